"""metagate against XdG + SI on the synthetic gated teacher, with its controls and ablations (issue 5).

Runs, over seeds, on ``gated_teacher`` (domain-incremental, 10 tasks, defaults otherwise) with the
same one-hidden-layer MLP (256 units, no dropout), the same density (20% of units per task), the same
SI (c = 1, xi = 0.01, the XdG consolidation) and learning curves every 20 steps:

* ``xdg``: random fixed masks (XdG + SI);
* ``metagate``: masks from the context (default);
* ``shuffled`` / ``onehot``: the context controls (the gain must vanish);
* ``no-meta``: the agent only regresses old masks; ``no-adapt``: the zero-shot mask is kept.

Zero-shot quality ``Q = (zs - zs_xdg) / (final - zs_xdg)`` uses means over the later tasks
(``--from-task``, default 5: after at least five tasks have shaped the agent): ``zs`` the accuracy on a
task before training it, ``final`` the accuracy right after training it; ``zs_xdg`` XdG's zero-shot
accuracy on the same tasks and seed. ``steps_to_90``: steps until 90% of the task's final accuracy.

    .venv/bin/python experiments/metagate_gated.py --out runs/metagate-gated [--seeds 3] [key=value ...]

Writes ``table.md`` and ``comparison.json`` (and the run folders) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

COMMON = [
    "benchmark.name=gated_teacher", "benchmark.num_tasks=10", "benchmark.scenario=domain",
    "method.backbone.hidden=[256]", "method.backbone.dropout=0.0", "trainer.epochs=3", "trainer.curve_every=20",
]
VARIANTS = {
    "xdg": ("xdg", ["method.c=1", "method.input_dropout=0.0", "method.gate_fraction=0.8"]),
    "metagate": ("metagate", ["method.c=1"]),
    "shuffled": ("metagate", ["method.c=1", "method.context_mode=shuffled"]),
    "onehot": ("metagate", ["method.c=1", "method.context_mode=onehot"]),
    "no-meta": ("metagate", ["method.c=1", "method.meta_learning=false"]),
    "no-adapt": ("metagate", ["method.c=1", "method.adapt=false"]),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--from-task", type=int, default=5)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    entries = ",".join(f"{k}={m}" for k, (m, _) in VARIANTS.items())
    specific = [f"{k}:{o}" for k, (_, os_) in VARIANTS.items() for o in os_]
    cmd = [str(Path(sys.executable).parent / "metagate"), "compare", *COMMON, *specific, *args.overrides,
           "--methods", entries, "--seeds", str(args.seeds), "--out", str(args.out), "--resume", "trainer.progress=false"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    comp = json.loads((args.out / "comparison.json").read_text())
    k = args.from_task
    runs = {label: {json.loads((Path(r) / "results.json").read_text())["seed"]: json.loads((Path(r) / "results.json").read_text())
                    for r in e["runs"]} for label, e in comp["methods"].items()}

    def figures(r: dict, x: dict) -> dict:
        fin = [r["acc_matrix"][t][t] for t in range(r["num_tasks"])]
        zs, zs_x = np.mean(r["zero_shot_acc"][k:]), np.mean(x["zero_shot_acc"][k:])
        return {"acc": r["acc"], "bwt": r["bwt"], "zs": zs, "final": np.mean(fin[k:]),
                "q": (zs - zs_x) / (np.mean(fin[k:]) - zs_x), "s90": np.mean(r["steps_to_90"][k:]),
                "s90x": np.mean(x["steps_to_90"][k:]), "ovl": r["mask_overlap_mean"],
                "orc": r.get("oracle_overlap_correlation") or float("nan")}

    rows = ["| variant | ACC (%) | BWT (pt) | zero-shot (%) | just trained (%) | Q | steps to 90% | XdG steps / these | mask IoU | IoU vs oracle IoU (r) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for label in VARIANTS:
        f = [figures(runs[label][s], runs["xdg"][s]) for s in runs[label]]
        m = lambda key, scale=1.0: f"{scale * np.mean([x[key] for x in f]):.{1 if scale != 1.0 else 2}f} ± {scale * np.std([x[key] for x in f], ddof=1 if len(f) > 1 else 0):.{1 if scale != 1.0 else 2}f}"  # noqa: E731
        ratio = np.mean([x["s90x"] / x["s90"] for x in f])
        q = "n/a" if label == "xdg" else m("q")
        rows.append(f"| {label} | {m('acc', 100)} | {m('bwt', 100)} | {m('zs', 100)} | {m('final', 100)} | {q} | "
                    f"{np.mean([x['s90'] for x in f]):.0f} | {ratio:.2f} | {np.mean([x['ovl'] for x in f]):.2f} | {np.mean([x['orc'] for x in f]):.2f} |")
    header = (f"Gated teacher (domain-incremental, 10 tasks), seeds {comp['seeds']}; zero-shot, just-trained, Q and "
              f"steps over tasks {k}..9.\nCommand: `python experiments/metagate_gated.py --out {args.out} --seeds {args.seeds}"
              f"{''.join(' ' + repr(o) for o in args.overrides)}`\n\n")
    (args.out / "table.md").write_text(header + "\n".join(rows) + "\n")
    print(header + "\n".join(rows))


if __name__ == "__main__":
    main()
