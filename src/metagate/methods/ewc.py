"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, Method
from metagate.methods.regularizers import QuadraticPenalty, fisher_diagonal


@METHODS.register("ewc")
class EWC(Method):
    """EWC: after each task t, the diagonal Fisher ``F_t`` at the task's solution ``theta*_t``;
    while training later tasks the loss is ``L + lambda/2 * sum_t sum_k F_t,k (theta_k - theta*_t,k)^2``
    (paper, eq. 3, one penalty per past task).

    Fisher from labels sampled from the model's predictive distribution (the true Fisher, as in the
    paper), estimated on ``fisher_samples`` training inputs with per-sample gradients. The per-task
    penalties are folded into one importance/anchor pair with an exact constant (same value and
    gradient, constant memory). The paper tunes ``lambda`` per problem and gives no universal value:
    the default here was chosen on the synthetic ``gated_teacher`` stream (see the README's numbers).
    Supports task-, domain- and class-incremental streams.
    """

    class Config(BaseMethodConfig):
        name: Literal["ewc"] = "ewc"
        lambda_: float = Field(100.0, ge=0, alias="lambda", description="penalty strength")
        fisher_samples: int = Field(1000, ge=1, description="training inputs used to estimate the Fisher")
        fisher_labels: Literal["sampled", "true"] = Field(
            "sampled", description="sampled: labels drawn from the model (true Fisher); true: empirical Fisher"
        )

    name = "ewc"
    cfg: Config

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.penalty = QuadraticPenalty(self.model).to(self.device)

    def regularizer(self) -> Tensor:
        return 0.5 * self.cfg.lambda_ * self.penalty(self.model)

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.task_loss(batch, task)
        if self.penalty.active:  # a host flag: no device sync
            reg = self.regularizer()
        else:
            reg = torch.zeros((), device=loss.device)
        (loss + reg).backward()
        self.optimizer.step()
        return {"loss": loss.detach(), "penalty": reg.detach()}

    def fisher(self, task: Task) -> dict[str, Tensor]:
        return fisher_diagonal(self, self.model, task, self.cfg.fisher_samples, self.cfg.fisher_labels)

    def after_task(self, task: Task) -> None:
        self.penalty.add_anchored(self.model, self.fisher(task))
