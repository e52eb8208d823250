"""Fine-tuning: plain SGD/Adam on each task in turn, nothing against forgetting (lower bound)."""

from __future__ import annotations

from typing import Literal

from metagate.methods.base import METHODS, BaseMethodConfig, Method


@METHODS.register("finetune")
class Finetune(Method):
    """Train on the current task only. Supports task-, domain- and class-incremental streams."""

    class Config(BaseMethodConfig):
        name: Literal["finetune"] = "finetune"

    name = "finetune"
