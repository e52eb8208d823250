"""The angle schedule shared by the rotation streams (``rotated_teacher``, ``rotated``)."""

from __future__ import annotations

import torch
from pydantic import Field, model_validator

from metagate.schema import BenchmarkConfig


class AngleFields(BenchmarkConfig):
    """Training angles evenly spaced in ``[0, max_angle]``; held-out angles between them and beyond."""

    num_tasks: int = Field(10, ge=1)
    max_angle: float = Field(180.0, gt=0, le=360, description="training angles span [0, max_angle] degrees")
    heldout_inside: int = Field(2, ge=0, description="held-out angles between training angles")
    heldout_outside: int = Field(2, ge=0, description="held-out angles beyond max_angle")
    shuffle_order: bool = Field(False, description="train the angles in a seeded random order")

    @model_validator(mode="after")
    def _enough_tasks_for_inside(self) -> "AngleFields":
        if self.heldout_inside and self.num_tasks < 2:
            raise ValueError("heldout_inside needs num_tasks >= 2")
        return self


def angle_schedule(cfg: AngleFields, order: torch.Generator | None = None) -> tuple[list[float], list[float]]:
    """Training angles (in training order; shuffled with ``order`` when ``cfg.shuffle_order``) and
    held-out angles, in degrees. Inside: ``heldout_inside`` midpoints between neighbouring training
    angles, spread evenly; outside: ``max_angle + step/2, max_angle + step, ...``."""
    step = cfg.max_angle / max(cfg.num_tasks - 1, 1)
    train = [i * step for i in range(cfg.num_tasks)]
    mids = [(i + 0.5) * step for i in range(cfg.num_tasks - 1)]
    inside: list[float] = []
    if cfg.heldout_inside and mids:
        picks = torch.linspace(0, len(mids) - 1, cfg.heldout_inside).round().long().unique().tolist()
        inside = [mids[i] for i in picks]
    outside = [cfg.max_angle + (i + 1) * step / 2 for i in range(cfg.heldout_outside)]
    if cfg.shuffle_order and order is not None:
        train = [train[i] for i in torch.randperm(len(train), generator=order).tolist()]
    return train, inside + outside
