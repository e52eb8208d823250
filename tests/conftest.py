"""Shared fixtures: small, fast configs for behaviour tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch

torch.set_num_threads(2)


def small_config(**sections: Any) -> dict[str, Any]:
    """A raw config dict for a small gated-teacher stream; sections merge over the defaults."""
    raw: dict[str, Any] = {
        "seed": 0,
        "benchmark": {"name": "gated_teacher", "num_tasks": 3, "train_per_task": 600, "test_per_task": 300},
        "method": {"name": "finetune", "backbone": {"hidden": [32, 32]}},
        "trainer": {"epochs": 2, "batch_size": 64, "progress": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


@pytest.fixture
def small() -> Any:
    return small_config
