"""The factor rule: XdG + SI (Masse, Grant & Freedman, PNAS 2018) whose mask is built by a hand rule from
the task's discrete context factors, one fixed random block of units per (factor, value): the
structure-aware, non-learned reference a context -> mask learner is measured against (issue 25)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from metagate.data.stream import Task
from metagate.methods.base import METHODS, MethodReport
from metagate.methods.components.context_factors import factors_of, require_factors
from metagate.methods.xdg import XdG
from metagate.nn.backbones import BackboneConfig
from metagate.nn.gates import BitMask


@METHODS.register("factor_rule")
class FactorRule(XdG):
    """XdG + SI whose per-task unit mask is the union of one fixed block of units per (factor, value) of the
    task's context: ``mask(c) = U_f block(f, v_f(c))``. No mask is learned or looked up and no teacher mask
    is read: the rule only needs to be told that the context is a tuple of discrete factors
    (``task.info["context_factors"]``, see :mod:`metagate.methods.components.context_factors`); it refuses
    streams whose context is not (``encoding=embedded``, ``context=prototypes``).

    Blocks: per gated layer, the units are shuffled once (from the run's seed) and dealt out in order,
    ``block_units`` per (factor, value) of every task of the stream (trained and held out, in sorted
    order), wrapping around with a fresh shuffle when the layer runs out (so blocks are disjoint while
    they fit). ``block_units`` defaults to ``round((1 - gate_fraction) * width / factors)``: a union over
    the factors then keeps XdG's density. Training is XdG + SI's with that mask, from the first step of
    the task; an untrained task (zero-shot, held out) is predicted with its rule mask too, so its figures
    show what a hand rule transfers. The student's units are interchangeable, so any fixed block per value
    serves as well as a teacher's own groups (the issue's audit: ACC 72.1% against the oracle's 71.1%).

    At test the mask comes from the context alone (``test_time_info = "context"``).

    Differences from XdG's defaults: no input or hidden dropout and one hidden layer of 256 units (as
    :class:`~metagate.methods.oracle.Oracle`, to compare on the same student).
    """

    class Config(XdG.Config):
        name: Literal["factor_rule"] = "factor_rule"  # type: ignore[assignment]
        backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(hidden=[256], dropout=0.0))
        input_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the input (XdG's paper: 0.2)")
        block_units: int | None = Field(
            None, ge=1, description="units per (factor, value) block in every gated layer (None: (1 - gate_fraction) x width / factors)"
        )

    name = "factor_rule"
    cfg: Config

    def __init__(self, cfg: Config, stream, trainer, device) -> None:  # type: ignore[no-untyped-def]
        require_factors(stream, "factor_rule")
        super().__init__(cfg, stream, trainer, device)

    def blocks(self) -> list[dict[tuple[int, int], torch.Tensor]]:
        """Per gated layer, (factor, value) -> the block's unit indices (drawn once, from the run's seed)."""
        if getattr(self, "_blocks", None) is None:
            tasks = [*self.stream.tasks, *self.stream.heldout]
            keys = sorted({(f, v) for t in tasks for f, v in enumerate(factors_of(t))})
            n_factors = len(factors_of(tasks[0]))
            gen = torch.Generator().manual_seed(int(self.mask_seed) + 65_537)
            layers = []
            for width in self.model.gated_widths:
                size = self.cfg.block_units or max(1, round((1 - self.cfg.gate_fraction) * width / n_factors))
                size = min(size, width)
                need = -(-len(keys) * size // width)  # shuffles needed to deal every block
                order = torch.cat([torch.randperm(width, generator=gen) for _ in range(need)])
                layers.append({k: order[i * size : (i + 1) * size] for i, k in enumerate(keys)})
            self._blocks = layers
        return self._blocks

    def rule_mask(self, task: Task) -> list[torch.Tensor]:
        """The union of the task's (factor, value) blocks, per gated layer."""
        out = []
        for width, blocks in zip(self.model.gated_widths, self.blocks()):
            mask = torch.zeros(width, dtype=torch.bool)
            for f, v in enumerate(factors_of(task)):
                mask[blocks[(f, v)]] = True
            out.append(mask)
        return out

    def _draw(self, index: int) -> nn.ModuleList:
        task = next(t for t in (*self.stream.tasks, *self.stream.heldout) if t.index == index)
        return nn.ModuleList(BitMask(m).to(self.device) for m in self.rule_mask(task))

    def report(self, task: Task | None = None) -> MethodReport:
        """At the end: the mask came from the context at test time (not the task's identity)."""
        out = super().report(task)
        if task is None:
            out.test_time_info = "context"
        return out
