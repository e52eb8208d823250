"""Every method on a CUDA device (skipped without one): a training step never synchronises with the host
(``torch.cuda.set_sync_debug_mode("error")`` turns any sync into an error), whole runs finish with their
state on the device, and a resumed CUDA run equals an uninterrupted one."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch

from conftest import whole_and_resumed
from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import METHODS, create_method
from metagate.methods.base import Batch
from metagate.runs import RunDir
from metagate.train import Trainer, task_seed

# METAGATE_TEST_DEVICE=cpu runs the same checks on the CPU (the sync check then checks nothing): a dry run of
# this file on a machine without a GPU before device time is spent on it
DEVICE = os.environ.get("METAGATE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")

BENCH = {"name": "gated_teacher", "num_tasks": 3, "train_per_task": 300, "test_per_task": 100}
# methods that learn new classes (MeRGAN: task- and class-incremental only) run on a split stream
BENCH_OF = {"mergan": {"name": "split", "dataset": "digits", "num_tasks": 3, "scenario": "task"}}
# MARK's conv knowledge base needs images
BENCH_OF["mark"] = {"name": "split", "dataset": "digits", "num_tasks": 3, "scenario": "task"}
# the methods that use the teacher's masks need the student at the teacher's width
HIDDEN = {"oracle": [64], "nearest_context": [64]}
# the references of issue 25 read discrete context factors (and the composed teacher's masks): a small composed stream
COMPOSED = {"name": "composed_teacher", "num_tasks": 8, "factors": 3, "values": 2, "units_per_group": 4, "novel_tasks": 2, "novel_min_differing": 1,
            "min_value_tasks": 1, "heldout_inside": 0, "heldout_outside": 1, "train_per_task": 300, "test_per_task": 100}
for _name in ("factor_rule", "stored_composition", "ridge_context"):
    BENCH_OF[_name], HIDDEN[_name] = COMPOSED, [28]
# host-side bookkeeping a training step never reads: XdG's mask seed (drawn into CPU generators), metagate's
# record of trained tasks (read when the stored masks change, between tasks)
HOST_STATE = {"mask_seed", "trained"}
# the isolation family's records of which tasks trained, in what order (read between tasks and at evaluation), the
# seed of SupSup's scores (drawn into CPU generators) and WSN's coded mask sizes (computed on the host between tasks)
HOST_STATE |= {"tasks_trained", "position", "order", "score_seed", "coded_bits"}
# options a method needs on a stream this small (pathnet splits a task's few steps into its search rounds)
OPTIONS = {"pathnet": {"generations": 1, "evals_per_path": 1}}
OPTIONS["mark"] = {"kernels": "3x3", "kb_channels": [4, 8], "f_channels": [4], "latent": 8, "meta_epochs": 1, "mini_tasks": 2, "inner_steps": 3}
NO_STEP = {"joint"}  # trains on the union of the tasks: covered by the whole-run test


def method_on_cuda(name: str, **method: Any):  # noqa: ANN201
    cfg = config_from_dict({"benchmark": BENCH_OF.get(name, BENCH), "method": {"name": name, "backbone": {"hidden": HIDDEN.get(name, [32, 32])}, **OPTIONS.get(name, {}), **method},
                            "trainer": {"device": DEVICE, "progress": False}})
    device = torch.device(DEVICE)
    stream = build_stream(cfg.benchmark, 0).to(device)
    torch.manual_seed(task_seed(0, -1))
    return create_method(cfg.method, stream, cfg.trainer, device), stream


def batches(task, steps: int = 3, n: int = 64) -> list[Batch]:  # noqa: ANN001
    return [Batch(task.x_train[n * s : n * (s + 1)], task.y_train[n * s : n * (s + 1)]) for s in range(steps)]


VARIANTS = [(name, {}) for name in sorted(METHODS.names()) if name not in NO_STEP] + [
    ("metagate", {"meta_learning": False}),
    ("metagate", {"context_mode": "shuffled"}),
    # issue 13's switches: the default run's set (additive agent, repel prior, stored-mask batches, windowed agent steps)
    ("metagate", {"agent": "additive", "agent_hidden": [16], "prior_kind": "repel", "reg_batch": 4, "consolidation_batch": 4, "agent_every": 2}),
    ("metagate", {"agent": "additive", "agent_hidden": [16], "prior_kind": "usage"}),
    ("hypermask", {"sparsity": 30.0}),
    ("hypermask", {"embedding": "context", "reg_subset": 1}),
    ("hnet", {"chunk_size": 500, "chunk_emb_dim": 8}),
    ("si", {"context_input": "film"}),
]


@pytest.mark.parametrize(("name", "method"), VARIANTS, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in m.items())}" for n, m in VARIANTS])
def test_a_cuda_training_step_never_syncs_with_the_host(name: str, method: dict[str, Any]) -> None:
    m, stream = method_on_cuda(name, **method)
    for task in stream.tasks[:2]:
        m.before_task(task)
        for b in batches(task):
            m.train_step(b, task)
        m.after_task(task)
    task = stream.tasks[2]
    m.before_task(task)
    steps = batches(task)
    m.train_step(steps[0], task)  # warm-up: lazily built state (optimiser moments) is allowed one sync
    on_cuda = DEVICE == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for b in steps[1:]:
            m.train_step(b, task)
    finally:
        if on_cuda:
            torch.cuda.set_sync_debug_mode("default")
    assert all(p.device.type == DEVICE for p in m.parameters())


@pytest.mark.parametrize("name", sorted(METHODS.names()))
def test_a_whole_run_on_cuda_finishes_with_every_tensor_on_the_device(name: str, tmp_path) -> None:  # noqa: ANN001
    raw = {"seed": 0, "benchmark": BENCH_OF.get(name, BENCH), "method": {"name": name, "backbone": {"hidden": HIDDEN.get(name, [32, 32])}, **OPTIONS.get(name, {})},
           "trainer": {"epochs": 1, "batch_size": 64, "device": DEVICE, "progress": False}}
    trainer = Trainer(config_from_dict(raw), RunDir.create(tmp_path / "r"))
    results = trainer.fit()
    assert results["device"].startswith(DEVICE)
    elsewhere = {k.rsplit(".", 1)[-1] for k, t in trainer.method.state_dict().items() if isinstance(t, torch.Tensor) and t.device.type != DEVICE}
    assert elsewhere <= HOST_STATE
    final = results["acc_matrix"][-1]
    assert all(0.0 <= a <= 1.0 for a in final) and sum(final) / len(final) > 0.15  # above chance (0.1)


RESUMED = [("metagate", {}), ("metagate", {"agent": "additive", "agent_hidden": [16], "prior_kind": "repel", "reg_batch": 4, "agent_every": 2}),
           ("xdg", {}), ("hypermask", {}), ("hat", {}), ("packnet", {}), ("supsup", {"task_inference": "oneshot", "transfer": True}), ("wsn", {})]


@pytest.mark.parametrize(("name", "method"), RESUMED, ids=[f"{n}-{len(m)}" for n, m in RESUMED])
def test_a_resumed_cuda_run_equals_an_uninterrupted_one(name: str, method: dict[str, Any], tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    raw = {"seed": 0, "benchmark": BENCH, "method": {"name": name, "backbone": {"hidden": [32, 32]}, **method},
           "trainer": {"epochs": 1, "batch_size": 64, "device": DEVICE, "progress": False}}
    whole, resumed = whole_and_resumed(raw, tmp_path, monkeypatch)
    assert resumed["acc_matrix"] == whole["acc_matrix"]


def test_mark_phases_and_meta_learning_on_cuda_never_sync_with_the_host() -> None:
    """MARK: every phase of a task, the phase changes and the meta-learning inside the step that starts the last phase."""
    m, stream = method_on_cuda("mark")
    task = stream.tasks[1]
    m.before_task(task)
    n = len(task.y_train)
    steps = m.epochs_for(task, m.trainer_cfg.epochs) * -(-n // m.trainer_cfg.batch_size)
    bs = m.trainer_cfg.batch_size
    m.train_step(Batch(task.x_train[:bs], task.y_train[:bs]), task)  # warm-up
    on_cuda = DEVICE == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        for s in range(1, steps):
            start = (s * bs) % n
            m.train_step(Batch(task.x_train[start : start + bs], task.y_train[start : start + bs]), task)
    finally:
        if on_cuda:
            torch.cuda.set_sync_debug_mode("default")
    assert m._phase == len(m._phases) - 1


def test_metagate_few_shot_measurement_on_cuda_leaves_training_as_it_was_and_never_syncs(tmp_path) -> None:  # noqa: ANN001
    """The few-shot measurement (issue 13): on the device, training with it equals training without it, and the
    inference (outside training steps, but on the device) reads nothing back."""
    def raw(few_shot: int) -> dict[str, Any]:
        return {"seed": 0, "benchmark": BENCH, "trainer": {"epochs": 1, "batch_size": 64, "device": DEVICE, "progress": False},
                "method": {"name": "metagate", "backbone": {"hidden": [32]}, "agent": "additive", "agent_hidden": [16],
                           "prior_kind": "repel", "reg_batch": 4, "consolidation_steps": 10, "few_shot": few_shot}}
    off = Trainer(config_from_dict(raw(0)), RunDir.create(tmp_path / "off")).fit()
    trainer = Trainer(config_from_dict(raw(16)), RunDir.create(tmp_path / "on"))
    on = trainer.fit()
    assert on["acc_matrix"] == off["acc_matrix"] and len(on["few_shot_acc"]) == len(off["acc_matrix"])
    method, task = trainer.method, trainer.stream.tasks[-1]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    method.few_shot_mask(task, gen)  # warm-up
    on_cuda = DEVICE == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        mask = method.few_shot_mask(task, gen)
    finally:
        if on_cuda:
            torch.cuda.set_sync_debug_mode("default")
    assert mask.device.type == DEVICE
