"""metagate's si_relatedness (issue 13): the SI strength of a weight follows how unrelated its stored users are to
the task in training; off, nothing changes."""

from __future__ import annotations

import pytest
import torch

from conftest import train_tasks
from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.nn.gates import BitMask
from metagate.train import task_seed

BENCH = {"name": "composed_teacher", "num_tasks": 6, "factors": 2, "values": 4, "units_per_group": 4, "novel_tasks": 0, "min_value_tasks": 1,
         "train_per_task": 200, "test_per_task": 50}
GAMMA = 3.0


def make(hidden: list[int] | None = None, **method):  # noqa: ANN003, ANN201
    cfg = config_from_dict({"benchmark": BENCH, "method": {"name": "metagate", "backbone": {"hidden": hidden or [32]}, **method}})
    stream = build_stream(cfg.benchmark, 0)
    torch.manual_seed(task_seed(0, -1))
    return create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")), stream


def with_two_stored_tasks(hidden: list[int], gamma: float = GAMMA):  # noqa: ANN201
    """Task 0 stored with task 2's very context, task 1 with one that differs in every number; task 0 keeps units
    0-5 of every layer, task 1 units 4-9 (4 and 5 shared), the others are unused. Task 2 then starts."""
    m, stream = make(hidden, si_relatedness=gamma, consolidation_steps=2)
    c = m.contexts.clone()
    c[0] = c[2]
    c[1] = c[2] + 1.0
    m.contexts.copy_(c)
    masks = {0: range(0, 6), 1: range(4, 10)}
    for i, units in masks.items():
        mask = torch.zeros(sum(m.widths), dtype=torch.bool)
        for start in (0, *m.widths[:-1]):
            mask[[start + u for u in units]] = True
        m.stored[i] = BitMask(mask)
        m.trained[i] = True
    m._refresh_masks()
    m.before_task(stream.tasks[2])
    return m, stream


def unit_multiplier() -> torch.Tensor:
    """What each unit's own weights get in ``with_two_stored_tasks``: 1 + gamma x (unrelated users / users)."""
    want = torch.ones(32)
    want[6:10] = 1 + GAMMA  # task 1's alone
    want[4:6] = 1 + GAMMA / 2  # task 0's and task 1's
    return want


def test_the_switch_off_registers_nothing_and_leaves_the_penalty_plain() -> None:
    off, _ = make()
    on, _ = make(si_relatedness=GAMMA)
    assert off.cfg.si_relatedness == 0 and off.stabilizer.multipliers is None
    assert not any(k.startswith("si_multiplier") for k in off.state_dict())
    assert set(on.state_dict()) - set(off.state_dict()) == {f"si_multiplier_{j}" for j in range(4)}
    cfg = config_from_dict({"benchmark": {"name": "rotated", "dataset": "digits", "num_tasks": 2, "max_angle": 90},
                            "method": {"name": "metagate", "si_relatedness": 1.0, "backbone": {"kind": "cnn", "channels": [4], "hidden": [16]}}})
    with pytest.raises(ValueError, match="needs backbone.kind=mlp"):
        create_method(cfg.method, build_stream(cfg.benchmark, 0), cfg.trainer, torch.device("cpu"))


def test_multipliers_of_one_train_exactly_as_the_switch_off() -> None:
    """Every context the same: every stored task is related, every multiplier exactly 1, and training is bit for bit
    the switch off's (the multiplied penalty is the plain one when nothing is unrelated)."""
    runs = []
    for gamma in (0.0, GAMMA):
        m, stream = make(si_relatedness=gamma, consolidation_steps=2)
        m.contexts.copy_(m.contexts[:1].expand_as(m.contexts))
        train_tasks(m, stream.tasks[:3], 4, 32)
        if gamma:
            assert all(torch.equal(t, torch.ones_like(t)) for t in m.stabilizer.multipliers.values())
        runs.append([p.detach().clone() for p in m.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("hidden", [[32], [32, 32]])
def test_the_multiplier_is_above_one_exactly_on_units_unrelated_stored_tasks_use(hidden: list[int]) -> None:
    m, _ = with_two_stored_tasks(hidden)
    mult = m.stabilizer.multipliers
    want = unit_multiplier()
    assert torch.equal(mult["hidden.0.weight"][:, 0], want) and mult["hidden.0.weight"].shape == (32, 1)
    assert torch.equal(mult["hidden.0.bias"], want)
    last = len(hidden) - 1
    assert torch.equal(mult["head.weight"][0], want)  # the outgoing column of each last-layer unit
    assert torch.equal(mult[f"hidden.{last}.bias"], want)
    assert torch.equal(mult["head.bias"], torch.tensor([1 + GAMMA / 2]))  # used by both stored tasks
    if len(hidden) == 2:  # a weight between two gated units: the tasks using both ends
        pair = mult["hidden.1.weight"]
        assert pair.shape == (32, 32)
        assert pair[7, 8] == 1 + GAMMA and pair[1, 2] == 1  # both ends kept by task 1 alone / by task 0 alone
        assert pair[4, 5] == 1 + GAMMA / 2 and pair[4, 8] == 1 + GAMMA  # both tasks / task 1 alone keeps unit 8
        assert pair[1, 8] == 1 and pair[8, 1] == 1 and pair[20, 21] == 1  # no stored task keeps both ends
    # the next task gets its own multipliers, from its own relatedness to the stored tasks
    w = m.repel_weights(m._targets[0])[m.slot[3]]
    m.before_task(m.stream.tasks[3])
    r = torch.zeros(32)
    r[0:4], r[4:6], r[6:10] = w[0], (w[0] + w[1]) / 2, w[1]
    torch.testing.assert_close(m.stabilizer.multipliers["hidden.0.bias"], 1 + GAMMA * r)


def test_the_penalty_gradient_and_value_are_scaled_per_row() -> None:
    m, _ = with_two_stored_tasks([32])
    stab = m.stabilizer
    gen = torch.Generator().manual_seed(0)
    importance = {n: torch.rand(p.shape, generator=gen) for n, p in m.model.named_parameters()}
    stab.quadratic.set(m.model, importance)
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    grads = {}
    for multipliers in (None, stab.multipliers):
        stab.set_multipliers(multipliers)
        m.model.zero_grad(set_to_none=True)
        value = stab.add_penalty_grad()
        grads[multipliers is None] = ({n: p.grad.clone() for n, p in m.model.named_parameters()}, value)
        # the same as the autograd gradient of the value penalty() gives
        m.model.zero_grad(set_to_none=True)
        stab.penalty().backward()
        for n, p in m.model.named_parameters():
            torch.testing.assert_close(p.grad, grads[multipliers is None][0][n])
        torch.testing.assert_close(stab.penalty().detach(), value)
    (plain, plain_value), (scaled, scaled_value) = grads[True], grads[False]
    want = unit_multiplier()
    torch.testing.assert_close(scaled["hidden.0.weight"], want[:, None] * plain["hidden.0.weight"])
    torch.testing.assert_close(scaled["hidden.0.bias"], want * plain["hidden.0.bias"])
    torch.testing.assert_close(scaled["head.weight"], want[None, :] * plain["head.weight"])
    assert torch.equal(scaled["hidden.0.weight"][:4], plain["hidden.0.weight"][:4])  # related users only: unchanged
    assert torch.equal(scaled["hidden.0.weight"][10:], plain["hidden.0.weight"][10:])  # unused units: unchanged
    assert scaled_value > plain_value
    with pytest.raises(ValueError, match="does not protect"):
        stab.set_multipliers({"nope.weight": torch.ones(1)})


def test_a_resumed_run_with_si_relatedness_equals_an_uninterrupted_one(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from conftest import whole_and_resumed

    raw = {"seed": 0, "benchmark": BENCH, "method": {"name": "metagate", "backbone": {"hidden": [32]}, "prior_kind": "repel",
           "prior": 1.0, "si_relatedness": GAMMA, "agent": "additive", "agent_hidden": [16], "reg_batch": 2, "consolidation_batch": 2,
           "consolidation_steps": 10}, "trainer": {"epochs": 1, "progress": False}}
    whole, resumed = whole_and_resumed(raw, tmp_path, monkeypatch, stop_at=3)
    for key in ("acc_matrix", "val_acc_matrix", "heldout_acc_matrix", "zero_shot_acc", "mask_overlap", "agent_mask_reproduction"):
        assert whole[key] == resumed[key], key
