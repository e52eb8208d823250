"""HyperMask (Książek & Spurek 2023): hypernetwork-generated semi-binary weight masks per task."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import train_on as train
from conftest import whole_and_resumed
from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.hypermask import ramped_sparsity, random_crop
from metagate.nn.hypernetwork import HyperNetwork, percentile
from metagate.train import Trainer, task_seed

SMALL = {"backbone": {"hidden": [32, 32]}, "hnet_hidden": [16, 16], "embedding_dim": 8}


def raw_config(method: dict, seed: int = 0, **bench) -> dict:  # noqa: ANN003
    return {
        "seed": seed,
        "benchmark": {"name": "gated_teacher", "num_tasks": 3, "train_per_task": 300, "test_per_task": 200, **bench},
        "method": {"name": "hypermask", **SMALL, **method},
        "trainer": {"progress": False, "epochs": 1, "batch_size": 64},
    }


def build(method: dict, seed: int = 0, **bench):  # noqa: ANN003, ANN201
    cfg = config_from_dict(raw_config(method, seed, **bench))
    stream = build_stream(cfg.benchmark, seed)
    torch.manual_seed(task_seed(seed, -1))
    return create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")), stream


@pytest.mark.parametrize("q", [0.0, 7.5, 30.0, 50.0, 99.0])
def test_percentile_interpolates_as_numpy_and_torchpercentile(q: float) -> None:
    values = torch.rand(37, 11, generator=torch.Generator().manual_seed(1))
    assert float(percentile(values, q)) == pytest.approx(float(np.percentile(values.numpy(), q)), rel=1e-6)
    ties = torch.randint(0, 5, (53,), generator=torch.Generator().manual_seed(2)).float()  # repeated values
    assert float(percentile(ties, q)) == pytest.approx(float(np.percentile(ties.numpy(), q)), rel=1e-6)


def test_hypernetwork_splits_one_batched_output_into_the_target_shapes() -> None:
    torch.manual_seed(0)
    hnet = HyperNetwork(5, [(3, 4), (3,), (2, 3)], [7], "elu")
    z = torch.randn(4, 5)
    outs = hnet(z)
    assert [tuple(o.shape) for o in outs] == [(4, 3, 4), (4, 3), (4, 2, 3)]
    one = hnet(z[2])  # a single input gives the same numbers as its row of the batch
    assert all(torch.allclose(a, b[2]) for a, b in zip(one, outs))


def test_masks_lie_in_the_unit_interval_and_the_percentile_zeroes_the_configured_fraction() -> None:
    method, stream = build({"sparsity": 30.0})
    masks = method.task_masks(stream.tasks[0])
    assert len(masks) == len(list(method.model.parameters()))
    for m in masks:
        assert float(m.min()) >= 0 and float(m.max()) <= 1
    for m in masks[:-1]:
        zeroed = float((m == 0).float().mean())
        assert abs(zeroed - 0.30) <= 1.0 / m.numel() + 1e-9
    assert bool((masks[-1] > 0).all())  # the output bias's mask is never thresholded
    flat = torch.cat([m.flatten() for m in masks[:-1]])
    assert float(method.unit_mask(stream.tasks[0]).float().mean()) == pytest.approx(float((flat > 0).float().mean()))
    dense, _ = build({"sparsity": 0.0})
    assert all(bool((m > 0).all()) for m in dense.task_masks(stream.tasks[0]))


def test_the_first_task_ramps_the_sparsity_as_the_code() -> None:
    assert [ramped_sparsity(i, 30.0, 4) for i in (1, 2, 3, 4, 5)] == [7.5, 15.0, 22.5, 30.0, 30.0]
    method, stream = build({"sparsity": 40.0})
    method.before_task(stream.tasks[0])  # 270 training samples, batch 64, 1 epoch: 5 iterations
    assert method.current_sparsity() == pytest.approx(8.0)
    for _ in range(4):
        method.count_step()  # four optimiser steps taken
    assert method.current_sparsity() == pytest.approx(40.0)
    method.before_task(stream.tasks[0])  # the count starts again
    method._position = 1  # later tasks: the full sparsity from the first step
    assert method.current_sparsity() == 40.0


def test_the_output_bias_is_neither_masked_nor_thresholded() -> None:
    method, stream = build({"sparsity": 50.0})
    task = stream.tasks[0]
    with torch.no_grad():
        method.model.head.bias.copy_(torch.arange(method.model.head.bias.numel(), dtype=torch.float32))
    masks = method.task_masks(task)
    x = task.x_test[:16]
    h = x.flatten(1)
    params = list(method.model.parameters())
    for i in range(len(method.model.hidden)):
        h = torch.relu(F.linear(h, params[2 * i] * masks[2 * i], params[2 * i + 1] * masks[2 * i + 1]))
    expected = F.linear(h, params[-2] * masks[-2], method.model.head.bias)  # raw output bias
    method._cache.clear()
    got = method.target(x, method.task_weights(task))
    assert torch.allclose(got, expected, atol=1e-6)
    assert "head.bias" not in method.task_weights(task)


def drift_after_a_second_task(beta: float, lam: float) -> tuple[float, float, float]:
    """How far task 0's hypernetwork output (relative) and its logits move while task 1 trains, and the
    fraction of task 0's test predictions that change."""
    method, stream = build({"beta": beta, "lambda": lam}, num_tasks=2)
    t0, t1 = stream.tasks
    train(method, t0, 60)
    with torch.no_grad():
        out0 = method.hnet.flat(method.hnet_input([t0.index]))[0].clone()
        logits0 = method.predict(t0.x_test, t0)
    train(method, t1, 60, seed=1)
    with torch.no_grad():
        out1 = method.hnet.flat(method.hnet_input([t0.index]))[0]
        logits1 = method.predict(t0.x_test, t0)
    changed = float((logits1.argmax(1) != logits0.argmax(1)).float().mean())
    return float((out1 - out0).norm() / out0.norm()), float((logits1 - logits0).abs().mean()), changed


def test_the_output_regulariser_keeps_earlier_tasks_masks_and_predictions() -> None:
    free_out, _, _ = drift_after_a_second_task(0.0, 0.0)
    kept_out, _, _ = drift_after_a_second_task(1.0, 0.0)
    assert kept_out < 0.02 < 0.1 < free_out  # measured: 0.0005 vs 0.49
    # with the L1 anchor on the shared target weights too, task 0's predictions stay nearly unchanged
    # (measured: mean |logit change| 0.041 vs 0.193 and 9.5% vs 58.5% of predictions changed)
    _, free_logits, free_changed = drift_after_a_second_task(0.0, 0.1)
    _, kept_logits, kept_changed = drift_after_a_second_task(1.0, 0.1)
    assert kept_logits < 0.35 * free_logits
    assert kept_changed < 0.3 * free_changed


def test_the_l1_term_anchors_the_target_weights_at_the_task_start() -> None:
    moved = []
    for lam in (0.0, 1.0):
        method, stream = build({"beta": 0.0, "lambda": lam}, num_tasks=2)
        train(method, stream.tasks[0], 20)
        before = torch.cat([p.detach().flatten() for p in method.model.parameters()])
        train(method, stream.tasks[1], 20, seed=1)
        after = torch.cat([p.detach().flatten() for p in method.model.parameters()])
        moved.append(float((after - before).abs().sum()))
    assert moved[1] < 0.5 * moved[0]


def test_state_dict_round_trip_gives_identical_predictions_and_identical_continued_training() -> None:
    a, stream = build({"sparsity": 20.0}, num_tasks=3)
    train(a, stream.tasks[0], 8)
    train(a, stream.tasks[1], 8, seed=1)
    b, _ = build({"sparsity": 20.0}, seed=7, num_tasks=3)  # another seed: every tensor starts elsewhere
    b.load_state_dict(a.state_dict())
    b.eval()
    for t in stream.tasks:
        assert torch.equal(a.predict(t.x_test, t), b.predict(t.x_test, t))
    train(a, stream.tasks[2], 6, seed=2)
    train(b, stream.tasks[2], 6, seed=2)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q), name



def test_resume_equals_uninterrupted(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    whole, resumed = whole_and_resumed(raw_config({"sparsity": 30.0, "task_inference": "entropy"}), tmp_path, monkeypatch)
    for key in ("acc_matrix", "initial_acc", "mask_density", "mask_overlap", "task_inference_acc", "mask_value_mean"):
        assert resumed[key] == whole[key], key
    saved = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert saved["test_time_info"] == "none" and saved["task_inference"] == "entropy"
    assert len(saved["mask_density"]) == 3 and saved["mask_overlap_mean"] is not None


@pytest.mark.parametrize(
    ("option", "expected"),
    [({}, "task_id"), ({"embedding": "context"}, "context"), ({"task_inference": "entropy"}, "none"),
     ({"embedding": "context", "task_inference": "entropy"}, "none")],
)
def test_test_time_info_per_option(option: dict, expected: str) -> None:
    method, _ = build(option)
    assert method.report().test_time_info == expected


def test_with_context_embeddings_an_untrained_task_gets_its_mask_from_its_context() -> None:
    method, stream = build({"embedding": "context"}, num_tasks=3)
    t0, t1, t2 = stream.tasks
    before = torch.cat([m.flatten() for m in method.task_masks(t2)])
    train(method, t0, 20)
    after = torch.cat([m.flatten() for m in method.task_masks(t2)])
    assert not torch.allclose(before, after)  # learning task 0 shaped the mask task 2 gets zero-shot
    method.contexts[t2.index] = method.contexts[t0.index]  # same context, same mask
    assert all(torch.equal(a, b) for a, b in zip(method.task_masks(t2), method.task_masks(t0)))
    logits = method.predict(t2.x_test, t2)
    assert torch.isfinite(logits).all()


def test_entropy_inference_picks_per_sample_the_task_with_the_least_entropy(monkeypatch) -> None:  # noqa: ANN001
    """Each trained task's mask is tried on every sample; the sample gets the logits of the task whose
    softmax has the lowest entropy (``entropy.py:21-77``); only trained tasks are candidates."""
    method, stream = build({"task_inference": "entropy"}, num_tasks=3)
    method.tasks_trained.fill_(2)
    confident, flat = torch.tensor([6.0, 0.0, 0.0, 0.0]), torch.zeros(4)
    rows = {  # task index -> its logits for the 3 samples
        stream.tasks[0].index: torch.stack([confident, flat, flat]),
        stream.tasks[1].index: torch.stack([flat, confident.roll(1), flat + torch.tensor([0.0, 0.0, 0.1, 0.0])]),
        stream.tasks[2].index: torch.stack([confident * 3] * 3),  # untrained: never chosen
    }
    monkeypatch.setattr(method, "task_weights", lambda task: {"index": task.index})
    monkeypatch.setattr(method, "target", lambda x, weights: rows[weights["index"]])
    logits, chosen = method.infer(torch.zeros(3, stream.input_dim))
    assert chosen.tolist() == [0, 1, 1]
    assert torch.equal(logits, torch.stack([confident, confident.roll(1), rows[stream.tasks[1].index][2]]))
    assert torch.equal(method.predict(torch.zeros(3, stream.input_dim), stream.tasks[2]), logits)  # the given task is ignored


def test_random_crop_shifts_each_image_within_the_padding() -> None:
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    torch.manual_seed(0)
    out = random_crop(x, 2)
    assert out.shape == x.shape
    for i in range(2):  # padding takes the batch's smallest value; the rest is the image's own pixels
        assert set(out[i].flatten().tolist()) <= set(x[i].flatten().tolist()) | {float(x.amin())}
    assert not torch.equal(out, x)


def test_refused_configs_name_the_fix() -> None:
    from metagate.schema import ConfigError

    with pytest.raises((ConfigError, ValueError), match="resnet18|mlp or cnn"):
        build({"backbone": {"kind": "resnet18"}})
    with pytest.raises((ConfigError, ValueError), match="embedding=context"):
        build({"context_input": "concat"})


@pytest.mark.slow
def test_entropy_inference_finds_the_task_on_permuted_digits() -> None:
    """Behavioural (about 15 s): three permutations of scikit-learn's digits, 800 iterations each; the
    lowest-entropy mask is the sample's own task well above chance (measured: 87, 70, 87%)."""
    raw = {
        "seed": 0,
        "benchmark": {"name": "permuted", "dataset": "digits", "num_tasks": 3, "identity_first": False},
        "method": {"name": "hypermask", "backbone": {"hidden": [128, 128]}, "hnet_hidden": [16, 16], "embedding_dim": 8,
                   "task_inference": "entropy", "beta": 0.01},
        "trainer": {"iterations_per_task": 800, "batch_size": 64, "progress": False, "checkpoint": False},
    }
    res = Trainer(config_from_dict(raw)).fit()
    assert res["test_time_info"] == "none"
    assert min(res["task_inference_acc"]) > 0.55 and res["task_inference_acc_mean"] > 0.7, res["task_inference_acc"]
