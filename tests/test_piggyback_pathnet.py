"""Piggyback (Mallya et al. 2018) and PathNet (Fernando et al. 2017, HAT's re-implementation): frozen parts stay
bit-identical, so backward transfer is exactly zero; the threshold and its straight-through gradient; the path
search; exact resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import whole_and_resumed
from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.base import Batch
from metagate.nn.gates import binarize_ste
from metagate.train import Trainer, task_seed

FAST_PATHNET = {"generations": 3, "evals_per_path": 2}


def raw_config(method: dict, seed: int = 0, epochs: int = 2) -> dict:
    return {
        "seed": seed,
        "benchmark": {"name": "gated_teacher", "num_tasks": 3, "train_per_task": 400, "test_per_task": 200},
        "method": {"backbone": {"hidden": [32, 32]}, **method},
        "trainer": {"epochs": epochs, "batch_size": 64, "progress": False},
    }


def build(method: dict, seed: int = 0, epochs: int = 2):  # noqa: ANN201
    cfg = config_from_dict(raw_config(method, seed, epochs))
    stream = build_stream(cfg.benchmark, seed)
    torch.manual_seed(task_seed(seed, -1))
    return create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")), stream, cfg


def train_task(method, task, cfg) -> None:  # noqa: ANN001
    """The task's steps through the method's hooks, as the Trainer would take them."""
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


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ piggyback


def test_threshold_keeps_weights_whose_score_exceeds_it_and_passes_the_gradient_straight_through() -> None:
    scores = torch.tensor([-1.0, 0.0, 5e-3, 5.0001e-3, 1e-2, 3.0], requires_grad=True)
    mask = binarize_ste(scores, 5e-3)
    assert mask.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # Binarizer: le(threshold) -> 0, gt -> 1
    upstream = torch.tensor([0.5, -1.0, 2.0, 3.0, -4.0, 0.25])
    (mask * upstream).sum().backward()
    assert torch.equal(scores.grad, upstream)  # the identity backward, zeros and ones alike


def test_piggyback_score_gradient_is_the_masked_weights_gradient_times_the_weight() -> None:
    method, stream, cfg = build({"name": "piggyback"})
    train_task(method, stream.tasks[0], cfg)  # the backbone (pretrain=first_task)
    task = stream.tasks[1]
    method.train()
    method.before_task(task)
    x, y = task.x_train[:32], task.y_train[:32]
    method.optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(method(x, task), y).backward()
    got = [s.grad.clone() for s in method.scores]
    # by hand: d loss / d (W * m) times W, with m = 1 (every score starts at 1e-2 > 5e-3)
    params = dict(method.model.named_parameters())
    eff = {n: params[n].detach().clone().requires_grad_(True) for n in method.weight_names}
    h = torch.func.functional_call(method.model, eff, (x,))
    F.cross_entropy(method.mask_logits(method.heads[task.index](h), task), y).backward()
    for name, g in zip(method.weight_names, got):
        torch.testing.assert_close(g, eff[name].grad * params[name].detach())


def test_piggyback_keeps_backbone_masks_and_heads_bit_identical_so_bwt_is_zero() -> None:
    method, stream, cfg = build({"name": "piggyback", "lr_mask": 1e-2, "lr_classifier": 1e-2})
    train_task(method, stream.tasks[0], cfg)
    backbone = snapshot(method.model)
    train_task(method, stream.tasks[1], cfg)
    after_one = {"stored": snapshot(method.stored[1]), "head": snapshot(method.heads[1]), "head0": snapshot(method.heads[0])}
    assert method.stored[1][0].density() < 1.0  # the mask learned something (lr 1e-2: scores cross the threshold)
    preds = [method.predict(t.x_test, t) for t in stream.tasks[:2]]
    train_task(method, stream.tasks[2], cfg)
    for k, v in snapshot(method.model).items():
        assert torch.equal(v, backbone[k]), k
    for k, v in snapshot(method.stored[1]).items():
        assert torch.equal(v, after_one["stored"][k])
    for k, v in snapshot(method.heads[1]).items():
        assert torch.equal(v, after_one["head"][k])
    for k, v in snapshot(method.heads[0]).items():
        assert torch.equal(v, after_one["head0"][k])
    for t, p in zip(stream.tasks[:2], preds):
        assert torch.equal(method.predict(t.x_test, t), p)


def test_piggyback_run_has_zero_bwt_and_counts_mask_bits_per_task() -> None:
    raw = raw_config({"name": "piggyback", "lr_mask": 1e-2, "lr_classifier": 1e-2})
    res = Trainer(config_from_dict(raw)).fit()
    r = np.asarray(res["acc_matrix"])
    for j in range(3):
        assert np.all(r[j:, j] == r[j, j])  # every later row repeats the task's accuracy exactly
    assert res["bwt"] == 0.0 and res["test_time_info"] == "task_id"
    masked = res["piggyback"]["masked_weights"]
    k = build_stream(config_from_dict(raw).benchmark, 0).num_outputs
    head = (32 * k + k) * 4
    assert res["task_bytes"][1] == res["task_bytes"][2] == math.ceil(masked / 8) + head  # 1 bit per masked weight
    assert res["task_bytes"][0] == res["piggyback"]["backbone_bytes"] + head  # the first task trains the backbone
    assert res["mask_density"][0] == 1.0 and res["mask_density"][1] < 1.0


def test_piggyback_later_tasks_train_masks_only() -> None:
    method, stream, cfg = build({"name": "piggyback"})
    train_task(method, stream.tasks[0], cfg)
    method.before_task(stream.tasks[1])
    trained = {id(p) for g in method.optimizer.param_groups for p in g["params"]}
    assert trained == {id(s) for s in method.scores} | {id(p) for p in method.heads[1].parameters()}
    assert not any(p.requires_grad for p in method.model.parameters())
    assert [g["lr"] for g in method.optimizer.param_groups] == [1e-4, 1e-4]


def test_piggyback_decays_its_rates_every_15_epochs() -> None:
    method, stream, cfg = build({"name": "piggyback", "lr_decay_every": 1}, epochs=3)
    train_task(method, stream.tasks[0], cfg)
    task = stream.tasks[1]
    method.before_task(task)
    per_epoch = math.ceil(task.num_train / 64)
    seen = []
    for s in range(3 * per_epoch):
        method.train_step(Batch(task.x_train[:64], task.y_train[:64]), task)
        if s % per_epoch == 0:
            seen.append(method.optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([1e-4, 1e-5, 1e-6])


def test_piggyback_file_backbone_is_loaded_and_every_task_learns_a_mask(tmp_path) -> None:  # noqa: ANN001
    source, stream, cfg = build({"name": "piggyback"})
    path = tmp_path / "backbone.pt"
    torch.save(source.model.state_dict(), path)
    method, _, _ = build({"name": "piggyback", "pretrain": "file", "weights": str(path)}, seed=1)
    for k, v in method.model.state_dict().items():
        assert torch.equal(v, source.model.state_dict()[k])
    assert not method.uses_first_task(stream.tasks[0])


def test_piggyback_torchvision_backbone_without_torchvision_is_a_one_line_error() -> None:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torchvision is installed here")
    with pytest.raises(ValueError, match="needs the torchvision package") as err:
        build({"name": "piggyback", "pretrain": "torchvision"})
    assert "\n" not in str(err.value)


def test_piggyback_resume_is_exact(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    raw = raw_config({"name": "piggyback", "lr_mask": 1e-2})
    whole, resumed = whole_and_resumed(raw, tmp_path, monkeypatch)
    assert resumed["acc_matrix"] == whole["acc_matrix"] and resumed["task_bytes"] == whole["task_bytes"]


# ------------------------------------------------------------------------------------------------ pathnet


def test_pathnet_keeps_frozen_modules_and_earlier_heads_bit_identical_so_bwt_is_zero() -> None:
    method, stream, cfg = build({"name": "pathnet", **FAST_PATHNET})
    train_task(method, stream.tasks[0], cfg)
    path0 = method.best_path[0].clone()
    frozen = method.frozen.clone()
    assert int(frozen.sum()) == len({(l, int(m)) for l in range(2) for m in path0[l]})
    banks = [(b.weight.detach().clone(), b.bias.detach().clone()) for b in method.model.banks]
    head0 = snapshot(method.model.heads[0])
    pred = method.predict(stream.tasks[0].x_test, stream.tasks[0])
    for task in stream.tasks[1:]:
        train_task(method, task, cfg)
    for i, (b, (w, bias)) in enumerate(zip(method.model.banks, banks)):
        keep = frozen[i]
        assert torch.equal(b.weight[keep], w[keep]) and torch.equal(b.bias[keep], bias[keep])
        assert not torch.equal(b.weight[~keep], w[~keep])  # the others did train (or were reset)
    for k, v in snapshot(method.model.heads[0]).items():
        assert torch.equal(v, head0[k])
    assert torch.equal(method.best_path[0], path0)
    assert torch.equal(method.predict(stream.tasks[0].x_test, stream.tasks[0]), pred)


def test_pathnet_resets_modules_on_no_best_path_at_a_new_task() -> None:
    method, stream, cfg = build({"name": "pathnet", **FAST_PATHNET})
    train_task(method, stream.tasks[0], cfg)
    method.before_task(stream.tasks[1])
    for i, b in enumerate(method.model.banks):
        free = ~method.frozen[i]
        assert torch.equal(b.weight[free], getattr(method, f"initial_weight_{i}")[free])
        assert not torch.equal(b.weight[~free], getattr(method, f"initial_weight_{i}")[~free])


def test_pathnet_run_has_zero_bwt_and_reports_paths_and_their_overlap() -> None:
    raw = raw_config({"name": "pathnet", **FAST_PATHNET})
    res = Trainer(config_from_dict(raw)).fit()
    k = build_stream(config_from_dict(raw).benchmark, 0).num_outputs
    r = np.asarray(res["acc_matrix"])
    for j in range(3):
        assert np.all(r[j:, j] == r[j, j])
    assert res["bwt"] == 0.0 and res["test_time_info"] == "task_id"
    info = res["pathnet"]
    assert len(info["paths"]) == 3 and all(len(p) == 2 and len(p[0]) == 3 for p in info["paths"])
    assert info["modules_reused"][0] == 0 and sum(info["modules_newly_frozen"]) == round(info["frozen_fraction"] * 32)
    assert all(0 < d <= 3 / 16 for d in res["mask_density"])  # at most N of M modules a layer
    width = res["pathnet"]["module_widths"][-1]
    assert res["task_bytes"] == [2 * 3 + (width * k + k) * 4] * 3  # the path (a byte per index) and the head


def test_pathnet_tournament_lowers_the_fitness_loss_by_selection_alone() -> None:
    """With learning switched off (a rate too small to move the weights), only the tournament can improve
    fitness: the best fitness loss (held-out training data) found falls over the generations, and never rises."""
    method, stream, cfg = build({"name": "pathnet", "generations": 24, "evals_per_path": 1, "lr": 1e-30, "lr_min": 1e-40}, epochs=8)
    task = stream.tasks[0]
    best: list[float] = []
    original = method._end_round

    def spy(task, j):  # noqa: ANN001, ANN202
        original(task, j)
        if j % 2 == 1:
            best.append(float(method.best_overall))

    method._end_round = spy
    before = snapshot(method.model)
    train_task(method, task, cfg)
    assert all(torch.equal(v, before[k]) for k, v in snapshot(method.model).items())  # no learning
    assert len(best) == 24 and all(b <= a for a, b in zip(best, best[1:]))
    assert best[-1] < best[0]  # (a random path drawn outside the tournament is no yardstick on 10% of a small task)
    assert float(method.fitness_loss(task, method.best_path[0])) == pytest.approx(best[-1])


def test_pathnet_mutates_losers_from_the_winner() -> None:
    method, stream, cfg = build({"name": "pathnet", "generations": 1, "evals_per_path": 1, "modules": 16, "active": 3})
    task = stream.tasks[0]
    method.before_task(task)
    torch.manual_seed(0)
    method.winner.fill_(1)
    method.best_overall.fill_(-1.0)  # nothing beats it: the winner stays path 1
    method._end_round(task, 0)
    winner = method.paths[1].clone()
    method._end_round(task, 1)  # the generation's last round: path 0 becomes a mutant of path 1
    diff = method.paths[0] - winner
    assert torch.equal(method.paths[1], winner)
    assert set(torch.remainder(diff, 16).flatten().tolist()) <= {0, 1, 2, 14, 15}  # +-2 at most, modulo M
    assert float(method.path_lr[0]) == float(method.path_lr[1])


def test_pathnet_refuses_a_budget_smaller_than_its_rounds() -> None:
    method, stream, cfg = build({"name": "pathnet"})  # 20 x 2 x 10 rounds, 14 steps
    with pytest.raises(ValueError, match="rounds"):
        method.before_task(stream.tasks[0])


def test_pathnet_resume_is_exact(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    raw = raw_config({"name": "pathnet", **FAST_PATHNET})
    whole, resumed = whole_and_resumed(raw, tmp_path, monkeypatch)
    assert resumed["acc_matrix"] == whole["acc_matrix"] and resumed["pathnet"]["paths"] == whole["pathnet"]["paths"]


# ------------------------------------------------------------------------------------------------ bytes per task


def test_results_count_the_bytes_each_task_adds_and_the_comparison_shows_them() -> None:
    from metagate import aggregate

    xdg = Trainer(config_from_dict(raw_config({"name": "xdg", "backbone": {"hidden": [30, 20]}}, epochs=1))).fit()
    assert xdg["task_bytes"] == [math.ceil(30 / 8) + math.ceil(20 / 8)] * 3  # one bit per hidden unit
    fine = Trainer(config_from_dict(raw_config({"name": "finetune"}, epochs=1))).fit()
    assert fine["task_bytes"] == [0, 0, 0] and fine["bytes_per_task"] == 0
    groups = {label: [aggregate.RunRecord(Path(label), label, {}, r)] for label, r in (("xdg", xdg), ("finetune", fine))}
    table = aggregate.table(aggregate.summarise(groups))
    assert table.splitlines()[0].endswith("| peak memory (MiB) | bytes / task |")
    assert table.splitlines()[2].endswith(f"| {xdg['bytes_per_task']:.0f} ± 0 |")


# ------------------------------------------------------------------------------------------------ conv layouts


@pytest.mark.parametrize("name", ["piggyback", "pathnet"])
def test_conv_layouts_train_and_keep_bwt_at_zero(name: str) -> None:
    extra = FAST_PATHNET if name == "pathnet" else {"lr_mask": 1e-2}
    raw = {
        "seed": 0,
        "benchmark": {"name": "split", "dataset": "digits", "num_tasks": 3, "scenario": "task"},
        "method": {"name": name, "backbone": {"kind": "cnn", "channels": [8], "hidden": [16]}, **extra},
        "trainer": {"epochs": 3, "batch_size": 32, "progress": False},
    }
    res = Trainer(config_from_dict(raw)).fit()
    assert res["bwt"] == 0.0
    assert res["acc"] > 0.6  # two or three digits a task: well above chance
    if name == "piggyback":  # the conv kernel is masked too
        assert res["piggyback"]["masked_weights"] == 8 * 1 * 9 + 8 * 4 * 4 * 16


def test_pathnet_scores_paths_on_held_out_training_data_never_on_the_validation_split() -> None:
    method, stream, cfg = build({"name": "pathnet", **FAST_PATHNET})
    task = stream.tasks[0]
    train, held = method.fitness_split(task)
    assert len(set(train.tolist()) & set(held.tolist())) == 0 and len(train) + len(held) == task.num_train
    assert len(held) == round(0.1 * task.num_train)
    assert method.training_data(task).x.shape[0] == len(train)
    x_val, y_val = task.split("val")
    task.x_val = torch.full_like(x_val, float("nan"))  # were the validation split read, the loss would be nan
    method.before_task(task)
    assert torch.isfinite(method.fitness_loss(task, method.paths[0]))
