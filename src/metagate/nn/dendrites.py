"""Active dendrites (Iyer et al., Frontiers in Neurorobotics 2022): sparse linear layers whose units
are gated by dendritic segments that read a context vector, and k-winners-take-all.

Written after numenta's code (nupic.research ``packages/dendrites/src/nupic/research/frameworks/dendrites``
and nupic.torch ``src/nupic/torch``), read for its behaviour, not copied:

* :class:`DendriticLayer` -- ``modules/dendritic_layers.py`` (``AbsoluteMaxGatingDendriticLayer``,
  ``GatingDendriticLayer``) with ``modules/dendrite_segments.py`` and ``functional/apply_dendrites.py``.
  Unit ``u``'s output is ``(W x + b)_u * sigmoid(d_u)`` with ``d_u`` the activation ``s_{u,j} . c`` of
  one of its segments ``j``: the largest (``gating="max"``, ``dendritic_gate_1d``) or the one largest in
  absolute value, sign kept (``gating="absolute_max"``, ``dendritic_absolute_max_gate_1d``; the default
  ``dendritic_layer_class`` of ``DendriticMLP``, which the permuted-MNIST configs do not override).
  Segments have no bias (``DendriteSegments(bias=None)``).
* Weight sparsity -- nupic.torch ``modules/sparse_weights.py`` ``SparseWeights``: a fixed random mask
  per layer keeps exactly ``round(density * fan_in)`` incoming weights of every unit; the masked
  weights are set to zero at construction and after every optimiser step (the experiments'
  ``RezeroWeights`` mixin, ``post_optimizer_step``), here :meth:`DendriticMLP.rezero_`.
* :func:`kwinners` -- nupic.torch ``functions/k_winners.py``: per sample, the ``k = round(n * percent_on)``
  largest activations pass, all others are set to zero (no ReLU before it: ``relu=False``, so a
  negative winner passes as it is). The gradient reaches the winners only. ``DendriticMLP`` builds its
  ``KWinners`` with ``boost_strength=0.0``, ``boost_strength_factor=0.0``, ``k_inference_factor=1.0``:
  no duty-cycle boosting and the same ``k`` at test, so neither boosting nor its duty cycles are
  implemented here. The code's default ``break_ties=False`` keeps every unit at least as large as the
  k-th value (more than ``k`` only on exact ties); here ties are broken so exactly ``k`` stay on.
* Initialisation -- ``modules/dendritic_mlp.py`` (``weight_init="modified"``, ``dendrite_init="modified"``):
  feed-forward weights ``U(-h, h)``, ``h = 1 / sqrt(input_density * weight_density * fan_in)``, with
  ``input_density`` 1 for the first layer and ``kw_percent_on`` after a k-winners layer; segment weights
  ``U(-h, h)``, ``h = 1 / sqrt(context_percent_on * dendrite_density * context_dim)``; biases keep
  ``nn.Linear``'s default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

Gating = Literal["absolute_max", "max"]


def sparse_mask(rows: int, cols: int, density: float) -> Tensor:
    """``[rows, cols]`` bool, True where a weight is kept: exactly ``round(density * cols)`` per row,
    at random positions (drawn from torch's global generator)."""
    keep = int(round(density * cols))
    order = torch.rand(rows, cols).argsort(dim=1)
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    mask.scatter_(1, order[:, :keep], True)
    return mask


def kwinners(x: Tensor, k: int) -> Tensor:
    """``x`` ([batch, units]) with all but each row's ``k`` largest entries set to zero."""
    if k >= x.shape[1]:
        return x
    if k <= 0:
        return torch.zeros_like(x)
    winners = x.topk(k, dim=1, sorted=False).indices
    on = torch.zeros_like(x, dtype=torch.bool).scatter_(1, winners, True)
    return x.masked_fill(~on, 0.0)


class KWinners(nn.Module):
    """k-winners-take-all over ``n`` units, ``k = round(n * percent_on)`` in training and at test."""

    def __init__(self, n: int, percent_on: float) -> None:
        super().__init__()
        if not 0 < percent_on < 1:
            raise ValueError(f"percent_on must be in (0, 1), not {percent_on}")
        self.n, self.percent_on = n, percent_on
        self.k = int(round(n * percent_on))

    def forward(self, x: Tensor) -> Tensor:
        return kwinners(x, self.k)

    def extra_repr(self) -> str:
        return f"n={self.n}, k={self.k}"


class SparseLinear(nn.Linear):
    """``nn.Linear`` with a fixed random mask over its weight (``weight_mask``, a buffer): masked
    weights are zero after :meth:`rezero_`, which the owner calls after every optimiser step."""

    def __init__(self, in_features: int, out_features: int, density: float = 1.0, input_density: float = 1.0) -> None:
        super().__init__(in_features, out_features)
        if not 0 < density <= 1 or not 0 < input_density <= 1:
            raise ValueError(f"densities must be in (0, 1], not {density} and {input_density}")
        self.density = density
        bound = 1.0 / math.sqrt(input_density * density * in_features)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)
        self.register_buffer("weight_mask", sparse_mask(out_features, in_features, density))
        self.rezero_()

    @torch.no_grad()
    def rezero_(self) -> None:
        if self.density < 1:
            self.weight.masked_fill_(~self.weight_mask, 0.0)


def gate_from_segments(activations: Tensor, gating: Gating) -> tuple[Tensor, Tensor]:
    """``activations`` [batch, units, segments] -> (``sigmoid`` of each unit's selected segment
    activation [batch, units], the selected segment's index [batch, units])."""
    if gating == "max":
        chosen, index = activations.max(dim=2)
    else:
        index = activations.abs().argmax(dim=2)
        chosen = activations.gather(2, index.unsqueeze(2)).squeeze(2)
    return torch.sigmoid(chosen), index


class DendriticLayer(nn.Module):
    """A sparse linear layer whose every unit has ``num_segments`` dendritic segments over the context.

    ``forward(x, contexts, index=None)``: ``contexts`` is ``[batch, context_dim]`` (one per sample),
    ``[1, context_dim]`` (one for the whole batch), or with ``index`` ([batch] long) a table of
    distinct contexts that sample ``i`` reads row ``index[i]`` of. The segments are evaluated once per
    row of ``contexts``, so a batch that shares a few contexts costs a few segment evaluations, not one
    per sample (the same values and gradients as per-sample evaluation).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_segments: int,
        context_dim: int,
        weight_density: float = 0.5,
        dendrite_density: float = 1.0,
        input_density: float = 1.0,
        context_density: float = 0.1,
        gating: Gating = "absolute_max",
    ) -> None:
        super().__init__()
        if num_segments < 1:
            raise ValueError("a dendritic layer needs at least one segment per unit")
        self.ff = SparseLinear(in_features, out_features, weight_density, input_density)
        self.num_segments, self.context_dim, self.gating = num_segments, context_dim, gating
        self.dendrite_density = dendrite_density
        bound = 1.0 / math.sqrt(context_density * dendrite_density * context_dim)
        self.segments = nn.Parameter(torch.empty(out_features, num_segments, context_dim).uniform_(-bound, bound))
        if dendrite_density < 1:  # per (unit, segment): exactly round(density * context_dim) weights kept
            mask = sparse_mask(out_features * num_segments, context_dim, dendrite_density)
            self.register_buffer("segment_mask", mask.view(out_features, num_segments, context_dim))
        self.rezero_()

    @torch.no_grad()
    def rezero_(self) -> None:
        self.ff.rezero_()
        if self.dendrite_density < 1:
            self.segments.masked_fill_(~self.segment_mask, 0.0)

    def segment_activations(self, contexts: Tensor) -> Tensor:
        """``[rows, units, segments]``: every segment's activation ``s_{u,j} . c`` for each context row."""
        units = self.segments.shape[0]
        flat = contexts @ self.segments.reshape(units * self.num_segments, self.context_dim).t()
        return flat.view(contexts.shape[0], units, self.num_segments)

    def gates(self, contexts: Tensor) -> tuple[Tensor, Tensor]:
        """Per context row, each unit's gate ``sigmoid(d_u)`` and the index of its selected segment."""
        return gate_from_segments(self.segment_activations(contexts), self.gating)

    def forward(self, x: Tensor, contexts: Tensor, index: Tensor | None = None) -> Tensor:
        gate, _ = self.gates(contexts.to(x.dtype))
        if index is not None:
            gate = gate[index]
        return self.ff(x) * gate


class DendriticMLP(nn.Module):
    """``DendriticMLP`` of nupic.research (``modules/dendritic_mlp.py``): dendritic hidden layers, each
    followed by k-winners (``kw_percent_on > 0``) or ReLU (``kw_percent_on = 0``, as the code), and a
    sparse linear output layer without dendrites. Inputs are flattened."""

    def __init__(
        self,
        input_dim: int,
        hidden: Sequence[int],
        num_outputs: int,
        num_segments: int,
        context_dim: int,
        kw_percent_on: float = 0.05,
        weight_sparsity: float = 0.5,
        dendrite_sparsity: float = 0.0,
        context_percent_on: float = 0.1,
        gating: Gating = "absolute_max",
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("a dendritic MLP needs at least one hidden layer")
        density = 1.0 - weight_sparsity
        after_hidden = kw_percent_on if kw_percent_on > 0 else 1.0  # input density seen past a hidden layer
        self.layers = nn.ModuleList()
        self.activations = nn.ModuleList()
        width = input_dim
        for i, h in enumerate(hidden):
            self.layers.append(
                DendriticLayer(
                    width, h, num_segments, context_dim, density, 1.0 - dendrite_sparsity,
                    input_density=1.0 if i == 0 else after_hidden, context_density=context_percent_on, gating=gating,
                )
            )
            self.activations.append(KWinners(h, kw_percent_on) if kw_percent_on > 0 else nn.ReLU())
            width = h
        self.head = SparseLinear(width, num_outputs, density, input_density=after_hidden)

    @torch.no_grad()
    def rezero_(self) -> None:
        for layer in self.layers:
            layer.rezero_()  # type: ignore[operator]
        self.head.rezero_()

    def feedforward(self) -> nn.ModuleDict:
        """The feed-forward (non-dendritic) linear layers, by name: what SI protects by default."""
        named = {f"layer{i}": layer.ff for i, layer in enumerate(self.layers)}
        return nn.ModuleDict({**named, "head": self.head})

    def hidden_activity(self, x: Tensor, contexts: Tensor, index: Tensor | None = None) -> list[Tensor]:
        """Each hidden layer's output (after k-winners / ReLU)."""
        out = []
        h = x.flatten(1)
        for layer, act in zip(self.layers, self.activations):
            h = act(layer(h, contexts, index))
            out.append(h)
        return out

    def forward(self, x: Tensor, contexts: Tensor, index: Tensor | None = None) -> Tensor:
        return self.head(self.hidden_activity(x, contexts, index)[-1])
