"""Ridge context: XdG + SI (Masse, Grant & Freedman, PNAS 2018) where a new task's mask is predicted by a
ridge regression from context to mask, fitted in closed form to the stored (context, mask) pairs of the
trained tasks: the simplest learned map, for any context (numbers, embeddings, prototypes, angles)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor

from metagate.data.stream import Task
from metagate.methods.base import METHODS, MethodReport
from metagate.methods.nearest_context import NearestContext


def ridge_fit(x: Tensor, y: Tensor, lambdas: list[float]) -> tuple[Tensor, Tensor, Tensor, float]:
    """Ridge regression ``y ~ mean_y + (x - mean_x) W`` with the ``lambda`` of ``lambdas`` whose
    leave-one-out squared error is smallest (closed form: residual / (1 - leverage), the intercept's
    leverage 1/n included). Returns ``(W, mean_x, mean_y, lambda)``; one row: ``W = 0`` (the mean)."""
    n, d = x.shape
    mx, my = x.mean(0), y.mean(0)
    xc, yc = (x - mx).double(), (y - my).double()
    best: tuple[float, Tensor, float] | None = None
    for lam in lambdas:
        inv = torch.linalg.inv(xc.T @ xc + lam * torch.eye(d, dtype=xc.dtype))
        w = inv @ xc.T @ yc
        if n < 2:
            return w.float(), mx, my, lam
        lev = ((xc @ inv) * xc).sum(1) + 1.0 / n
        loo = ((yc - xc @ w) / (1 - lev).clamp_min(1e-6)[:, None]).pow(2).mean()
        if best is None or float(loo) < best[0] - 1e-12:
            best = (float(loo), w, lam)
    assert best is not None
    return best[1].float(), mx, my, best[2]


@METHODS.register("ridge_context")
class RidgeContext(NearestContext):
    """XdG + SI whose mask for a task not trained yet is ``top_n(mean_M + (c - mean_c) W)``, a ridge
    regression from the context to the (0/1) mask of every gated unit, refitted in closed form to the
    trained tasks' stored (context, mask) pairs whenever a task starts; ``n`` is the stored masks' mean
    size (ties broken by a fixed random order). With a single stored task it copies that mask; before any,
    an untrained task has XdG's random mask.

    ``lam``: the ridge penalty. ``None`` (default) chooses it at every refit from ``lambdas`` by
    leave-one-out squared error over the stored pairs (each stored task held out in turn: a validation
    split of what is stored, no test data), which is how the issue's "lambda chosen on validation" is met
    without a separate run per value; a number fixes it. The choices are recorded (``ridge_lambda``).

    What a trained task stores (``train_mask``), and the prediction of trained tasks with their stored
    masks, are as in :class:`~metagate.methods.nearest_context.NearestContext` (plus ``random``: XdG's random
    mask trains and is stored, the regression is used for untrained tasks only). It applies to any stream
    whose tasks' contexts differ (refused otherwise); ``test_time_info = "context"``.
    """

    class Config(NearestContext.Config):
        name: Literal["ridge_context"] = "ridge_context"  # type: ignore[assignment]
        lam: float | None = Field(None, gt=0, description="ridge penalty (None: chosen per refit by leave-one-out over stored tasks)")
        lambdas: list[float] = Field(
            default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0], description="candidates for lam=None"
        )

    name = "ridge_context"
    cfg: Config

    def __init__(self, cfg: Config, stream, trainer, device) -> None:  # type: ignore[no-untyped-def]
        contexts = torch.stack([t.context.float().cpu() for t in (*stream.tasks, *stream.heldout)])
        if stream.context_dim == 0 or bool((contexts == contexts[0]).all()):
            raise ValueError(f"ridge_context maps contexts to masks, but every task of {stream.name} has the same context")
        super().__init__(cfg, stream, trainer, device)
        self._fit: tuple[tuple[int, ...], Any] | None = None
        self.chosen_lambda: dict[int, float] = {}

    def fit(self, done: list[Task]) -> tuple[Tensor, Tensor, Tensor, float]:
        key = tuple(t.index for t in done)
        if self._fit is None or self._fit[0] != key:
            x = self.contexts[[self.slot[t.index] for t in done]].float().cpu()
            y = torch.stack([torch.cat([m.float() for m in self.masks[str(t.index)]]) for t in done]).cpu()
            lambdas = [self.cfg.lam] if self.cfg.lam is not None else list(self.cfg.lambdas)
            self._fit = (key, ridge_fit(x, y, lambdas))
        return self._fit[1]

    def lookup(self, task: Task) -> list[Tensor] | None:
        done = [t for t in (*self.stream.tasks, *self.stream.heldout) if bool(self.fixed[self.slot[t.index]]) and t.index != task.index]
        if not done:
            return None
        w, mx, my, lam = self.fit(done)
        if task.index < self.stream.num_tasks and task.index not in self.chosen_lambda:
            self.chosen_lambda[task.index] = lam  # the fit its zero-shot mask came from (first lookup)
        score = (my + (self.contexts[self.slot[task.index]].float().cpu() - mx) @ w).to(self.device) + self.tie_break
        size = int(round(float(my.sum())))
        flat = torch.zeros_like(score, dtype=torch.bool)
        flat[score.topk(size).indices] = True
        return list(flat.split(self.model.gated_widths))

    def report(self, task: Task | None = None) -> MethodReport:
        """At the end: the mask came from the context at test time (not the task's identity), and the ridge λ chosen at each refit."""
        out = super().report(task)
        if task is None:
            out.test_time_info = "context"
            out.figures["ridge_lambda"] = [self.chosen_lambda.get(t.index) for t in self.stream.tasks]
        return out
