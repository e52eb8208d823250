"""Evidence for XdG (issue 4): XdG alone, XdG + SI and XdG + EWC against SI, EWC, fine-tune and joint
on permuted Fashion-MNIST, over seeds; plus XdG's capacity (fraction of units per task, mask overlap).

Every method uses the same stream and the same MLP (``configs/xdg-small.yaml``: 10 tasks x 6000
images, 2 x 400, no dropout, 2 epochs, Adam 1e-3, batch 256), so the rows differ only by gating and
stabiliser. Stabiliser strengths: those tuned for plain SI (c = 30, xi = 0.1) and EWC (lambda = 3)
on this stream (``configs/permuted-fmnist.yaml``), used unchanged with gating; one more row runs
XdG + SI with the paper's own SI setting (c = 0.035, xi = 0.01).

    .venv/bin/python experiments/xdg_permuted.py --out runs/xdg-permuted [--seeds 3]

Writes ``table.md`` (and ``comparison.json`` and the run folders) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

VARIANTS = {
    "finetune": ["method.name=finetune"],
    "ewc": ["ewc:method.lambda=3"],
    "si": ["si:method.c=30", "si:method.xi=0.1"],
    "joint": [],
    "xdg": ["xdg:method.stabilizer=none"],
    "xdg-si": ["xdg-si:method.stabilizer=si"],
    "xdg-ewc": ["xdg-ewc:method.stabilizer=ewc", "xdg-ewc:method.ewc_lambda=3"],
    "xdg-si-paper": ["xdg-si-paper:method.c=0.035", "xdg-si-paper:method.xi=0.01"],
}
METHOD_OF = {"xdg": "xdg", "xdg-si": "xdg", "xdg-ewc": "xdg", "xdg-si-paper": "xdg"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--config", default="xdg-small")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = p.parse_args()
    entries = ",".join(f"{k}={METHOD_OF[k]}" if k in METHOD_OF else k for k in VARIANTS)
    specific = [o for k, os_ in VARIANTS.items() for o in os_ if ":" in o]
    cmd = [
        str(Path(sys.executable).parent / "metagate"), "compare", args.config, *specific, *args.overrides,
        "--methods", entries, "--seeds", str(args.seeds), "--out", str(args.out), "--resume", "trainer.progress=false",
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    comp = json.loads((args.out / "comparison.json").read_text())
    rows = ["| method | ACC (%) | BWT (pt) | forgetting (pt) | units used per task (%) | mask IoU between tasks |", "|---|---|---|---|---|---|"]
    for label, entry in comp["methods"].items():
        s = entry["summary"]
        fmt = lambda k: f"{100 * s[k]['mean']:.1f} ± {100 * s[k]['std']:.1f}"  # noqa: E731
        runs = [json.loads((Path(r) / "results.json").read_text()) for r in entry["runs"]]
        if "mask_density" in runs[0]:
            dens = np.mean([np.mean(r["mask_density"]) for r in runs])
            ovl = np.mean([r["mask_overlap_mean"] for r in runs])
            cap = (f"{100 * dens:.1f}", f"{ovl:.3f}")
        else:
            cap = ("100", "1")
        rows.append(f"| {label} | {fmt('acc')} | {fmt('bwt')} | {fmt('forgetting')} | {cap[0]} | {cap[1]} |")
    table = "\n".join(rows)
    header = (
        f"Permuted Fashion-MNIST ({args.config}), mean ± std over seeds {comp['seeds']}.\n"
        f"Command: `python experiments/xdg_permuted.py --out {args.out} --seeds {args.seeds}"
        f"{''.join(' ' + repr(o) for o in args.overrides)}`\n\n"
    )
    (args.out / "table.md").write_text(header + table + "\n")
    print(header + table)


if __name__ == "__main__":
    main()
