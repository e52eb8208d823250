"""Joint training: the upper bound, trained on the union of all tasks seen so far."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Method, TrainingData


def share_one_buffer(tasks: list[Task]) -> None:
    """Lay the tasks' training images and labels out back to back in one tensor each, and make every
    task's ``x_train`` / ``y_train`` a view of it (same values), so that any run of consecutive tasks
    is a view too. Each task's own tensor is released as soon as it is copied, so on CPU the data is
    held about once throughout (the new buffer's pages fill as the old ones go); a tensor someone
    else still holds stays alive. A no-op when the tasks already lie back to back."""
    for field in ("x_train", "y_train"):
        parts: list[Tensor] = [getattr(t, field) for t in tasks]
        if _back_to_back(parts):
            continue
        rows, first = sum(p.shape[0] for p in parts), parts[0]
        buffer = torch.empty((rows, *first.shape[1:]), dtype=first.dtype, device=first.device)
        del parts, first  # hold no task's old tensor longer than its copy
        start = 0
        for task in tasks:
            part = getattr(task, field)
            view = buffer[start : start + part.shape[0]]
            view.copy_(part)
            setattr(task, field, view)
            start += view.shape[0]
            del part


def _back_to_back(parts: list[Tensor]) -> bool:
    """Whether the tensors are contiguous consecutive slices of one storage."""
    if not all(p.is_contiguous() for p in parts):
        return False
    storage = parts[0].untyped_storage().data_ptr()
    end = parts[0].data_ptr()
    for p in parts:
        if p.untyped_storage().data_ptr() != storage or p.data_ptr() != end:
            return False
        end = p.data_ptr() + p.numel() * p.element_size()
    return True


@METHODS.register("joint")
class Joint(Method):
    """At task t, train (continuing from the current weights) on the data of tasks 0..t together,
    for ``trainer.epochs`` passes over that union. Samples carry their own task index, so label
    masking stays per sample in task-incremental streams. This is the usual non-continual
    reference (e.g. van de Ven et al. 2020's "joint"); it stores every task's data by design.
    Supports task-, domain- and class-incremental streams.

    No copy of the data: at construction the stream's training tensors are laid out back to back in
    one buffer (:func:`share_one_buffer`; values unchanged), so the union of tasks 0..t is a view
    of it and the Trainer's batches index it directly.
    """

    class Config(BaseMethodConfig):
        name: Literal["joint"] = "joint"

    name = "joint"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        tasks = self.stream.tasks
        share_one_buffer(tasks)
        ids = [torch.full((t.num_train,), t.index, dtype=torch.long, device=self.device) for t in tasks]
        self._task_ids = torch.cat(ids) if self.label_masking else None  # 8 bytes per sample

    def training_data(self, task: Task) -> TrainingData:
        """Tasks 0..t as views of the shared buffers (laid out again if the stream's tensors changed)."""
        seen = self.stream.tasks[: task.index + 1]
        if not (_back_to_back([t.x_train for t in seen]) and _back_to_back([t.y_train for t in seen])):
            share_one_buffer(self.stream.tasks)
        n, x0, y0 = sum(t.num_train for t in seen), seen[0].x_train, seen[0].y_train
        x = x0.as_strided((n, *x0.shape[1:]), x0.stride())  # runs on into the following tasks' rows
        y = y0.as_strided((n,), y0.stride())
        return TrainingData(x, y, None if self._task_ids is None else self._task_ids[:n])
