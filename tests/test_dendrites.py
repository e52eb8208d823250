"""Active dendrites (Iyer et al. 2022): k-winners, segment gating, sparse weights, the method."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from conftest import whole_and_resumed
from metagate.config import config_from_dict, load_config
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.base import Batch
from metagate.nn.dendrites import DendriticLayer, DendriticMLP, KWinners, kwinners
from metagate.train import Trainer, task_seed

pytest.importorskip("sklearn")  # the permuted digits stream


def raw(method: dict, seed: int = 0, num_tasks: int = 3, epochs: int = 4) -> dict:
    return {
        "seed": seed,
        "benchmark": {"name": "permuted", "dataset": "digits", "num_tasks": num_tasks},
        "method": method,
        "trainer": {"epochs": epochs, "batch_size": 32, "lr": 1e-3, "progress": False, "device": "cpu"},
    }


def dendrites(**kw) -> dict:  # noqa: ANN003
    return {"name": "active_dendrites", "backbone": {"hidden": [128, 128]}, "kw_percent_on": 0.1, **kw}


def build(method: dict, seed: int = 0, num_tasks: int = 3):  # noqa: ANN201
    cfg = config_from_dict(raw(method, seed, num_tasks))
    stream = build_stream(cfg.benchmark, seed)
    torch.manual_seed(task_seed(seed, -1))
    return create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")), stream


# --------------------------------------------------------------------------- layers


def test_kwinners_keeps_exactly_k_per_sample_and_their_values() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 400)
    out = KWinners(400, 0.05)(x)
    assert KWinners(400, 0.05).k == 20
    assert torch.all((out != 0).sum(dim=1) == 20)
    top = x.topk(20, dim=1).values
    assert torch.equal(out.sort(dim=1, descending=True).values[:, :20].sort(dim=1).values, top.sort(dim=1).values)
    ties = torch.zeros(3, 10)  # all equal: still exactly k on (the code's break_ties=False would keep all)
    ties[:, 0] = 1.0
    assert torch.all((kwinners(ties + 1.0, 4) != 0).sum(dim=1) == 4)
    x.requires_grad_(True)
    kwinners(x, 20).sum().backward()
    assert torch.all(x.grad.sum(dim=1) == 20)  # the gradient reaches the winners only


def test_gating_picks_the_best_matching_segment_by_hand() -> None:
    layer = DendriticLayer(2, 2, num_segments=3, context_dim=2, weight_density=1.0, gating="max")
    with torch.no_grad():
        layer.ff.weight.copy_(torch.eye(2))
        layer.ff.bias.zero_()
        # unit 0: segment activations 1, 2, -3 for c = (1, 1); unit 1: 1, 0, 0
        layer.segments.copy_(torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]], [[0.5, 0.5], [0.0, 0.0], [1.0, -1.0]]]))
    x, c = torch.tensor([[2.0, 3.0]]), torch.tensor([[1.0, 1.0]])
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))  # noqa: E731
    assert torch.allclose(layer(x, c), torch.tensor([[2 * sig(2.0), 3 * sig(1.0)]]))
    assert layer.gates(c)[1].tolist() == [[1, 0]]
    layer.gating = "absolute_max"  # the paper's model: -3 wins unit 0, its sign kept
    assert torch.allclose(layer(x, c), torch.tensor([[2 * sig(-3.0), 3 * sig(1.0)]]))
    assert layer.gates(c)[1].tolist() == [[2, 0]]
    # a table of contexts read by index equals per-sample contexts
    table = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    index = torch.tensor([1, 0, 1])
    xs = torch.randn(3, 2)
    assert torch.allclose(layer(xs, table, index), layer(xs, table[index]))


def test_sparse_weights_keep_their_mask_through_training() -> None:
    method, stream = build(dendrites(weight_sparsity=0.5))
    net = method.model
    assert isinstance(net, DendriticMLP)
    first = net.layers[0].ff
    assert torch.all(first.weight_mask.sum(dim=1) == round(0.5 * 64))
    task = stream.tasks[0]
    method.train()
    method.before_task(task)
    for _ in range(3):
        method.train_step(Batch(task.x_train[:32], task.y_train[:32]), task)
    for lin in (first, net.layers[1].ff, net.head):
        assert torch.all(lin.weight[~lin.weight_mask] == 0)
        assert lin.weight[lin.weight_mask].abs().min() > 0
    assert net.layers[0].segments.shape == (128, 3, 64)  # a segment per task, over the 64-pixel prototype


# --------------------------------------------------------------------------- method


def test_prototypes_are_the_tasks_mean_inputs_and_inference_finds_them() -> None:
    method, stream = build(dendrites())
    for task in stream.tasks:
        method.before_task(task)
        assert torch.allclose(method.prototypes[task.index], task.x_train.flatten(1).mean(0))
    hits = method.prototype_hits()
    assert min(hits) > 0.9  # permutations make each task's inputs nearest its own mean


def test_forgets_less_than_finetune_of_the_same_size() -> None:
    def fit(method: dict) -> dict:
        return Trainer(config_from_dict(raw(method, seed=0, num_tasks=3))).fit()

    ours = fit(dendrites(test_context="given"))
    plain = fit({"name": "finetune", "backbone": {"hidden": [128, 128]}, "reset_optimizer": True})
    assert ours["test_time_info"] == "task_id" and plain["test_time_info"] == "none"
    assert ours["bwt"] > plain["bwt"] + 0.15


@pytest.mark.parametrize(
    ("options", "info"),
    [
        ({}, "none"),
        ({"test_context": "infer"}, "none"),
        ({"test_context": "given"}, "task_id"),
        ({"context": "stream"}, "context"),
        ({"context": "stream", "test_context": "given"}, "context"),
    ],
)
def test_test_time_info_follows_the_context_option(options: dict, info: str) -> None:
    method, _ = build(dendrites(**options))
    assert method.report().test_time_info == info


def test_a_stream_context_cannot_be_inferred() -> None:
    with pytest.raises(ValueError, match="test_context=given"):
        build(dendrites(context="stream", test_context="infer"))


def test_inferred_context_uses_nothing_but_the_input() -> None:
    method, stream = build(dendrites())
    for task in stream.tasks[:2]:
        method.before_task(task)
    method.eval()
    x = stream.tasks[1].x_test[:50]
    assert torch.equal(method.predict(x, stream.tasks[0]), method.predict(x, stream.tasks[2]))


def test_state_dict_round_trip_is_exact_with_si() -> None:
    opts = dendrites(si_c=0.1)
    a, stream = build(opts)
    a.train()
    for task in stream.tasks[:2]:
        a.before_task(task)
        for i in range(3):
            a.train_step(Batch(task.x_train[32 * i : 32 * (i + 1)], task.y_train[32 * i : 32 * (i + 1)]), task)
        a.after_task(task)
    b, _ = build(opts, seed=1)  # other weights and masks until loaded
    saved = io.BytesIO()  # through bytes, as a checkpoint (in memory, Adam's moments would be shared with a)
    torch.save(a.state_dict(), saved)
    saved.seek(0)
    b.load_state_dict(torch.load(saved, weights_only=False))
    for m in (a, b):
        m.eval()
    for task in stream.tasks:
        assert torch.equal(a.predict(task.x_test, task), b.predict(task.x_test, task))
    task = stream.tasks[2]
    for m in (a, b):
        m.train()
        m.before_task(task)
        m.train_step(Batch(task.x_train[:32], task.y_train[:32]), task)
        m.train_step(Batch(task.x_train[32:64], task.y_train[32:64]), task)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q), name


def test_resume_equals_uninterrupted(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    whole, resumed = whole_and_resumed(raw(dendrites(si_c=0.1), epochs=1), tmp_path, monkeypatch)
    for key in ("acc_matrix", "acc", "bwt", "val_acc_matrix", "prototype_hit_rate"):
        assert resumed[key] == whole[key], key


def test_ready_config_is_the_papers() -> None:
    cfg = load_config("permuted-fmnist-dendrites")
    m = cfg.method
    assert (m.name, m.backbone.hidden, m.kw_percent_on, m.weight_sparsity, m.gating) == (
        "active_dendrites", [2048, 2048], 0.05, 0.5, "absolute_max"
    )
    assert (cfg.trainer.batch_size, cfg.trainer.lr, cfg.trainer.epochs, cfg.trainer.optimizer) == (256, 5e-4, 3, "adam")
