"""Shared fixtures: small, fast configs for behaviour tests."""

from __future__ import annotations

from typing import Any

import pytest

from metagate.runtime import configure_threads
from metagate.schema import TrainerConfig

# The suite runs with the threads a run gets by default (trainer.threads unset), set the same way.
configure_threads(TrainerConfig().resolved_threads())


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (longer end-to-end checks)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow (or -m slow --slow for only these)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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


class Interrupted(Exception):
    """Raised by :func:`whole_and_resumed` to stop a run as a kill would."""


def whole_and_resumed(raw: dict[str, Any], tmp_path: Any, monkeypatch: pytest.MonkeyPatch, stop_at: int = 2) -> tuple[dict[str, Any], dict[str, Any]]:
    """The results of ``raw`` run uninterrupted (``tmp_path/whole``), and of the same run stopped as task
    ``stop_at`` begins and resumed from its last checkpoint (``tmp_path/cut``)."""
    from metagate.config import config_from_dict
    from metagate.methods import METHODS
    from metagate.runs import RunDir
    from metagate.train import Trainer

    def fit(run: RunDir, resume: bool = False) -> dict[str, Any]:
        try:
            return Trainer(config_from_dict(raw), run).fit(resume=resume)
        finally:
            run.unlock()  # the folder's lock is its caller's (orchestration's) to release
    whole = fit(RunDir.create(tmp_path / "whole"))
    cls = METHODS.get(raw["method"]["name"])
    original = cls.before_task

    def stop(self, task):  # noqa: ANN001, ANN202
        if task.index == stop_at:
            raise Interrupted
        return original(self, task)

    run = RunDir.create(tmp_path / "cut")
    with monkeypatch.context() as m:
        m.setattr(cls, "before_task", stop)
        with pytest.raises(Interrupted):
            fit(run)
    assert not run.has_results()
    return whole, fit(RunDir.open_for_resume(tmp_path / "cut"), resume=True)


def train_tasks(method: Any, tasks: Any, steps: int, batch: int) -> None:
    """Each of ``tasks`` in turn through the method's hooks (before_task, ``steps`` train_steps on the task's first
    ``steps x batch`` training samples in order, after_task); the method's train / eval mode is left as it is."""
    from metagate.methods import Batch

    for task in tasks:
        method.before_task(task)
        for s in range(steps):
            method.train_step(Batch(task.x_train[batch * s : batch * (s + 1)], task.y_train[batch * s : batch * (s + 1)]), task)
        method.after_task(task)


def train_on(method: Any, task: Any, steps: int, batch: int = 64, seed: int = 0, then_eval: bool = True) -> None:
    """``steps`` optimiser steps on ``task`` through the method's hooks (before_task, train_step, after_task),
    batches of ``batch`` drawn with ``seed``; the method left in eval mode unless ``then_eval`` is false."""
    import torch

    from metagate.methods import Batch

    gen = torch.Generator().manual_seed(seed)
    method.train()
    method.before_task(task)
    for _ in range(steps):
        idx = torch.randint(0, task.num_train, (batch,), generator=gen)
        method.train_step(Batch(task.x_train[idx], task.y_train[idx]), task)
    method.after_task(task)
    if then_eval:
        method.eval()
