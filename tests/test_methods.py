"""Classic baselines behave as the literature says on a small synthetic stream."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import METHODS, create_method
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
