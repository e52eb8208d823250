"""ER's training time against fine-tune's on the same stream, in one run.

Stream and settings of ``configs/er-split-fmnist.yaml`` (class-incremental split Fashion-MNIST, 5 tasks x 2
classes, 2000 training images per task, MLP 256-256, batch 64, 3 epochs; ER replays ``replay_batch`` =
the batch size from a 500-sample reservoir), or split digits with a message when the Fashion-MNIST files
are missing. Fine-tune trains the same backbone on the same batches without replay. Each variant runs
through the Trainer (``train_seconds``: the training loop and the task hooks, evaluation not counted);
variants alternate within each repeat so that drift on a shared machine hits all of them, and the medians
over ``--repeats`` are compared.

Printed: training seconds, ER / fine-tune (target <= 1.6 at the same replay batch), and the mean
``train_step`` time of each; ``finetune-joined`` is fine-tune with batches as large as ER's joined batch
(current + replayed) over the same number of steps (epochs scaled): one forward and backward on that many
samples, the floor of any replay that trains on the joined batch, so ER's step over its step is the cost of
the memory itself (reservoir insertion and the replay draw). ``--replay-batch`` sets ER's replayed samples per step (0: the batch size).

Run: ``PYTHONPATH=src python benchmarks/replay_speed.py [--repeats 5] [--threads 1] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import metagate.train as train_module  # noqa: E402
from metagate.config import config_from_dict, find_config, read_yaml  # noqa: E402
from metagate.data.sources import DataNotFoundError  # noqa: E402
from method_speed import CachedStreams, trainer_run  # noqa: E402


def make_config(method: str, args: argparse.Namespace, seed: int, dataset: str) -> Any:
    raw = read_yaml(find_config("er-split-fmnist"))
    raw["seed"] = seed
    raw["benchmark"]["dataset"] = dataset
    if dataset == "digits":
        raw["benchmark"].update(train_per_task=None, test_per_task=None)
    if args.quick:
        raw["benchmark"]["num_tasks"], raw["trainer"]["epochs"] = 2, 1
    raw["trainer"].update(device="cpu", progress=False, checkpoint=False, threads=args.threads)
    if method == "er":
        raw["method"]["replay_batch"] = args.replay_batch
    elif method == "finetune-joined":  # one step on as many samples as ER's joined batch, as many steps as ER
        batch = raw["trainer"]["batch_size"]
        raw["trainer"]["batch_size"] = batch + (args.replay_batch or batch)
        raw["trainer"]["epochs"] = round(raw["trainer"]["epochs"] * raw["trainer"]["batch_size"] / batch)
        raw["method"] = {"name": "finetune", "backbone": raw["method"]["backbone"]}
    else:  # the same backbone, without ER's fields
        raw["method"] = {"name": method, "backbone": raw["method"]["backbone"]}
    return config_from_dict(raw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--replay-batch", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 tasks, 1 epoch, 1 repeat (a smoke test)")
    args = p.parse_args()
    if args.quick:
        args.repeats = 1
    torch.set_num_threads(args.threads)
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"environment: torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}")
    cache = CachedStreams()
    train_module.build_stream = cache
    dataset = "fashion_mnist"
    try:
        cache(make_config("finetune", args, 0, dataset).benchmark, 0)
    except DataNotFoundError:
        print("Fashion-MNIST files not found (apt-get install dataset-fashion-mnist): using split digits instead")
        dataset = "digits"
    cfg = make_config("er", args, 0, dataset)
    stream = cache(cfg.benchmark, 0)
    print(f"stream: {stream.name} ({stream.scenario}-incremental), {stream.num_tasks} tasks x {stream.tasks[0].num_train} "
          f"images, MLP {cfg.method.backbone.hidden}, batch {cfg.trainer.batch_size}, {cfg.trainer.epochs} epochs, "
          f"ER buffer {cfg.method.buffer_size}, replay batch {args.replay_batch or cfg.trainer.batch_size}, "
          f"median of {args.repeats}")
    variants = ("finetune", "er", "finetune-joined")
    trainer_run(make_config("finetune", args, 0, dataset))  # warm-up
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    steps: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in variants if r % 2 == 0 else variants[::-1]:
            secs, _, step = trainer_run(make_config(v, args, r, dataset))
            seconds[v].append(secs)
            steps[v].append(step)
    med = {v: statistics.median(s) for v, s in seconds.items()}
    step = {v: statistics.median(s) for v, s in steps.items()}
    print("\n| method | train s | x finetune | mean step ms |")
    print("|---|---|---|---|")
    for v in variants:
        print(f"| {v} | {med[v]:.2f} | {med[v] / med['finetune']:.2f} | {1e3 * step[v]:.3f} |")
    print(f"\ner / finetune (training time): {med['er'] / med['finetune']:.2f}   (target <= 1.6)")
    print(f"er step / finetune-joined step (ER's own work beyond one step on the joined batch): {step['er'] / step['finetune-joined']:.2f}")
    ratios = [e / f for e, f in zip(seconds["er"], seconds["finetune"])]
    print(f"per-repeat ratios: {', '.join(f'{x:.2f}' for x in ratios)}")


if __name__ == "__main__":
    main()
