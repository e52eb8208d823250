"""No absolute path of a machine in what the repository shows and ships: the README, the docs, the configs, the
experiments, the committed run summaries and the scripts."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ["README.md", "docs", "configs", "src/metagate/configs", "experiments", "results", "scripts", "benchmarks"]
TEXT = {".md", ".yaml", ".yml", ".json", ".py", ".sh", ".txt", ".toml", ".jsonl"}
# a user's or a machine's own folders; system locations that are the same everywhere (Debian's
# /usr/share/datasets, where its dataset packages put the data) are not machine paths
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|tmp|root|Users|mnt|scratch|data|private|var/folders)/")


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix in TEXT and "__pycache__" not in p.parts]
    return files


def machine_paths(text: str) -> list[str]:
    return [text[m.start():m.start() + 50].split()[0] for m in MACHINE_PATH.finditer(text)]


def test_the_pattern_finds_machine_paths_and_leaves_generic_ones() -> None:
    assert machine_paths("runs in /work/runs13/bench and /home/me/x and `/tmp/rep`") == ["/work/runs13/bench", "/home/me/x", "/tmp/rep`"]
    assert machine_paths("Debian's /usr/share/datasets/fashion-mnist, runs/x, ~/.cache/metagate, sqlite:///runs/mlflow.db") == []


def test_no_absolute_machine_path_in_readme_docs_configs_experiments_results_or_scripts() -> None:
    files = scanned_files()
    assert any(f.name == "README.md" for f in files) and any("results" in f.parts for f in files)
    found = {str(f.relative_to(ROOT)): machine_paths(f.read_text(errors="replace")) for f in files}
    found = {f: paths for f, paths in found.items() if paths}
    assert not found, f"absolute machine paths (write them relative to the repository, or ~): {found}"
