"""Brain-inspired replay (issue 27): gates per class in the decoder, conditional replay from per-class prior
modes, replay through the network's own feedback connections, labelled by the frozen network."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from conftest import train_on
from test_hot_paths import host_reads, steps_on_a_third_task  # noqa: F401  (host_reads: the fixture)
from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.methods.base import Batch
from metagate.train import task_seed

DIGITS = {"name": "split", "dataset": "digits", "num_tasks": 3, "classes_per_task": 2, "scenario": "class"}


def build(method: dict[str, Any] | None = None, seed: int = 0):  # noqa: ANN201
    cfg = config_from_dict({"seed": seed, "benchmark": DIGITS,
                            "method": {"name": "bir", "backbone": {"hidden": [64, 64]}, "z_dim": 8, "eval_samples": 0, **(method or {})},
                            "trainer": {"progress": False, "batch_size": 32}})
    stream = build_stream(cfg.benchmark, seed)
    torch.manual_seed(task_seed(seed, -1))
    return create_method(cfg.method, stream, cfg.trainer, torch.device("cpu")), stream


def test_decoder_gates_differ_per_class_and_keep_the_codes_share_of_units() -> None:
    m, stream = build()
    for gate in m.net.gates():
        assert gate.shape == (stream.num_outputs, 64)
        assert len({tuple(row.tolist()) for row in gate}) == stream.num_outputs  # every class its own mask
        assert abs(float(gate.mean()) - 0.2) < 0.08  # dg_prop 0.8: a fifth of the units open per class
    z = torch.randn(4, 8)
    a, b = m.net.decode(z, torch.zeros(4, dtype=torch.long)), m.net.decode(z, torch.ones(4, dtype=torch.long))
    assert not torch.allclose(a, b)  # the same latent decodes differently under another class's gates
    half = torch.full((4, stream.num_outputs), 0.0)
    half[:, :2] = 0.5  # a soft class vector mixes the masks (the code's gate_input @ gate_mask)
    h = torch.relu(m.net.decoder[0](z) * (half @ m.net.gates()[0]))
    assert torch.allclose(h, torch.relu(m.net.decoder[0](z) * (0.5 * m.net.gates()[0][0] + 0.5 * m.net.gates()[0][1])))


def test_conditional_samples_are_of_the_class_asked_for() -> None:
    m, stream = build()
    task = stream.tasks[0]
    train_on(m, task, 300, 32, then_eval=False)
    with torch.no_grad():
        for c in task.classes:
            x = m.net.sample(torch.full((200,), c, dtype=torch.long))
            assert x.shape == (200, *stream.input_shape)
            share = float((m.net(x)[:, list(task.classes)].argmax(1) == list(task.classes).index(c)).float().mean())
            assert share > 0.9, (c, share)  # the network's own classifier recognises its samples of class c


def test_replay_draws_only_earlier_classes_and_is_labelled_by_the_frozen_network() -> None:
    m, stream = build()
    train_on(m, stream.tasks[0], 30, 32, then_eval=False)
    train_on(m, stream.tasks[1], 30, 32, then_eval=False)
    task = stream.tasks[2]
    m.before_task(task)
    frozen = m.previous[0]
    old = sorted(c for t in stream.tasks[:2] for c in t.classes)
    assert sorted(m.old_classes.tolist()) == old
    drawn: list[torch.Tensor] = []
    original = frozen.sample
    frozen.sample = lambda classes: drawn.append(classes) or original(classes)  # type: ignore[method-assign]
    x, scores = m.replay(256)
    assert set(drawn[0].tolist()) == set(old)  # conditional replay over the earlier classes, uniformly drawn
    assert torch.isinf(scores[:, [c for c in range(stream.num_outputs) if c not in old]]).all()  # no mass on new classes
    with torch.no_grad():
        assert torch.equal(scores[:, old], frozen(x)[:, old])
    before = [p.clone() for p in frozen.parameters()]
    m.train_step(Batch(task.x_train[:32], task.y_train[:32]), task)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.parameters()))  # the replaying copy stays frozen


@pytest.mark.slow
def test_bir_forgets_less_than_finetune_class_incremental() -> None:
    """8x8 digits, 3 x 2 classes, 25 epochs (~1 min on a shared CPU)."""
    from metagate.train import Trainer

    raw = lambda name, extra: {"benchmark": DIGITS, "method": {"name": name, "backbone": {"hidden": [64, 64]}, **extra},  # noqa: E731
                               "trainer": {"epochs": 25, "batch_size": 32, "optimizer": "adam", "lr": 0.001, "progress": False}}
    bir = Trainer(config_from_dict(raw("bir", {"z_dim": 8, "eval_samples": 0}))).fit()
    ft = Trainer(config_from_dict(raw("finetune", {}))).fit()
    assert bir["acc"] > ft["acc"] + 0.15, (bir["acc"], ft["acc"])


def test_bir_with_si_protects_every_parameter() -> None:
    m, _ = build({"si_c": 0.1})
    assert m.stabilizer is not None and len(m.stabilizer.params) == len([p for p in m.net.parameters() if p.requires_grad])



def test_a_bir_training_step_reads_nothing_back_from_the_device(host_reads: list[str]) -> None:
    m, stream = build({"si_c": 0.1})
    assert steps_on_a_third_task(m, stream, 3, host_reads) == []
