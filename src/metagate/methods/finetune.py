"""Fine-tuning: plain SGD/Adam on each task in turn, nothing against forgetting (lower bound)."""

from __future__ import annotations

from typing import Literal

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Method, MethodReport


@METHODS.register("finetune")
class Finetune(Method):
    """Train on the current task only. Supports task-, domain- and class-incremental streams."""

    class Config(BaseMethodConfig):
        name: Literal["finetune"] = "finetune"

    name = "finetune"

    def report(self, task: Task | None = None) -> MethodReport:
        """Nothing is kept per task (one shared network), but a task's own head with ``heads=per_task``."""
        out = super().report(task)
        if task is None:
            out.task_bytes = [self.head_bytes() for _ in self.stream.tasks]
        return out
