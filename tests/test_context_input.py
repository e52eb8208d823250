"""context_input=film: FiLM conditioning (Perez et al. 2018) of a method without gating on the task's context."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from conftest import train_tasks
from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.base import Batch
from metagate.nn.backbones import CNN, MLP
from metagate.nn.film import FiLMNet
from metagate.train import Trainer, task_seed
from test_hot_paths import host_reads  # noqa: F401  (the fixture)

# Tasks switch on different hidden units of one teacher: they conflict, and the context identifies the task.
GATED = {"name": "gated_teacher", "num_tasks": 3, "scenario": "domain", "train_per_task": 1000, "test_per_task": 500}
SMALL = {**GATED, "train_per_task": 300, "test_per_task": 100}


def make(name: str = "finetune", context_input: str = "film", bench: dict[str, Any] = SMALL, **method: Any):  # noqa: ANN201
    raw = {"benchmark": bench, "method": {"name": name, "backbone": {"hidden": [32, 32]}, "context_input": context_input, **method}}
    cfg = config_from_dict(raw)
    stream = build_stream(cfg.benchmark, 0)
    torch.manual_seed(task_seed(0, -1))
    return create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")), stream


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_a_film_net_starts_as_the_plain_net(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "mlp":
        backbone, x = MLP(10, [16, 8], 3), torch.randn(5, 10)
    else:
        backbone, x = CNN((1, 8, 8), [4, 6], [8], 3), torch.randn(5, 1, 8, 8)
    net = FiLMNet(backbone, context_dim=4)
    context = torch.randn(5, 4)  # any context: the generator's output is exactly zero at init
    assert torch.equal(net(x, context), backbone(x))
    masks = [torch.rand(w) > 0.5 for w in backbone.gated_widths]  # unit masks still apply, after the ReLU
    assert torch.equal(net(x, context, unit_masks=masks), backbone(x, unit_masks=masks))
    gamma_beta = net.generator(context)
    assert [g.shape[1] for g, _ in gamma_beta] == backbone.gated_widths
    assert all(torch.equal(g, torch.ones_like(g)) and torch.equal(b, torch.zeros_like(b)) for g, b in gamma_beta)


def test_film_modulates_the_pre_activation_per_unit_and_per_channel() -> None:
    torch.manual_seed(0)
    mlp, x = MLP(6, [5], 2), torch.randn(3, 6)
    gamma, beta = torch.rand(3, 5) + 0.5, torch.randn(3, 5)
    expected = mlp.head(torch.relu(gamma * mlp.hidden[0](x) + beta))
    assert torch.allclose(mlp(x, film=[(gamma, beta)]), expected)
    cnn, img = CNN((1, 4, 4), [3], [], 2), torch.randn(3, 1, 4, 4)
    g, b = torch.rand(3, 3) + 0.5, torch.randn(3, 3)
    h = torch.nn.functional.max_pool2d(torch.relu(g[:, :, None, None] * cnn.convs[0](img) + b[:, :, None, None]), 2)
    assert torch.allclose(cnn(img, film=[(g, b)]), cnn.head(h.flatten(1)))
    with pytest.raises(ValueError, match="got 2 FiLM"):
        mlp(x, film=[(gamma, beta)] * 2)


def test_a_method_with_film_starts_as_the_plain_method_and_learns_a_context_dependence() -> None:
    film, stream = make()
    plain, _ = make(context_input="none")
    plain.model.load_state_dict(film.model.backbone.state_dict())
    x = stream.tasks[0].x_test[:20]
    assert all(torch.equal(film(x, t), plain(x, t)) for t in stream.tasks)  # same weights, same logits
    train_tasks(film, stream.tasks[:1], 5, 64)
    outs = [film.predict(x, t) for t in stream.tasks]
    assert not torch.allclose(outs[0], outs[1], atol=1e-4) and not torch.allclose(outs[1], outs[2], atol=1e-4)
    assert film.model.generator.linear.weight.abs().sum() > 0
    assert film.report().test_time_info == "context"


def test_mixed_batches_take_each_samples_own_context() -> None:
    method, stream = make("joint")
    train_tasks(method, stream.tasks[:2], 5, 64)
    ids = torch.tensor([0, 2, 1, 1, 0])
    x = stream.tasks[0].x_test[:5]
    mixed = method(x, stream.tasks[0], ids)
    one_by_one = torch.cat([method(x[i : i + 1], stream.tasks[int(t)]) for i, t in enumerate(ids)])
    assert torch.allclose(mixed, one_by_one, atol=1e-6)


def test_finetune_with_film_forgets_less_than_without_context() -> None:
    """Behavioural: on conflicting tasks identified by their context, the context's scale and shift per
    unit give finetuning a better final accuracy (film ahead on 10 of 10 seeds, by 0.027 on average)."""
    gains = []
    for seed in range(3):
        acc = {}
        for mode in ("none", "film"):
            raw = {"seed": seed, "benchmark": GATED, "method": {"name": "finetune", "backbone": {"hidden": [64]}},
                   "trainer": {"epochs": 5, "progress": False}}
            acc[mode] = Trainer(config_from_dict(raw, [f"method.context_input={mode}"])).fit()["acc"]
        gains.append(acc["film"] - acc["none"])
    assert min(gains) > 0 and sum(gains) / len(gains) > 0.01, gains


def test_the_stabilisers_protect_the_generator() -> None:
    si, stream = make("si", c=1.0)
    assert any(p is si.model.generator.linear.weight for p in si.stabilizer.params)
    assert "generator.linear.weight" in si.stabilizer.quadratic.names
    train_tasks(si, stream.tasks[:2], 5, 64)
    assert si.stabilizer.quadratic.importance("generator.linear.weight").abs().sum() > 0
    ewc, stream = make("ewc", **{"lambda": 1.0, "fisher_samples": 100})
    train_tasks(ewc, stream.tasks[:2], 5, 64)
    assert ewc.stabilizer.quadratic.importance("generator.linear.weight").abs().sum() > 0
    assert ewc.stabilizer.quadratic.importance("generator.linear.bias").abs().sum() > 0


def test_a_film_method_round_trips_through_its_state_dict() -> None:
    method, stream = make("si", c=1.0)
    train_tasks(method, stream.tasks[:2], 5, 64)
    state = copy.deepcopy(method.state_dict())  # as from a file: Adam's loaded moments would alias the live ones
    assert any(k.startswith("model.generator.") for k in state)
    fresh, _ = make("si", c=1.0)
    fresh.load_state_dict(state)
    x = stream.tasks[2].x_test[:10]
    assert all(torch.equal(method.predict(x, t), fresh.predict(x, t)) for t in stream.tasks)
    train_tasks(method, stream.tasks[2:], 2, 64)  # the stabiliser's state came along too: training continues alike
    train_tasks(fresh, stream.tasks[2:], 2, 64)
    assert torch.equal(method.predict(x, stream.tasks[0]), fresh.predict(x, stream.tasks[0]))


def test_a_training_step_with_film_reads_nothing_back(host_reads: list[str]) -> None:  # noqa: F811
    method, stream = make("si", c=1.0)
    train_tasks(method, stream.tasks[:1], 5, 64)
    task = stream.tasks[1]
    method.before_task(task)
    host_reads.clear()
    for s in range(3):
        method.train_step(Batch(task.x_train[64 * s : 64 * s + 64], task.y_train[64 * s : 64 * s + 64]), task)
    assert host_reads == []


def test_film_on_a_cnn_trains_with_ewc() -> None:
    raw = {"benchmark": {"name": "rotated", "dataset": "digits", "num_tasks": 2, "max_angle": 90},
           "method": {"name": "ewc", "lambda": 1.0, "fisher_samples": 50, "context_input": "film",
                      "backbone": {"kind": "cnn", "channels": [4, 8], "hidden": [16]}},
           "trainer": {"epochs": 1, "progress": False}}
    trainer = Trainer(config_from_dict(raw))
    res = trainer.fit()
    assert res["test_time_info"] == "context"
    generator = trainer.method.model.generator
    assert generator.widths == [4, 8, 16]
    assert trainer.method.stabilizer.quadratic.importance("generator.linear.weight").abs().sum() > 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method.name=xdg"], "context through its masks"),
        (["method.backbone.kind=resnet18"], "mlp or cnn backbone, not resnet18"),
        (["method.backbone.hidden=[]"], "the mlp has none"),
    ],
)
def test_film_is_refused_where_it_cannot_apply(overrides: list[str], message: str) -> None:
    raw = {"benchmark": SMALL, "method": {"name": "finetune", "context_input": "film"}}
    with pytest.raises(Exception, match=message) as info:
        config_from_dict(raw, overrides)
    assert "context_input" in str(info.value)
