"""Backbones. Every backbone takes optional per-unit masks for its gated layers, so gating methods can
switch units on and off per task without copying weights.

Shared interface (:class:`GatedBackbone`):

* ``forward(x, unit_masks=None) -> logits``; ``unit_masks`` is ``None`` or a list with one entry per
  gated layer (``None`` leaves that layer ungated). A mask for a fully connected layer broadcasts
  against ``[batch, width]``; a mask for a conv layer is ``[channels]`` or ``[batch, channels]`` and is
  broadcast over the spatial positions. Masks multiply the layer's activations (after its ReLU,
  dropout and pooling), as in XdG (Masse et al. 2018).
* ``gated_widths``: units (features or channels) per gated layer, the length of each mask.
* ``maskable_weights()``: the weight tensors a per-weight mask (PackNet, Piggyback, SupSup) would
  multiply, by parameter name in forward order. The hook for such methods: run the backbone as
  ``torch.func.functional_call(model, {name: w * mask[name]}, (x,))``.
* ``head``: the output layer (``nn.Linear``); ``features(x, unit_masks)`` gives its input.
* ``film`` (MLP and CNN): ``None`` or one ``(gamma, beta)`` pair per gated layer (``None`` leaves that
  layer alone), applied to the layer's pre-activation, ``relu(gamma * (W x + b) + beta)``, before
  dropout, pooling and the unit mask; shapes as for unit masks (``[batch, width]`` or ``[width]``; per
  channel on a conv layer). FiLM conditioning (Perez et al. 2018), see :mod:`metagate.nn.film`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from metagate.schema import Section

UnitMasks = Sequence[Tensor | None] | None
Modulation = Sequence[tuple[Tensor, Tensor] | None] | None  # FiLM's (gamma, beta) per gated layer


class BackboneConfig(Section):
    """The network a method trains.

    ``kind``: ``mlp`` (default), ``cnn`` (small conv net for 28x28, 32x32, 8x8 inputs), ``resnet18``
    (GEM's reduced ResNet-18). ``hidden``: widths of the fully connected hidden layers (the MLP's, or
    the CNN's after its conv stack; unused by resnet18). ``channels``: the CNN's conv layer widths.
    ``nf``: the ResNet's base width. ``dropout``: after each fully connected hidden layer (MLP, CNN).
    """

    kind: Literal["mlp", "cnn", "resnet18"] = Field("mlp", description="mlp, cnn or resnet18")
    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [128, 128], description="fully connected hidden widths (mlp, cnn)"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after each fully connected hidden layer (mlp, cnn)")
    channels: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [32, 64], min_length=1, description="conv layer widths (cnn)"
    )
    nf: int = Field(20, ge=1, description="base width of resnet18 (GEM: 20)")

    def gated_widths(self) -> list[int]:
        """Units per gated layer of the backbone this config builds (without building it)."""
        if self.kind == "mlp":
            return list(self.hidden)
        if self.kind == "cnn":
            return [*self.channels, *self.hidden]
        return [self.nf] + [w for w in (self.nf, 2 * self.nf, 4 * self.nf, 8 * self.nf) for _ in range(2)]


def _apply_film(h: Tensor, film: tuple[Tensor, Tensor] | None) -> Tensor:
    """``gamma * h + beta``; a conv activation ``[B, C, H, W]`` takes ``[C]`` or ``[B, C]`` per channel."""
    if film is None:
        return h
    gamma, beta = film
    if h.ndim == 4 and gamma.ndim in (1, 2):
        gamma, beta = gamma.reshape(*gamma.shape, 1, 1), beta.reshape(*beta.shape, 1, 1)
    return torch.addcmul(beta, gamma, h)


def _apply_mask(h: Tensor, mask: Tensor | None) -> Tensor:
    """``h * mask``; a conv activation ``[B, C, H, W]`` takes a ``[C]`` or ``[B, C]`` mask per channel."""
    if mask is None:
        return h
    if h.ndim == 4 and mask.ndim in (1, 2):
        mask = mask.reshape(*mask.shape, 1, 1)
    return h * mask


class GatedBackbone(nn.Module):
    """Base class: per-unit masks on the gated layers, a linear ``head``, the per-weight-mask hook."""

    head: nn.Linear

    @property
    def gated_widths(self) -> list[int]:
        raise NotImplementedError

    def _check_masks(self, unit_masks: UnitMasks, film: Modulation = None) -> None:
        for what, given in (("unit masks", unit_masks), ("FiLM (gamma, beta) pairs", film)):
            if given is not None and len(given) != len(self.gated_widths):
                raise ValueError(
                    f"{type(self).__name__} has {len(self.gated_widths)} gated layers (widths {self.gated_widths}), "
                    f"got {len(given)} {what}"
                )

    def features(self, x: Tensor, unit_masks: UnitMasks = None, film: Modulation = None) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, unit_masks: UnitMasks = None, film: Modulation = None) -> Tensor:
        return self.head(self.features(x, unit_masks, film))

    def maskable_weights(self) -> dict[str, nn.Parameter]:
        """Weights of every conv and linear layer (head included), by name, in forward order."""
        return {
            f"{name}.weight": m.weight
            for name, m in self.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))
        }


class MLP(GatedBackbone):
    """Fully connected ReLU network ``in -> hidden... -> out`` with dropout after each hidden layer.

    ``forward(x, unit_masks)`` multiplies hidden layer ``l``'s activations (after dropout, as in
    XdG) by ``unit_masks[l]``, which broadcasts against ``[batch, width]``.
    """

    def __init__(self, input_dim: int, hidden: Sequence[int], output_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        widths = [input_dim, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], output_dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.widths = list(hidden)

    @property
    def gated_widths(self) -> list[int]:
        return list(self.widths)

    def features(self, x: Tensor, unit_masks: UnitMasks = None, film: Modulation = None) -> Tensor:
        self._check_masks(unit_masks, film)
        h = x.flatten(1)
        for i, layer in enumerate(self.hidden):
            h = layer(h)
            if film is not None:
                h = _apply_film(h, film[i])
            h = self.dropout(torch.relu(h))
            if unit_masks is not None:
                h = _apply_mask(h, unit_masks[i])
        return h


class CNN(GatedBackbone):
    """Small conv net: per entry of ``channels`` a 3x3 conv (padding 1), ReLU and 2x2 max-pool, then
    fully connected ReLU layers ``hidden`` (with dropout) and a linear head.

    A spatial side shorter than 2 is not pooled along (so 8x8 digits and 1x40 MNIST-1D signals work):
    28x28 -> 14 -> 7, 32x32 -> 16 -> 8, 8x8 -> 4 -> 2 with two conv layers. Gated layers: every conv
    layer (per channel), then every hidden fully connected layer.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        channels: Sequence[int],
        hidden: Sequence[int],
        output_dim: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"the cnn backbone needs inputs [C, H, W], got input shape {tuple(input_shape)}; use kind=mlp")
        c, h, w = input_shape
        self.convs = nn.ModuleList()
        self.pools: list[tuple[int, int]] = []
        for width in channels:
            self.convs.append(nn.Conv2d(c, width, kernel_size=3, padding=1))
            pool = (2 if h >= 2 else 1, 2 if w >= 2 else 1)
            self.pools.append(pool)
            c, h, w = width, h // pool[0], w // pool[1]
        widths = [c * h * w, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], output_dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.channels, self.widths = list(channels), list(hidden)

    @property
    def gated_widths(self) -> list[int]:
        return self.channels + self.widths

    def features(self, x: Tensor, unit_masks: UnitMasks = None, film: Modulation = None) -> Tensor:
        self._check_masks(unit_masks, film)
        masks = list(unit_masks) if unit_masks is not None else [None] * len(self.gated_widths)
        mods = list(film) if film is not None else [None] * len(self.gated_widths)
        h = x
        for conv, pool, mask, mod in zip(self.convs, self.pools, masks, mods):
            h = torch.relu(_apply_film(conv(h), mod))
            if pool != (1, 1):
                h = F.max_pool2d(h, pool)
            h = _apply_mask(h, mask)
        h = h.flatten(1)
        n = len(self.convs)
        for layer, mask, mod in zip(self.hidden, masks[n:], mods[n:]):
            h = _apply_mask(self.dropout(torch.relu(_apply_film(layer(h), mod))), mask)
        return h


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016) as in GEM's ``model/common.py``: two 3x3 convs with batch
    norm, a 1x1 conv shortcut when the shape changes; the unit mask gates the block's output."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return _apply_mask(torch.relu(out + self.shortcut(x)), mask)


class ResNet18(GatedBackbone):
    """The reduced ResNet-18 of GEM (Lopez-Paz & Ranzato 2017, ``model/common.py``), also used by
    SupSup (Wortsman et al. 2020) for split CIFAR: base width ``nf = 20`` (stages of 20, 40, 80, 160
    channels, two basic blocks each, strides 1, 2, 2, 2), batch norm, a linear head.

    Differences from GEM's code: the stem takes the input's channel count (GEM hard-codes 3 and
    32x32), and the final pooling is a global average (``adaptive_avg_pool2d(1)``), identical to GEM's
    ``avg_pool2d(4)`` on 32x32 inputs and defined for 28x28 and 8x8 inputs too. Gated layers: the stem
    and the output of each of the 8 blocks (per channel).
    """

    def __init__(self, input_shape: Sequence[int], output_dim: int, nf: int = 20) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"the resnet18 backbone needs inputs [C, H, W], got input shape {tuple(input_shape)}; use kind=mlp")
        self.conv1 = nn.Conv2d(input_shape[0], nf, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        blocks, in_planes, self._widths = [], nf, [nf]
        for planes, stride in ((nf, 1), (2 * nf, 2), (4 * nf, 2), (8 * nf, 2)):
            for s in (stride, 1):
                blocks.append(BasicBlock(in_planes, planes, s))
                in_planes = planes
                self._widths.append(planes)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(8 * nf, output_dim)

    @property
    def gated_widths(self) -> list[int]:
        return list(self._widths)

    def features(self, x: Tensor, unit_masks: UnitMasks = None, film: Modulation = None) -> Tensor:
        if film is not None:
            raise ValueError("the resnet18 backbone takes no FiLM modulation (mlp and cnn do)")
        self._check_masks(unit_masks)
        masks = list(unit_masks) if unit_masks is not None else [None] * len(self._widths)
        h = _apply_mask(torch.relu(self.bn1(self.conv1(x))), masks[0])
        for block, mask in zip(self.blocks, masks[1:]):
            h = block(h, mask)
        return F.adaptive_avg_pool2d(h, 1).flatten(1)


def build_backbone(cfg: BackboneConfig, input_shape: Sequence[int], num_outputs: int) -> GatedBackbone:
    """The backbone ``cfg.kind`` for inputs of ``input_shape`` (without the batch axis)."""
    if cfg.kind == "cnn":
        return CNN(input_shape, cfg.channels, cfg.hidden, num_outputs, cfg.dropout)
    if cfg.kind == "resnet18":
        return ResNet18(input_shape, num_outputs, cfg.nf)
    input_dim = 1
    for s in input_shape:
        input_dim *= s
    return MLP(input_dim, cfg.hidden, num_outputs, cfg.dropout)
