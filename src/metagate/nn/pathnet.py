"""A PathNet (Fernando et al. 2017): layers of ``M`` modules each, run along a *path* that names ``N`` modules
per layer; a layer's output is the sum of its active modules' outputs.

The modules of a layer are held as one weight bank (``[M, out, in]`` linear, ``[M, out, in, k, k]`` conv), so
a path given as a device tensor ``[L, N]`` of module indices selects its modules by indexing: choosing,
evolving and freezing paths never reads anything back from the device.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ModuleBank(nn.Module):
    """``M`` modules of one layer: linear ``in -> out`` or a 3x3 conv (padding 1) ``in -> out`` channels,
    each followed by ReLU, dropout and (conv) max-pooling ``pool``. Every module starts like PyTorch's
    default ``nn.Linear`` / ``nn.Conv2d``: weights and bias ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""

    def __init__(self, kind: str, modules: int, fan_in: int, width: int, pool: tuple[int, int] = (1, 1)) -> None:
        super().__init__()
        self.kind, self.pool, self.width = kind, pool, width
        shape = (modules, width, fan_in) if kind == "linear" else (modules, width, fan_in, 3, 3)
        bound = 1.0 / math.sqrt(fan_in if kind == "linear" else fan_in * 9)
        self.weight = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(modules, width).uniform_(-bound, bound))

    def forward(self, h: Tensor, idx: Tensor, dropout: float, train: bool) -> Tensor:
        """The sum over the modules ``idx`` (``[N]`` indices, repeats allowed) of each module's output."""
        w, b = self.weight[idx], self.bias[idx]
        n = idx.shape[0]
        if self.kind == "linear":
            z = torch.relu(torch.einsum("bi,noi->bno", h, w) + b)  # [B, N, out]
            z = F.dropout(z, dropout, train) if dropout > 0 else z
            return z.sum(1)
        z = torch.relu(F.conv2d(h, w.reshape(n * self.width, *w.shape[2:]), b.reshape(-1), padding=1))
        z = F.dropout(z, dropout, train) if dropout > 0 else z
        if self.pool != (1, 1):
            z = F.max_pool2d(z, self.pool)
        return z.view(z.shape[0], n, self.width, *z.shape[2:]).sum(1)


def bank_widths(kind: str, channels: Sequence[int], hidden: Sequence[int], factor: float) -> list[int]:
    """Module widths: each layer's width (channels, then hidden) times ``factor``, at least 1."""
    layers = [*channels, *hidden] if kind == "cnn" else list(hidden)
    return [max(1, int(factor * w)) for w in layers]


class PathNetwork(nn.Module):
    """``L`` module banks over an MLP (``hidden``) or a small CNN (``channels`` then ``hidden``) layout, and a
    linear head per task. ``forward(x, path, head)`` runs ``path`` (``[L, N]`` module indices) and head
    ``head``."""

    def __init__(
        self,
        kind: str,
        input_shape: Sequence[int],
        channels: Sequence[int],
        hidden: Sequence[int],
        modules: int,
        factor: float,
        num_outputs: int,
        num_heads: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in ("mlp", "cnn"):
            raise ValueError(f"pathnet builds its modules over an mlp or cnn layout, not {kind}")
        widths = bank_widths(kind, channels, hidden, factor)
        self.dropout = dropout
        self.banks = nn.ModuleList()
        self.conv_layers = len(channels) if kind == "cnn" else 0
        if kind == "cnn":
            if len(input_shape) != 3:
                raise ValueError(f"the cnn layout needs inputs [C, H, W], got {tuple(input_shape)}; use kind=mlp")
            c, h, w = input_shape
            for width in widths[: self.conv_layers]:
                pool = (2 if h >= 2 else 1, 2 if w >= 2 else 1)
                self.banks.append(ModuleBank("conv", modules, c, width, pool))
                c, h, w = width, h // pool[0], w // pool[1]
            fan_in = c * h * w
        else:
            fan_in = 1
            for s in input_shape:
                fan_in *= s
        for width in widths[self.conv_layers :]:
            self.banks.append(ModuleBank("linear", modules, fan_in, width))
            fan_in = width
        self.widths = widths
        self.heads = nn.ModuleList(nn.Linear(fan_in, num_outputs) for _ in range(num_heads))

    @property
    def num_layers(self) -> int:
        return len(self.banks)

    def forward(self, x: Tensor, path: Tensor, head: int, train: bool = False) -> Tensor:
        h = x
        for i, bank in enumerate(self.banks):
            if i == self.conv_layers:
                h = h.flatten(1)
            drop = 0.0 if bank.kind == "conv" else self.dropout
            h = bank(h, path[i], drop, train)
        if self.conv_layers == len(self.banks):
            h = h.flatten(1)
        return self.heads[head](h)


def bank_params(kind: str, input_shape: Sequence[int], channels: Sequence[int], hidden: Sequence[int], modules: int, factor: float) -> int:
    """Parameters in the module banks of a :class:`PathNetwork` (heads excluded), without building it."""
    widths = bank_widths(kind, channels, hidden, factor)
    total, n_conv = 0, len(channels) if kind == "cnn" else 0
    if kind == "cnn":
        c, h, w = input_shape
        for width in widths[:n_conv]:
            total += modules * (c * 9 * width + width)
            c, h, w = width, h // (2 if h >= 2 else 1), w // (2 if w >= 2 else 1)
        fan_in = c * h * w
    else:
        fan_in = math.prod(input_shape)
    for width in widths[n_conv:]:
        total += modules * (fan_in * width + width)
        fan_in = width
    return total


def matching_factor(kind: str, input_shape: Sequence[int], channels: Sequence[int], hidden: Sequence[int], modules: int, target: int) -> float:
    """The largest width factor (to 0.001) whose module banks hold at most ``target`` parameters (HAT's
    ``expand_factor``, chosen "to match num params" of the network PathNet replaces); at least 0.001."""
    lo, hi = 0.001, 1.0
    if bank_params(kind, input_shape, channels, hidden, modules, hi) <= target:
        return hi
    while hi - lo > 0.0001:
        mid = (lo + hi) / 2
        if bank_params(kind, input_shape, channels, hidden, modules, mid) <= target:
            lo = mid
        else:
            hi = mid
    return max(0.001, math.floor(lo * 1000) / 1000)
