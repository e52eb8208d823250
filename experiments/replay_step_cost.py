"""Training cost per solver step of the replay methods relative to fine-tuning, on the setting of
experiments/replay-split-fmnist.yaml (one CPU thread): each method trains task 0 briefly, starts task 2 (replay
on), and then the methods' steps are timed in interleaved rounds, so that a shared machine's load falls alike on
all of them. Prints the median milliseconds per step and the ratio to fine-tuning's.

    PYTHONPATH=src python experiments/replay_step_cost.py [rounds]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from metagate.config import load_config
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.base import Batch

VARIANTS = {
    "finetune": ["method.name=finetune"],
    "er500": ["method.name=er", "method.buffer_size=500"],
    "dgr-vae": ["method.name=dgr", "method.generator.kind=vae", "method.eval_samples=0"],
    "bir": ["method.name=bir", "method.eval_samples=0"],
    "bir-si": ["method.name=bir", "method.si_c=0.1", "method.eval_samples=0"],
}


def main(rounds: int = 15, steps: int = 5) -> None:
    torch.set_num_threads(1)
    methods, tasks = {}, None
    for name, overrides in VARIANTS.items():
        cfg = load_config("experiments/replay-split-fmnist.yaml", overrides)
        stream = build_stream(cfg.benchmark, 0)
        tasks = stream.tasks
        m = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
        for t in tasks[:2]:  # two short tasks, so that the third replays
            m.before_task(t)
            for s in range(5):
                m.train_step(Batch(t.x_train[128 * s : 128 * (s + 1)], t.y_train[128 * s : 128 * (s + 1)]), t)
            m.after_task(t)
        m.before_task(tasks[2])
        methods[name] = m
    t = tasks[2]
    batches = [Batch(t.x_train[128 * s : 128 * (s + 1)], t.y_train[128 * s : 128 * (s + 1)]) for s in range(steps)]
    times: dict[str, list[float]] = {n: [] for n in methods}
    for _ in range(rounds):
        for n, m in methods.items():
            start = time.perf_counter()
            for b in batches:
                m.train_step(b, t)
            times[n].append((time.perf_counter() - start) / steps * 1000)
    base = statistics.median(times["finetune"])
    for n, v in times.items():
        print(f"{n:10s} {statistics.median(v):8.1f} ms/step  {statistics.median(v) / base:5.2f} x finetune")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 15)
