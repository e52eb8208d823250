"""Summarise experiments/mark_split_fmnist.sh: ACC, BWT, training seconds per task (mean ± std over seeds),
MARK's mask figures and what its meta phases did to the KB.

    python experiments/mark_summary.py runs/mark-split-fmnist
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def fmt(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    a = np.asarray([v for v in values if v is not None], dtype=float) * scale
    return f"{a.mean():.{digits}f} ± {a.std():.{digits}f}" if a.size else "-"


def main(root: Path) -> None:
    rows = []
    for results in sorted(root.glob("*/*/seed*/results.json")):
        rows.append((results.parent.parent.name, json.loads(results.read_text())))
    labels = list(dict.fromkeys(label for label, _ in rows))
    print("| method | seeds | ACC (%) | BWT (pt) | s / task | mask density | between-task cosine | meta: KB change (1e-4) | meta: alignment |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label in labels:
        rs = [r for lab, r in rows if lab == label]
        per_task = [float(np.mean(r["task_seconds"])) for r in rs if r.get("task_seconds")]
        density = [float(np.mean(r["mark_mask_sample_density"])) for r in rs if r.get("mark_mask_sample_density")]
        between = [r.get("mark_mask_between_task_cosine_mean") for r in rs]
        change = [float(np.nanmean([v for v in r["mark_meta_kb_change"] if v is not None] or [np.nan])) for r in rs if "mark_meta_kb_change" in r]
        align = [float(np.nanmean([v for v in r["mark_meta_alignment"] if v is not None] or [np.nan])) for r in rs if "mark_meta_alignment" in r]
        change = [c for c in change if not np.isnan(c)]
        align = [a for a in align if not np.isnan(a)]
        print(
            f"| {label} | {len(rs)} | {fmt([r['acc'] for r in rs], 100)} | {fmt([r['bwt'] for r in rs], 100)} | {fmt(per_task)} | "
            f"{fmt(density, 1, 2)} | {fmt([b for b in between if b is not None], 1, 2)} | {fmt(change, 1e4, 2)} | {fmt(align, 1, 2)} |"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
