"""The parameter-isolation family (issue 30): HAT, PackNet, SupSup, WSN. Earlier tasks' outputs stay bit-identical
where the method promises it, each method's own rule (attention-restricted gradients, magnitude pruning, supermasks,
top-c scores) does what its paper says, and an interrupted run resumes exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import whole_and_resumed
from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.base import Batch
from metagate.train import Trainer, task_seed


def raw_config(method: dict, seed: int = 0, epochs: int = 2, bench: dict | None = None) -> dict:
    return {
        "seed": seed,
        "benchmark": bench or {"name": "gated_teacher", "num_tasks": 3, "train_per_task": 400, "test_per_task": 200, "val_fraction": 0.1},
        "method": {"backbone": {"hidden": [32, 32]}, **method},
        "trainer": {"epochs": epochs, "batch_size": 64, "progress": False},
    }


def build(method: dict, seed: int = 0, epochs: int = 2, bench: dict | None = None):  # noqa: ANN201
    cfg = config_from_dict(raw_config(method, seed, epochs, bench))
    stream = build_stream(cfg.benchmark, seed)
    torch.manual_seed(task_seed(seed, -1))
    return create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")), stream, cfg


def train_task(method, task, cfg) -> None:  # noqa: ANN001
    """The task's steps through the method's hooks, as the Trainer takes them."""
    n, bs = task.num_train, cfg.trainer.batch_size
    gen = torch.Generator().manual_seed(task.index)
    method.train()
    method.before_task(task)
    for _ in range(cfg.trainer.epochs):
        order = torch.randperm(n, generator=gen)
        for b in range(math.ceil(n / bs)):
            idx = order[b * bs : (b + 1) * bs]
            method.train_step(Batch(task.x_train[idx], task.y_train[idx]), task)
    method.after_task(task)
    method.eval()


# ------------------------------------------------------------------------------------------------ hat


def test_hat_weights_fully_attended_by_an_earlier_task_stay_bit_identical_and_it_forgets_little() -> None:
    method, stream, cfg = build({"name": "hat", "backbone": {"hidden": [32, 32], "dropout": 0.0}, "input_dropout": 0.0}, epochs=4)
    t0 = stream.tasks[0]
    train_task(method, t0, cfg)
    views = {k: v.clone() for k, v in method.gradient_views().items()}
    before = [(layer.weight.detach().clone(), layer.bias.detach().clone()) for layer in method.layers]
    acc0 = (method.predict(t0.x_test, t0).argmax(1) == t0.y_test).float().mean()
    for task in stream.tasks[1:]:
        train_task(method, task, cfg)
    frozen = 0
    for l, (layer, (w, b)) in enumerate(zip(method.layers, before)):
        shut = views[f"layer{l}.weight"] == 0  # attention exactly 1 on both ends: no gradient ever again
        frozen += int(shut.sum())
        assert torch.equal(layer.weight.detach()[shut], w[shut])
        assert torch.equal(layer.bias.detach()[views[f"layer{l}.bias"] == 0], b[views[f"layer{l}.bias"] == 0])
    assert frozen > 0
    acc0_after = (method.predict(t0.x_test, t0).argmax(1) == t0.y_test).float().mean()
    assert abs(float(acc0_after - acc0)) <= 0.02


def test_hat_anneals_the_scale_within_each_epoch_and_compensates_the_embedding_gradient() -> None:
    method, stream, cfg = build({"name": "hat"})
    task = stream.tasks[0]
    method.train()
    method.before_task(task)
    seen = []
    for s in range(method._steps_per_epoch + 1):
        method.train_step(Batch(task.x_train[:64], task.y_train[:64]), task)
        seen.append(method._s)
    s_max = method.cfg.s_max
    assert seen[0] == pytest.approx(1 / s_max) and seen[-1] == pytest.approx(1 / s_max)  # a new epoch starts low again
    assert seen[-2] == pytest.approx((s_max - 1 / s_max) * 64 * (len(seen) - 2) / task.num_train + 1 / s_max)
    assert all(a < b for a, b in zip(seen[:-2], seen[1:-1]))
    assert all(float(e.abs().max()) <= method.cfg.thres_emb for e in method.embeddings)


def test_hat_run_reports_bytes_and_resumes_exactly(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    whole, resumed = whole_and_resumed(raw_config({"name": "hat"}), tmp_path, monkeypatch)
    assert resumed["acc_matrix"] == whole["acc_matrix"] and resumed["task_bytes"] == whole["task_bytes"]
    k = build_stream(config_from_dict(raw_config({"name": "hat"})).benchmark, 0).num_outputs
    assert whole["task_bytes"] == [(32 + 32) * 4 + (32 * k + k) * 4] * 3  # two embeddings and a head, float32
    assert whole["test_time_info"] == "task_id"


# ------------------------------------------------------------------------------------------------ packnet


def test_packnet_keeps_earlier_tasks_predictions_bit_identical_so_bwt_is_zero() -> None:
    method, stream, cfg = build({"name": "packnet", "lr": 0.05})
    t0 = stream.tasks[0]
    train_task(method, t0, cfg)
    pred = method.predict(t0.x_test, t0)
    for task in stream.tasks[1:]:
        train_task(method, task, cfg)
    assert torch.equal(method.predict(t0.x_test, t0), pred)


def test_packnet_releases_the_pruned_fraction_of_each_task_by_magnitude_and_the_last_task_keeps_the_rest() -> None:
    method, stream, cfg = build({"name": "packnet", "lr": 0.05, "prune": 0.75})
    train_task(method, stream.tasks[0], cfg)
    for o, bits in zip(method.owners(), method.owned[stream.tasks[0].index]):
        owned = bits.bool()
        assert torch.equal(owned, o == 1)
        assert abs(float(owned.float().mean()) - 0.25) < 1e-3  # round(0.75 n) released
    params = dict(method.model.named_parameters())
    for name, o in zip(method.weight_names, method.owners()):
        w = params[name].detach()
        assert torch.all(w[o == 0] == 0)  # released weights are zero
        assert float(w[o == 1].abs().min()) >= float(w[o == 0].abs().max())
    for task in stream.tasks[1:]:
        train_task(method, task, cfg)
    assert all(int((o == 0).sum()) == 0 for o in method.owners())  # the last task is not pruned (code: -1)


def test_packnet_run_has_zero_bwt_counts_mask_bits_and_resumes_exactly(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    raw = raw_config({"name": "packnet", "lr": 0.05})
    whole, resumed = whole_and_resumed(raw, tmp_path, monkeypatch)
    assert resumed["acc_matrix"] == whole["acc_matrix"]
    r = np.asarray(whole["acc_matrix"])
    for j in range(3):
        assert np.all(r[j:, j] == r[j, j])
    stream = build_stream(config_from_dict(raw).benchmark, 0)
    head = (32 * stream.num_outputs + stream.num_outputs) * 4
    assert whole["task_bytes"] == [math.ceil(stream.input_dim * 32 / 8) + 32 * 32 // 8 + head] * 3  # 1 bit per masked weight


# ------------------------------------------------------------------------------------------------ hot paths

from test_hot_paths import host_reads  # noqa: E402,F401  (the fixture that records host reads)


@pytest.mark.parametrize(
    ("name", "method"),
    [("hat", {}), ("packnet", {"prune_last": True, "retrain_fraction": 0.5})],
    ids=["hat-validation-schedule", "packnet-pruning-step"],
)
def test_steps_that_end_an_epoch_or_prune_read_nothing_back(name: str, method: dict, host_reads: list[str]) -> None:  # noqa: F811
    """HAT's end-of-epoch validation schedule and PackNet's pruning run inside a step: on the device."""
    m, stream, cfg = build({"name": name, **method}, epochs=1)
    for task in stream.tasks[:2]:
        train_task(m, task, cfg)
    task = stream.tasks[2]
    m.train()
    m.before_task(task)
    host_reads.clear()
    for s in range(math.ceil(task.num_train / 64)):  # a whole epoch: HAT validates at its end, PackNet prunes halfway
        m.train_step(Batch(task.x_train[64 * s : 64 * (s + 1)], task.y_train[64 * s : 64 * (s + 1)]), task)
    assert host_reads == []
