"""metagate's cost (issue 13, item 2): its training time against XdG + SI's on the default benchmark, and its
time per task along a 100-task stream, with the stored-mask batches (``reg_batch``, ``consolidation_batch``)
against regularising and consolidating over every stored mask.

1. The default run (``configs/default.yaml``: metagate and its XdG + SI reference on the composed teacher):
   both trained through the Trainer, alternated ``--repeats`` times so drift hits both; printed: each one's
   median ``train_seconds`` (training loop and before/after-task hooks, metagate's consolidation included;
   evaluation not counted) and the ratio metagate / XdG + SI (target <= 1.5). ``--clock cpu`` times the runs by
   the process's CPU time instead of the wall clock (with one torch thread, what the run itself cost, whatever
   else the shared machine runs; the trainer's clock is swapped for ``time.process_time`` in this process).
2. Time per task over ``--tasks`` tasks (default 100) of the composed teacher (3 factors x 6 values, the
   default's student and metagate settings): each task gets ``--steps`` training steps, then ``after_task``
   (the consolidation); the mean seconds per task over the first, middle and last 10 tasks, and last / first
   (flat: about 1), for the default's batches and for ``reg_batch=0 consolidation_batch=0`` (every stored
   mask each step: grows with the tasks), the two run task by task in turn.
3. Where the time goes (``--only components``): XdG + SI and metagate (the default's settings, then with the agent's
   in-task updates off, ``agent_every`` past the task's length, and with ``consolidation_steps=0``) on the default's
   first ``--component-tasks`` tasks, each step and hook timed by the process's CPU time: training steps,
   ``after_task`` (the consolidation), and the ratio to XdG + SI, so that the in-task agent updates' share and the
   consolidation's share of the overhead are read off one run.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/metagate_cost.py [--repeats 3] [--clock cpu] [--only default|components|per-task] [--tasks 100] [--steps 50] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
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


PRINTED: list[str] = []  # every line printed, for --md


def say(line: str) -> None:
    print(line)
    PRINTED.append(line)


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
    say(f"default run ({cfg.benchmark.name}, {cfg.benchmark.num_tasks} tasks), median of {repeats}: "
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


def components(tasks: int, overrides: list[str]) -> None:
    """CPU seconds of the training steps and of ``after_task``, per variant, on the default stream's first tasks."""
    variants: dict[str, list[str] | None] = {  # None: the default run's XdG + SI reference, as part 1 trains it
        "xdg + si": None, "metagate": overrides, "metagate, no in-task agent updates": [*overrides, "method.agent_every=1000000"],
        "metagate, no consolidation": [*overrides, "method.consolidation_steps=0"]}
    base = None
    for label, ov in variants.items():
        cfg = load_config("default", overrides).reference_configs()[0] if ov is None else load_config("default", ["reference=null", *ov])
        stream = build_stream(cfg.benchmark, 0)
        torch.manual_seed(task_seed(0, -1))
        method = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")).train()
        steps = after = 0.0
        for task in stream.tasks[:tasks]:
            method.before_task(task)
            n = cfg.trainer.epochs * task.num_train // cfg.trainer.batch_size
            start = time.process_time()
            for s in range(n):
                i = (s * 64) % (task.num_train - 64)
                method.train_step(Batch(task.x_train[i : i + 64], task.y_train[i : i + 64]), task)
            mid = time.process_time()
            method.after_task(task)
            steps, after = steps + mid - start, after + time.process_time() - mid
        base = base or steps + after
        say(f"{label:38s} CPU s over {tasks} tasks: steps {steps:.2f}, after_task {after:.2f}, total {steps + after:.2f} "
              f"({(steps + after) / base:.2f} x XdG + SI)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--steps", type=int, default=50, help="training steps per task in part 2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=["default", "per-task", "components"], default=None)
    p.add_argument("--component-tasks", type=int, default=12, help="tasks of the default stream in part 3")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: the process's CPU time (robust to a shared machine's load)")
    p.add_argument("--md", type=Path, default=None, help="also write what it printed as a Markdown block (a block to quote in the docs)")
    p.add_argument("overrides", nargs="*", help="dotted overrides of the default config (e.g. method.consolidation_steps=20)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    say(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()}")
    if args.clock == "cpu":  # every perf_counter read (the trainer's, this script's) becomes the process's CPU time
        time.perf_counter = time.process_time  # type: ignore[assignment]
    say(f"clock: {args.clock}")
    if args.only in (None, "default"):
        default_run_seconds(args.repeats, args.overrides)
    if args.only in (None, "components"):
        components(args.component_tasks, args.overrides)
    if args.only in (None, "per-task"):
        times = seconds_per_task(args.tasks, args.steps, {
            "stored-mask batches (default)": args.overrides,
            "every stored mask": [*args.overrides, "method.reg_batch=0", "method.consolidation_batch=0"],
        })
        for label, t in times.items():
            first, mid, last = (statistics.mean(t[a : a + 10]) for a in (0, len(t) // 2 - 5, len(t) - 10))
            say(f"{label:32s} s/task: tasks 1-10 {first:.3f}, middle 10 {mid:.3f}, last 10 {last:.3f}; last / first {last / first:.2f}")
    say(f"load average after: {os.getloadavg()}")
    if args.md is not None:
        argv = sys.argv[1:]
        shown = [a for i, a in enumerate(argv) if a != "--md" and (i == 0 or argv[i - 1] != "--md") and not a.startswith("--md=")]
        cmd = " ".join(["python benchmarks/metagate_cost.py", *shown])
        text = f"**metagate's cost against XdG + SI** (issue 13; the output of `{cmd}`):\n\n" + "\n".join(f"    {l}" for l in PRINTED) + "\n"
        args.md.write_text(text)


if __name__ == "__main__":
    main()
