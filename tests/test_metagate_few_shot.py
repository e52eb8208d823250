"""metagate's few-shot measurement (issue 13): a mask inferred from a few labelled examples before a task trains,
measured only (training unchanged), recorded per task, resumed exactly, and better than the zero-shot mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import small_config, whole_and_resumed
from metagate.config import config_from_dict
from metagate.data import build_stream
from metagate.methods import create_method
from metagate.train import Trainer, task_seed

METHOD = {"name": "metagate", "backbone": {"hidden": [32]}, "consolidation_steps": 20}


def raw(few_shot: int = 0, **method: object) -> dict:
    return small_config(method={**METHOD, "few_shot": few_shot, "few_shot_steps": 20, "few_shot_lr": 0.1, **method}, trainer={"epochs": 1, "batch_size": 64, "progress": False})


def fit(cfg: dict) -> tuple[dict, Trainer]:
    trainer = Trainer(config_from_dict(cfg))
    return trainer.fit(), trainer


def test_off_records_nothing_and_on_changes_nothing_in_training() -> None:
    off, t_off = fit(raw(0))
    on, t_on = fit(raw(16))
    assert "few_shot_acc" not in off and "few_shot_val_acc" not in off and "few_shot_final_iou" not in off
    assert not hasattr(t_off.method, "few_shot_masks") and "few_shot_masks" not in t_off.method.state_dict()
    # a measurement only: the same accuracies, zero-shot ones included, and the same state, bit for bit
    assert on["acc_matrix"] == off["acc_matrix"] and on["zero_shot_acc"] == off["zero_shot_acc"]
    a, b = t_off.method.state_dict(), t_on.method.state_dict()
    assert set(b) - set(a) == {"few_shot_masks"}
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
    n = len(on["task_names"])
    assert len(on["few_shot_acc"]) == len(on["few_shot_val_acc"]) == len(on["few_shot_final_iou"]) == n
    assert all(0.0 <= a <= 1.0 for a in on["few_shot_acc"] + on["few_shot_val_acc"])
    assert t_on.method.few_shot_masks.sum(1).tolist() == t_on.method.zero_shot.sum(1).tolist()  # same density


def test_the_inference_touches_no_state_nor_the_global_random_stream() -> None:
    cfg = config_from_dict(raw(16))
    stream = build_stream(cfg.benchmark, 0)
    torch.manual_seed(task_seed(0, -1))
    m = create_method(cfg.method, stream, cfg.trainer, torch.device("cpu"))
    before = {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}
    rng = torch.get_rng_state()
    task = stream.tasks[0]
    zero_shot, other = m.unit_mask(task), m.unit_mask(stream.tasks[1])
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    mask = m.few_shot_mask(task, gen())
    assert torch.equal(mask, m.few_shot_mask(task, gen()))  # the examples come from the given generator alone
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in m.parameters())
    for k, v in m.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), k
    assert not torch.equal(mask, zero_shot)  # it moved
    with m.few_shot(task, gen()):
        assert torch.equal(m.unit_mask(task), mask) and torch.equal(m.unit_mask(stream.tasks[1]), other)
    assert torch.equal(m.unit_mask(task), zero_shot) and torch.equal(m.few_shot_masks[0], mask)


def test_the_few_shot_mask_beats_a_poor_zero_shot_mask() -> None:
    """Shuffled contexts: the zero-shot masks come from other tasks' contexts; 64 labelled examples find better units."""
    cfg = small_config(
        benchmark={"name": "gated_teacher", "num_tasks": 5, "train_per_task": 600, "test_per_task": 300},
        method={**METHOD, "backbone": {"hidden": [64]}, "context_mode": "shuffled", "few_shot": 64, "few_shot_steps": 50, "few_shot_lr": 0.1},
        trainer={"epochs": 2, "batch_size": 64, "progress": False},
    )
    res, _ = fit(cfg)
    zs, fs = np.array(res["zero_shot_acc"][1:]), np.array(res["few_shot_acc"][1:])
    assert fs.mean() > zs.mean() + 0.02, (fs, zs)


def test_resume_is_exact_with_the_few_shot_measurement(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    whole, resumed = whole_and_resumed(raw(16), tmp_path, monkeypatch)
    for key in ("acc_matrix", "few_shot_acc", "few_shot_val_acc", "few_shot_final_iou", "zero_shot_final_iou"):
        assert whole[key] == resumed[key], key
