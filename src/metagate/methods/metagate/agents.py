"""metagate's meta-agents: ``context -> mask logits`` for every gated unit of the target network."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

AgentKind = Literal["mlp", "additive"]


class MetaAgent(nn.Module):
    """``context -> mask logits`` for every gated unit of the target network (an MLP)."""

    rescaled_input = False  # reads the contexts as they are

    def __init__(self, context_dim: int, num_units: int, hidden: list[int]) -> None:
        super().__init__()
        widths = [context_dim, *hidden]
        layers: list[nn.Module] = []
        # No biases: the logits are a (positively homogeneous) function of the context alone. With
        # biases, which outweigh a unit-norm context's contribution, every context starts from nearly
        # the same mask, and fitting the first task's mask teaches the agent a constant.
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b, bias=False), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_units, bias=False))
        self.net = nn.Sequential(*layers)

    def forward(self, context: Tensor) -> Tensor:
        return self.net(context)


class AdditiveAgent(nn.Module):
    """``context -> mask logits`` as a sum of one small ReLU network per context coordinate, with biases:
    ``logits = b + sum_d g_d(c_d)``, ``g_d: R -> R^units`` (one hidden layer of ``hidden`` units).

    A generalised additive model over the context's coordinates: tasks that share a coordinate's value share
    that coordinate's contribution to every unit's logit, so a new combination of known values gets the
    sum of what each value selected (composition), which a nearest-neighbour lookup cannot give. With
    biases, ``g_d`` can be a bump around one value (a step-function code: one value selects a group, its
    neighbours another), which the bias-free MLP, positively homogeneous in the context, cannot be.
    It reads each coordinate rescaled to [0, 1] over its known range (:class:`~.contexts.ContextRange`), and the
    hidden units' kinks start spread evenly over [0, 1] (a piecewise-linear basis) with random slopes' signs.
    For low-dimensional contexts (factors, angles): the parameters grow as ``dims x hidden x units``."""

    MAX_DIMS = 64
    rescaled_input = True  # reads each context number rescaled to [0, 1] over its range

    def __init__(self, dims: int, num_units: int, hidden: int) -> None:
        super().__init__()
        if dims > self.MAX_DIMS:
            raise ValueError(
                f"method.agent=additive takes contexts of at most {self.MAX_DIMS} numbers (one network per number); this "
                f"stream's have {dims}: use method.agent=mlp"
            )
        knots = torch.linspace(0, 1, hidden).repeat(dims, 1)  # [dims, hidden]
        sign = torch.where(torch.rand(dims, hidden) < 0.5, -1.0, 1.0)
        self.w1 = nn.Parameter(sign)
        self.b1 = nn.Parameter(-sign * knots + 0.5 / hidden * sign)  # each kink just off a knot: no exact zero slope at 0
        self.w2 = nn.Parameter(torch.randn(dims, hidden, num_units) / (dims * hidden) ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(num_units))

    def forward(self, context: Tensor) -> Tensor:
        h = torch.relu(context.unsqueeze(-1) * self.w1 + self.b1)  # [n, dims, hidden]
        return torch.einsum("ndh,dhu->nu", h, self.w2) + self.b2


def make_agent(kind: AgentKind, dims: int, num_units: int, hidden: list[int]) -> nn.Module:
    """The agent of ``method.agent`` (``additive``: ``hidden[0]`` units per context number)."""
    if kind == "additive":
        return AdditiveAgent(dims, num_units, hidden[0])
    return MetaAgent(dims, num_units, hidden)
