"""Backbones. Every backbone takes optional per-unit masks for its hidden layers, so gating
methods can switch units on and off per task without copying weights."""

from __future__ import annotations

from typing import Sequence

import torch
from pydantic import Field
from torch import Tensor, nn

from metagate.config import Section


class BackboneConfig(Section):
    """The network a method trains. ``hidden`` lists the hidden layer widths of the MLP."""

    hidden: list[int] = Field(default_factory=lambda: [128, 128])
    dropout: float = Field(0.0, ge=0, lt=1)


class MLP(nn.Module):
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

    def features(self, x: Tensor, unit_masks: Sequence[Tensor | None] | None = None) -> Tensor:
        h = x.flatten(1)
        for i, layer in enumerate(self.hidden):
            h = self.dropout(torch.relu(layer(h)))
            if unit_masks is not None and unit_masks[i] is not None:
                h = h * unit_masks[i]
        return h

    def forward(self, x: Tensor, unit_masks: Sequence[Tensor | None] | None = None) -> Tensor:
        return self.head(self.features(x, unit_masks))


def build_backbone(cfg: BackboneConfig, input_shape: Sequence[int], num_outputs: int) -> nn.Module:
    input_dim = 1
    for s in input_shape:
        input_dim *= s
    return MLP(input_dim, cfg.hidden, num_outputs, cfg.dropout)
