"""Stored composition: XdG + SI (Masse, Grant & Freedman, PNAS 2018) where a new task's mask is composed,
factor by factor, from the stored masks of earlier tasks that share the factor's value: the non-learned
reference that rebuilds the composed teacher's novel masks from what is stored (issue 25's audit)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from metagate.data.stream import Task
from metagate.methods.base import METHODS, MethodReport
from metagate.methods.components.context_factors import factors_of, require_factors
from metagate.methods.nearest_context import NearestContext


@METHODS.register("stored_composition")
class StoredComposition(NearestContext):
    """XdG + SI whose mask for a task not trained yet is composed from the trained tasks' stored masks.

    For each factor ``f``, the stored masks of the trained tasks whose value of ``f`` equals the new
    task's are combined; the parts are then united over the factors:

    * ``combine=intersection`` (default): part ``f`` = the units every such mask keeps; the mask is the
      union of the parts. On the composed teacher with stored oracle masks this rebuilds a novel task's
      oracle mask exactly in 33 of 35 novel tasks (issue 25).
    * ``combine=votes``: each unit scores the fraction of such masks that keep it, summed over the
      factors; the mask keeps the top ``n`` units, ``n`` the stored masks' mean size (ties broken by a fixed
      random order).

    A factor whose value no trained task has contributes the nearest-context lookup's mask instead
    (:class:`~metagate.methods.nearest_context.NearestContext`, ``neighbours`` / ``ties`` as there). The
    factor values are read from ``task.info["context_factors"]`` (the context's decoded tuple); streams
    whose context hides them are refused.

    What a trained task stores (``train_mask``) is as in nearest_context: its oracle mask (default: the
    lookup then measures only what composing stored masks transfers), or ``lookup`` (the composed mask,
    fixed when the task starts, trains and is stored; the first task keeps XdG's random mask), or
    ``random`` (XdG's own random mask trains and is stored; the composition is used for untrained tasks
    only): the two for streams without oracle masks.

    A trained task is predicted with its stored mask, an untrained one with the composed mask: both follow
    from the context (the stored one by exact match), so ``test_time_info = "context"``.
    """

    class Config(NearestContext.Config):
        name: Literal["stored_composition"] = "stored_composition"  # type: ignore[assignment]
        combine: Literal["intersection", "votes"] = Field(
            "intersection", description="per factor, the units every matching stored mask keeps, or a vote over them (top-n)"
        )

    name = "stored_composition"
    cfg: Config

    def __init__(self, cfg: Config, stream, trainer, device) -> None:  # type: ignore[no-untyped-def]
        require_factors(stream, "stored_composition")
        super().__init__(cfg, stream, trainer, device)

    def lookup(self, task: Task) -> list[Tensor] | None:
        all_tasks = (*self.stream.tasks, *self.stream.heldout)
        done = [t for t in all_tasks if bool(self.fixed[self.slot[t.index]]) and t.index != task.index]
        if not done:
            return None
        stored = torch.stack([torch.cat([m.float() for m in self.masks[str(t.index)]]) for t in done])
        values = torch.tensor([factors_of(t) for t in done])
        nearest: Tensor | None = None
        parts = []
        for f, v in enumerate(factors_of(task)):
            rows = stored[values[:, f] == v]
            if rows.shape[0] == 0:
                if nearest is None:
                    nearest = torch.cat(super().lookup(task)).float()  # type: ignore[arg-type]
                parts.append(nearest)
            elif self.cfg.combine == "intersection":
                parts.append(rows.min(0).values)
            else:
                parts.append(rows.mean(0))
        if self.cfg.combine == "intersection":
            flat = torch.stack(parts).amax(0) > 0.5
        else:
            size = int(round(float(stored.sum(1).mean())))
            score = torch.stack(parts).sum(0) + self.tie_break
            flat = torch.zeros_like(score, dtype=torch.bool)
            flat[score.topk(size).indices] = True
        return list(flat.split(self.model.gated_widths))

    def report(self, task: Task | None = None) -> MethodReport:
        """At the end: the mask came from the context at test time (not the task's identity)."""
        out = super().report(task)
        if task is None:
            out.test_time_info = "context"
        return out
