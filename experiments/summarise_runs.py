"""A Markdown table of finished run folders grouped into rows (mean ± std over each row's runs): what each
method used at test, the scenario, the device and budget, ACC, BWT, task-inference accuracy (where the
method infers the task) and training time. For results made elsewhere (a GPU machine, another worktree):

    python experiments/summarise_runs.py --title "HyperMask, split Fashion-MNIST" \\
        "hypermask, task given=runs/gpu/hypermask-split-given-s*" "xdg + SI=runs/cmp/split/xdg/seed*" > table.md

Each row is ``label=glob`` (a glob of run folders holding results.json); the table's first line names the command.
"""

from __future__ import annotations

import argparse
import glob
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from metagate.report import uses_at_test  # noqa: E402


def mean_sd(values: list[float], scale: float = 100.0) -> str:
    if not values:
        return "n/a"
    v = scale * np.asarray(values, dtype=float)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"


def row(label: str, folders: list[Path]) -> list[str]:
    runs: list[dict[str, Any]] = [json.loads((f / "results.json").read_text()) for f in folders]
    cfgs = [yaml.safe_load((f / "config.yaml").read_text()) for f in folders]
    first, trainer = runs[0], cfgs[0]["trainer"]
    budget = f"{trainer['iterations_per_task']} it" if trainer.get("iterations_per_task") else f"{trainer['epochs']} ep"
    inferred = [float(np.mean(r["task_inference_acc"])) for r in runs if r.get("task_inference_acc")]
    return [
        label, uses_at_test(first.get("test_time_info")), str(first.get("scenario")), str(first.get("num_tasks")),
        f"{budget} x batch {trainer['batch_size']}", str(first.get("device")), f"{sorted(r['seed'] for r in runs)}",
        mean_sd([r["acc"] for r in runs]), mean_sd([r["bwt"] for r in runs]), mean_sd(inferred),
        mean_sd([r["train_seconds"] for r in runs], 1.0),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--title", required=True)
    p.add_argument("rows", nargs="+", help="label=glob of run folders")
    args = p.parse_args()
    cols = ["method", "uses at test", "scenario", "tasks", "budget per task", "device", "seeds", "ACC (%)", "BWT (pt)",
            "task inference (%)", "train time (s)"]
    lines = [f"**{args.title}** (test figures; `python experiments/summarise_runs.py` over the run folders below)", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    sources, uses = [], set()
    for spec in args.rows:
        label, _, pattern = spec.partition("=")
        folders = sorted(Path(f) for f in glob.glob(pattern) if (Path(f) / "results.json").is_file())
        if not folders:
            raise SystemExit(f"no finished run folder matches {pattern!r} (row {label!r})")
        cells = row(label, folders)
        uses.add(cells[1])
        lines.append("| " + " | ".join(cells) + " |")
        sources.append(f"{label}: `{pattern}`")
    if len(uses) > 1:
        lines += ["", f"Not like for like: these methods use different information at test time ({', '.join(sorted(uses))}); "
                      "compare within the same 'uses at test'."]
    lines += ["", "Run folders: " + "; ".join(sources) + ".", ""]
    print("\n".join(lines))
    print(f"<!-- {shlex.join(['python', 'experiments/summarise_runs.py', *sys.argv[1:]])} -->")


if __name__ == "__main__":
    main()
