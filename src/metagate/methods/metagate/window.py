"""metagate's windowed agent steps (``agent_every = k > 1``): the agent updated every k-th step.

The window's first step runs the agent (the current task's logits and the regulariser's stored tasks, kept with
their graph) and fixes the hard mask as a leaf; every step trains the target network through that leaf, whose
gradient accumulates; the k-th step (or the task's end) updates the agent with the mean of the k mask gradients
through the straight-through estimator plus ``beta`` x the regulariser's gradient. With the agent unchanged inside a
window, this is the gradient of k separate steps summed, taken once (gradient accumulation for the agent alone), and
k - 1 of k steps cost what an XdG step costs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metagate.nn.gates import topk_mask_grad


class AgentWindow:
    """The open window of steps: the agent's logits and regulariser at its start, the hard mask as a leaf whose
    gradient accumulates, and the steps taken."""

    def __init__(self, every: int) -> None:
        self.every = every
        self._open: tuple[Tensor, Tensor | None, Tensor] | None = None
        self._steps = 0

    def open(self, logits: Tensor, reg: Tensor | None, mask: Tensor) -> None:
        """Start a window with the agent's ``logits`` and regulariser ``reg`` (their graphs kept) and the hard ``mask``."""
        self._open, self._steps = (logits, reg, mask.requires_grad_(True)), 0

    @property
    def is_open(self) -> bool:
        return self._open is not None

    @property
    def mask(self) -> Tensor:
        assert self._open is not None
        return self._open[2]

    @property
    def reg(self) -> Tensor | None:
        assert self._open is not None
        return self._open[1]

    def discard(self) -> None:
        self._open = None

    def stepped(self, optimizer: torch.optim.Optimizer, beta: float) -> None:
        """A step through the mask has run: the k-th closes the window (the agent's update)."""
        self._steps += 1
        if self._steps == self.every:
            self.close(optimizer, beta)

    def close(self, optimizer: torch.optim.Optimizer, beta: float) -> None:
        """The agent's update for the steps of the open window (nothing when none is open or no step ran)."""
        if self._open is None:
            return
        (logits, reg, leaf), n = self._open, self._steps
        self._open = None
        if n == 0 or leaf.grad is None:
            return
        optimizer.zero_grad(set_to_none=True)
        grad = topk_mask_grad(logits, leaf.grad / n)
        if reg is None:
            logits.backward(grad)
        else:
            torch.autograd.backward([logits, beta * reg], [grad, torch.ones_like(reg)])
        optimizer.step()
