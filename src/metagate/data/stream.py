"""Tasks and streams: the data a continual learner sees, one task after another."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

Scenario = Literal["task", "domain", "class"]


@dataclass
class Task:
    """One step of a stream.

    ``classes`` are the output units the task uses (its labels live in the stream's shared output
    space). ``context`` is a fixed-length float vector describing the task. Synthetic families also
    record the ``oracle_mask`` (one bool tensor per gated layer of the generator) the task was made
    from, so that mask recovery can be measured. ``x_val`` / ``y_val`` are the validation split,
    carved from the training data (never overlapping it): hyperparameters are chosen on it, figures
    are reported on test.
    """

    index: int
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    context: Tensor
    classes: tuple[int, ...]
    oracle_mask: list[Tensor] | None = None
    info: dict[str, float | int | str] = field(default_factory=dict)
    x_val: Tensor | None = None
    y_val: Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.y_test.shape[0])

    @property
    def num_val(self) -> int:
        return 0 if self.y_val is None else int(self.y_val.shape[0])

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        """``(x, y)`` of ``"train"``, ``"val"`` or ``"test"`` (an empty validation split when there is none)."""
        if name == "val" and self.x_val is None:
            return self.x_test[:0], self.y_test[:0]
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")

    def with_validation(self, fraction: float, gen: torch.Generator) -> "Task":
        """The task with a random ``fraction`` of its training data moved to its validation split."""
        n_val = round(fraction * self.num_train)
        if n_val == 0 or self.x_val is not None:
            return self
        order = torch.randperm(self.num_train, generator=gen)
        val, train = order[:n_val].sort().values, order[n_val:].sort().values
        return replace(
            self, x_train=self.x_train[train], y_train=self.y_train[train], x_val=self.x_train[val], y_val=self.y_train[val]
        )

    def to(self, device: torch.device | str) -> "Task":
        """The same task with its tensors on ``device`` (a no-op when they already are)."""
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Task(
            index=self.index,
            name=self.name,
            x_train=move(self.x_train),
            y_train=move(self.y_train),
            x_test=move(self.x_test),
            y_test=move(self.y_test),
            context=move(self.context),
            classes=self.classes,
            oracle_mask=None if self.oracle_mask is None else [move(m) for m in self.oracle_mask],
            info=dict(self.info),
            x_val=None if self.x_val is None else move(self.x_val),
            y_val=None if self.y_val is None else move(self.y_val),
        )


@dataclass
class Stream:
    """The ordered tasks plus what a model must know up front.

    ``heldout`` tasks are never trained on; they are evaluated after every task (held-out contexts
    inside and outside the training range, for transfer measurements). ``provenance`` says where the
    data came from (``location``, ``found_via``) and fingerprints it (``bytes``, ``sha256``): the files
    read for a data set on disk, the tensors for a generated one.
    """

    name: str
    tasks: list[Task]
    input_shape: tuple[int, ...]
    num_outputs: int
    scenario: Scenario
    context_dim: int
    heldout: list[Task] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, task in enumerate(self.tasks):
            if task.index != i:
                raise ValueError(f"task {task.name!r} has index {task.index}, expected {i}")
            if task.context.shape != (self.context_dim,):
                raise ValueError(
                    f"task {task.name!r} has context of shape {tuple(task.context.shape)}, "
                    f"expected ({self.context_dim},)"
                )

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def input_dim(self) -> int:
        n = 1
        for s in self.input_shape:
            n *= s
        return n

    def contexts(self) -> Tensor:
        """All training tasks' contexts, one row per task."""
        return torch.stack([t.context for t in self.tasks])

    def class_mask(self) -> Tensor:
        """``[num_tasks, num_outputs]`` bool: which outputs each task may use (label masking)."""
        mask = torch.zeros(self.num_tasks, self.num_outputs, dtype=torch.bool)
        for t in self.tasks:
            mask[t.index, list(t.classes)] = True
        return mask

    def to(self, device: torch.device | str) -> "Stream":
        return Stream(
            name=self.name,
            tasks=[t.to(device) for t in self.tasks],
            input_shape=self.input_shape,
            num_outputs=self.num_outputs,
            scenario=self.scenario,
            context_dim=self.context_dim,
            heldout=[t.to(device) for t in self.heldout],
            provenance=dict(self.provenance),
        )
