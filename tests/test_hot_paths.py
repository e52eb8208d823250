"""The training step's hot paths: no host syncs in metagate's step, stored masks unpacked once,
the same objective with fewer backward passes, XdG's input dropout, joint without a copy of the data."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import metagate
from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.base import Batch
from metagate.nn.dropout import Dropout, keep_mask
from metagate.train import Trainer, task_seed

BENCH = {"name": "gated_teacher", "num_tasks": 3, "train_per_task": 300, "test_per_task": 100}
PACKAGE = str(Path(metagate.__file__).parent)
SYNCS = ("item", "tolist", "nonzero", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def make(name: str, **method: Any):  # noqa: ANN201
    cfg = config_from_dict({"benchmark": BENCH, "method": {"name": name, "backbone": {"hidden": [32, 32]}, **method}})
    stream = build_stream(cfg.benchmark, 0)
    torch.manual_seed(task_seed(0, -1))
    return create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")), stream


def batch(task, n: int = 64, start: int = 0) -> Batch:  # noqa: ANN001
    return Batch(task.x_train[start : start + n], task.y_train[start : start + n])


def train_tasks(method, tasks, steps: int = 3) -> None:  # noqa: ANN001
    for task in tasks:
        method.before_task(task)
        for s in range(steps):
            method.train_step(batch(task, start=64 * s), task)
        method.after_task(task)


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every call, made from metagate's own code, of a tensor method that reads a value back
    to the host (a device sync on a GPU) or copies a host list to the device (``torch.tensor``)."""
    calls: list[str] = []

    def spy(name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if sys._getframe(1).f_code.co_filename.startswith(PACKAGE):
                calls.append(f"{name} at {sys._getframe(1).f_code.co_filename}:{sys._getframe(1).f_lineno}")
            return original(*args, **kwargs)

        return wrapper

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, spy(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", spy("torch.tensor", torch.tensor))
    monkeypatch.setattr(torch, "nonzero", spy("torch.nonzero", torch.nonzero))
    return calls


# pathnet: 10 rounds over the 15 steps of a task, so its three steps end two rounds, one a generation's last
HOT_SETTINGS = {"pathnet": {"generations": 5, "evals_per_path": 1}}


@pytest.mark.parametrize(
    "method", ["metagate", "xdg", "si", "finetune", "hypermask", "hnet", "active_dendrites", "piggyback", "pathnet", "er", "dgr", "hat", "packnet", "supsup", "wsn"]
)
def test_a_training_step_reads_nothing_back_from_the_device(method: str, host_reads: list[str]) -> None:
    m, stream = make(method, **HOT_SETTINGS.get(method, {}))
    assert steps_on_a_third_task(m, stream, 3, host_reads) == []


def steps_on_a_third_task(m, stream, steps: int, host_reads: list[str]) -> list[str]:  # noqa: ANN001
    """Train two tasks, start the third and run ``steps`` steps on it: the host reads the steps made."""
    train_tasks(m, stream.tasks[:2])
    task = stream.tasks[2]
    m.before_task(task)
    host_reads.clear()
    for s in range(steps):
        m.train_step(batch(task, start=64 * s), task)
    return host_reads


def test_metagate_windowed_and_batched_steps_read_nothing_back(host_reads: list[str]) -> None:
    """agent_every, reg_batch, consolidation_batch and the additive agent (issue 13) keep the step free of syncs."""
    m, stream = make("metagate", agent="additive", agent_hidden=[16], agent_every=2, reg_batch=2, consolidation_batch=2)
    assert steps_on_a_third_task(m, stream, 5, host_reads) == []  # two whole windows and an open one


@pytest.mark.parametrize("prior_kind", ["usage", "repel"])
def test_metagate_usage_prior_reads_nothing_back_in_a_step_or_when_it_is_updated(prior_kind: str, host_reads: list[str]) -> None:
    """prior_kind=usage / repel: the step reads a fixed buffer, and the usage update at a task boundary (repel: the
    context weights and their product with the stored masks) stays on the device."""
    m, stream = make("metagate", prior_kind=prior_kind, reg_batch=2)
    steps_on_a_third_task(m, stream, 3, host_reads)
    m._update_prior()
    assert host_reads == []


def test_metagate_few_shot_inference_reads_nothing_back(host_reads: list[str]) -> None:
    """few_shot: the mask's inference before a task trains (outside the steps) stays on the device too."""
    m, stream = make("metagate", prior_kind="repel", reg_batch=2, few_shot=16, few_shot_steps=3)
    train_tasks(m, stream.tasks[:2])
    host_reads.clear()
    with m.few_shot(stream.tasks[2], torch.Generator().manual_seed(0)):
        pass
    assert host_reads == []


def test_metagate_unpacks_stored_masks_once_per_task(monkeypatch: pytest.MonkeyPatch) -> None:
    m, stream = make("metagate", consolidation_steps=5)
    train_tasks(m, stream.tasks[:2])
    unpacked: list[int] = []
    original = metagate.nn.gates.unpack_bits
    monkeypatch.setattr(metagate.nn.gates, "unpack_bits", lambda *a: unpacked.append(1) or original(*a))
    task = stream.tasks[2]
    m.before_task(task)
    for s in range(4):
        m.train_step(batch(task, start=64 * s), task)
    m.eval()
    for t in stream.tasks[:2]:
        m.predict(task.x_test[:8], t)
    assert unpacked == []
    m.train()
    m.after_task(task)
    assert len(unpacked) == 3  # each stored mask once, for the consolidation that follows


def test_metagate_loaded_state_replaces_the_cached_masks() -> None:
    trained, stream = make("metagate", consolidation_steps=5)
    train_tasks(trained, stream.tasks[:2])
    fresh, _ = make("metagate", consolidation_steps=5)
    fresh.before_task(stream.tasks[0])  # caches of a method with nothing stored yet
    assert fresh._regression_loss() is None
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh._regression_loss(), trained._regression_loss())
    for t in stream.tasks[:2]:
        assert torch.equal(fresh.unit_mask(t), trained.stored[t.index].bool())


def test_metagate_step_optimises_what_separate_backward_passes_did() -> None:
    """One agent forward and one backward for task loss + regulariser give the same update as the
    task loss, then the regulariser, each with its own forward and backward."""
    m, stream = make("metagate", consolidation_steps=5)
    train_tasks(m, stream.tasks[:2])
    task = stream.tasks[2]
    m.before_task(task)
    ref = copy.deepcopy(m)
    grads_seen: dict[str, list[torch.Tensor]] = {}
    for name, method in (("fused", m), ("separate", ref)):
        after_backward = method.stabilizer.after_backward

        def spy(method=method, name=name, after_backward=after_backward) -> None:  # noqa: ANN001
            grads_seen[name] = [p.grad.clone() for p in method.model.parameters() if p.grad is not None]
            after_backward()

        method.stabilizer.after_backward = spy
    b = batch(task)
    m.train_step(b, task)
    # the reference: the step as three backward passes
    ref.optimizer.zero_grad(set_to_none=True)
    ref.agent_optimizer.zero_grad(set_to_none=True)
    loss = ref.task_loss(b, task)
    loss.backward()
    ref.stabilizer.after_backward()
    ref.stabilizer.penalty().backward()
    slots, targets = ref.stored.targets
    (ref.cfg.beta * F.binary_cross_entropy_with_logits(ref.logits(slots), targets)).backward()
    ref.agent_optimizer.step()
    ref.optimizer.step()
    ref.stabilizer.after_step()
    for a, b_ in zip(grads_seen["fused"], grads_seen["separate"]):
        torch.testing.assert_close(a, b_)  # SI saw the task loss's gradient alone in both
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_input_dropout_is_inverted_dropout_with_the_configured_keep_probability() -> None:
    torch.manual_seed(0)
    drop = Dropout(0.2)
    x = torch.ones(400, 1000)
    y = drop(x)
    assert set(y.unique().tolist()) == {0.0, 1.25}
    kept = (y > 0).float()
    assert abs(kept.mean().item() - 0.8) < 0.005  # 400k draws: sd 0.0006
    # both 31-bit halves of each 64-bit draw keep with probability 0.8, independently of each other
    flat = kept.flatten()
    assert abs(flat[0::2].mean().item() - 0.8) < 0.005 and abs(flat[1::2].mean().item() - 0.8) < 0.005
    assert abs((flat[0::2] * flat[1::2]).mean().item() - 0.64) < 0.006
    drop.eval()
    assert drop(x) is x


def test_input_dropout_masks_follow_the_global_seed() -> None:
    torch.manual_seed(3)
    a = keep_mask((64, 784), 0.8)
    torch.manual_seed(3)
    b = keep_mask((64, 784), 0.8)
    c = keep_mask((64, 784), 0.8)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_joint_trains_on_views_of_the_stream_and_holds_no_copy() -> None:
    m, stream = make("joint")
    before = [(t.x_train.clone(), t.y_train.clone()) for t in stream.tasks]
    for task in stream.tasks:
        data = m.training_data(task)
        seen = stream.tasks[: task.index + 1]
        assert data.x.data_ptr() == stream.tasks[0].x_train.data_ptr()  # a view, not a copy
        assert data.x.untyped_storage().data_ptr() == stream.tasks[-1].x_train.untyped_storage().data_ptr()
        assert torch.equal(data.x, torch.cat([x for x, _ in before[: task.index + 1]]))
        assert torch.equal(data.y, torch.cat([y for _, y in before[: task.index + 1]]))
        assert data.y.shape[0] == sum(t.num_train for t in seen)
    for t, (x, y) in zip(stream.tasks, before):  # the stream's values are unchanged
        assert torch.equal(t.x_train, x) and torch.equal(t.y_train, y)
    storages = {t.x_train.untyped_storage().data_ptr() for t in stream.tasks}
    assert len(storages) == 1  # the images are held once, in one buffer


def test_joint_task_incremental_batches_carry_their_task() -> None:
    cfg = config_from_dict({"benchmark": {"name": "split", "dataset": "digits", "num_tasks": 3, "scenario": "task"},
                            "method": {"name": "joint", "backbone": {"hidden": [16]}}, "trainer": {"progress": False}})
    stream = build_stream(cfg.benchmark, 0)
    m = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
    data = m.training_data(stream.tasks[2])
    expected = torch.cat([torch.full((t.num_train,), t.index) for t in stream.tasks])
    assert torch.equal(data.task_ids, expected)


def test_joint_runs_are_deterministic() -> None:
    raw = {"benchmark": BENCH, "method": {"name": "joint", "backbone": {"hidden": [16]}},
           "trainer": {"epochs": 1, "progress": False}}
    a, b = Trainer(config_from_dict(raw)).fit(), Trainer(config_from_dict(raw)).fit()
    assert a["acc_matrix"] == b["acc_matrix"]


def test_hypermask_ramps_its_sparsity_on_the_first_task_without_reading_back(host_reads: list[str]) -> None:
    m, stream = make("hypermask", sparsity=30.0)
    task = stream.tasks[0]
    m.before_task(task)
    host_reads.clear()
    for s in range(3):
        m.train_step(batch(task, start=64 * s), task)
    assert host_reads == []


@pytest.mark.parametrize("variant", ["replay_alignment", "joint_retraining"])
def test_mergan_steps_read_nothing_back_from_the_device(variant: str, host_reads: list[str]) -> None:
    """Replay methods (issue 17): MeRGAN's critic and generator steps, with old classes to replay."""
    cfg = config_from_dict({"benchmark": {"name": "split", "dataset": "digits", "num_tasks": 2, "classes_per_task": 2, "scenario": "class"},
                            "method": {"name": "mergan", "variant": variant, "gan": {"dim": 4, "z_dim": 8}}, "trainer": {"batch_size": 32}})
    stream = build_stream(cfg.benchmark, 0)
    m = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
    m.before_task(stream.tasks[0])
    for s in range(2):
        m.train_step(batch(stream.tasks[0], 32, 32 * s), stream.tasks[0])
    task = stream.tasks[1]
    m.before_task(task)
    host_reads.clear()
    for s in range(6):  # a generator step at the 5th
        m.train_step(batch(task, 32, 32 * s), task)
    assert host_reads == []


def test_mark_training_steps_read_nothing_back_from_the_device(host_reads: list[str]) -> None:
    """MARK (a conv KB, needs images): the steps of every phase, the phase changes and the meta-learning
    that runs inside the step starting the last phase."""
    cfg = config_from_dict({
        "benchmark": {"name": "split", "dataset": "digits", "num_tasks": 2, "scenario": "task"},
        "method": {"name": "mark", "kernels": "3x3", "kb_channels": [4, 8], "f_channels": [4], "latent": 8,
                   "meta_epochs": 1, "mini_tasks": 2, "inner_steps": 3, "mini_task_size": 16},
        "trainer": {"epochs": 1, "batch_size": 64},
    })
    stream = build_stream(cfg.benchmark, 0)
    m = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
    task = stream.tasks[1]
    m.before_task(task)
    steps = m.epochs_for(task, 1) * -(-len(task.y_train) // 64)
    host_reads.clear()
    for s in range(steps):
        m.train_step(batch(task, start=(64 * s) % len(task.y_train)), task)
    assert m._phase == len(m._phases) - 1  # every phase ran, the meta-learning before the last
    assert host_reads == []
