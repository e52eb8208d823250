"""XdG (Masse et al. 2018): fixed random unit masks per task, with SI or EWC."""

from __future__ import annotations

import pytest
import torch

from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.base import Batch
from metagate.train import Trainer, task_seed


def build(raw_method: dict, seed: int = 0, **bench):  # noqa: ANN003, ANN201
    raw = {
        "seed": seed,
        "benchmark": {"name": "gated_teacher", "num_tasks": 4, "train_per_task": 200, "test_per_task": 100, **bench},
        "method": {"name": "xdg", **raw_method},
        "trainer": {"progress": False},
    }
    cfg = config_from_dict(raw)
    stream = build_stream(cfg.benchmark, seed)
    torch.manual_seed(task_seed(seed, -1))
    return create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")), stream


def all_masks(method, stream) -> list[torch.Tensor]:  # noqa: ANN001
    return [torch.cat(method.task_masks(t)) for t in stream.tasks]


def test_masks_are_reproducible_from_the_seed_and_differ_between_seeds_and_tasks() -> None:
    small = {"backbone": {"hidden": [300, 300], "dropout": 0.5}}
    a, s = build(small, seed=1)
    b, _ = build(small, seed=1)
    c, _ = build(small, seed=2)
    ma, mb, mc = all_masks(a, s), all_masks(b, s), all_masks(c, s)
    assert all(torch.equal(x, y) for x, y in zip(ma, mb))
    assert not any(torch.equal(x, y) for x, y in zip(ma, mc))
    assert not torch.equal(ma[0], ma[1])


def test_gating_fraction_holds_within_sampling_error() -> None:
    method, stream = build({"backbone": {"hidden": [2000, 2000]}, "gate_fraction": 0.8})
    for m in all_masks(method, stream):
        sd = (0.2 * 0.8 / m.numel()) ** 0.5
        assert abs(m.float().mean().item() - 0.2) < 4 * sd


def test_a_gated_off_unit_gets_no_gradient() -> None:
    method, stream = build({"backbone": {"hidden": [64, 64], "dropout": 0.0}, "input_dropout": 0.0, "stabilizer": "none"})
    task = stream.tasks[0]
    method.zero_grad()
    loss = torch.nn.functional.cross_entropy(method(task.x_train[:50], task), task.y_train[:50])
    loss.backward()
    first, second = method.task_masks(task)
    w1, w2 = method.model.hidden[0], method.model.hidden[1]
    assert torch.all(w1.weight.grad[~first.bool()] == 0) and torch.all(w1.bias.grad[~first.bool()] == 0)
    assert torch.all(w2.weight.grad[~second.bool()] == 0)
    assert torch.all(w2.weight.grad[:, ~first.bool()] == 0)  # nor do weights leaving a gated-off unit
    assert w1.weight.grad[first.bool()].abs().sum() > 0


@pytest.mark.parametrize("freeze", [False, True])
def test_the_output_bias_starts_at_zero_and_trains_unless_frozen(freeze: bool) -> None:
    # The XdG code zeroes every bias at the start and trains all of them (model.py:75, 152).
    method, stream = build({"backbone": {"hidden": [32], "dropout": 0.0}, "stabilizer": "si", "freeze_output_bias": freeze})
    task = stream.tasks[0]
    bias = method.model.head.bias
    assert torch.equal(bias, torch.zeros_like(bias))
    method.before_task(task)
    for _ in range(3):
        method.train_step(Batch(task.x_train[:64], task.y_train[:64]), task)
    assert torch.equal(bias, torch.zeros_like(bias)) == freeze
    assert ("head.bias" in method.stabilizer.quadratic.names) != freeze  # stabilised when it trains


def test_the_ewc_fisher_is_the_codes_mean_over_sampled_labels_with_dropout_on() -> None:
    # The code (model.py:246-266, 397-401): one dropped-out forward per batch, labels sampled from that
    # forward's output, per-input squared gradients of log p(label), summed and divided by the number
    # of inputs. Reproduced here literally (same random draws), against the stabiliser's Fisher.
    method, stream = build(
        {"backbone": {"hidden": [24, 16], "dropout": 0.5}, "input_dropout": 0.2, "gate_fraction": 0.5,
         "stabilizer": "ewc", "fisher_samples": 40},
        train_per_task=40,
        val_fraction=0,
    )
    task = stream.tasks[1]
    torch.manual_seed(3)
    fisher = method.stabilizer.fisher(task)

    torch.manual_seed(3)
    idx = torch.randperm(task.num_train)[:40]
    method.train()
    logits = method(task.x_train[idx], task)  # dropout on, each input its own dropout mask
    labels = torch.multinomial(torch.softmax(logits.detach(), 1), 1).squeeze(1)
    logp = torch.log_softmax(logits, 1)
    params = dict(method.model.named_parameters())
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(40):
        grads = torch.autograd.grad(logp[i, labels[i]], list(params.values()), retain_graph=True)
        for n, g in zip(params, grads):
            expected[n] += g**2 / 40
    assert set(fisher) == set(expected)
    assert all(torch.allclose(fisher[n], expected[n], rtol=1e-4, atol=1e-8) for n in expected)
    off = ~method.task_masks(task)[0].bool()
    assert torch.all(fisher["hidden.0.weight"][off] == 0)  # gated-off units carry no information


def test_xdg_ewc_strength_default_is_the_codes_omega_c() -> None:
    # code: omega_c * sum F (theta - theta*)^2 with omega_c = 10; here lambda/2 * sum F (...)^2
    method, _ = build({"stabilizer": "ewc"})
    assert method.stabilizer.strength() == 10.0
    assert method.cfg.fisher_samples == 256 * 32


def test_masse_adam_option_reproduces_the_codes_update_for_two_steps() -> None:
    method, stream = build(
        {"backbone": {"hidden": [16], "dropout": 0.0}, "input_dropout": 0.0, "stabilizer": "none", "adam_variant": "masse"}
    )
    task = stream.tasks[0]
    method.before_task(task)
    params = [p for p in method.model.parameters()]
    theta = [p.detach().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    lr_t = 1e-3 * (1 - 0.999) ** 0.5 / (1 - 0.9)  # AdamOpt.py:53 at t = 1, as the graph keeps it
    for step in range(2):
        batch = Batch(task.x_train[64 * step : 64 * step + 64], task.y_train[64 * step : 64 * step + 64])
        with torch.no_grad():
            for p, t in zip(params, theta):
                p.copy_(t)  # hand computation and optimiser start from the same point each step
        loss = torch.nn.functional.cross_entropy(method(batch.x, task), batch.y)
        grads = torch.autograd.grad(loss, params)
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            d = -lr_t * m[i] / (v[i].sqrt() + 1e-8)
            theta[i] = theta[i] + d * min(1.0, 1.0 / d.norm().item())
        method.train_step(batch, task)
        assert all(torch.allclose(p, t, atol=1e-7) for p, t in zip(params, theta))


def test_training_one_task_leaves_gated_off_units_of_that_task_unchanged() -> None:
    method, stream = build({"backbone": {"hidden": [64, 64]}, "stabilizer": "none"})
    task = stream.tasks[0]
    before = method.model.hidden[0].weight.detach().clone()
    method.before_task(task)
    for _ in range(5):
        method.train_step(Batch(task.x_train[:64], task.y_train[:64]), task)
    off = ~method.task_masks(task)[0].bool()
    assert torch.equal(method.model.hidden[0].weight.detach()[off], before[off])


def test_unseen_and_heldout_tasks_are_predicted_with_their_own_masks() -> None:
    method, stream = build({"backbone": {"hidden": [32, 32]}})
    x = stream.tasks[0].x_test[:8]
    method.eval()
    outs = [method.predict(x, t) for t in stream.tasks]
    assert not torch.allclose(outs[0], outs[1])


@pytest.mark.parametrize("stabilizer", ["si", "ewc", "none"])
def test_xdg_runs_with_each_stabilizer_and_is_deterministic(stabilizer: str) -> None:
    raw = {
        "benchmark": {"name": "gated_teacher", "num_tasks": 2, "train_per_task": 600, "test_per_task": 200},
        "method": {
            "name": "xdg", "stabilizer": stabilizer, "gate_fraction": 0.5, "input_dropout": 0.0,
            "backbone": {"hidden": [64, 64], "dropout": 0.0}, "fisher_samples": 64,
        },
        "trainer": {"epochs": 3, "progress": False},
    }
    a, b = Trainer(config_from_dict(raw)).fit(), Trainer(config_from_dict(raw)).fit()
    assert a["acc_matrix"] == b["acc_matrix"]
    assert a["acc_matrix"][1][1] > 0.5  # 4 classes: chance is 0.25


def test_capacity_figures_reported() -> None:
    res = Trainer(
        config_from_dict(
            {
                "benchmark": {"name": "gated_teacher", "num_tasks": 3, "train_per_task": 100, "test_per_task": 50},
                "method": {"name": "xdg", "backbone": {"hidden": [200, 200]}},
                "trainer": {"epochs": 1, "progress": False},
            }
        )
    ).fit()
    assert len(res["mask_density"]) == 3 and all(0.1 < d < 0.3 for d in res["mask_density"])
    assert 0.0 < res["mask_overlap_mean"] < 0.25  # independent masks at density 0.2: IoU about 0.11
    assert res["mask_overlap"][0][0] == 1.0
    assert res["context_mask_correlation"] is not None  # random masks: defined, near zero


@pytest.fixture(scope="module")
def domain_runs() -> dict[str, dict]:
    """A domain-incremental stream whose tasks conflict: only the task's identity can separate them."""
    out = {}
    for name, method in {
        "si": {"name": "si", "c": 10.0, "backbone": {"hidden": [128, 128]}},
        "xdg_si": {"name": "xdg", "stabilizer": "si", "c": 10.0, "backbone": {"hidden": [128, 128], "dropout": 0.0}, "input_dropout": 0.0},
    }.items():
        raw = {
            "benchmark": {"name": "gated_teacher", "num_tasks": 3, "train_per_task": 1000, "test_per_task": 400},
            "method": method,
            "trainer": {"epochs": 3, "progress": False},
        }
        out[name] = Trainer(config_from_dict(raw)).fit()
    return out


def test_xdg_si_forgets_less_than_si_alone(domain_runs) -> None:  # noqa: ANN001
    assert domain_runs["xdg_si"]["bwt"] > domain_runs["si"]["bwt"] + 0.05


def test_xdg_gates_conv_channels_of_a_cnn() -> None:
    raw = {
        "benchmark": {"name": "permuted", "dataset": "digits", "num_tasks": 2},
        "method": {"name": "xdg", "gate_fraction": 0.5, "backbone": {"kind": "cnn", "channels": [16, 32], "hidden": [64]}},
        "trainer": {"epochs": 3, "batch_size": 32, "progress": False},
    }
    res = Trainer(config_from_dict(raw)).fit()
    assert len(res["mask_density"]) == 2
    assert all(res["acc_matrix"][t][t] > 0.5 for t in range(2))  # 10 classes: chance is 0.1


def test_training_on_the_kept_units_only_matches_the_full_masked_products_to_float_rounding() -> None:
    raw = {"name": "xdg", "gate_fraction": 0.75, "input_dropout": 0.2, "stabilizer": "si", "c": 1.0,
           "backbone": {"hidden": [48, 32], "dropout": 0.0}}
    compact, stream = build(raw)
    full, _ = build({**raw, "active_units_only": False})
    full.load_state_dict(compact.state_dict())
    assert compact._compact and not full._compact
    step = 0
    for task in stream.tasks[:2]:
        for m in (compact, full):
            m.train()
            m.before_task(task)
        for b in range(0, 160, 32):
            batch = Batch(task.x_train[b : b + 32], task.y_train[b : b + 32])
            losses = []
            for m in (compact, full):
                torch.manual_seed(step)  # the same input dropout
                losses.append(m.train_step(batch, task)["loss"])
            step += 1
            torch.testing.assert_close(losses[0], losses[1])
            assert compact._kept[task.index][0] is compact.task_masks(task)  # the kept-units path ran
            kept = compact._kept[task.index][1][0]
            gated = torch.ones(48, dtype=torch.bool)
            gated[kept] = False
            assert gated.any() and (compact.model.hidden[0].weight.grad[gated] == 0).all()  # no gradient into gated units
        for m in (compact, full):
            m.after_task(task)
    for (n, p), q in zip(compact.model.named_parameters(), full.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    on_hidden_dropout, _ = build({**raw, "backbone": {"hidden": [48, 32], "dropout": 0.5}})
    assert not on_hidden_dropout._compact  # a dropout draw over the full width: the full products
