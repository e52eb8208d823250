"""Device check for piggyback and pathnet (run on a CUDA machine): a small run of each on the GPU, then three
training steps of each under ``torch.cuda.set_sync_debug_mode("error")`` (any host sync raises), the pathnet
steps ending two tournament rounds, one a generation's last.

    PYTHONPATH=src python experiments/piggyback_pathnet/cuda_check.py
"""

from __future__ import annotations

import torch

from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.base import Batch
from metagate.train import Trainer, task_seed

BENCH = {"name": "gated_teacher", "num_tasks": 3, "train_per_task": 300, "test_per_task": 100}
SETTINGS = {"piggyback": {}, "pathnet": {"generations": 5, "evals_per_path": 1}}


def main() -> None:
    dev = torch.device("cuda")
    for name, extra in SETTINGS.items():
        raw = {"benchmark": BENCH, "method": {"name": name, "backbone": {"hidden": [32, 32]}, **extra},
               "trainer": {"device": "cuda", "progress": False}}
        res = Trainer(config_from_dict(raw)).fit()
        print(f"{name}: run on {res['device']}: acc {res['acc']:.3f} bwt {res['bwt']}")
        cfg = config_from_dict(raw)
        stream = build_stream(cfg.benchmark, 0).to(dev)
        torch.manual_seed(task_seed(0, -1))
        m = create_method(cfg.method, stream, cfg.trainer, dev)
        for task in stream.tasks[:2]:
            m.before_task(task)
            for s in range(3):
                m.train_step(Batch(task.x_train[64 * s : 64 * s + 64], task.y_train[64 * s : 64 * s + 64]), task)
            m.after_task(task)
        task = stream.tasks[2]
        m.before_task(task)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for s in range(3):
                m.train_step(Batch(task.x_train[64 * s : 64 * s + 64], task.y_train[64 * s : 64 * s + 64]), task)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        print(f"{name}: 3 training steps on cuda without a host sync")


if __name__ == "__main__":
    main()
