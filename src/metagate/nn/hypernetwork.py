"""A hypernetwork: an MLP from an input vector (a learned task embedding, a task's context, ...) to one
output tensor per target tensor, as ``hypnettorch``'s ``HMLP`` (von Oswald et al., ICLR 2020), which
HyperMask (Książek & Spurek 2023) uses to emit masks and hnet to emit weights.

``HMLP`` (``hypnettorch/hnets/mlp_hnet.py``): fully connected hidden layers with an activation after each
(HyperMask: ELU, ``datasets.py:676``), no activation on the output, biases everywhere, and one linear
output layer over all target tensors' entries, split into the target shapes. Its layers start as
PyTorch's ``nn.Linear`` does (``hypnettorch/utils/torch_utils.py:init_params`` copies
``reset_parameters``), so ``nn.Linear`` here starts the same. (Its internal task embeddings, drawn from
``N(0, 1)``, belong to the method that owns them; here the input is any vector.)

One call takes a batch of inputs ``[k, in_dim]`` and returns ``[k, num_outputs]`` flat (``flat``) or the
list of per-tensor views (``forward``), so a method regenerating several tasks' outputs (the output
regulariser over all earlier tasks) makes one matrix product, not one per task.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

Activation = Literal["elu", "relu", "none"]


class HyperNetwork(nn.Module):
    """``z [k, in_dim] -> [k, sum(prod(shape))]``: hidden layers with ``activation``, a linear output."""

    def __init__(
        self, in_dim: int, target_shapes: Sequence[Sequence[int]], hidden: Sequence[int], activation: Activation = "elu"
    ) -> None:
        super().__init__()
        self.target_shapes = [tuple(int(d) for d in s) for s in target_shapes]
        self.sizes = [math.prod(s) for s in self.target_shapes]
        self.num_outputs = sum(self.sizes)
        widths = [in_dim, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers.append(nn.Linear(a, b))
            if activation == "elu":
                layers.append(nn.ELU())
            elif activation == "relu":
                layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(widths[-1], self.num_outputs)

    def flat(self, z: Tensor) -> Tensor:
        """All outputs, ``[k, num_outputs]`` for ``z [k, in_dim]`` (or ``[num_outputs]`` for ``z [in_dim]``)."""
        return self.out(self.body(z))

    def split(self, flat: Tensor) -> list[Tensor]:
        """Flat outputs ``[..., num_outputs]`` as one view per target tensor, ``[..., *shape]``."""
        lead = flat.shape[:-1]
        return [p.reshape(*lead, *s) for p, s in zip(flat.split(self.sizes, dim=-1), self.target_shapes)]

    def forward(self, z: Tensor) -> list[Tensor]:
        return self.split(self.flat(z))


def percentile(values: Tensor, q: float) -> Tensor:
    """The ``q``-th percentile (0-100) of all entries, linearly interpolated between the two nearest order
    statistics: numpy's default and ``torchpercentile.Percentile``'s (which HyperMask uses), without a full
    sort: one ``kthvalue`` for the lower order statistic, the next one as the smallest value above it (or
    the same value when it repeats). No gradient (the value is only compared against). No host sync."""
    flat = values.detach().flatten()
    n = flat.numel()
    pos = q * (n - 1) / 100.0
    lo = int(math.floor(pos))
    w = pos - lo
    low = flat.kthvalue(lo + 1).values
    if w == 0 or lo + 1 >= n:
        return low
    at_or_below = flat <= low
    above = flat.masked_fill(at_or_below, float("inf")).min()
    high = torch.where(at_or_below.sum() >= lo + 2, low, above)  # the (lo+2)-th smallest
    return (low.double() * (1 - w) + high.double() * w).to(flat.dtype)
