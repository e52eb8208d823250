"""hnet (von Oswald et al., ICLR 2020) and the hypernetwork pieces it shares with hypermask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import train_on as train
from conftest import whole_and_resumed
from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.base import Batch
from metagate.methods.components.hypernet_cl import HypernetCL
from metagate.metrics import average_accuracy, backward_transfer
from metagate.nn.hypernetwork import HyperNetwork
from metagate.train import Trainer, task_seed

SMALL = {"backbone": {"hidden": [32, 32]}, "hnet_hidden": [16, 16], "embedding_dim": 8}


def raw_config(method: dict, seed: int = 0, name: str = "hnet", **bench) -> dict:  # noqa: ANN003
    return {
        "seed": seed,
        "benchmark": {"name": "gated_teacher", "num_tasks": 3, "train_per_task": 300, "test_per_task": 200, **bench},
        "method": {"name": name, **SMALL, **method},
        "trainer": {"progress": False, "epochs": 1, "batch_size": 64, "lr": 1e-3},
    }


def build(method: dict, seed: int = 0, name: str = "hnet", init_seed: int | None = None, **bench):  # noqa: ANN003, ANN201
    """The method on the stream of ``seed``, its parameters drawn from ``init_seed`` (default: the run's)."""
    cfg = config_from_dict(raw_config(method, seed, name, **bench))
    stream = build_stream(cfg.benchmark, seed)
    torch.manual_seed(task_seed(seed, -1) if init_seed is None else init_seed)
    return create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")), stream


def generated(method: HypernetCL, task) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        return method.hnet.flat(method.hnet_input([task.index]))[0].clone()


# ---------------------------------------------------------------- the shared hypernetwork


def test_output_layer_gradients_equal_autograds_bit_for_bit_and_reuse_one_buffer() -> None:
    torch.manual_seed(0)
    hnet = HyperNetwork(5, [(40, 7), (40,)], [9], "elu")
    ref = torch.nn.Linear(9, hnet.num_outputs)
    ref.load_state_dict(hnet.out.state_dict())
    pointers = set()
    for k in (1, 3, 4):
        z = torch.randn(k, 5)
        g = torch.randn(k, hnet.num_outputs)
        hnet.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        h = hnet.body(z)
        h_ref = h.detach().requires_grad_()
        h_own = h.detach().requires_grad_()
        hnet.flat(z)  # the full path runs too
        from metagate.nn.hypernetwork import _OutputLayer

        _OutputLayer.apply(h_own, hnet.out.weight, hnet.out.bias, hnet).backward(g)
        ref(h_ref).backward(g)
        assert torch.equal(hnet.out.weight.grad, ref.weight.grad)
        assert torch.equal(hnet.out.bias.grad, ref.bias.grad)
        assert torch.equal(h_own.grad, h_ref.grad)
        pointers.add(hnet.out.weight.grad.data_ptr())
        # a second backward in the same step accumulates, as autograd does (one fused addmm_: equal up to rounding)
        _OutputLayer.apply(h_own, hnet.out.weight, hnet.out.bias, hnet).backward(g)
        ref(h_ref).backward(g)
        assert torch.allclose(hnet.out.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-6)
    assert len(pointers) == 1  # one gradient buffer across steps, never reallocated


def test_chunked_hypernetwork_runs_once_per_chunk_on_task_and_chunk_embedding() -> None:
    torch.manual_seed(0)
    shapes = [(3, 7), (3,), (2, 3)]  # 30 outputs
    hnet = HyperNetwork(4, shapes, [6], "relu", chunk_size=8, chunk_emb_dim=2)
    assert hnet.num_chunks == 4 and hnet.out.out_features == 8
    z = torch.randn(2, 4)
    out = hnet.flat(z)
    assert out.shape == (2, 30)
    for i in range(2):
        rows = [hnet.out(hnet.body(torch.cat([z[i], c]))) for c in hnet.chunk_embeddings]
        assert torch.allclose(out[i], torch.cat(rows)[:30], atol=1e-6)
    assert [tuple(t.shape) for t in hnet(z[0])] == [tuple(s) for s in shapes]


# ---------------------------------------------------------------- hnet


def test_the_regulariser_keeps_earlier_tasks_generated_weights() -> None:
    drift = {}
    for beta in (0.0, 0.1):
        method, stream = build({"beta": beta}, num_tasks=2)
        t0, t1 = stream.tasks
        train(method, t0, 60)
        before = generated(method, t0)
        train(method, t1, 60, seed=1)
        drift[beta] = float((generated(method, t0) - before).norm() / before.norm())
    assert drift[0.1] < 0.01 and drift[0.0] > 5 * drift[0.1], drift  # measured: 0.0066 vs 0.088


def test_earlier_and_future_task_embeddings_never_move() -> None:
    method, stream = build({"beta": 0.1}, num_tasks=3)
    t0, t1, t2 = stream.tasks
    train(method, t0, 10)
    e = method.embeddings.detach().clone()
    train(method, t1, 10, seed=1)
    assert torch.equal(method.embeddings[t0.index], e[t0.index])
    assert torch.equal(method.embeddings[t2.index], e[t2.index])
    assert not torch.equal(method.embeddings[t1.index], e[t1.index])


def test_the_lookahead_is_adams_next_step_on_the_task_loss() -> None:
    """``dTheta`` (hypercl ``adam_step``) is the step torch's Adam then takes on the same gradient. The two
    formulas put eps in different places (hypercl's is PyTorch 1.x's), so eps is made negligible here."""
    method, stream = build({"beta": 0.1}, num_tasks=2)
    t0, t1 = stream.tasks
    train(method, t0, 5)
    method.train()
    method.before_task(t1)
    for group in method.optimizer.param_groups:
        group["eps"] = 1e-16
    for step in range(3):
        x, y = t1.x_train[step * 32 : (step + 1) * 32], t1.y_train[step * 32 : (step + 1) * 32]
        method.optimizer.zero_grad(set_to_none=True)
        flat = method.hnet.flat(method.hnet_input([t1.index]))
        F.cross_entropy(method.mask_logits(method.target(x, method.weights_from(flat[0])), t1), y).backward()
        predicted = {k: v.detach().clone() for k, v in method.lookahead_params().items()}
        method.optimizer.step()
        method.count_step()  # as train_step does after its optimiser step
        for name, p in method.theta():
            assert torch.allclose(predicted[name], p.detach(), rtol=0, atol=1e-6), name


def test_hnet_forgets_less_than_finetune_on_a_small_stream() -> None:
    results = {}
    for name, method in (("hnet", SMALL), ("finetune", {"backbone": {"hidden": [32, 32]}})):
        raw = {
            "seed": 0,
            "benchmark": {"name": "permuted", "dataset": "digits", "num_tasks": 3, "identity_first": False},
            "method": {"name": name, **method},
            "trainer": {"progress": False, "iterations_per_task": 150, "batch_size": 64, "checkpoint": False, "lr": 1e-3},
        }
        results[name] = Trainer(config_from_dict(raw)).fit()
    hnet_bwt, ft_bwt = (backward_transfer(results[n]["acc_matrix"]) for n in ("hnet", "finetune"))
    assert hnet_bwt > -0.03 and ft_bwt < -0.15, (hnet_bwt, ft_bwt)  # measured: about 0.00 vs -0.29
    acc = {n: average_accuracy(results[n]["acc_matrix"]) for n in results}
    assert acc["hnet"] > acc["finetune"] + 0.1, acc


@pytest.mark.parametrize("option", [{}, {"lookahead": False, "chunk_size": 300, "chunk_emb_dim": 4}, {"embedding": "context"}])
def test_state_dict_round_trip_gives_identical_predictions_and_identical_continued_training(option: dict) -> None:
    a, stream = build({"beta": 0.1, **option}, num_tasks=3)
    train(a, stream.tasks[0], 8)
    train(a, stream.tasks[1], 8, seed=1)
    b, _ = build({"beta": 0.1, **option}, init_seed=7, num_tasks=3)  # every tensor starts elsewhere
    b.load_state_dict(a.state_dict())
    b.eval()
    for t in stream.tasks:
        assert torch.equal(a.predict(t.x_test, t), b.predict(t.x_test, t))
    a.train()
    b.train()
    a.before_task(stream.tasks[2])
    b.before_task(stream.tasks[2])
    b.optimizer.load_state_dict(a.optimizer.state_dict())
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        idx = torch.randint(0, stream.tasks[2].num_train, (64,), generator=gen)
        batch = Batch(stream.tasks[2].x_train[idx], stream.tasks[2].y_train[idx])
        a.train_step(batch, stream.tasks[2])
        b.train_step(batch, stream.tasks[2])
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q), name


@pytest.mark.parametrize(("name", "extra"), [("hnet", {"lookahead": True}), ("hnet", {"lookahead": False}), ("hypermask", {})])
def test_reg_subset_regularises_exactly_k_earlier_tasks_per_step(name: str, extra: dict, monkeypatch) -> None:  # noqa: ANN001
    option = {"reg_subset": 2, **extra}
    method, stream = build(option, name=name, num_tasks=5)
    seen: list[list[int]] = []
    original = HypernetCL.output_regularizer

    def spy(self, outputs, positions):  # noqa: ANN001, ANN202
        assert outputs.shape[0] == len(positions)
        seen.append(list(positions))
        return original(self, outputs, positions)

    monkeypatch.setattr(HypernetCL, "output_regularizer", spy)
    for i, task in enumerate(stream.tasks):
        seen.clear()
        train(method, task, 12, seed=i)
        if i == 0:
            assert seen == []
        elif i <= 2:  # no more than k earlier tasks: all of them
            assert seen == [list(range(i))] * 12
        else:
            assert len(seen) == 12 and all(len(s) == 2 == len(set(s)) and max(s) < i for s in seen)
            assert len({tuple(s) for s in seen}) > 1  # a fresh draw each step


def test_with_context_embeddings_an_untrained_task_gets_its_weights_from_its_context() -> None:
    method, stream = build({"embedding": "context"}, num_tasks=3)
    t0, _, t2 = stream.tasks
    before = generated(method, t2)
    train(method, t0, 20)
    assert not torch.allclose(before, generated(method, t2))  # learning task 0 shaped task 2's zero-shot weights
    method.contexts[t2.index] = method.contexts[t0.index]
    assert torch.equal(generated(method, t2), generated(method, t0))
    assert torch.isfinite(method.predict(t2.x_test, t2)).all()


@pytest.mark.parametrize(
    ("option", "expected"),
    [({}, "task_id"), ({"embedding": "context"}, "context"), ({"task_inference": "entropy"}, "none")],
)
def test_test_time_info_per_option(option: dict, expected: str) -> None:
    method, _ = build(option)
    assert method.report().test_time_info == expected


def test_refused_configs_name_the_fix() -> None:
    from metagate.schema import ConfigError

    with pytest.raises((ConfigError, ValueError), match="reset_optimizer"):
        build({"reset_optimizer": False})
    with pytest.raises((ConfigError, ValueError), match="embedding=context"):
        build({"context_input": "concat"})
    cfg = config_from_dict({**raw_config({}), "trainer": {"optimizer": "sgd", "progress": False}})
    with pytest.raises(ValueError, match="lookahead"):
        create_method(cfg.method, build_stream(cfg.benchmark, 0), cfg.trainer, torch.device("cpu"))


def test_ready_configs_load() -> None:
    from pathlib import Path

    from metagate.config import load_config

    root = Path(__file__).resolve().parents[1] / "src" / "metagate" / "configs"
    for name in ("hnet-permuted-fmnist.yaml", "hnet-split-fmnist.yaml"):
        cfg = load_config(str(root / name))
        assert cfg.method.name == "hnet"



def test_resume_equals_uninterrupted(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    whole, resumed = whole_and_resumed(raw_config({"chunk_size": 400, "task_inference": "entropy"}), tmp_path, monkeypatch)
    for key in ("acc_matrix", "initial_acc", "task_inference_acc", "compression_ratio"):
        assert resumed[key] == whole[key], key
    assert whole["test_time_info"] == "none" and whole["task_inference"] == "entropy"


def test_the_large_output_layouts_give_autograds_numbers_up_to_rounding(monkeypatch) -> None:  # noqa: ANN001
    import metagate.nn.hypernetwork as hn

    monkeypatch.setattr(hn, "LARGE_OUTPUT", 1)  # every layer takes the paper-size paths
    torch.manual_seed(0)
    hnet = HyperNetwork(5, [(40, 7)], [9], "elu")
    ref = torch.nn.Linear(9, hnet.num_outputs)
    ref.load_state_dict(hnet.out.state_dict())
    for k in (1, 2, 4, 5, 7):
        h = torch.randn(k, 9)
        g = torch.randn(k, hnet.num_outputs)
        hnet.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        for _ in range(2):  # a fresh gradient, then an accumulated one
            h_own, h_ref = h.clone().requires_grad_(), h.clone().requires_grad_()
            out = hn._OutputLayer.apply(h_own, hnet.out.weight, hnet.out.bias, hnet)
            expected = ref(h_ref)
            assert out.is_contiguous() and torch.allclose(out, expected, atol=1e-5)
            out.backward(g)
            expected.backward(g)
            assert torch.allclose(hnet.out.weight.grad, ref.weight.grad, atol=1e-5)
            assert torch.allclose(h_own.grad, h_ref.grad, atol=1e-5)
