"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, Method
from metagate.methods.regularizers import QuadraticPenalty


@METHODS.register("si")
class SI(Method):
    """SI: every parameter accumulates, along its training trajectory, the path integral
    ``w_k = -sum_steps g_k * delta_theta_k`` with ``g`` the gradient of the *unregularised* task loss
    (paper, eq. 3). After task t its importance becomes ``Omega_k = relu(Omega_k + w_k / (Delta_k^2 + xi))``
    with ``Delta_k`` the parameter's total change over the task (eq. 5; the ReLU of the sum as in the
    authors' code), ``w`` resets, and later tasks add ``c * sum_k Omega_k (theta_k - theta~_k)^2`` (eq. 4) with
    the anchor ``theta~`` at the end of the previous task.

    Defaults from the paper's permuted-MNIST setting: ``c = 0.1``, ``xi = 0.1`` (split MNIST used
    ``c = 1``, ``xi = 1e-3``). Supports task-, domain- and class-incremental streams.
    """

    class Config(BaseMethodConfig):
        name: Literal["si"] = "si"
        c: float = Field(0.1, ge=0, description="penalty strength")
        xi: float = Field(0.1, gt=0, description="damping")

    name = "si"
    cfg: Config

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.penalty = QuadraticPenalty(self.model).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        for i, p in enumerate(self.params):
            self.register_buffer(f"path_{i}", torch.zeros_like(p))  # w_k, running over the task
            self.register_buffer(f"start_{i}", p.detach().clone())  # theta at the start of the task
        self._unreg = [torch.zeros_like(p) for p in self.params]
        self._before = [torch.zeros_like(p) for p in self.params]

    def _named_list(self, prefix: str) -> list[Tensor]:
        return [getattr(self, f"{prefix}_{i}") for i in range(len(self.params))]

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        with torch.no_grad():
            torch._foreach_copy_(self._named_list("start"), [p.detach() for p in self.params])
            torch._foreach_zero_(self._named_list("path"))

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.task_loss(batch, task)
        loss.backward()
        with torch.no_grad():
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            torch._foreach_copy_(self._unreg, grads)
            torch._foreach_copy_(self._before, [p.detach() for p in self.params])
        if self.penalty.active:
            reg = self.cfg.c * self.penalty(self.model)
            reg.backward()
        else:
            reg = torch.zeros((), device=loss.device)
        self.optimizer.step()
        with torch.no_grad():
            # w_k -= g_k * (theta_after - theta_before)
            delta = torch._foreach_sub([p.detach() for p in self.params], self._before)
            torch._foreach_mul_(delta, self._unreg)
            torch._foreach_sub_(self._named_list("path"), delta)
        return {"loss": loss.detach(), "penalty": reg.detach()}

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        omega = {}
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        for n, p, w, start in zip(names, self.params, self._named_list("path"), self._named_list("start")):
            change = p.detach() - start
            omega[n] = torch.relu(self.penalty.importance(n) + w / (change**2 + self.cfg.xi))
        self.penalty.set(self.model, omega)
