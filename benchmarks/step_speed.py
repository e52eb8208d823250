"""Training-step time of each method against a bare step and against the code it replaced, steps interleaved.

On a shared machine whole runs compared one after another drift with the load; here every variant takes
one step in turn on the same batch (round robin), each step is timed, and the medians over all steps are
compared, so a burst of load hits all variants alike and is dropped by the median. What is timed is
``train_step`` alone (the Trainer's loop, the task hooks, e.g. EWC's Fisher, and evaluation are not:
``benchmarks/method_speed.py`` and ``benchmarks/replay_speed.py`` time whole runs).

Two streams, each trained first on task 0 (so that the penalties are active and ER's memory is full), then
timed on task 1:

* ``permuted``: ``benchmarks/method_speed.py``'s setting (permuted Fashion-MNIST, 6000 images a task, MLP
  400-400, batch 256, Adam): ``bare`` (a hand-written step: forward, cross-entropy, backward,
  ``torch.optim.Adam`` with its defaults), finetune, EWC, SI, XdG + SI (gating 0.8, input dropout 0.2); and
  ``si-before``, ``ewc-before``, ``xdg-before``: the same methods with the step as it was before the fused
  passes (task gradient and parameters copied, the penalty gradient added in place and its value from a
  second product, dropout as ``x * mask * scale``, XdG's full masked products). Targets: SI, EWC <= 1.05 x bare; XdG + SI <= 1.15 x
  finetune.
* ``split``: ``configs/er-split-fmnist.yaml``'s setting (class-incremental split Fashion-MNIST, MLP 256-256,
  batch 64): finetune, ER (replay batch = batch), ``er-before`` (the replay draw by a cumulative sum and tensor
  indexing, as before), and ``finetune-joined`` (fine-tune on a batch as large as ER's joined one: its floor).
  Target: ER <= 1.6 x finetune.

Run: ``PYTHONPATH=src python benchmarks/step_speed.py [--steps 300] [--threads 1] [--only permuted|split]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from metagate.config import config_from_dict, find_config, read_yaml  # noqa: E402
from metagate.data import build_stream  # noqa: E402
from metagate.data.stream import Stream, Task  # noqa: E402
from metagate.methods import Batch, Method, create_method  # noqa: E402
from metagate.methods.er import ER  # noqa: E402
from metagate.methods.stabilizers import SIStabilizer  # noqa: E402
from metagate.nn.dropout import keep_mask  # noqa: E402

Step = Callable[[Batch, Task], Any]


# --------------------------------------------------------------------- the code that was replaced


def step_before(method: Method, batch: Batch, task: Task) -> dict[str, torch.Tensor]:
    """The stabilised step before the fusion (the reference of ``tests/test_speedups_are_exact.py``)."""
    stab = method.stabilizer
    assert stab is not None
    method.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(method(batch.x, task, batch.task_ids), batch.y)
    loss.backward()
    q = stab.quadratic
    named = dict(method.model.named_parameters())
    params = [named[n] for n in q.names]
    si = isinstance(stab, SIStabilizer)
    with torch.no_grad():
        if si:
            torch._foreach_copy_(stab._before_grads, [p.grad for p in params])  # type: ignore[attr-defined]
            torch._foreach_copy_(stab._before, [p.detach() for p in params])
        value = loss.new_zeros(())
        if q.active:
            scale = stab.strength()
            diff = stab._before_diff  # type: ignore[attr-defined]
            torch._foreach_copy_(diff, params)
            torch._foreach_sub_(diff, [q.anchor(n) for n in q.names])
            torch._foreach_mul_(diff, [q.importance(n) for n in q.names])
            torch._foreach_add_([p.grad for p in params], diff, alpha=2.0 * scale)
            total = torch.stack([(d * (p - q.anchor(n))).sum() for d, p, n in zip(diff, params, q.names)]).sum()
            value = scale * (total + q.offset)
    method.optimizer.step()
    if si:
        with torch.no_grad():
            torch._foreach_sub_(stab._before, [p.detach() for p in params])
            torch._foreach_addcmul_(stab._list("path"), stab._before, stab._before_grads)  # type: ignore[attr-defined]
    return {"loss": loss.detach(), "penalty": value}


def as_before(method: Method) -> Step:
    stab = method.stabilizer
    assert stab is not None
    params = [p for p in method.model.parameters() if p.requires_grad]
    stab._before_grads = [torch.zeros_like(p) for p in params]  # type: ignore[attr-defined]
    stab._before_diff = [torch.zeros_like(p) for p in params]  # type: ignore[attr-defined]
    if getattr(method, "_compact", False):
        method._compact = False  # type: ignore[attr-defined]  # XdG: the full masked products, as before
    if hasattr(getattr(method, "input_dropout", None), "p"):
        method.input_dropout = DropoutBefore(method.input_dropout.p)  # type: ignore[assignment]
    return lambda batch, task: step_before(method, batch, task)


class DropoutBefore(torch.nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * keep_mask(x.shape, 1.0 - self.p) * (1.0 / (1.0 - self.p)) if self.training else x


def er_sample_before(method: ER) -> None:
    def sample(k: int) -> tuple[torch.Tensor, ...]:
        cdf = method.filled[: method.capacity].cumsum(0)
        idx = torch.searchsorted(cdf, torch.rand(k) * cdf[-1], right=True).clamp_(max=method.capacity - 1)
        return method.mem_x[idx], method.mem_y[idx], method.mem_task[idx]

    method.sample = sample  # type: ignore[method-assign]


# --------------------------------------------------------------------- variants


def build(raw: dict[str, Any]) -> tuple[Method, Stream]:
    cfg = config_from_dict(raw)
    stream = build_stream(cfg.benchmark, 0)
    torch.manual_seed(0)
    return create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")), stream


def bare_step(stream: Stream, hidden: list[int]) -> Step:
    from metagate.nn.backbones import MLP

    torch.manual_seed(0)
    model = MLP(stream.input_dim, hidden, stream.num_outputs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch: Batch, task: Task) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(batch.x), batch.y).backward()
        opt.step()

    return step


def permuted_variants(args: argparse.Namespace) -> tuple[dict[str, Step], Stream, int]:
    bench = {"name": "permuted", "dataset": "fashion_mnist", "num_tasks": 2, "context": "random", "train_per_task": 6000, "test_per_task": 100}
    trainer = {"batch_size": 256, "device": "cpu", "progress": False}
    backbone = {"hidden": [400, 400], "dropout": 0.0}
    methods = {
        "finetune": {},
        "ewc": {"lambda": 3.0, "fisher_samples": 1000},
        "si": {"c": 30.0, "xi": 0.1},
        "xdg": {"gate_fraction": 0.8, "input_dropout": 0.2, "stabilizer": "si", "c": 30.0, "xi": 0.1},
    }
    built = {}
    stream = None
    for name, extra in methods.items():
        m, stream = build({"benchmark": bench, "method": {"name": name, "backbone": backbone, **extra}, "trainer": trainer})
        pretrain(m, stream.tasks[0], 256, args.pretrain)
        built[name] = m
    assert stream is not None
    steps: dict[str, Step] = {"bare": bare_step(stream, backbone["hidden"])}
    for name, m in built.items():
        steps[name] = m.train_step
        if name != "finetune":
            steps[f"{name}-before"] = as_before(copy.deepcopy(m))
    return steps, stream, 256


def split_variants(args: argparse.Namespace) -> tuple[dict[str, Step], Stream, int]:
    raw = read_yaml(find_config("er-split-fmnist"))
    raw["trainer"].update(device="cpu", progress=False)
    batch = raw["trainer"]["batch_size"]
    er, stream = build(raw)
    pretrain(er, stream.tasks[0], batch, args.pretrain)
    ft, _ = build({**raw, "method": {"name": "finetune", "backbone": raw["method"]["backbone"]}})
    pretrain(ft, stream.tasks[0], batch, args.pretrain)
    before = copy.deepcopy(er)
    er_sample_before(before)  # type: ignore[arg-type]
    joined = copy.deepcopy(ft)
    replay = er.replay_size()  # type: ignore[attr-defined]

    def joined_step(b: Batch, task: Task) -> Any:
        # the batch and as many other samples of the task: one step on a batch of ER's joined size
        idx = torch.randint(task.num_train, (replay,))
        return joined.train_step(Batch(torch.cat([b.x, task.x_train.index_select(0, idx)]), torch.cat([b.y, task.y_train.index_select(0, idx)])), task)

    return {"finetune": ft.train_step, "er": er.train_step, "er-before": before.train_step, "finetune-joined": joined_step}, stream, batch


def pretrain(method: Method, task: Task, batch: int, steps: int) -> None:
    method.train()
    method.before_task(task)
    for s in range(steps):
        b = (s * batch) % max(task.num_train - batch, 1)
        method.train_step(Batch(task.x_train[b : b + batch], task.y_train[b : b + batch]), task)
    method.after_task(task)


def measure(steps: dict[str, Step], stream: Stream, batch: int, n: int) -> dict[str, float]:
    task = stream.tasks[1]
    for s in steps.values():
        if hasattr(s, "__self__"):
            s.__self__.before_task(task)  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {k: [] for k in steps}
    names = list(steps)
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        idx = torch.randint(task.num_train, (batch,), generator=gen)
        b = Batch(task.x_train.index_select(0, idx), task.y_train.index_select(0, idx))
        order = names[i % len(names):] + names[: i % len(names)]  # rotate who goes first
        for k in order:
            start = time.perf_counter()
            steps[k](b, task)
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v[n // 10 :]) for k, v in times.items()}  # the first tenth: warm-up


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="timed steps per variant")
    p.add_argument("--pretrain", type=int, default=40, help="steps on task 0 before the timed task")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=["permuted", "split"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    print(f"environment: torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
          f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
    if args.only in (None, "permuted"):
        steps, stream, batch = permuted_variants(args)
        med = measure(steps, stream, batch, args.steps)
        print(f"\npermuted Fashion-MNIST, MLP 400-400, batch 256: median step over {args.steps} interleaved steps")
        print("| variant | step ms | x bare | x finetune |")
        print("|---|---|---|---|")
        for k, v in med.items():
            print(f"| {k} | {1e3 * v:.3f} | {v / med['bare']:.3f} | {v / med['finetune']:.3f} |")
        print(f"targets: si {med['si'] / med['bare']:.3f} x bare (<= 1.05), ewc {med['ewc'] / med['bare']:.3f} x bare (<= 1.05), "
              f"xdg + si {med['xdg'] / med['finetune']:.3f} x finetune (<= 1.15)")
        print(f"before: si {med['si-before'] / med['bare']:.3f} x bare, ewc {med['ewc-before'] / med['bare']:.3f} x bare, "
              f"xdg + si {med['xdg-before'] / med['finetune']:.3f} x finetune")
    if args.only in (None, "split"):
        steps, stream, batch = split_variants(args)
        med = measure(steps, stream, batch, args.steps)
        print(f"\nclass-incremental split Fashion-MNIST, MLP 256-256, batch {batch}, replay {batch}: median step over {args.steps} interleaved steps")
        print("| variant | step ms | x finetune |")
        print("|---|---|---|")
        for k, v in med.items():
            print(f"| {k} | {1e3 * v:.3f} | {v / med['finetune']:.3f} |")
        print(f"target: er {med['er'] / med['finetune']:.3f} x finetune (<= 1.6); before {med['er-before'] / med['finetune']:.3f}; "
              f"floor (finetune-joined) {med['finetune-joined'] / med['finetune']:.3f}")


if __name__ == "__main__":
    main()
