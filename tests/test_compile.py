"""``trainer.compile=true``: the method's step under ``torch.compile`` trains as the eager step, to float rounding."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from metagate.config import config_from_dict
from metagate.train import Trainer


def test_compile_is_off_by_default_and_a_trainer_option() -> None:
    cfg = config_from_dict({"benchmark": {"name": "gated_teacher"}, "method": {"name": "finetune"}})
    assert cfg.trainer.compile is False
    assert config_from_dict({"benchmark": {"name": "gated_teacher"}, "method": {"name": "finetune"}}, ["trainer.compile=true"]).trainer.compile


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"name": "si", "c": 1.0}, {"name": "er", "buffer_size": 50}], ids=lambda m: m["name"])
def test_the_compiled_step_trains_as_the_eager_step_to_float_rounding(method: dict[str, Any]) -> None:
    raw = {
        "seed": 0,
        "benchmark": {"name": "gated_teacher", "num_tasks": 2, "train_per_task": 96, "test_per_task": 50},
        "method": {"backbone": {"hidden": [16]}, **method},
        "trainer": {"epochs": 1, "batch_size": 32, "progress": False, "checkpoint": False},
    }
    params = {}
    for compiled in (False, True):
        trainer = Trainer(config_from_dict(raw, [f"trainer.compile={str(compiled).lower()}"]))
        res = trainer.fit()
        params[compiled] = ([p.detach().clone() for p in trainer.method.model.parameters()], res["acc_matrix"])
    (eager, eager_acc), (comp, comp_acc) = params[False], params[True]
    for a, b in zip(eager, comp):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # 6 steps of Adam: rounding only
    assert comp_acc == eager_acc
