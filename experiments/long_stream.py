"""Generalisation to future tasks as the stream grows (issue 12.2): zero-shot accuracy and Q against
the number of tasks already learned, on a 100-task composed-teacher stream.

Variants (same student, density, SI and budget as ``experiments/metagate_benchmarks.py``'s composed
stream): XdG + SI, the oracle (the teacher's masks), ``nearest_context`` (the nearest earlier task's
mask), metagate and its shuffled-context control. SI's ``c`` and metagate's ``prior`` are the values
that stream chose on validation (read from its tuning folders, ``--tuning``); nothing is chosen here.

Per task ``t``: ``zs`` (accuracy before training it), ``final`` (right after), and, for every
``--scratch-every``-th task, the same task trained alone from scratch with its oracle mask on the same
budget (``scratch``: what Q's denominator can be compared with; Q alone can rise because ``final``
falls). Q over a sliding window of ``--window`` tasks ending at ``t``:
``Q = (zs - zs_xdg) / (final - zs_xdg)`` (means over the window, per seed, then the seeds' mean).

    .venv/bin/python experiments/long_stream.py --out runs/long-stream --tuning runs/metagate [--tasks 100] [--seeds 3]

Writes ``<out>/table.md`` and ``<out>/q_vs_tasks_seen.png``; finished runs are reused (``--resume``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from metagate.config import load_config  # noqa: E402
from metagate.data.stream import Stream  # noqa: E402
from metagate.train import Trainer  # noqa: E402

COMMON = ["method.backbone.kind=mlp", "method.backbone.dropout=0.0", "method.backbone.hidden=[209]", "trainer.curve_every=10",
          "reference=null", "trainer.progress=false"]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "xdg": ("xdg", ["method.input_dropout=0.0", "method.gate_fraction=0.842"]),
    "oracle": ("oracle", []),
    "nearest": ("nearest_context", []),
    "metagate": ("metagate", ["method.density=0.158"]),
    "shuffled": ("metagate", ["method.density=0.158", "method.context_mode=shuffled"]),
}


def chosen(tuning: Path) -> tuple[float, float]:
    """SI's c and metagate's prior, as the composed stream chose them on validation."""
    c = json.loads((tuning / "composed-tuning-c" / "tuning.json").read_text())["chosen"]["xdg"][0]
    prior = json.loads((tuning / "composed-tuning-prior" / "tuning.json").read_text())["chosen"]["metagate"][0]
    return float(c.split("=")[1]), float(prior.split("=")[1])


def scratch(overrides: list[str], seed: int, tasks: list[int]) -> dict[int, float]:
    """Test accuracy of each of ``tasks`` trained alone from scratch with its oracle mask, same budget."""
    cfg = load_config("composed-teacher", [*overrides, "method.name=oracle", f"seed={seed}", "trainer.checkpoint=false"])
    base = Trainer(cfg)
    s = base.stream
    out = {}
    for t in tasks:
        trainer = Trainer(cfg)
        trainer.stream = Stream(s.name, [replace(s.tasks[t], index=0)], s.input_shape, s.num_outputs, s.scenario, s.context_dim)
        torch.manual_seed(seed)
        trainer.method = type(trainer.method)(cfg.method, trainer.stream, cfg.trainer, trainer.device)  # type: ignore[arg-type]
        out[t] = trainer.fit()["acc_matrix"][0][0]
    return out


def window_means(x: np.ndarray, w: int) -> np.ndarray:
    """Mean over tasks ``t - w + 1 .. t`` for ``t = w - 1 .. T - 1`` (last axis)."""
    c = np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 1) + [(1, 0)]), axis=-1)
    return (c[..., w:] - c[..., :-w]) / w


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tuning", type=Path, required=True, help="metagate_benchmarks.py's --out (its composed tuning folders)")
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--scratch-every", type=int, default=10, help="every n-th task is also trained alone from scratch")
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for every run")
    args = p.parse_args()
    c, prior = chosen(args.tuning)
    stream_opts = [f"benchmark.num_tasks={args.tasks}", *COMMON, *args.overrides]
    specific = [f"{k}:{o}" for k, (m, opts) in VARIANTS.items()
                for o in [*opts, f"method.c={c}", "method.xi=0.01", *([f"method.prior={prior}"] if m == "metagate" else [])]]
    cmd = [str(Path(sys.executable).parent / "metagate"), "compare", "composed-teacher", *stream_opts, *specific,
           "--methods", ",".join(f"{k}={m}" for k, (m, _) in VARIANTS.items()), "--seeds", str(args.seeds),
           "--out", str(args.out), "--resume"]
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    comp = json.loads((args.out / "comparison.json").read_text())
    runs: dict[str, list[dict[str, Any]]] = {
        k: [json.loads((Path(f) / "results.json").read_text()) for f in comp["methods"][k]["runs"]] for k in VARIANTS
    }
    zs = {k: np.array([r["zero_shot_acc"] for r in rs]) for k, rs in runs.items()}  # [seeds, tasks]
    fin = {k: np.array([[r["acc_matrix"][t][t] for t in range(r["num_tasks"])] for r in rs]) for k, rs in runs.items()}
    seeds = [r["seed"] for r in runs["xdg"]]
    cache = args.out / "scratch.json"
    done: dict[str, dict[str, float]] = json.loads(cache.read_text()) if cache.exists() else {}
    picks = list(range(args.scratch_every - 1, args.tasks, args.scratch_every))
    for seed in seeds:
        if str(seed) not in done:
            done[str(seed)] = {str(t): a for t, a in scratch(stream_opts + VARIANTS["oracle"][1] + [f"method.c={c}", "method.xi=0.01"], seed, picks).items()}
            cache.write_text(json.dumps(done))
    scratch_acc = np.array([[done[str(s)][str(t)] for t in picks] for s in seeds])
    w = args.window
    zs_x = window_means(zs["xdg"], w)
    q = {k: ((window_means(zs[k], w) - zs_x) / (window_means(fin[k], w) - zs_x)).mean(0) for k in VARIANTS if k != "xdg"}
    ends = np.arange(w - 1, args.tasks)  # window [t - w + 1, t]; tasks seen before its last task: t
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for k, v in q.items():
        a1.plot(ends, v, label=k)
    a1.axhline(0, color="k", lw=0.5)
    a1.set(xlabel="tasks learned before the window's last task", ylabel=f"Q over the last {w} tasks", title="Zero-shot quality as the stream grows")
    for k in VARIANTS:
        a2.plot(ends, 100 * window_means(zs[k], w).mean(0), label=f"{k} zero-shot")
    a2.plot(ends, 100 * window_means(fin["oracle"], w).mean(0), "k--", lw=1, label="oracle just trained")
    a2.plot(ends, 100 * window_means(fin["xdg"], w).mean(0), "k:", lw=1, label="XdG + SI just trained")
    a2.plot(picks, 100 * scratch_acc.mean(0), "ks", ms=4, label="alone from scratch (oracle mask)")
    a2.set(xlabel="task", ylabel=f"accuracy (%, mean of {w} tasks)", title="Zero-shot, just trained, from scratch")
    for a in (a1, a2):
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "q_vs_tasks_seen.png", dpi=120)
    plt.close(fig)
    blocks = [(b, min(b + w, args.tasks)) for b in range(0, args.tasks, w)]
    head = ["tasks", *[f"Q {k}" for k in q], *[f"zero-shot {k} (%)" for k in VARIANTS], "just trained: oracle / XdG (%)", "alone from scratch (%)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for lo, hi in blocks:
        ts = list(range(max(lo, 1), hi))
        zx = zs["xdg"][:, ts].mean(1)
        qs = [np.mean((zs[k][:, ts].mean(1) - zx) / (fin[k][:, ts].mean(1) - zx)) for k in q]
        sc = [i for i, t in enumerate(picks) if lo <= t < hi]
        cells = [f"{lo}-{hi - 1}", *[f"{v:.2f}" for v in qs], *[f"{100 * zs[k][:, ts].mean():.1f}" for k in VARIANTS],
                 f"{100 * fin['oracle'][:, ts].mean():.1f} / {100 * fin['xdg'][:, ts].mean():.1f}",
                 f"{100 * scratch_acc[:, sc].mean():.1f}" if sc else "n/a"]
        rows.append("| " + " | ".join(cells) + " |")
    text = (f"Composed teacher, {args.tasks} tasks, seeds {seeds} (test; every method uses the task's identity at test). "
            f"SI c = {c:g}, metagate prior = {prior:g}, both chosen on validation on the 50-task stream "
            f"(`experiments/metagate_benchmarks.py`). Q per block of {w} tasks (means over the block's tasks, per seed, then over seeds; "
            f"the first block from task 1); 'alone from scratch': tasks {picks[0]}, {picks[0] + args.scratch_every}, ... trained alone "
            f"with their oracle mask on the same budget.\n\n    python experiments/long_stream.py --out {args.out} --tuning {args.tuning} "
            f"--tasks {args.tasks} --seeds {args.seeds}\n\n" + "\n".join(rows) + "\n")
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
