"""Optimisers that reproduce a reference implementation's update rule."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor


class MasseAdam(torch.optim.Optimizer):
    """Adam as Masse et al.'s XdG code executes it (nmasse/Context-Dependent-Gating, ``AdamOpt.py``).

    Per parameter ``p`` with gradient ``g`` (a missing gradient counts as zero: the code updates every
    variable at every step)::

        m <- beta1 m + (1 - beta1) g                     # AdamOpt.py:57
        v <- beta2 v + (1 - beta2) g^2                   # AdamOpt.py:58
        d  = -lr_t m / (sqrt(v) + eps)                   # AdamOpt.py:60
        d <- d * min(1, clip / ||d||_2)                  # AdamOpt.py:61, tf.clip_by_norm per variable
        p <- p + d                                       # AdamOpt.py:67

    with ``lr_t = lr sqrt(1 - beta2^t) / (1 - beta1^t)`` (AdamOpt.py:53). The code computes ``lr_t`` in
    Python when it builds the graph: ``compute_gradients`` runs once (model.py:189), so ``t = 1`` and
    ``lr_t = lr sqrt(1 - beta2) / (1 - beta1) ~= 0.316 lr`` is a constant baked into every step of every
    task; ``reset_params`` sets ``self.t = 0`` (AdamOpt.py:38), which the graph never reads again. This
    class does the same (``lr_t`` fixed at its ``t = 1`` value). Compared with :class:`torch.optim.Adam`
    (``lr m_hat / (sqrt(v_hat) + eps)``): the first step is the same (up to eps), steps around 10-30 are
    about twice torch's (the moments are still small but not yet bias-corrected for), after a few hundred
    steps they settle at 0.316x torch's, and an update whose norm over a whole tensor exceeds ``clip`` is
    scaled down to it.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        clip: float = 1.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "clip": clip})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr_t = group["lr"] * math.sqrt(1 - beta2) / (1 - beta1)  # AdamOpt.py:53 with t = 1 (see above)
            for p in group["params"]:
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                m, v = state["m"], state["v"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                delta = m / (v.sqrt() + group["eps"]) * -lr_t
                norm = torch.linalg.vector_norm(delta)
                delta.mul_(group["clip"] / torch.clamp(norm, min=group["clip"]))  # tf.clip_by_norm(delta, clip)
                p.add_(delta)
        return loss
