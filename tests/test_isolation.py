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


# ------------------------------------------------------------------------------------------------ supsup


def test_supsup_trains_scores_only_over_fixed_signed_constant_weights_and_keeps_earlier_tasks_bit_identical() -> None:
    method, stream, cfg = build({"name": "supsup", "lr": 1e-2})
    weights = {k: v.detach().clone() for k, v in method.model.state_dict().items()}
    for name in method.weight_names:  # init.py signed_constant: +-sqrt(2 / fan_in)
        w = weights[name]
        assert torch.allclose(w.abs(), torch.full_like(w, math.sqrt(2.0 / w[0].numel())))
    t0 = stream.tasks[0]
    train_task(method, t0, cfg)
    pred = method.predict(t0.x_test, t0)
    assert 0.05 < float(method.unit_mask(t0).float().mean()) < 0.95
    for task in stream.tasks[1:]:
        train_task(method, task, cfg)
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert torch.equal(method.predict(t0.x_test, t0), pred)


def test_supsup_oneshot_inference_needs_no_task_and_finds_the_task_of_each_batch() -> None:
    bench = {"name": "permuted", "dataset": "digits", "num_tasks": 3, "identity_first": True, "context": "random"}
    method, stream, cfg = build({"name": "supsup", "lr": 1e-2, "task_inference": "oneshot", "inference_samples": 16, "inference_batch": 32}, epochs=5, bench=bench)
    for task in stream.tasks:
        train_task(method, task, cfg)
    assert method.report().test_time_info == "none"
    found = method.report().figures["task_inference_acc"]
    assert min(found) >= 0.9, found
    wrong_task = stream.tasks[1]  # the task argument is ignored: predictions come from the inferred mask
    t0 = stream.tasks[0]
    assert torch.equal(method.predict(t0.x_test[:64], wrong_task), method.predict(t0.x_test[:64], t0))


def test_supsup_transfer_starts_a_task_from_the_mean_of_earlier_scores_and_predicts_unseen_tasks_with_it() -> None:
    method, stream, cfg = build({"name": "supsup", "lr": 1e-2, "transfer": True})
    finals = []
    for task in stream.tasks[:2]:
        train_task(method, task, cfg)
        finals.append([s.detach().clone() for s in method.scores])
    mean = [(a + b) / 2 for a, b in zip(*finals)]
    unseen = stream.tasks[2]
    for m, want in zip(method.task_masks(unseen), mean):  # zero-shot: the running mean's mask
        assert torch.equal(m, (want >= 0).float())
    method.before_task(unseen)
    for s, want in zip(method.scores, mean):
        torch.testing.assert_close(s.detach(), want)


@pytest.mark.parametrize("method", [{}, {"task_inference": "oneshot", "transfer": True}], ids=["given", "oneshot-transfer"])
def test_supsup_run_counts_one_bit_per_weight_and_resumes_exactly(method: dict, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    raw = raw_config({"name": "supsup", "lr": 1e-2, **method})
    whole, resumed = whole_and_resumed(raw, tmp_path, monkeypatch)
    assert resumed["acc_matrix"] == whole["acc_matrix"]
    assert resumed.get("task_inference_acc") == whole.get("task_inference_acc")
    stream = build_stream(config_from_dict(raw).benchmark, 0)
    k = stream.num_outputs
    assert whole["task_bytes"] == [math.ceil(stream.input_dim * 32 / 8) + 32 * 32 // 8 + math.ceil(32 * k / 8)] * 3


# ------------------------------------------------------------------------------------------------ wsn


def test_top_fraction_mask_keeps_wsn_percentile_share_and_passes_the_gradient_straight_through() -> None:
    from metagate.nn.gates import topk_ste

    scores = torch.arange(10.0).flip(0).requires_grad_(True)
    mask = topk_ste(scores, 0.3)
    assert mask.tolist() == [1.0] * 4 + [0.0] * 6  # k = 1 + round(0.7 * 9) = 7: the 7th smallest (6.0) is the cut, kept
    upstream = torch.linspace(-1, 1, 10)
    (mask * upstream).sum().backward()
    assert torch.equal(scores.grad, upstream)


def test_huffman_bits_is_the_coded_length() -> None:
    from metagate.methods.wsn import huffman_bits

    assert huffman_bits([0] * 5) == 5
    assert huffman_bits([0, 0, 0, 0, 1, 1, 2, 3]) == 4 * 1 + 2 * 2 + 1 * 3 + 1 * 3  # codes 0, 10, 110, 111


def test_wsn_freezes_weights_earlier_tasks_use_and_keeps_their_predictions_bit_identical() -> None:
    method, stream, cfg = build({"name": "wsn", "c": 0.3})
    t0 = stream.tasks[0]
    train_task(method, t0, cfg)
    pred = method.predict(t0.x_test, t0)
    params = dict(method.model.named_parameters())
    before = [params[n].detach().clone() for n in method.weight_names]
    used0 = [u.clone() for u in method.used()]
    for m in method.stored[t0.index]:
        assert abs(float(m.bool().float().mean()) - 0.3) < 0.01  # the top c of each layer
    for task in stream.tasks[1:]:
        train_task(method, task, cfg)
    params = dict(method.model.named_parameters())
    for name, w, u in zip(method.weight_names, before, used0):
        assert torch.equal(params[name].detach()[u], w[u])
        assert not torch.equal(params[name].detach()[~u], w[~u])  # free weights did train
    assert torch.equal(method.predict(t0.x_test, t0), pred)


def test_wsn_run_reports_coded_mask_bytes_and_resumes_exactly(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    raw = raw_config({"name": "wsn"})
    whole, resumed = whole_and_resumed(raw, tmp_path, monkeypatch)
    assert resumed["acc_matrix"] == whole["acc_matrix"] and resumed["task_bytes"] == whole["task_bytes"]
    r = np.asarray(whole["acc_matrix"])
    for j in range(3):
        assert np.all(r[j:, j] == r[j, j])
    stream = build_stream(config_from_dict(raw).benchmark, 0)
    head = (32 * stream.num_outputs + stream.num_outputs) * 4
    for bits, size in zip(whole["wsn"]["mask_bits_coded"], whole["task_bytes"]):
        assert size == math.ceil(bits / 8) + head
        assert 0 < bits <= (stream.input_dim * 32 + 32 * 32) * 1.1  # about 1 bit per weight or less at c = 0.5
