"""Copy the summaries of a finished sweep (or compare, or any folder of runs) into the repository.

    python scripts/collect_results.py runs/<experiment> results/<experiment>

For every run folder below the sweep's folder (one holding ``results.json``), copies its ``results.json`` and
``config.yaml`` to the same place below the target (``<variant>/seed<k>/``; a tuned sweep's ``final/`` and
``tuning/`` runs both), and the sweep's ``tuning.json`` and ``sweep.yaml`` beside them: what
``metagate aggregate`` and ``scripts/update_docs.py`` read, and nothing else (no checkpoints, logs, reports).
Failed attempts (``seedN.failed-K``) are left out. The home folder and the working folder in the copied text
are written ``~`` and ``.``; any other absolute path under a user's or a machine's own folders (under ``/work``,
``/tmp``, ``/home``, ...) is refused, since the copies are committed. The target must not exist yet (``--replace``: it is
emptied first).
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from pathlib import Path

KEPT_RUN_FILES = ("results.json", "config.yaml")
KEPT_TOP_FILES = ("tuning.json", "sweep.yaml")
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|home|tmp|root|Users|mnt|scratch|var/folders|private)/")
MAX_BYTES = 1_000_000


def scrub(text: str) -> str:
    for folder, short in ((Path.cwd().resolve(), "."), (Path.home().resolve(), "~")):
        text = text.replace(str(folder) + "/", short + "/").replace(str(folder), short)
    return text


def collect(source: Path, target: Path) -> list[Path]:
    """Copy the summaries; returns the files written (relative to ``target``)."""
    runs = sorted(p.parent for p in source.rglob("results.json") if not any(".failed-" in part for part in p.parts))
    if not runs:
        raise SystemExit(f"no finished run (results.json) below {source}")
    written = []
    pairs = [(run / name, run.relative_to(source) / name) for run in runs for name in KEPT_RUN_FILES]
    pairs += [(source / name, Path(name)) for name in KEPT_TOP_FILES]
    for src, rel in pairs:
        if not src.is_file():
            continue
        text = scrub(src.read_text())
        bad = MACHINE_PATH.search(text)
        if bad:
            line = text[: bad.start()].count("\n") + 1
            raise SystemExit(f"{src}, line {line}, holds an absolute path of this machine ({text[bad.start():bad.start() + 60]!r}); "
                             "rerun with a relative --out / data folder, or edit it out")
        if len(text.encode()) > MAX_BYTES:
            raise SystemExit(f"{src} is {len(text.encode())} bytes; summaries are meant to be small (under {MAX_BYTES})")
        out = target / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        written.append(rel)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path, help="the sweep's --out folder (runs/<experiment>)")
    p.add_argument("target", type=Path, help="results/<experiment>")
    p.add_argument("--replace", action="store_true", help="empty the target first")
    args = p.parse_args()
    if not args.source.is_dir():
        raise SystemExit(f"{args.source} is not a folder; name the sweep's --out folder")
    if args.target.exists():
        if not args.replace:
            raise SystemExit(f"{args.target} exists; pass --replace to empty it first")
        shutil.rmtree(args.target)
    written = collect(args.source, args.target)
    runs = sum(1 for w in written if w.name == "results.json")
    size = sum((args.target / w).stat().st_size for w in written)
    print(f"{runs} runs, {len(written)} files, {size / 1024:.0f} KiB -> {args.target}")


if __name__ == "__main__":
    sys.exit(main())
