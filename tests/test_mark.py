"""MARK: earlier tasks' F^t, M^t and heads stay bit-identical, the KB's meta step follows the weighted rule
(checked by hand), the inner loop's device-side SGD and plateau schedule equal torch's, each ablation switch
changes what it claims, resume is exact."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.base import Batch
from metagate.methods.mark import Mark, Plateau, plateau_step, sgd_step
from metagate.train import Trainer, task_seed
from conftest import whole_and_resumed

TINY = {
    "name": "mark", "kernels": "3x3", "kb_channels": [4, 8, 8], "f_channels": [4, 4], "latent": 8,
    "meta_epochs": 1, "mini_tasks": 2, "inner_steps": 2, "mini_task_size": 16,
}


def raw(**method: Any) -> dict[str, Any]:
    return {
        "seed": 0,
        "benchmark": {"name": "split", "dataset": "digits", "num_tasks": 3, "classes_per_task": 2, "scenario": "task"},
        "method": {**TINY, **method},
        "trainer": {"epochs": 1, "batch_size": 64, "progress": False, "device": "cpu"},
    }


def make(**method: Any) -> tuple[Mark, Any]:
    cfg = config_from_dict(raw(**method))
    stream = build_stream(cfg.benchmark, 0)
    torch.manual_seed(task_seed(0, -1))
    return create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")), stream  # type: ignore[return-value]


def run_task(m: Mark, task: Any) -> None:
    """One task as the Trainer runs it: every epoch-phase's steps over the task's data."""
    m.train()
    m.before_task(task)
    n, bs = len(task.y_train), m.trainer_cfg.batch_size
    steps = m.epochs_for(task, m.trainer_cfg.epochs) * -(-n // bs)
    for s in range(steps):
        start = (s * bs) % n
        m.train_step(Batch(task.x_train[start : start + bs], task.y_train[start : start + bs]), task)
    m.after_task(task)


def kb_state(m: Mark) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.model.kb.state_dict().items()}


def per_task_state(m: Mark, slot: int) -> dict[str, torch.Tensor]:
    out = {}
    for part in ("features", "masks", "heads"):
        for k, v in getattr(m.model, part)[slot].state_dict().items():
            out[f"{part}.{k}"] = v.clone()
    return out


def test_earlier_tasks_modules_are_bit_identical_after_later_tasks() -> None:
    m, stream = make()
    snapshots = []
    for task in stream.tasks:
        kb_before = kb_state(m)
        run_task(m, task)
        assert any(not torch.equal(kb_before[k], v) for k, v in kb_state(m).items())  # the KB did move
        snapshots.append(per_task_state(m, m.slot[task.index]))
    for task, snap in zip(stream.tasks, snapshots):
        now = per_task_state(m, m.slot[task.index])
        assert all(torch.equal(snap[k], now[k]) for k in snap), f"task {task.index}'s F, M or head changed"
    # the BN running statistics were trained (so the check above covers them)
    assert not torch.equal(snapshots[0]["features.norms.0.running_mean"], torch.zeros(4))


def test_schedule_runs_the_code_order() -> None:
    m, stream = make()
    assert m.schedule(stream.tasks[0]) == (["features", "pretrain", "masks", "final"], "final")
    assert m.schedule(stream.tasks[1]) == (["features", "masks", "final"], "final")
    assert m.epochs_for(stream.tasks[0], 3) == 12


@pytest.mark.parametrize("direction", ["toward", "away"])
def test_meta_step_follows_the_weighted_rule(direction: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two mini-tasks with known weight changes and accuracies 0.25 and 0.75: the KB moves by
    lr * (+-(0.25 d1 + 0.75 d2) / 2 - wd * theta) (hand computation; d = adapted - theta)."""
    m, stream = make(meta_direction=direction, outer_lr=0.5, meta_weight_decay=0.1)
    task = stream.tasks[0]
    theta = [p.detach().clone() for p in m.model.kb.parameters()]
    d1 = [torch.full_like(p, 1.0) for p in theta]
    d2 = [torch.full_like(p, -2.0) for p in theta]
    returns = iter([([t + d for t, d in zip(theta, d1)], torch.tensor(0.25)), ([t + d for t, d in zip(theta, d2)], torch.tensor(0.75))])
    monkeypatch.setattr(m, "mini_task", lambda x, y, slot: next(returns))
    m.meta_learn(task)
    # by hand: weights 0.25 / 1.0 and 0.75 / 1.0; D = (0.25 * 1 + 0.75 * -2) / 2 = -0.625 everywhere
    sign = 1.0 if direction == "toward" else -1.0
    for t, p in zip(theta, m.model.kb.parameters()):
        expected = t + 0.5 * (sign * -0.625) - 0.5 * 0.1 * t
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)


def test_meta_step_weights_zero_accuracies_equally(monkeypatch: pytest.MonkeyPatch) -> None:
    m, stream = make(outer_lr=1.0, meta_weight_decay=0.0)
    theta = [p.detach().clone() for p in m.model.kb.parameters()]
    returns = iter([([t + 1 for t in theta], torch.tensor(0.0)), ([t + 3 for t in theta], torch.tensor(0.0))])
    monkeypatch.setattr(m, "mini_task", lambda x, y, slot: next(returns))
    m.meta_learn(stream.tasks[0])
    for t, p in zip(theta, m.model.kb.parameters()):
        torch.testing.assert_close(p.detach(), t + (0.5 * 1 + 0.5 * 3) / 2)


def test_inner_loop_equals_torch_sgd_and_reduce_lr_on_plateau() -> None:
    """sgd_step + plateau_step reproduce torch.optim.SGD(momentum, weight decay) with
    ReduceLROnPlateau(factor 0.5, patience 5, threshold 1e-3) stepped on each step's loss."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    ref = torch.nn.Linear(5, 3)
    mine = [p.detach().clone().requires_grad_(True) for p in ref.parameters()]
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=5, threshold=0.001)
    state = Plateau(torch.tensor(0.5), torch.tensor(float("inf")), torch.tensor(0.0))
    bufs: list[torch.Tensor | None] = [None, None]
    lrs = []
    for _ in range(40):  # a rate this large oscillates, so the schedule halves it several times
        opt.zero_grad()
        loss = F.cross_entropy(ref(x), y)
        loss.backward()
        opt.step()
        sched.step(loss.item())
        my_loss = F.cross_entropy(F.linear(x, mine[0], mine[1]), y)
        sgd_step(mine, list(torch.autograd.grad(my_loss, mine)), bufs, state.lr, 0.9, 0.1)
        state = plateau_step(state, my_loss.detach())
        lrs.append(opt.param_groups[0]["lr"])
        assert float(state.lr) == pytest.approx(opt.param_groups[0]["lr"])
    assert min(lrs) < 0.5  # the schedule did act
    for a, b in zip(mine, ref.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_without_meta_learning_the_kb_trains_by_sgd_and_no_meta_step_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    m, stream = make(kb_update="sgd")
    assert m.schedule(stream.tasks[1]) == (["features", "masks", "kb_sgd", "final"], None)
    calls: list[int] = []
    monkeypatch.setattr(m, "meta_learn", lambda task: calls.append(task.index))
    run_task(m, stream.tasks[0])
    before = kb_state(m)
    run_task(m, stream.tasks[1])
    assert calls == []
    assert any(not torch.equal(before[k], v) for k, v in kb_state(m).items())
    meta, _ = make()
    seen: list[int] = []
    original = meta.meta_learn
    monkeypatch.setattr(meta, "meta_learn", lambda task: seen.append(task.index) or original(task))
    run_task(meta, stream.tasks[0])
    assert seen == [stream.tasks[0].index]


def test_without_masks_the_kb_is_used_unmasked() -> None:
    m, stream = make(masks=False)
    task = stream.tasks[0]
    assert m.schedule(task)[0] == ["pretrain", "masks", "final"]  # F^t is not trained: nothing reads it
    m.eval()
    x = task.x_test[:16]
    before = m.predict(x, task)
    with torch.no_grad():
        for p in [*m.model.masks[0].parameters(), *m.model.features[0].parameters()]:
            p.add_(1.0)
    assert torch.equal(before, m.predict(x, task))
    with torch.no_grad():
        logits = m.model.heads[0](m.model.kb(x, None))
    assert torch.equal(before[:, m.class_index[0]], logits)
    assert bool(m.unit_mask(task).all())
    masked, _ = make()
    masked.eval()
    out = masked.predict(x, task)
    with torch.no_grad():
        for p in masked.model.masks[0].parameters():
            p.add_(1.0)
    assert not torch.equal(out, masked.predict(x, task))


def test_kb_frozen_after_the_first_task() -> None:
    m, stream = make(freeze_kb_after=1)
    run_task(m, stream.tasks[0])
    kb = kb_state(m)
    for task in stream.tasks[1:]:
        assert m.schedule(task) == (["features", "masks", "final"], None)
        run_task(m, task)
    assert all(torch.equal(kb[k], v) for k, v in kb_state(m).items())


def test_resume_is_exact(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    whole, resumed = whole_and_resumed(raw(), tmp_path, monkeypatch, stop_at=2)
    assert whole["acc_matrix"] == resumed["acc_matrix"]
    assert whole["val_acc_matrix"] == resumed["val_acc_matrix"]
    assert whole["mark_mask_sample_density"] == resumed["mark_mask_sample_density"]


def test_trainer_runs_one_trainer_epochs_per_phase() -> None:
    cfg = config_from_dict(raw(), ["trainer.epochs=2"])
    steps: list[int] = []
    trainer = Trainer(cfg)
    original = trainer.method.after_task
    trainer.method.after_task = lambda task: steps.append(trainer.method._step) or original(task)  # type: ignore[method-assign]
    results = trainer.fit()
    per_epoch = [-(-len(t.y_train) // 64) for t in trainer.stream.tasks]
    assert steps == [2 * 4 * per_epoch[0], 2 * 3 * per_epoch[1], 2 * 3 * per_epoch[2]]
    assert len(results["task_seconds"]) == 3
    assert 0 < results["mark_mask_between_task_cosine_mean"] <= 1


def test_mark_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="kernels=3x3"):
        make(kernels="code")  # 8x8 digits: the code's kernel formula gives 1 and 0
    with pytest.raises(ValueError, match="iterations_per_task"):
        cfg = config_from_dict(raw(), ["trainer.iterations_per_task=10"])
        create_method(cfg.method, build_stream(cfg.benchmark, 0), cfg.trainer, torch.device("cpu"))


def test_meta_statistics_show_the_direction(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without weight decay the KB's change over the meta phase points along sum D (toward) or against it (away)."""
    for direction, sign in (("toward", 1.0), ("away", -1.0)):
        m, stream = make(meta_direction=direction, meta_weight_decay=0.0)
        run_task(m, stream.tasks[0])
        stats = m.report().figures
        assert stats["mark_meta_alignment"][0] == pytest.approx(sign, abs=1e-3)  # float32 rounding of a small change
        assert stats["mark_meta_kb_change"][0] > 0
        assert stats["mark_meta_alignment"][1] is None  # not trained yet


def test_a_diverged_mini_task_adds_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    m, stream = make(outer_lr=1.0, meta_weight_decay=0.0)
    theta = [p.detach().clone() for p in m.model.kb.parameters()]
    returns = iter([([t + 2 for t in theta], torch.tensor(0.5)), ([t * float("nan") for t in theta], torch.tensor(0.5))])
    monkeypatch.setattr(m, "mini_task", lambda x, y, slot: next(returns))
    m.meta_learn(stream.tasks[0])
    for t, p in zip(theta, m.model.kb.parameters()):
        torch.testing.assert_close(p.detach(), t + 2 / 2)  # weight 1 on the finite one, divided by K = 2
    assert m.report().figures["mark_meta_diverged_mini_tasks"][0] == 1


def test_inner_clip_equals_torch_clip_grad_norm() -> None:
    from metagate.methods.mark import clip_norm

    torch.manual_seed(0)
    grads = [torch.randn(3, 4) * 5, torch.randn(7)]
    ref = [g.clone().requires_grad_(False) for g in grads]
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, g in zip(params, ref):
        p.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    for mine, p in zip(clip_norm(grads, 0.5), params):
        torch.testing.assert_close(mine, p.grad)
    small = [torch.full((2,), 1e-3)]
    assert torch.equal(clip_norm(small, 0.5)[0], small[0])  # under the limit: unchanged
