"""L2 anchor: a quadratic pull of every weight toward where the previous task left it (a metagate plugin).

The simplest regulariser against forgetting: while task ``t`` trains, the loss is
``L_t + strength / 2 * sum_k (theta_k - theta*_{t-1,k})^2``, with ``theta*_{t-1}`` the weights at the end of
the previous task (EWC with the importance of every weight set to 1; Kirkpatrick et al., PNAS 2017, call it the
"L2" baseline of their Fig. 2). It is here to show how a method in a package of your own plugs into metagate:
one class with a typed ``Config``, the training hooks, and ``report`` for what it adds to the results; the
package's ``pyproject.toml`` names the class under the entry point group ``metagate.methods``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from metagate.data.stream import Task
from metagate.methods.base import Batch, BaseMethodConfig, Method, MethodReport


class L2Anchor(Method):
    """L2 anchor: weights pulled toward the previous task's with strength ``strength``."""

    class Config(BaseMethodConfig):
        name: Literal["l2_anchor"] = "l2_anchor"
        strength: float = Field(1.0, ge=0, description="the pull toward the previous task's weights")

    name = "l2_anchor"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        # buffers, so state_dict() carries them and a resumed run continues with the same anchor
        for i, p in enumerate(self.model.parameters()):
            self.register_buffer(f"anchor_{i}", p.detach().clone())
        self.register_buffer("has_anchor", torch.zeros((), dtype=torch.bool))
        self.register_buffer("moved", torch.zeros(self.stream.num_tasks))  # how far each task moved the weights

    def anchors(self) -> list[Tensor]:
        return [getattr(self, f"anchor_{i}") for i, _ in enumerate(self.model.parameters())]

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.task_loss(batch, task)
        pull = sum(((p - a) ** 2).sum() for p, a in zip(self.model.parameters(), self.anchors()))
        total = loss + self.has_anchor.float() * self.cfg.strength / 2 * pull  # no host sync: the flag stays a tensor
        total.backward()
        self.optimizer.step()
        return {"loss": loss.detach(), "pull": pull.detach()}

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        distance = sum(((p - a) ** 2).sum() for p, a in zip(self.model.parameters(), self.anchors()))
        self.moved[task.index] = distance.sqrt()
        for p, a in zip(self.model.parameters(), self.anchors()):
            a.copy_(p)
        self.has_anchor.fill_(True)

    def report(self, task: Task | None = None) -> MethodReport:
        out = super().report(task)
        if task is None:
            out.task_bytes = [0 for _ in self.stream.tasks]  # one anchor, shared by every task
            out.figures = {**out.figures, "l2_anchor_moved": self.moved.tolist()}
        return out
