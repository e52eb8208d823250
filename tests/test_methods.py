"""Classic baselines behave as the literature says on a small synthetic stream."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import METHODS, Batch, create_method
from metagate.methods.regularizers import QuadraticPenalty, fisher_diagonal
from metagate.train import Trainer

# A domain-incremental stream whose tasks conflict (rotations of one problem), small enough for CPU.
STREAM = {"name": "rotated_teacher", "num_tasks": 3, "max_angle": 120, "train_per_task": 1000, "test_per_task": 500}
HYPER = {"ewc": {"lambda": 100.0}, "online_ewc": {"lambda": 100.0}, "si": {"c": 100.0}}


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    out = {}
    for name in ("finetune", "ewc", "online_ewc", "si", "joint"):
        raw = {
            "seed": 0,
            "benchmark": STREAM,
            "method": {"name": name, "backbone": {"hidden": [64, 64]}, **HYPER.get(name, {})},
            "trainer": {"epochs": 3, "progress": False},
        }
        out[name] = Trainer(config_from_dict(raw)).fit()
    return out


def test_finetune_forgets(results) -> None:  # noqa: ANN001
    assert results["finetune"]["bwt"] < -0.08


@pytest.mark.parametrize("method", ["ewc", "online_ewc", "si"])
def test_regularisers_forget_less_than_finetune(results, method: str) -> None:  # noqa: ANN001
    assert results[method]["bwt"] > results["finetune"]["bwt"] + 0.04
    assert results[method]["forgetting"] < results["finetune"]["forgetting"] - 0.04


def test_joint_is_the_best(results) -> None:  # noqa: ANN001
    best_other = max(r["acc"] for name, r in results.items() if name != "joint")
    assert results["joint"]["acc"] > best_other + 0.05


def test_every_method_is_registered_with_its_paper() -> None:
    papers = {"ewc": "Kirkpatrick", "online_ewc": "Schwarz", "si": "Zenke"}
    assert set(METHODS.names()) >= {"finetune", "joint", "ewc", "online_ewc", "si"}
    for name, author in papers.items():
        import sys

        assert author in (sys.modules[METHODS.get(name).__module__].__doc__ or "")


def test_folded_ewc_penalty_equals_the_sum_of_per_task_penalties() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    pen = QuadraticPenalty(model)
    terms = []
    for _ in range(3):
        f = {n: torch.rand_like(p) for n, p in model.named_parameters()}
        anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
        pen.add_anchored(model, f)
        terms.append((f, anchors))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    separate = sum(
        ((f[n] * (p - a[n]) ** 2).sum() for f, a in terms for n, p in model.named_parameters()), torch.zeros(())
    )
    folded = pen(model)
    assert torch.allclose(folded, separate, rtol=1e-5)
    g1 = torch.autograd.grad(folded, list(model.parameters()))
    g2 = torch.autograd.grad(separate, list(model.parameters()))
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g1, g2))


def test_fisher_matches_a_per_sample_loop() -> None:
    raw = {"benchmark": {**STREAM, "train_per_task": 40, "val_fraction": 0}, "method": {"name": "ewc", "backbone": {"hidden": [8]}}}
    cfg = config_from_dict(raw)
    stream = build_stream(cfg.benchmark, 0)
    method = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
    task = stream.tasks[0]
    fast = fisher_diagonal(method, method.model, task, 40, labels="true", chunk=7)
    slow = {n: torch.zeros_like(p) for n, p in method.model.named_parameters()}
    for i in range(40):
        method.zero_grad()
        logp = torch.log_softmax(method(task.x_train[i : i + 1], task), 1)[0, task.y_train[i]]
        logp.backward()
        for n, p in method.model.named_parameters():
            slow[n] += p.grad**2 / 40
    assert all(torch.allclose(fast[n], slow[n], rtol=1e-4, atol=1e-7) for n in slow)


@pytest.mark.parametrize("method_cfg", [
    {"name": "ewc", "backbone": {"hidden": [16, 8]}},
    {"name": "xdg", "gate_fraction": 0.5, "input_dropout": 0.0, "backbone": {"hidden": [16, 8], "dropout": 0.0}},
])
@pytest.mark.parametrize("labels", ["true", "sampled"])
def test_closed_form_fisher_of_linear_layers_equals_the_vmap_fisher(method_cfg: dict, labels: str) -> None:
    raw = {"benchmark": {"name": "gated_teacher", "num_tasks": 3, "scenario": "task", "train_per_task": 60}, "method": method_cfg}
    cfg = config_from_dict(raw)
    stream = build_stream(cfg.benchmark, 0)
    method = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
    task = stream.tasks[1]  # label-masked to its own classes; for xdg, gated by its mask
    torch.manual_seed(1)
    closed = fisher_diagonal(method, method.model, task, 50, labels, chunk=7)  # type: ignore[arg-type]
    torch.manual_seed(1)
    per_sample = fisher_diagonal(method, method.model, task, 50, labels, chunk=7, closed_form=False)  # type: ignore[arg-type]
    assert set(closed) == set(per_sample)
    assert all(torch.allclose(closed[n], per_sample[n], rtol=1e-4, atol=1e-7) for n in per_sample)


def test_online_ewc_weighs_the_penalty_by_gamma_times_the_running_fisher() -> None:
    # Schwarz et al., eq. 8-9, by hand: F*_1 = F_1; F*_2 = g F*_1 + F_2; penalty while training task 3
    # is lambda/2 * g * F*_2 (theta - theta*_2)^2.
    from metagate.methods.stabilizers import EWCStabilizer

    model = torch.nn.Linear(2, 1, bias=False)
    stab = EWCStabilizer(model, model, lambda_=4.0, online=True, gamma=0.5)
    fishers = iter([{"weight": torch.tensor([[1.0, 2.0]])}, {"weight": torch.tensor([[3.0, 0.0]])}])
    stab.fisher = lambda task: next(fishers)  # type: ignore[method-assign]
    stab.after_task(None)  # type: ignore[arg-type]
    stab.after_task(None)  # type: ignore[arg-type]
    anchor = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(torch.tensor([[1.0, 1.0]]))
    running = 0.5 * torch.tensor([1.0, 2.0]) + torch.tensor([3.0, 0.0])  # F*_2 = [3.5, 1]
    expected = 4.0 / 2 * 0.5 * (running * (model.weight.detach() - anchor)[0] ** 2).sum()  # 2 * 0.5 * 4.5
    assert torch.allclose(stab.penalty(), expected)
    assert expected.item() == 4.5


def test_ewc_skips_the_fisher_after_the_last_training_task() -> None:
    raw = {"benchmark": {**STREAM, "train_per_task": 40}, "method": {"name": "ewc", "backbone": {"hidden": [8]}}}
    cfg = config_from_dict(raw)
    stream = build_stream(cfg.benchmark, 0)
    method = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
    calls = []
    real = method.stabilizer.fisher
    method.stabilizer.fisher = lambda task: calls.append(task.index) or real(task)  # type: ignore[method-assign]
    for task in stream.tasks:
        method.after_task(task)
    assert calls == [t.index for t in stream.tasks[:-1]]


def test_si_keeps_adams_state_across_tasks_by_default_as_the_permuted_mnist_notebook() -> None:
    from metagate.methods.si import SI

    assert SI.Config().reset_optimizer is False
    assert METHODS.get("ewc").Config().reset_optimizer is True


def test_task_incremental_prediction_uses_only_the_task_classes() -> None:
    raw = {"benchmark": {"name": "gated_teacher", "num_tasks": 3, "scenario": "task", "train_per_task": 50}, "method": {"name": "finetune"}}
    cfg = config_from_dict(raw)
    stream = build_stream(cfg.benchmark, 0)
    method = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
    for task in stream.tasks:
        pred = method.predict(task.x_test, task).argmax(1)
        assert set(pred.unique().tolist()) <= set(task.classes)


def test_per_task_heads_give_each_task_its_own_output_layer_and_forget_less() -> None:
    raw = {"benchmark": {**STREAM, "train_per_task": 600}, "method": {"name": "finetune", "backbone": {"hidden": [32]}},
           "trainer": {"epochs": 2, "progress": False}}
    shared = Trainer(config_from_dict(raw)).fit()
    per_task = Trainer(config_from_dict(raw, ["method.heads=per_task"])).fit()
    assert (shared["test_time_info"], per_task["test_time_info"]) == ("none", "task_id")
    assert per_task["forgetting"] < shared["forgetting"]
    method = Trainer(config_from_dict(raw, ["method.heads=per_task"])).method
    x = method.stream.tasks[0].x_test[:4]
    t0, t1 = method.stream.tasks[0], method.stream.tasks[1]
    full = method.model(x).view(4, method.num_heads, -1)
    assert torch.equal(method(x, t1), full[:, 1]) and torch.equal(method(x, t0, torch.tensor([1, 0, 1, 0])), full[[0, 1, 2, 3], [1, 0, 1, 0]])
    with pytest.raises(ValueError, match="heads=per_task is for domain-incremental"):
        Trainer(config_from_dict({**raw, "benchmark": {"name": "gated_teacher", "scenario": "task"}}, ["method.heads=per_task"]))


def test_the_penalty_gradient_added_directly_equals_autograds() -> None:
    raw = {"benchmark": {**STREAM, "train_per_task": 200}, "method": {"name": "ewc", "backbone": {"hidden": [16]}}, "trainer": {"epochs": 1, "progress": False}}
    trainer = Trainer(config_from_dict(raw))
    trainer.fit()
    stab, model = trainer.method.stabilizer, trainer.method.model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # away from the anchor
    model.zero_grad()
    value = stab.penalty()
    value.backward()
    autograd = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    direct = stab.add_penalty_grad()
    assert torch.allclose(direct, value.detach(), rtol=1e-5)
    assert all(torch.allclose(p.grad, g, rtol=1e-5, atol=1e-9) for p, g in zip(model.parameters(), autograd))


def test_context_input_appends_the_tasks_context_and_is_recorded() -> None:
    raw = {"benchmark": {**STREAM, "train_per_task": 300}, "method": {"name": "finetune", "backbone": {"hidden": [16]}},
           "trainer": {"epochs": 1, "progress": False}}
    trainer = Trainer(config_from_dict(raw, ["method.context_input=concat"]))
    method = trainer.method
    assert method.model.hidden[0].in_features == method.stream.input_dim + method.stream.context_dim
    t1 = method.stream.tasks[1]
    x = t1.x_test[:3]
    assert torch.equal(method.model_input(x, t1)[:, -2:], t1.context.expand(3, -1))
    ids = torch.tensor([0, 2, 1])
    assert torch.equal(method.model_input(x, t1, ids)[:, -2:], method.stream.contexts()[ids])
    res = trainer.fit()
    assert res["test_time_info"] == "context"
    with pytest.raises(Exception, match="context through its masks"):
        config_from_dict(raw, ["method.name=xdg", "method.context_input=concat"])


def test_a_state_dict_loaded_in_the_same_process_does_not_share_adam_moments() -> None:
    """Loading a live method's state into a fresh one and stepping both on the same batch gives the
    same weights (torch would otherwise alias the moment tensors, and each step would advance both)."""
    cfg = config_from_dict({"seed": 0, "benchmark": STREAM, "method": {"name": "si", "backbone": {"hidden": [16]}}, "trainer": {"progress": False}})
    stream = build_stream(cfg.benchmark, 0)
    task = stream.tasks[0]
    batch = Batch(task.x_train[:32], task.y_train[:32])
    a = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
    a.before_task(task)
    a.train_step(batch, task)
    b = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
    b.load_state_dict(a.state_dict())
    for m in (a, b):
        m.train_step(batch, task)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), name
