"""The gating family's table from committed run summaries (``results/gating-<stream>/<variant>/seed<k>/results.json``),
per variant mean ± sample std over seeds: ACC, BWT, bytes a task adds, what the method uses at test time, task
inference accuracy (SupSup one-shot), zero-shot accuracy (mean over the tasks after the first, just before each is
trained), steps to 90% of a task's final accuracy, training time.

    python experiments/gating/summarize.py results/gating-permuted
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
    return {
        "acc": r["acc"], "bwt": r["bwt"], "bytes": r.get("bytes_per_task"), "infer": r.get("task_inference_acc_mean"),
        "zs": float(np.mean(zs)) if zs else None, "steps": float(np.mean(steps)) if steps else None, "time": r["train_seconds"],
    }


def main(root: Path) -> None:
    header = ["variant", "ACC (%)", "BWT (pt)", "bytes / task", "test-time info", "task inference (%)", "zero-shot (%)", "steps to 90%", "time (s)"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for label in sorted(p.name for p in root.iterdir() if p.is_dir()):
        runs = [json.loads(f.read_text()) for f in sorted((root / label).glob("seed*/results.json"))]
        if not runs:
            continue
        f = [figures(r) for r in runs]
        col = lambda k: [x[k] for x in f]  # noqa: E731
        info = "/".join(sorted({r["test_time_info"] for r in runs}))
        print(f"| {label} ({len(runs)} seeds) | {ms(col('acc'), 100)} | {ms(col('bwt'), 100, 2)} | {ms(col('bytes'), 1, 0)} | {info} | "
              f"{ms(col('infer'), 100)} | {ms(col('zs'), 100)} | {ms(col('steps'), 1, 0)} | {ms(col('time'), 1, 0)} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
