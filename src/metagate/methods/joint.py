"""Joint training: the upper bound, trained on the union of all tasks seen so far."""

from __future__ import annotations

from typing import Literal

import torch

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Method, TrainingData


@METHODS.register("joint")
class Joint(Method):
    """At task t, train (continuing from the current weights) on the data of tasks 0..t together,
    for ``trainer.epochs`` passes over that union. Samples carry their own task index, so label
    masking stays per sample in task-incremental streams. This is the usual non-continual
    reference (e.g. van de Ven et al. 2020's "joint"); it stores every task's data by design.
    Supports task-, domain- and class-incremental streams."""

    class Config(BaseMethodConfig):
        name: Literal["joint"] = "joint"

    name = "joint"

    def training_data(self, task: Task) -> TrainingData:
        seen = self.stream.tasks[: task.index + 1]
        x = torch.cat([t.x_train for t in seen])
        y = torch.cat([t.y_train for t in seen])
        ids = torch.cat([torch.full((t.num_train,), t.index, dtype=torch.long, device=x.device) for t in seen])
        return TrainingData(x, y, ids if self.label_masking else None)
