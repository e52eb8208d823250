"""The compiled training step (``trainer.compile=true``) against the eager one, per method, in one run.

Stream and model of ``benchmarks/method_speed.py`` (permuted Fashion-MNIST, ``--tasks`` tasks x 6000 images,
MLP 400-400, batch 256, Adam), or permuted digits when the files are missing. For each method, an eager run
and a compiled run of the same config and seed, alternated over ``--repeats``. Printed per method:

* the compiled run's training seconds over the eager run's (compilation included: what a run pays);
* the median ``train_step`` time, compiled over eager (the steady state, compilation excluded: what a long
  run converges to);
* the largest difference in final test accuracy between the two (float rounding grows over training).

Inductor caches kernels on disk, so the first repeat of a method compiles from scratch and later ones less.
Run: ``PYTHONPATH=src python benchmarks/compile_speed.py [--tasks 2] [--epochs 2] [--repeats 2]
[--methods finetune,si,ewc,xdg,er]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import metagate.train as train_module  # noqa: E402
from method_speed import CachedStreams, benchmark_section, make_config  # noqa: E402

from metagate.config import config_from_dict  # noqa: E402
from metagate.train import Trainer  # noqa: E402

ER = {"buffer_size": 500}


def run(bench: dict[str, Any], method: str, epochs: int, seed: int, compiled: bool) -> tuple[float, float, float]:
    """(training seconds, median step seconds, final accuracy) of one run."""
    raw = make_config(bench, method, epochs, seed).to_dict()
    raw["trainer"]["compile"] = compiled
    if method == "er":
        raw["method"].update(ER)
    cfg = config_from_dict(raw)
    times: list[float] = []
    real = train_module.compile_step

    def timed(step: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            start = time.perf_counter()
            out = step(*args)
            times.append(time.perf_counter() - start)
            return out

        return wrapper

    trainer = Trainer(cfg)
    train_module.compile_step = lambda step, n: timed(real(step, n))  # type: ignore[assignment]
    eager_step = trainer.method.train_step
    if not compiled:
        trainer.method.train_step = timed(eager_step)  # type: ignore[method-assign]
    try:
        res = trainer.fit()
    finally:
        train_module.compile_step = real
    return res["train_seconds"], statistics.median(times), res["acc"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", default="finetune,si,ewc,xdg,er")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"environment: torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    cache = CachedStreams()
    train_module.build_stream = cache
    bench = benchmark_section(args.tasks, 6000, cache)
    methods = args.methods.split(",")
    print(f"stream: {bench['name']} {bench['dataset']}, {args.tasks} tasks, MLP 400-400, batch 256, {args.epochs} epochs, "
          f"{args.repeats} repeats (eager and compiled alternated)")
    rows = []
    for m in methods:
        got: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
        for r in range(args.repeats):
            for compiled in (False, True) if r % 2 == 0 else (True, False):
                got[compiled].append(run(bench, m, args.epochs, r, compiled))
        secs = {c: statistics.median(x[0] for x in v) for c, v in got.items()}
        step = {c: statistics.median(x[1] for x in v) for c, v in got.items()}
        acc = max(abs(a[2] - b[2]) for a, b in zip(got[False], got[True]))
        rows.append((m, secs[False], secs[True], step[False], step[True], acc))
        print(f"  {m}: done", flush=True)
    print("\n| method | eager train s | compiled train s (incl. compiling) | ratio | eager step ms | compiled step ms | step ratio | max acc diff |")
    print("|---|---|---|---|---|---|---|---|")
    for m, se, sc, te, tc, acc in rows:
        print(f"| {m} | {se:.2f} | {sc:.2f} | {sc / se:.2f} | {1e3 * te:.2f} | {1e3 * tc:.2f} | {tc / te:.2f} | {100 * acc:.2f} pp |")


if __name__ == "__main__":
    main()
