"""Each method's speed against a bare PyTorch loop on the same stream, in one run.

Stream: permuted Fashion-MNIST as in ``configs/xdg-small.yaml`` (6000 images per task, first
``--tasks`` tasks), or scikit-learn's digits permuted (with a message) when the Fashion-MNIST files
are missing. Every method trains the same MLP (hidden 400-400, no hidden dropout) with Adam (fresh
per task), batch 256, 2 epochs per task, through the Trainer (``train_seconds``: the training loop
and the before/after-task hooks, e.g. the EWC Fisher and metagate's consolidation; evaluation is
not counted). The bare loop is what one writes by hand on the same tensors and batch order: index,
forward, cross-entropy, backward, step. Methods run with their defaults otherwise: EWC (Fisher on
1000 samples), SI, XdG + SI (gating 80%, input dropout 0.2, the paper's), metagate (+ SI).

Printed, as ratios measured in this run (median of ``--repeats``, runs alternated so drift hits all):

* training time of each method / the bare loop's (targets, issue 31: EWC, SI <= 1.05);
* XdG + SI / finetune (target <= 1.15); metagate's mean ``train_step`` / XdG's (target <= 1.5);
* evaluation of all tasks (``metagate.train.evaluate``) / a bare evaluation loop (target <= 1.1);
* joint's peak memory / the bytes of the training data it holds (target <= 1.2), in a subprocess:
  peak resident set (``VmHWM``, reset after the stream is built) over the whole joint run, and the
  bytes of training-data tensors ``training_data`` allocates beyond the stream's own.

Run: ``PYTHONPATH=src python benchmarks/method_speed.py [--tasks 3] [--threads 1] [--quick]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

import metagate.train as train_module
from metagate.config import config_from_dict
from metagate.data.sources import DataNotFoundError
from metagate.data.stream import Stream
from metagate.methods import Method
from metagate.nn.backbones import MLP
from metagate.train import Trainer, evaluate, task_seed

HIDDEN = [400, 400]
BATCH, EPOCHS, EVAL_BATCH = 256, 2, 2048
METHODS: dict[str, dict[str, Any]] = {
    "finetune": {},
    "ewc": {"lambda": 3.0},
    "si": {"c": 30.0, "xi": 0.1},
    "xdg": {"gate_fraction": 0.8, "input_dropout": 0.2, "stabilizer": "si", "c": 30.0, "xi": 0.1},
    "metagate": {},
}


def benchmark_section(tasks: int, per_task: int, streams: "CachedStreams") -> dict[str, Any]:
    """Permuted Fashion-MNIST, or permuted digits when its files are missing (built once, cached)."""
    fmnist = {"name": "permuted", "dataset": "fashion_mnist", "num_tasks": tasks, "context": "random",
              "train_per_task": per_task, "test_per_task": 2000}
    try:
        streams(make_config(fmnist, "finetune", 1, 0).benchmark, 0)
        return fmnist
    except DataNotFoundError:
        print("Fashion-MNIST files not found (apt-get install dataset-fashion-mnist): using permuted digits instead")
        return {"name": "permuted", "dataset": "digits", "num_tasks": tasks, "context": "random"}


def make_config(bench: dict[str, Any], method: str, epochs: int, seed: int) -> Any:
    return config_from_dict(
        {
            "seed": seed,
            "benchmark": bench,
            "method": {"name": method, "backbone": {"hidden": HIDDEN, "dropout": 0.0}, **METHODS.get(method, {})},
            "trainer": {"epochs": epochs, "batch_size": BATCH, "eval_batch_size": EVAL_BATCH, "device": "cpu",
                        "progress": False, "checkpoint": False},
        }
    )


class CachedStreams:
    """Builds each stream once: the Trainer's ``build_stream`` is redirected here (training never
    writes to a stream's tensors), so repeated runs do not re-read and re-permute the images."""

    def __init__(self) -> None:
        self.cache: dict[str, Stream] = {}
        self.original = train_module.build_stream

    def __call__(self, cfg: Any, seed: int) -> Stream:
        key = json.dumps([cfg.model_dump(), seed], sort_keys=True, default=str)
        if key not in self.cache:
            self.cache[key] = self.original(cfg, seed)
        return self.cache[key]


def trainer_run(cfg: Any) -> tuple[float, Trainer, float]:
    """(training seconds, the trainer, mean seconds per ``train_step``)."""
    trainer = Trainer(cfg)
    step = trainer.method.train_step
    spent = [0.0, 0]

    def timed(*args: Any) -> Any:
        start = time.perf_counter()
        out = step(*args)
        spent[0] += time.perf_counter() - start
        spent[1] += 1
        return out

    trainer.method.train_step = timed  # type: ignore[method-assign]
    res = trainer.fit()
    del trainer.method.train_step
    return res["train_seconds"], trainer, spent[0] / max(spent[1], 1)


def bare_run(stream: Stream, epochs: int, seed: int) -> float:
    """Seconds for a hand-written loop over the same tasks, batches and model."""
    torch.manual_seed(task_seed(seed, -1))
    model = MLP(stream.input_dim, HIDDEN, stream.num_outputs)
    start = time.perf_counter()
    for t, task in enumerate(stream.tasks):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(task_seed(seed, t))
        torch.manual_seed(task_seed(seed, t))
        x, y, n = task.x_train, task.y_train, task.num_train
        for _ in range(epochs):
            order = torch.randperm(n, generator=gen)
            for b in range(0, n, BATCH):
                idx = order[b : b + BATCH]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                opt.step()
    return time.perf_counter() - start


@torch.no_grad()
def bare_evaluate(model: torch.nn.Module, stream: Stream) -> list[float]:
    model.eval()
    out = []
    for task in stream.tasks:
        hits = torch.zeros((), dtype=torch.long)
        for s in range(0, task.num_test, EVAL_BATCH):
            hits += (model(task.x_test[s : s + EVAL_BATCH]).argmax(1) == task.y_test[s : s + EVAL_BATCH]).sum()
        out.append(int(hits) / task.num_test)
    return out


def timed(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------- joint's memory (subprocess)


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def joint_memory_child(bench: dict[str, Any], threads: int) -> dict[str, float]:
    """Runs joint over the stream; reports bytes of training data held, the peak RSS above the
    resident set before training, and the bytes ``training_data`` allocates beyond the stream's."""
    torch.set_num_threads(threads)
    trainer = Trainer(make_config(bench, "joint", 1, 0))
    stream, method = trainer.stream, trainer.method
    held = sum(t.x_train.nbytes + t.y_train.nbytes for t in stream.tasks)
    own = {t.untyped_storage().data_ptr() for task in stream.tasks for t in (task.x_train, task.y_train)}
    extra = 0
    for task in stream.tasks:  # bytes of tensors training_data allocates (not views of the stream's)
        data = method.training_data(task)
        fresh = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in data if t is not None}
        extra = max(extra, sum(b for p, b in fresh.items() if p not in own))
        del data
    gc.collect()
    reset = True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
    except OSError:
        reset = False
    before = _status_kib("VmRSS") * 1024
    trainer.fit()
    peak = _status_kib("VmHWM") * 1024
    return {"held": held, "rss_peak_extra": peak - before if reset else float("nan"), "alloc_extra": extra}


def joint_memory(bench: dict[str, Any], threads: int) -> dict[str, float]:
    code = (
        "import json, sys; sys.path.insert(0, %r); import method_speed as m; "
        "print(json.dumps(m.joint_memory_child(json.loads(sys.argv[1]), %d)))"
    ) % (os.path.dirname(os.path.abspath(__file__)), threads)
    out = subprocess.run([sys.executable, "-c", code, json.dumps(bench)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="2 tasks of 2000 images, 1 epoch, 1 repeat (a smoke test)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tasks, per_task, epochs, repeats = args.tasks, 6000, EPOCHS, args.repeats
    if args.quick:
        tasks, per_task, epochs, repeats = 2, 2000, 1, 1
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"environment: torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    cache = CachedStreams()
    train_module.build_stream = cache
    bench = benchmark_section(tasks, per_task, cache)
    stream = cache(make_config(bench, "finetune", epochs, 0).benchmark, 0)
    print(f"stream: {stream.name}, {stream.num_tasks} tasks x {stream.tasks[0].num_train} images, MLP {HIDDEN}, "
          f"batch {BATCH}, {epochs} epochs, median of {repeats}")

    trainer_run(make_config(bench, "finetune", 1, 0))  # warm-up
    seconds: dict[str, list[float]] = {"bare": [], **{m: [] for m in METHODS}}
    steps: dict[str, list[float]] = {m: [] for m in METHODS}
    trainers: dict[str, Trainer] = {}
    for r in range(repeats):
        seconds["bare"].append(bare_run(stream, epochs, r))
        for m in METHODS:
            secs, trainers[m], step = trainer_run(make_config(bench, m, epochs, r))
            seconds[m].append(secs)
            steps[m].append(step)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    step = {k: statistics.median(v) for k, v in steps.items()}
    bare = med["bare"]
    print("\n| method | train s | x bare | mean step ms | target |")
    print("|---|---|---|---|---|")
    print(f"| bare loop | {bare:.2f} | 1.00 | | |")
    targets = {"ewc": "<= 1.05 x bare", "si": "<= 1.05 x bare", "xdg": "<= 1.15 x finetune", "metagate": "step <= 1.5 x xdg"}
    for m in METHODS:
        print(f"| {m} | {med[m]:.2f} | {med[m] / bare:.2f} | {1e3 * step[m]:.2f} | {targets.get(m, '')} |")
    print(f"\nxdg / finetune (training time): {med['xdg'] / med['finetune']:.2f}   (target <= 1.15)")
    print(f"metagate step / xdg step: {step['metagate'] / step['xdg']:.2f}   (target <= 1.5)")

    print("\n| evaluation of all tasks | evaluate ms | bare ms | ratio (target <= 1.1) |")
    print("|---|---|---|---|")
    for m in ("finetune", "xdg", "metagate"):
        method: Method = trainers[m].method
        ours = timed(lambda: evaluate(method, stream.tasks, EVAL_BATCH), 2 * repeats + 1)
        theirs = timed(lambda: bare_evaluate(method.model, stream), 2 * repeats + 1)
        print(f"| {m} | {1e3 * ours:.1f} | {1e3 * theirs:.1f} | {ours / theirs:.2f} |")

    mem = joint_memory(bench, args.threads)
    held = mem["held"]
    print(f"\njoint: training data held {held / 2**20:.1f} MiB ({stream.num_tasks} tasks)")
    print(f"  peak resident set above the stream's, over the joint run: {mem['rss_peak_extra'] / 2**20:.1f} MiB "
          f"-> peak / data = {(held + mem['rss_peak_extra']) / held:.2f}   (target <= 1.2)")
    print(f"  bytes training_data allocates beyond the stream's (largest task): {mem['alloc_extra'] / 2**20:.1f} MiB "
          f"-> {(held + mem['alloc_extra']) / held:.2f}")


if __name__ == "__main__":
    main()
