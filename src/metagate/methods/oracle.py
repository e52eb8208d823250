"""The oracle: XdG + SI (Masse, Grant & Freedman, PNAS 2018) with each task's mask set to the mask the
stream's teacher generated it from, the ceiling for any method that infers masks from context."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from metagate.methods.base import METHODS
from metagate.methods.xdg import XdG
from metagate.nn.backbones import BackboneConfig
from metagate.nn.gates import BitMask


@METHODS.register("oracle")
class Oracle(XdG):
    """XdG + SI whose per-task unit mask is the task's ``oracle_mask`` instead of a random draw.

    Everything else is XdG's (stabiliser, its defaults, Adam reset per task, prediction with the task's
    mask), so ``Q_oracle = (zs - zs_xdg) / (final - zs_xdg)`` measures the zero-shot accuracy that
    knowing the true mask gives on the same student and budget: the ceiling a context -> mask learner
    is measured against. The oracle mask must be defined over the student's units: the student needs
    exactly one hidden layer whose width equals the mask's length (``composed_teacher``:
    ``method.backbone.hidden=[hidden_units]``). Unused: ``gate_fraction`` (the oracle sets the density).

    Differences from XdG's defaults: no input dropout and no hidden dropout (the teacher has none, and
    the student should be able to represent it exactly); a one-hidden-layer backbone of 256 units.
    """

    class Config(XdG.Config):
        name: Literal["oracle"] = "oracle"  # type: ignore[assignment]
        backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(hidden=[256], dropout=0.0))
        input_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the input (XdG's paper: 0.2)")

    name = "oracle"

    def _draw(self, index: int) -> nn.ModuleList:
        task = next((t for t in (*self.stream.tasks, *self.stream.heldout) if t.index == index), None)
        if task is None or task.oracle_mask is None:
            raise ValueError(f"the oracle needs the stream's oracle masks; {self.stream.name} task {index} has none")
        widths = self.model.gated_widths
        shapes = [tuple(m.shape) for m in task.oracle_mask]
        if shapes != [(w,) for w in widths]:
            raise ValueError(
                f"the oracle masks of {self.stream.name} cover hidden layers of widths {[s[0] for s in shapes]}, "
                f"but the student's gated widths are {widths}: set method.backbone.hidden={[s[0] for s in shapes]}"
            )
        return nn.ModuleList(BitMask(m.bool()).to(self.device) for m in task.oracle_mask)
