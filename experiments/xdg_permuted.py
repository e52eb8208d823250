"""Evidence for XdG (issue 4): XdG alone, XdG + SI and XdG + EWC against SI, EWC, fine-tune and joint
on permuted Fashion-MNIST, over seeds; plus XdG's capacity (fraction of units per task, mask overlap).

Every method uses the same stream and the same MLP (``configs/xdg-small.yaml``: 10 tasks x 6000
images, 2 x 400, no dropout, 2 epochs, Adam 1e-3, batch 256), so the rows differ only by gating and
stabiliser. Stabiliser strengths are chosen on validation for plain SI (``c`` from ``SI_GRID``, xi =
0.1) and plain EWC (``lambda`` from ``EWC_GRID``) over tuning seeds 1000, 1001 (``metagate tune
--choose-only`` into ``<out>-tuning``), and used unchanged with gating; one more row runs XdG + SI with
the paper's own SI setting (c = 0.035, xi = 0.01). The table's runs use fresh seeds and report test.

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

from metagate.report import uses_at_test

SI_GRID = "3,30,300"
EWC_GRID = "0.3,3,30"


def variants(c: float, lam: float) -> dict[str, list[str]]:
    return {
        "finetune": ["method.name=finetune"],
        "ewc": [f"ewc:method.lambda={lam}"],
        "si": [f"si:method.c={c}", "si:method.xi=0.1"],
        "joint": [],
        "xdg": ["xdg:method.stabilizer=none"],
        "xdg-si": ["xdg-si:method.stabilizer=si", f"xdg-si:method.c={c}", "xdg-si:method.xi=0.1"],
        "xdg-ewc": ["xdg-ewc:method.stabilizer=ewc", f"xdg-ewc:method.ewc_lambda={lam}"],
        "xdg-si-paper": ["xdg-si-paper:method.c=0.035", "xdg-si-paper:method.xi=0.01"],
    }
METHOD_OF = {"xdg": "xdg", "xdg-si": "xdg", "xdg-ewc": "xdg", "xdg-si-paper": "xdg"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--config", default="xdg-small")
    p.add_argument("--tuning-seeds", type=int, default=2)
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = p.parse_args()
    metagate = str(Path(sys.executable).parent / "metagate")
    tuning = args.out.with_name(args.out.name + "-tuning")
    tune = [
        metagate, "tune", args.config, *args.overrides, "trainer.progress=false", "si:method.xi=0.1", "--methods", "si,ewc",
        "--grid", f"si:method.c={SI_GRID}", "--grid", f"ewc:method.lambda={EWC_GRID}",
        "--tuning-seeds", str(args.tuning_seeds), "--choose-only", "--out", str(tuning), "--resume",
    ]
    print("+", " ".join(tune), flush=True)
    subprocess.run(tune, check=True)
    chosen = json.loads((tuning / "tuning.json").read_text())["chosen"]
    c, lam = float(chosen["si"][0].split("=")[1]), float(chosen["ewc"][0].split("=")[1])
    VARIANTS = variants(c, lam)
    entries = ",".join(f"{k}={METHOD_OF[k]}" if k in METHOD_OF else k for k in VARIANTS)
    specific = [o for k, os_ in VARIANTS.items() for o in os_ if ":" in o]
    cmd = [
        metagate, "compare", args.config, *specific, *args.overrides,
        "--methods", entries, "--seeds", str(args.seeds), "--out", str(args.out), "--resume", "trainer.progress=false",
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    comp = json.loads((args.out / "comparison.json").read_text())
    rows = [
        "| method | uses at test | ACC (%) | BWT (pt) | forgetting (pt) | units used per task (%) | mask IoU between tasks |",
        "|---|---|---|---|---|---|---|",
    ]
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
        rows.append(f"| {label} | {uses_at_test(s.get('test_time_info'))} | {fmt('acc')} | {fmt('bwt')} | {fmt('forgetting')} | {cap[0]} | {cap[1]} |")
    table = "\n".join(rows)
    header = (
        f"Permuted Fashion-MNIST ({args.config}), test figures, mean ± std over seeds {comp['seeds']}; "
        f"SI c = {c:g} (from {SI_GRID}) and EWC lambda = {lam:g} (from {EWC_GRID}) chosen on validation accuracy "
        f"over tuning seeds 1000-{999 + args.tuning_seeds}, for plain SI and EWC, used unchanged with gating. "
        "Not like for like: the XdG rows predict each task with its own mask (task identity at test), the others use "
        "nothing; `method.heads=per_task` gives SI/EWC the same information.\n"
        f"Command: `python experiments/xdg_permuted.py --out {args.out} --seeds {args.seeds}"
        f"{''.join(' ' + repr(o) for o in args.overrides)}`\n\n"
    )
    (args.out / "table.md").write_text(header + table + "\n")
    print(header + table)


if __name__ == "__main__":
    main()
