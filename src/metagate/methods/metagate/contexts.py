"""What metagate's agent reads: each task's context (given, or a control's), and each context number's range."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from metagate.data.stream import Stream

ContextMode = Literal["given", "shuffled", "onehot"]


def derangement(n: int) -> Tensor:
    """A uniformly random permutation of ``range(n)`` with no fixed point (``n >= 2``; rejection
    sampling from the global generator: a permutation is redrawn while any element stays in place)."""
    if n < 2:
        return torch.arange(n)
    while True:
        perm = torch.randperm(n)
        if bool((perm != torch.arange(n)).all()):
            return perm


def task_contexts(stream: Stream, mode: ContextMode) -> Tensor:
    """A row per task, training tasks then held-out ones: ``given``, the stream's contexts; ``shuffled`` (a control),
    every training task gets another training task's context (a fixed derangement drawn from the global generator: none
    keeps its own); ``onehot`` (a control), the training task's index (nothing to transfer; held-out rows zero)."""
    tasks = [*stream.tasks, *stream.heldout]
    given = torch.stack([t.context for t in tasks]).float()
    if mode == "shuffled":
        given[: stream.num_tasks] = given[derangement(stream.num_tasks)]
    elif mode == "onehot":
        given = torch.zeros(len(tasks), stream.num_tasks)
        given[torch.arange(stream.num_tasks), torch.arange(stream.num_tasks)] = 1.0
    return given


class ContextRange(nn.Module):
    """Each context number's range, ``lo`` and ``span`` (buffers, so a checkpoint keeps them), and the rescaling
    ``(c - lo) / span`` that maps the range onto [0, 1]. Before any :meth:`fit`: ``lo`` 0, ``span`` 1 (the contexts
    as they are)."""

    def __init__(self, dims: int, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("lo", torch.zeros(dims, device=device))
        self.register_buffer("span", torch.ones(dims, device=device))

    @torch.no_grad()
    def fit(self, contexts: Tensor, rows: Tensor) -> None:
        """The range over the rows of ``contexts`` that ``rows`` (bool) selects, on the device (no host read). A
        number with fewer than two values among them keeps a span of 1 (``lo`` its value; 0 with no row): a rescaled
        number then moves as the context does, never by a factor a single value would make up."""
        keep = rows.unsqueeze(1)
        lo = torch.where(keep, contexts, float("inf")).min(0).values
        span = torch.where(keep, contexts, float("-inf")).max(0).values - lo  # no row: -inf
        self.lo.copy_(torch.where(torch.isfinite(lo), lo, 0.0))
        self.span.copy_(torch.where(span > 1e-6, span, 1.0))

    def forward(self, contexts: Tensor) -> Tensor:
        return (contexts - self.lo) / self.span
