"""FiLM conditioning: a backbone whose hidden layers are scaled and shifted by the task's context.

FiLM (Perez, Strub, de Vries, Dumoulin & Courville, "FiLM: Visual Reasoning with a General
Conditioning Layer", AAAI 2018) modulates every feature of a layer with an affine map predicted from
a conditioning input: ``FiLM(h) = gamma * h + beta``, applied in the paper after batch normalisation
and before the ReLU. The MLP and CNN backbones here have no normalisation, so the map acts on each
hidden layer's pre-activation: ``relu(gamma * (W x + b) + beta)``, per unit for a fully connected
layer and per channel (broadcast over the spatial positions) for a conv layer, before max-pooling,
dropout and any unit mask (see :mod:`metagate.nn.backbones`).

:class:`FiLMGenerator` is linear: one ``nn.Linear`` from the context vector to ``(delta_gamma, beta)``
for every modulated layer, with ``gamma = 1 + delta_gamma`` (the residual parametrisation many FiLM
implementations use). Its weight and bias start at zero, so at initialisation ``gamma = 1`` and
``beta = 0`` exactly for any context: a FiLM net starts as the plain net with the same weights.
:class:`FiLMNet` puts a backbone and its generator in one module, so that everything iterating over
the method's model (optimiser, EWC, SI) trains and protects the generator too.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor, nn

from metagate.nn.backbones import GatedBackbone, UnitMasks


class FiLMGenerator(nn.Module):
    """Context ``[batch, context_dim]`` -> one ``(gamma, beta)`` pair of ``[batch, width]`` per layer.

    The generator is applied per sample (the context is expanded to the batch, not broadcast) so
    that per-sample gradients, e.g. the closed-form Fisher of EWC, stay exact.
    """

    def __init__(self, context_dim: int, widths: Sequence[int]) -> None:
        super().__init__()
        if not widths:
            raise ValueError("FiLM needs at least one hidden layer to modulate")
        self.widths = list(widths)
        self.linear = nn.Linear(context_dim, 2 * sum(self.widths))
        nn.init.zeros_(self.linear.weight)  # output 0: gamma = 1, beta = 0 for every context
        nn.init.zeros_(self.linear.bias)

    def forward(self, context: Tensor) -> list[tuple[Tensor, Tensor]]:
        out = self.linear(context)
        d_gamma, beta = out.split(sum(self.widths), dim=1)
        return [(1.0 + g, b) for g, b in zip(d_gamma.split(self.widths, dim=1), beta.split(self.widths, dim=1))]


class FiLMNet(nn.Module):
    """A backbone (``mlp`` or ``cnn``) with a :class:`FiLMGenerator` on all of its hidden layers
    (``gated_widths``: every conv layer per channel, then every fully connected hidden layer).

    ``forward(x, context, unit_masks=None) -> logits`` with ``context`` of shape ``[batch, context_dim]``.
    """

    def __init__(self, backbone: GatedBackbone, context_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.generator = FiLMGenerator(context_dim, backbone.gated_widths)

    @property
    def gated_widths(self) -> list[int]:
        return self.backbone.gated_widths

    @property
    def head(self) -> nn.Linear:
        return self.backbone.head

    def features(self, x: Tensor, context: Tensor, unit_masks: UnitMasks = None) -> Tensor:
        return self.backbone.features(x, unit_masks, film=self.generator(context))

    def forward(self, x: Tensor, context: Tensor, unit_masks: UnitMasks = None) -> Tensor:
        return self.backbone(x, unit_masks, film=self.generator(context))
