"""Training throughput of metagate's Trainer against a bare PyTorch loop.

Same model (MLP 784-400-400-10, Adam), same data (one in-memory task of MNIST shape), same batches
(the Trainer's own permutation), same number of epochs. The bare loop is what one would write by
hand: index the tensors, forward, cross-entropy, backward, step. Prints samples/s for both and their
ratio (target: >= 0.95). Run: ``.venv/bin/python benchmarks/trainer_speed.py [--device cuda]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from metagate.config import config_from_dict
from metagate.nn.backbones import MLP
from metagate.train import Trainer, task_seed


def trainer_run(batch_size: int, epochs: int, samples: int, device: str, seed: int) -> float:
    cfg = config_from_dict(
        {
            "seed": seed,
            "benchmark": {"name": "gated_teacher", "num_tasks": 1, "input_dim": 784, "num_classes": 10,
                          "train_per_task": samples, "test_per_task": 10},
            "method": {"name": "finetune", "backbone": {"hidden": [400, 400]}},
            "trainer": {"epochs": epochs, "batch_size": batch_size, "device": device, "progress": False},
        }
    )
    trainer = Trainer(cfg)
    res = trainer.fit()
    return res["train_samples_per_second"]


def bare_run(batch_size: int, epochs: int, samples: int, device: str, seed: int) -> float:
    dev = torch.device(device)
    gen_data = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 784, generator=gen_data).to(dev)
    y = torch.randint(10, (samples,), generator=gen_data).to(dev)
    torch.manual_seed(seed)
    model = MLP(784, [400, 400], 10).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator(device=dev).manual_seed(task_seed(seed, 0))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(samples, device=dev, generator=gen)
        for b in range(0, samples, batch_size):
            idx = order[b : b + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return samples * epochs / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--samples", type=int, default=12_800)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-sizes", default="64,256")
    args = p.parse_args()
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"{args.samples} samples x {args.epochs} epochs, median of {args.repeats}")
    print("| batch | bare loop (samples/s) | Trainer (samples/s) | ratio |")
    print("|---|---|---|---|")
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        bare, ours = [], []
        trainer_run(bs, 1, 1024, args.device, 0)  # warm-up
        for r in range(args.repeats):  # alternate, so drift hits both alike
            bare.append(bare_run(bs, args.epochs, args.samples, args.device, r))
            ours.append(trainer_run(bs, args.epochs, args.samples, args.device, r))
        b, o = statistics.median(bare), statistics.median(ours)
        print(f"| {bs} | {b:,.0f} | {o:,.0f} | {o / b:.3f} |", flush=True)


if __name__ == "__main__":
    main()
