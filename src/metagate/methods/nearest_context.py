"""Nearest-context masks: XdG + SI (Masse, Grant & Freedman, PNAS 2018) where a new task's mask is the
stored mask of the earlier task with the nearest context, the lookup a context -> mask learner must beat."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from metagate import metrics
from metagate.data.stream import Task
from metagate.methods.base import METHODS, MethodReport
from metagate.methods.oracle import Oracle
from metagate.methods.xdg import XdG
from metagate.nn.backbones import BackboneConfig
from metagate.nn.gates import BitMask
from metagate.seeds import METHOD_DRAW_OFFSET


@METHODS.register("nearest_context")
class NearestContext(Oracle):
    """XdG + SI whose mask for a new task is looked up from the masks of the tasks trained before it.

    The mask of a task not trained yet (zero-shot, held-out tasks included) is the stored mask of
    the trained task whose context is nearest to ``c_t`` (Euclidean, rounded to 1e-5; among equally near ones, the latest). With ``neighbours = k > 1``
    (or ``ties=true``: every trained task as near as the k-th one joins) it is a vote instead: each
    unit scores ``sum_i w_i M_i[u]`` over the neighbours ``i``, ``w_i = 1 / (d_i + eps)``, and the
    mask keeps the top ``n`` units, ``n`` the neighbours' weighted mean mask size (equal scores are
    broken by a fixed random order drawn from the run's seed). No learning happens in the lookup.

    What a task trains with and stores (``train_mask``): ``oracle`` (default), its oracle mask, as a
    learner that found every trained task's true mask would store; training then matches the
    :class:`~metagate.methods.oracle.Oracle`'s run exactly and only the zero-shot masks differ, so
    ``Q_nn`` isolates how much of the ceiling a neighbour's mask already gives. ``lookup``: the
    looked-up mask stays fixed while the task trains like XdG + SI and is stored (the first task,
    with nothing to look up, keeps XdG's random mask); for streams without oracle masks. ``random``: XdG's
    random mask trains and is stored, and the lookup gives only the masks of tasks not trained yet (the
    stored masks then carry no structure a lookup could add to; for streams without oracle masks too).

    Differences from XdG's defaults: no input or hidden dropout and a one-hidden-layer backbone of 256
    units (as :class:`~metagate.methods.oracle.Oracle`, to compare on the same student).
    """

    class Config(XdG.Config):
        name: Literal["nearest_context"] = "nearest_context"  # type: ignore[assignment]
        backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(hidden=[256], dropout=0.0))
        input_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the input (XdG's paper: 0.2)")
        neighbours: int = Field(1, ge=1, description="trained tasks whose masks vote (1: copy the nearest one's)")
        ties: bool = Field(False, description="every trained task as near as the k-th nearest votes too")
        train_mask: Literal["oracle", "lookup", "random"] = Field(
            "oracle", description="a task trains with (and stores) its oracle mask, the looked-up one, or XdG's random one (the lookup for untrained tasks only)"
        )

    name = "nearest_context"
    cfg: Config

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        tasks = [*self.stream.tasks, *self.stream.heldout]
        self.slot = {t.index: i for i, t in enumerate(tasks)}
        self.register_buffer("contexts", torch.stack([t.context for t in tasks]).float().to(self.device), persistent=False)
        # which tasks' masks are fixed (trained, or training now); the others are looked up on demand
        self.register_buffer("fixed", torch.zeros(len(tasks), dtype=torch.bool, device=self.device))
        gen = torch.Generator().manual_seed(int(self.mask_seed) + METHOD_DRAW_OFFSET)
        # the mask each training task would have had zero-shot, just before it trained (for results)
        self.register_buffer("zero_shot_masks", torch.zeros(self.stream.num_tasks, sum(self.model.gated_widths), dtype=torch.bool, device=self.device))
        self.register_buffer("tie_break", torch.rand(sum(self.model.gated_widths), generator=gen).to(self.device) * 1e-6)

    def _draw(self, index: int) -> nn.ModuleList:
        return super()._draw(index) if self.cfg.train_mask == "oracle" else XdG._draw(self, index)

    def lookup(self, task: Task) -> list[Tensor] | None:
        """The mask the trained tasks' masks give ``task`` by nearest context (``None`` before any is trained)."""
        done = [t for t in (*self.stream.tasks, *self.stream.heldout) if bool(self.fixed[self.slot[t.index]]) and t.index != task.index]
        if not done:
            return None
        ctx = self.contexts[[self.slot[t.index] for t in done]]
        # rounded to 1e-5 so that distances equal up to float error (one step of a numeric factor
        # here or there) are ties, broken by the documented rule
        dist = ((ctx - self.contexts[self.slot[task.index]]).double().norm(dim=1) * 1e5).round() / 1e5
        order = sorted(range(len(done)), key=lambda i: (float(dist[i]), -done[i].index))
        chosen = order[: self.cfg.neighbours]
        if self.cfg.ties:
            kth = float(dist[chosen[-1]])
            chosen = [i for i in order if float(dist[i]) <= kth + 1e-6]
        stored = torch.stack([torch.cat([m.float() for m in self.masks[str(done[i].index)]]) for i in chosen])
        if len(chosen) == 1:
            flat = stored[0].bool()
        else:
            w = 1.0 / (dist[chosen].float() + 1e-6)
            w = w / w.sum()
            size = int(round(float((w * stored.sum(1)).sum())))
            score = (w[:, None] * stored).sum(0) + self.tie_break
            flat = torch.zeros_like(score, dtype=torch.bool)
            flat[score.topk(size).indices] = True
        return list(flat.split(self.model.gated_widths))

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.zero_shot_masks[task.index] = torch.cat(self.task_masks(task)).bool()
        looked_up = self.lookup(task) if self.cfg.train_mask == "lookup" else None
        if looked_up is not None:
            self.masks[str(task.index)] = nn.ModuleList(BitMask(m).to(self.device) for m in looked_up)
        self.fixed[self.slot[task.index]] = True
        self._dense.clear()  # untrained tasks' lookups change with every task trained

    def task_masks(self, task: Task) -> list[Tensor]:
        if task.index in self._dense:
            return self._dense[task.index]
        if bool(self.fixed[self.slot[task.index]]):
            return super().task_masks(task)
        looked_up = self.lookup(task)
        if looked_up is None:
            return super().task_masks(task)  # nothing trained yet: XdG's random mask
        self._dense[task.index] = [m.float() for m in looked_up]
        return self._dense[task.index]

    def report(self, task: Task | None = None) -> MethodReport:
        """Adds the zero-shot masks and how they relate to contexts and oracle masks (:meth:`_zero_shot_figures`)."""
        out = super().report(task)
        if task is None:
            out.figures.update(self._zero_shot_figures())
        return out

    def _zero_shot_figures(self) -> dict[str, Any]:
        """Per training task, its zero-shot mask (looked up just before it trained) as unit indices,
        those masks' overlap and context correlation (as metagate's zero-shot figures), and the fraction of its oracle mask's units that mask holds (``None`` without oracle masks)."""
        out: dict[str, Any] = {"zero_shot_masks": [torch.nonzero(m).flatten().tolist() for m in self.zero_shot_masks]}
        zs = metrics.mask_summary(list(self.zero_shot_masks.cpu()), self.stream.contexts().cpu())
        out["zero_shot_mask_overlap_mean"] = zs["mask_overlap_mean"]  # as metagate's: the masks before training
        out["zero_shot_context_mask_correlation"] = zs["context_mask_correlation"]
        if all(t.oracle_mask is not None for t in self.stream.tasks):
            recall = []
            for t, zs in zip(self.stream.tasks, self.zero_shot_masks):
                oracle = torch.cat([m.bool() for m in t.oracle_mask]).to(zs.device)  # type: ignore[union-attr]
                recall.append(float((zs & oracle).sum() / oracle.sum().clamp_min(1)))
            out["zero_shot_oracle_recall"] = recall
        return out
