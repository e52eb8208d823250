"""metagate's cost (issue 13, item 2): its training time against XdG + SI's on the default benchmark, and its
time per task along a 100-task stream, with the stored-mask batches (``reg_batch``, ``consolidation_batch``)
against regularising and consolidating over every stored mask.

1. The default run (``configs/default.yaml``: metagate and its XdG + SI reference on the composed teacher):
   both trained through the Trainer, alternated ``--repeats`` times so drift hits both; printed: each one's
   median ``train_seconds`` (training loop and before/after-task hooks, metagate's consolidation included;
   evaluation not counted) and the ratio metagate / XdG + SI (target <= 1.5).
2. Time per task over ``--tasks`` tasks (default 100) of the composed teacher (3 factors x 6 values, the
   default's student and metagate settings): each task gets ``--steps`` training steps, then ``after_task``
   (the consolidation); the mean seconds per task over the first, middle and last 10 tasks, and last / first
   (flat: about 1), for the default's batches and for ``reg_batch=0 consolidation_batch=0`` (every stored
   mask each step: grows with the tasks), the two run task by task in turn.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/metagate_cost.py [--repeats 3] [--tasks 100] [--steps 50] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from metagate.config import load_config
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.base import Batch
from metagate.runs import RunDir
from metagate.train import Trainer, task_seed


def default_run_seconds(repeats: int, overrides: list[str]) -> None:
    cfg = load_config("default", ["trainer.progress=false", "trainer.checkpoint=false", *overrides])
    ref = cfg.reference_configs()[0]
    times: dict[str, list[float]] = {cfg.method.name: [], f"{ref.method.name} (reference)": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for label, c in zip(times, (cfg.model_copy(update={"reference": None}), ref)):
                results = Trainer(c, RunDir.create(Path(tmp) / f"{i}-{label.split()[0]}")).fit()
                times[label].append(results["train_seconds"])
    med = {k: statistics.median(v) for k, v in times.items()}
    a, b = med.values()
    print(f"default run ({cfg.benchmark.name}, {cfg.benchmark.num_tasks} tasks), median of {repeats}: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in med.items()) + f"; metagate / XdG + SI = {a / b:.2f} (target <= 1.5)")


def seconds_per_task(tasks: int, steps: int, variants: dict[str, list[str]]) -> dict[str, list[float]]:
    """Seconds per task (``steps`` training steps, then ``after_task``) of each variant, the variants run task by
    task in turn, so that the machine's drift hits all alike."""
    methods = {}
    for label, overrides in variants.items():
        cfg = load_config("default", [f"benchmark.num_tasks={tasks}", "benchmark.novel_tasks=10", "benchmark.train_per_task=256",
                                      "benchmark.test_per_task=8", *overrides])
        stream = build_stream(cfg.benchmark, 0)
        torch.manual_seed(task_seed(0, -1))
        methods[label] = (create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")).train(), stream)
    out: dict[str, list[float]] = {label: [] for label in variants}
    for t in range(tasks):
        for label, (method, stream) in methods.items():
            task = stream.tasks[t]
            start = time.perf_counter()
            method.before_task(task)
            for s in range(steps):
                i = (s * 64) % (task.num_train - 64)
                method.train_step(Batch(task.x_train[i : i + 64], task.y_train[i : i + 64]), task)
            method.after_task(task)
            out[label].append(time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--steps", type=int, default=50, help="training steps per task in part 2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=["default", "per-task"], default=None)
    p.add_argument("overrides", nargs="*", help="dotted overrides of the default config (e.g. method.consolidation_steps=20)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()}")
    if args.only in (None, "default"):
        default_run_seconds(args.repeats, args.overrides)
    if args.only in (None, "per-task"):
        times = seconds_per_task(args.tasks, args.steps, {
            "stored-mask batches (default)": args.overrides,
            "every stored mask": [*args.overrides, "method.reg_batch=0", "method.consolidation_batch=0"],
        })
        for label, t in times.items():
            first, mid, last = (statistics.mean(t[a : a + 10]) for a in (0, len(t) // 2 - 5, len(t) - 10))
            print(f"{label:32s} s/task: tasks 1-10 {first:.3f}, middle 10 {mid:.3f}, last 10 {last:.3f}; last / first {last / first:.2f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
