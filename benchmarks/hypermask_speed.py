"""Seconds per training iteration of hypermask and hnet at the paper's permuted-MNIST sizes (issue 14, item 5).

Sizes (HyperMask's permuted "best hyperparameters", gmum/HyperMask datasets.py:284-319): target MLP
1024-1000-1000-10 (MNIST padded to 32 x 32, the code's input; ``--input 784`` for 28 x 28), hypernetwork
[100, 100] with ELU, task embedding 24, not chunked: 205.6M hypernetwork parameters for a 2.04M-parameter
target. Batch 128, Adam. Data: random tensors (speed does not depend on them).

For each variant, the mean seconds per ``train_step`` on the first task (no earlier task: no regulariser) and
on the fifth (4 earlier embeddings in the regulariser), each after one warm-up step (Adam's moments are
allocated there), over ``--iters`` steps; wall time and, in brackets, this process's CPU time (user + system),
the steadier figure on a loaded machine:

* ``hypermask``: the regulariser over all earlier tasks, one batched hypernetwork call with the current one;
* ``hypermask reg_subset=1``: one random earlier task per step;
* ``hnet``: von Oswald et al.'s hnet at the same sizes (``hnet_hidden=[100,100]``, not chunked) with the
  lookahead (its default: a second hypernetwork pass for the earlier tasks at ``theta + dTheta``);
* ``hnet reg_subset=1``, ``hnet lookahead=false``;
* ``hnet chunked (code)``: hypercl's own permuted-MNIST hypernetwork for this target (chunks of 78000, chunk
  embedding 8, hidden [25, 25]: 2.0M parameters), with the lookahead.

Memory: about 205.6M x 4 bytes x (weights, gradient, 2 Adam moments) = 3.3 GB, plus 1.6 GB of lookahead
buffers for hnet; the script checks ``MemAvailable`` first and skips a variant that does not fit.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/hypermask_speed.py [--iters 3] [--threads 1]
        [--only hypermask,hnet] [--input 1024] [--device cuda]

On a GPU (``--device cuda``) each measured step ends with a device synchronisation (so the time is the
step's own), the memory check reads the device's free memory, and CPU time means little.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch

from metagate.config import config_from_dict
from metagate.data.stream import Stream, Task
from metagate.methods import create_method
from metagate.methods.base import Batch

VARIANTS: dict[str, dict] = {
    "hypermask": {"name": "hypermask"},
    "hypermask reg_subset=1": {"name": "hypermask", "reg_subset": 1},
    "hnet": {"name": "hnet", "hnet_hidden": [100, 100], "embedding_dim": 24, "beta": 0.1},
    "hnet reg_subset=1": {"name": "hnet", "hnet_hidden": [100, 100], "embedding_dim": 24, "beta": 0.1, "reg_subset": 1},
    "hnet lookahead=false": {"name": "hnet", "hnet_hidden": [100, 100], "embedding_dim": 24, "beta": 0.1, "lookahead": False},
    "hnet chunked (code)": {"name": "hnet", "hnet_hidden": [25, 25], "embedding_dim": 24, "beta": 0.1, "chunk_size": 78000,
                            "chunk_emb_dim": 8},
}
BATCH = 128


def available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def stream(input_dim: int, num_tasks: int = 5) -> Stream:
    g = torch.Generator().manual_seed(0)
    tasks = [
        Task(index=i, name=f"random-{i}", x_train=torch.randn(1024, input_dim, generator=g),
             y_train=torch.randint(0, 10, (1024,), generator=g), x_test=torch.randn(8, input_dim, generator=g),
             y_test=torch.randint(0, 10, (8,), generator=g), context=torch.randn(8, generator=g), classes=tuple(range(10)))
        for i in range(num_tasks)
    ]
    return Stream(name="random", tasks=tasks, input_shape=(input_dim,), num_outputs=10, scenario="domain", context_dim=8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_step(method, task: Task, iters: int) -> tuple[float, float]:  # noqa: ANN001
    """Mean wall and CPU (user + system, this process) seconds per step after one warm-up step."""
    method.train()
    method.before_task(task)
    g = torch.Generator().manual_seed(1)
    wall, cpu = [], []
    for i in range(iters + 1):
        idx = torch.randint(0, task.num_train, (BATCH,), generator=g).to(task.x_train.device)
        batch = Batch(task.x_train[idx], task.y_train[idx])
        sync(task.x_train.device)
        start, start_cpu = time.perf_counter(), time.process_time()
        method.train_step(batch, task)
        sync(task.x_train.device)
        if i > 0:  # the first step allocates Adam's moments
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return sum(wall) / len(wall), sum(cpu) / len(cpu)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=3, help="measured steps per task (after one warm-up step)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--input", type=int, default=1024, help="target input size (1024: MNIST padded to 32x32, the code's)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    s = stream(args.input).to(device)
    free = (lambda: torch.cuda.mem_get_info(device)[0] / 2**30) if device.type == "cuda" else available_gb
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} CPU thread(s)"
    print(f"torch {torch.__version__}, {where}, load average {os.getloadavg()}, free memory {free():.1f} GB")
    chosen = [v.strip() for v in args.only.split(",") if v.strip()] or list(VARIANTS)
    for label in chosen:
        method_cfg = {"backbone": {"hidden": [1000, 1000], "dropout": 0.0}, **VARIANTS[label]}
        need = 0.5 if method_cfg.get("chunk_size") else 4.0 if method_cfg["name"] == "hypermask" else 5.5
        if free() < need + 1.0:
            print(f"{label:24s} skipped: needs about {need:.1f} GB (+1 GB headroom), {free():.1f} GB available")
            continue
        cfg = config_from_dict({
            "seed": 0, "benchmark": {"name": "gated_teacher"}, "method": method_cfg,
            "trainer": {"batch_size": BATCH, "lr": 1e-3, "optimizer": "adam", "progress": False, "device": args.device,
                        "iterations_per_task": 10},
        })
        torch.manual_seed(0)
        method = create_method(cfg.method, s, cfg.trainer, device)
        n_hnet = sum(p.numel() for p in method.hnet.parameters())
        first = seconds_per_step(method, s.tasks[0], args.iters)
        method.after_task(s.tasks[0])
        method._position = 4  # the fifth task: 4 earlier embeddings in the regulariser
        fifth = seconds_per_step(method, s.tasks[4], args.iters)
        print(f"{label:24s} hypernetwork {n_hnet / 1e6:.1f}M params, target {method.hnet.num_outputs / 1e6:.2f}M: "
              f"task 1 {1e3 * first[0]:.1f} ms/it (CPU {1e3 * first[1]:.1f}), task 5 {1e3 * fifth[0]:.1f} ms/it (CPU {1e3 * fifth[1]:.1f})")
        del method
        gc.collect()
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
