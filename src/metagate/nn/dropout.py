"""Inverted dropout with a cheaper random draw on CPU.

``nn.Dropout`` on CPU draws one Bernoulli sample per element (``bernoulli_``), which costs as much as
a 784 x 400 matmul for a batch of 256 MNIST-sized inputs. :class:`Dropout` draws 64-bit integers
instead (``random_``, 63 uniform bits each) and uses each as two uniform 31-bit numbers, one per
element: half the generator calls, and a keep test ``u < round(keep * 2^31)`` whose keep probability
is exact to 2^-31 (``torch.rand``'s float32 resolution is 2^-24). Kept elements are scaled by
``1 / (1 - p)``, as in ``nn.Dropout``. The draw comes from the global generator, so a run seeded the
same way draws the same masks (resume stays exact). On accelerators it is ``F.dropout`` (its fused
kernel is already cheap).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def keep_mask(
    shape: torch.Size | tuple[int, ...], keep: float, device: torch.device | str = "cpu", words: Tensor | None = None
) -> Tensor:
    """Bool tensor of ``shape``, each element True with probability ``keep`` (to 2^-31), drawn from
    the global generator as 31-bit halves of 64-bit integers. ``words``: an int64 scratch tensor of
    ``ceil(numel / 2)`` elements to draw into (reused across calls instead of a fresh allocation)."""
    n = 1
    for s in shape:
        n *= s
    if words is None or words.numel() != (n + 1) // 2:
        words = torch.empty((n + 1) // 2, dtype=torch.int64, device=device)
    words.random_()  # in [0, 2^63)
    halves = words.view(torch.int32)[:n].bitwise_and_(0x7FFFFFFF)  # both halves: uniform in [0, 2^31)
    return halves.view(shape) < round(keep * 2**31)


class Dropout(nn.Module):
    """Inverted dropout, ``x * Bernoulli(1 - p) / (1 - p)`` in training, identity in evaluation."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self._words: Tensor | None = None  # the draw's scratch, reused while the input's size stays the same

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        if self._words is None or self._words.numel() != (x.numel() + 1) // 2:
            self._words = torch.empty((x.numel() + 1) // 2, dtype=torch.int64)
        # scaled, then masked in place: the same numbers as (x * mask) * scale (x * 1 and x * 0 are exact), one
        # temporary fewer
        return x.mul(1.0 / (1.0 - self.p)).mul_(keep_mask(x.shape, 1.0 - self.p, words=self._words))

    def extra_repr(self) -> str:
        return f"p={self.p}"
