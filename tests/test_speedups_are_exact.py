"""The fast paths train exactly as the code they replaced: the stabilisers' step in fewer passes (SI keeps the task
gradient without a copy, the penalty gradient in four passes per tensor; the reference below is the old step, written
out) and CPU dropout with one temporary fewer."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.base import Batch, Method
from metagate.methods.stabilizers import SIStabilizer


def unfused_step(method: Method, batch: Batch, task: Any) -> dict[str, torch.Tensor]:
    """The stabilised step as it was before the fusion: the task gradient and the parameters copied, the penalty
    gradient ``2 s F (theta - a)`` added in place, its value from a second product, Adam, then SI's path integral."""
    stab = method.stabilizer
    assert stab is not None
    method.optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(method(batch.x, task, batch.task_ids), batch.y)
    loss.backward()
    q = stab.quadratic
    named = dict(method.model.named_parameters())
    params = [named[n] for n in q.names]
    with torch.no_grad():
        grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
        before = [p.detach().clone() for p in params]
        value = loss.new_zeros(())
        if q.active:
            scale = stab.strength()
            diff = [p.detach().clone() for p in params]
            torch._foreach_sub_(diff, [q.anchor(n) for n in q.names])
            torch._foreach_mul_(diff, [q.importance(n) for n in q.names])
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            torch._foreach_add_([p.grad for p in params], diff, alpha=2.0 * scale)
            total = torch.stack([(d * (p - q.anchor(n))).sum() for d, p, n in zip(diff, params, q.names)]).sum()
            value = scale * (total + q.offset)
    method.optimizer.step()
    if isinstance(stab, SIStabilizer):
        with torch.no_grad():
            torch._foreach_sub_(before, [p.detach() for p in params])
            torch._foreach_addcmul_(stab._list("path"), before, grads)
    return {"loss": loss.detach(), "penalty": value}


@pytest.mark.parametrize(
    "method_cfg",
    [
        {"name": "si", "c": 5.0},
        {"name": "ewc", "lambda": 50.0, "fisher_samples": 100},
        {"name": "xdg", "gate_fraction": 0.5, "input_dropout": 0.2, "stabilizer": "si", "c": 5.0, "active_units_only": False, "backbone": {"hidden": [32, 16], "dropout": 0.0}},
    ],
    ids=lambda c: c["name"],
)
def test_the_stabilised_step_trains_exactly_as_the_unfused_step(method_cfg: dict[str, Any]) -> None:
    raw = {
        "benchmark": {"name": "gated_teacher", "num_tasks": 3, "scenario": "task", "train_per_task": 256, "test_per_task": 10},
        "method": {"backbone": {"hidden": [32, 16]}, **method_cfg},
        "trainer": {"batch_size": 32},
    }
    cfg = config_from_dict(raw)
    stream = build_stream(cfg.benchmark, 0)
    torch.manual_seed(0)
    fused = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
    ref = copy.deepcopy(fused)
    ref.optimizer = ref.make_optimizer(ref.model.parameters())  # a fresh Adam over the copy's own parameters
    ref.optimizer.load_state_dict(fused.optimizer.state_dict())
    step = 0
    for task in stream.tasks:
        for method in (fused, ref):
            torch.manual_seed(100 + task.index)
            method.train()
            method.before_task(task)
        for b in range(0, task.num_train, 32):
            batch = Batch(task.x_train[b : b + 32], task.y_train[b : b + 32])
            torch.manual_seed(step)  # the same dropout draw in both
            got = fused.train_step(batch, task)
            torch.manual_seed(step)
            want = unfused_step(ref, batch, task)
            step += 1
            assert torch.equal(got["loss"], want["loss"])
            torch.testing.assert_close(got["penalty"], want["penalty"])  # a sum in another order
            for (n, p), q in zip(fused.model.named_parameters(), ref.model.parameters()):
                assert torch.equal(p, q), f"{n} differs after step {step}"
        for method in (fused, ref):
            torch.manual_seed(200 + task.index)  # the Fisher's samples
            method.after_task(task)
    assert fused.stabilizer.quadratic.active
    for (n, a), b in zip(fused.stabilizer.state_dict().items(), ref.stabilizer.state_dict().values()):
        assert torch.equal(a, b), n  # importance, anchors, path integrals: bit for bit


def test_cpu_dropout_gives_the_numbers_of_mask_times_input_times_scale() -> None:
    from metagate.nn.dropout import Dropout, keep_mask

    drop = Dropout(0.3)
    x = torch.randn(33, 17)
    x[0, :4] = torch.tensor([0.0, -0.0, float("inf"), -1e-30])
    for _ in range(2):  # the second call reuses the draw's scratch
        state = torch.get_rng_state()
        got = drop(x)
        torch.set_rng_state(state)
        want = x * keep_mask(x.shape, 0.7) * (1.0 / 0.7)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit for bit, signed zeros and NaN included


def test_er_draws_the_same_replay_batches_as_the_inverse_cdf_over_the_filled_slots() -> None:
    """The reservoir's prefix count kept on the host (no cumulative sum) and ``index_select`` gathers give the
    draws of the general inverse-CDF sampler, so training is bit for bit the same."""
    raw = {
        "benchmark": {"name": "split", "dataset": "digits", "num_tasks": 3, "classes_per_task": 2, "scenario": "class"},
        "method": {"name": "er", "buffer_size": 150, "replay_batch": 24, "backbone": {"hidden": [16]}},
        "trainer": {"batch_size": 16},
    }
    cfg = config_from_dict(raw)
    stream = build_stream(cfg.benchmark, 0)
    torch.manual_seed(0)
    fast = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
    ref = copy.deepcopy(fast)
    ref.optimizer = ref.make_optimizer(ref.model.parameters())

    def general_sample(k: int) -> tuple[torch.Tensor, ...]:  # the sampler as it was
        cdf = ref.filled[: ref.capacity].cumsum(0)
        idx = torch.searchsorted(cdf, torch.rand(k) * cdf[-1], right=True).clamp_(max=ref.capacity - 1)
        return ref.mem_x[idx], ref.mem_y[idx], ref.mem_task[idx]

    ref.sample = general_sample  # type: ignore[method-assign]
    step = 0
    for task in stream.tasks:
        for method in (fast, ref):
            method.before_task(task)
        for b in range(0, task.num_train, 16):
            batch = Batch(task.x_train[b : b + 16], task.y_train[b : b + 16])
            for method in (fast, ref):
                torch.manual_seed(step)
                method.train_step(batch, task)
            step += 1
            for p, q in zip(fast.model.parameters(), ref.model.parameters()):
                assert torch.equal(p, q)
    seen = sum(t.num_train for t in stream.tasks)
    assert fast.seen_host == int(fast.seen.sum()) == seen and torch.equal(fast.mem_x, ref.mem_x)
    again = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
    again.load_state_dict(fast.state_dict())
    assert again.seen_host == seen  # restored with the buffers
