"""Gating figures of a ``metagate compare`` folder, per method, mean ± sample std over seeds: ACC, BWT, training
time, bytes a task adds, mask density and overlap (of what each method masks: hidden units, weights, modules),
zero-shot accuracy (mean over the tasks after the first, just before each is trained) and steps to 90% of a
task's final accuracy (runs with ``trainer.curve_every``).

    python experiments/piggyback_pathnet/summarize.py RUNS/split
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def ms(values: list[float | None], scale: float = 1.0, digits: int = 1) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    a = np.asarray(vals, dtype=float) * scale
    return f"{a.mean():.{digits}f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.{digits}f}"


def figures(r: dict) -> dict[str, float | None]:
    zs = [z for z in (r.get("zero_shot_acc") or [])[1:] if z is not None]
    steps = [s for s in (r.get("steps_to_90") or []) if s is not None]
    density = r.get("mask_density")
    return {
        "acc": r["acc"], "bwt": r["bwt"], "time": r["train_seconds"], "bytes": r.get("bytes_per_task"),
        "density": float(np.mean(density)) if density else None, "overlap": r.get("mask_overlap_mean"),
        "zs": float(np.mean(zs)) if zs else None, "steps": float(np.mean(steps)) if steps else None,
    }


def main(root: Path) -> None:
    header = ["method", "ACC (%)", "BWT (pt)", "time (s)", "bytes / task", "mask density (%)", "mask overlap (IoU)", "zero-shot (%)", "steps to 90%"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label in sorted(p.name for p in root.iterdir() if p.is_dir()):
        runs = [json.loads(f.read_text()) for f in sorted((root / label).glob("seed*/results.json"))]
        f = [figures(r) for r in runs]
        col = lambda k: [x[k] for x in f]  # noqa: E731
        print(f"| {label} ({len(runs)} seeds) | {ms(col('acc'), 100)} | {ms(col('bwt'), 100, 2)} | {ms(col('time'))} | {ms(col('bytes'), 1, 0)} | "
              f"{ms(col('density'), 100)} | {ms(col('overlap'), 1, 3)} | {ms(col('zs'), 100)} | {ms(col('steps'), 1, 0)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
