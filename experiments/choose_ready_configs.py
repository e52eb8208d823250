"""Choose the ready configs' strengths on validation and write each choice, with how it was made, into
the config file (the value and its comment; nothing else in the file changes).

For each entry below: ``metagate tune CONFIG --methods M --grid M:KEY=... --tuning-seeds 2
--choose-only`` (mean validation accuracy over tuning seeds 1000, 1001; test accuracy is never read),
then the config's line ``KEY: value  # comment`` is rewritten with the chosen value. Entries whose
tuning needs data that is not on this machine are skipped with a message and keep their line.

    .venv/bin/python experiments/choose_ready_configs.py --out runs/ready-configs [--only NAME,...]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from metagate.catalog import CONFIG_DIR


@dataclass
class Entry:
    config: str
    method: str  # the section's method name (the config's own method, or its reference)
    key: str  # dotted override key, e.g. method.c
    grid: list[float]
    extra: list[str] = field(default_factory=list)  # overrides used while choosing (said in the comment)
    section: str = "method"  # where the line lives: method or reference
    note: str = ""


ENTRIES = [
    Entry("gated-teacher-task", "si", "method.c", [0.1, 1.0, 10.0, 100.0]),
    Entry("rotated-teacher", "ewc", "method.lambda", [10.0, 100.0, 1000.0]),
    Entry("digits-permuted", "si", "method.c", [1.0, 10.0, 100.0]),
    Entry("digits-rotated", "ewc", "method.lambda", [1.0, 10.0, 100.0, 1000.0]),
    Entry("digits-split", "si", "method.c", [1.0, 10.0, 100.0]),
    Entry("split-fmnist", "si", "method.c", [1.0, 10.0, 100.0, 1000.0]),
    Entry("rotated-fmnist", "ewc", "method.lambda", [10.0, 100.0, 1000.0], ["benchmark.train_per_task=4000"], note="4000 images per task while choosing"),
    Entry("permuted-fmnist", "si", "method.c", [3.0, 30.0, 300.0], ["benchmark.train_per_task=10000"], note="10000 images per task while choosing"),
]


def tune(entry: Entry, out: Path) -> tuple[float, dict[str, float]] | None:
    metagate = str(Path(sys.executable).parent / "metagate")
    grid = ",".join(f"{v:g}" for v in entry.grid)
    cmd = [
        metagate, "tune", entry.config, "reference=null", "trainer.progress=false", *entry.extra,
        "--methods", entry.method, "--grid", f"{entry.method}:{entry.key}={grid}",
        "--tuning-seeds", "2", "--choose-only", "--out", str(out), "--resume",
    ]
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"skipped {entry.config}: {(done.stderr or done.stdout).strip().splitlines()[-1]}", flush=True)
        return None
    record = json.loads((out / "tuning.json").read_text())
    chosen = float(record["chosen"][entry.method][0].split("=")[1])
    scores = {k: v["mean"] for k, v in record["validation"].items()}
    return chosen, scores


def rewrite(entry: Entry, value: float, scores: dict[str, float]) -> None:
    path = CONFIG_DIR / f"{entry.config}.yaml"
    key = entry.key.split(".")[-1]
    lines = path.read_text().splitlines(keepends=True)
    section, done = None, False
    for i, line in enumerate(lines):
        top = re.match(r"^(\w+):", line)
        if top:
            section = top.group(1)
        m = re.match(rf"^(\s+){re.escape(key)}:\s*[^#\n]*(#.*)?$", line)
        if m and section == entry.section and not done:
            val = ", ".join(f"{s * 100:.1f}" for s in scores.values())
            how = (f"chosen on validation: best of {', '.join(f'{v:g}' for v in entry.grid)} by mean val_acc "
                   f"({val}%) over tuning seeds 1000-1001{'; ' + entry.note if entry.note else ''} "
                   "(experiments/choose_ready_configs.py)")
            lines[i] = f"{m.group(1)}{key}: {value:g}  # {how}\n"
            done = True
    if not done:
        raise SystemExit(f"{path} has no line '{key}:' in its {entry.section} section")
    path.write_text("".join(lines))
    print(f"{entry.config}: {entry.key} = {value:g}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", default="", help="comma-separated config names")
    args = p.parse_args()
    only = {s for s in args.only.split(",") if s}
    for entry in ENTRIES:
        if only and entry.config not in only:
            continue
        result = tune(entry, args.out / entry.config)
        if result is not None:
            rewrite(entry, *result)


if __name__ == "__main__":
    main()
