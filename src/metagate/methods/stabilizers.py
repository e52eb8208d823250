"""Weight stabilisers that any method can carry: EWC / online EWC and SI.

A stabiliser protects the parameters that earlier tasks rely on with a quadratic penalty. It is a
component, not a method, so that gating methods can combine with it (XdG + SI, XdG + EWC, as in
Masse et al. 2018). The owning method calls, per training step::

    loss.backward(); stab.after_backward(); stab.add_penalty_grad(); optimizer.step(); stab.after_step()

and ``before_task`` / ``after_task`` around each task. ``after_backward`` sees the gradient of the
unregularised task loss (SI's path integral needs exactly that; SI keeps those gradient tensors until
``after_step`` and ``add_penalty_grad`` puts the penalised sum in fresh ``.grad`` tensors, so nothing between
the two may change a gradient in place). ``after_task(task, final=True)`` after
the stream's last training task: nothing trains after it, so a stabiliser may skip work whose only use
is a later task's penalty (EWC skips its Fisher there).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor, nn

from metagate.data.stream import Task
from metagate.methods.regularizers import QuadraticPenalty, fisher_diagonal


class Stabilizer(nn.Module):
    """Base: no penalty. Subclasses hold their importance as buffers (they ride in checkpoints)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = [model]  # a list, so the model is not registered twice in state_dict
        self.quadratic = QuadraticPenalty(model)

    @property
    def net(self) -> nn.Module:
        return self.model[0]

    def before_task(self, task: Task) -> None:
        pass

    def after_backward(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_task(self, task: Task, final: bool = False) -> None:
        pass

    def strength(self) -> float:
        raise NotImplementedError

    def penalty(self) -> Tensor | None:
        """The scaled penalty, or ``None`` before any task has been consolidated (no device sync)."""
        if not self.quadratic.active:
            return None
        return self.strength() * self.quadratic(self.net)

    def add_penalty_grad(self) -> Tensor | None:
        """Add the scaled penalty's gradient to the parameters' ``.grad`` directly (what
        ``penalty().backward()`` would add, without autograd) and return its value, detached; ``None``
        before any task has been consolidated."""
        if not self.quadratic.active:
            return None
        return self.quadratic.add_grad_(self.net, self.strength())


class EWCStabilizer(Stabilizer):
    """Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017) and its online variant
    (Schwarz et al., ICML 2018).

    * ``online=False``: ``lambda/2 * sum_t sum_k F_t,k (theta_k - theta*_t,k)^2``, one term per past
      task with its own Fisher and anchor (Kirkpatrick et al., eq. 3 summed over tasks), folded exactly
      into one importance/anchor pair (see :meth:`QuadraticPenalty.add_anchored`).
    * ``online=True``: ``lambda/2 * gamma * sum_k F*_k (theta_k - theta*_k)^2`` with the running Fisher
      ``F* <- gamma F* + F_t`` and the anchor at the latest task's solution (Schwarz et al., eq. 8-9:
      the penalty is weighted by ``gamma F*_{t-1}``, so even the latest task's Fisher is decayed once).
      ``gamma = 1`` is plain accumulation.

    The Fisher (:func:`fisher_diagonal`): plain mean over ``fisher_samples`` training inputs of the
    squared per-sample gradient of ``log p(y|x)``, ``y`` drawn from the model (``"sampled"``) or the
    true label; with ``fisher_dropout`` the forward keeps dropout on, as Masse et al.'s XdG code does.
    Not computed after the stream's last training task (``final``), where no penalty follows.
    ``owner(x, task)`` gives the (masked) logits the Fisher is taken of.
    """

    def __init__(
        self,
        model: nn.Module,
        owner: nn.Module,
        lambda_: float,
        fisher_samples: int = 1000,
        fisher_labels: Literal["sampled", "true"] = "sampled",
        online: bool = False,
        gamma: float = 1.0,
        fisher_dropout: bool = False,
    ) -> None:
        super().__init__(model)
        self.owner = [owner]
        self.lambda_, self.fisher_samples, self.fisher_labels = lambda_, fisher_samples, fisher_labels
        self.online, self.gamma, self.fisher_dropout = online, gamma, fisher_dropout

    def strength(self) -> float:
        # online: the penalty's Fisher is gamma * F*_{t-1} (Schwarz et al., eq. 8); the buffers hold F*
        return 0.5 * self.lambda_ * (self.gamma if self.online else 1.0)

    def fisher(self, task: Task) -> dict[str, Tensor]:
        return fisher_diagonal(
            self.owner[0], self.net, task, self.fisher_samples, self.fisher_labels, dropout=self.fisher_dropout
        )

    def after_task(self, task: Task, final: bool = False) -> None:
        if final:
            return  # no task trains after this one: its Fisher would never enter a penalty
        new = self.fisher(task)
        if self.online:
            # F*_t = gamma F*_{t-1} + F_t (Schwarz et al., eq. 9), anchored at theta*_t
            running = {n: self.gamma * self.quadratic.importance(n) + f for n, f in new.items()}
            self.quadratic.set(self.net, running)
        else:
            self.quadratic.add_anchored(self.net, new)


class SIStabilizer(Stabilizer):
    """Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017).

    Each parameter accumulates ``w_k = -sum_steps g_k * delta_theta_k`` with ``g`` the gradient of the
    unregularised loss (eq. 3). After a task, ``Omega_k = relu(Omega_k + w_k / (Delta_k^2 + xi))`` with
    ``Delta_k`` the parameter's change over the task (eq. 5; the ReLU of the sum as in the authors'
    code), ``w`` resets, and the penalty is ``c * sum_k Omega_k (theta_k - theta~_k)^2`` (eq. 4) with the
    anchor at the end of the previous task.

    ``omega_rule="masse"`` uses the consolidation of Masse et al.'s XdG code instead,
    ``Omega_k += relu(w_k) / (Delta_k^2 + xi)`` (the ReLU on the task's path integral alone).
    """

    def __init__(self, model: nn.Module, c: float, xi: float, omega_rule: Literal["zenke", "masse"] = "zenke") -> None:
        super().__init__(model)
        self.c, self.xi, self.omega_rule = c, xi, omega_rule
        self.params = [p for p in model.parameters() if p.requires_grad]
        for i, p in enumerate(self.params):
            self.register_buffer(f"path_{i}", torch.zeros_like(p))  # w_k over the current task
            self.register_buffer(f"start_{i}", p.detach().clone())  # theta at the start of the task
        self._grads: list[Tensor] = []  # the task loss's gradients between after_backward and after_step
        self._before = [torch.zeros_like(p) for p in self.params]

    def _list(self, prefix: str) -> list[Tensor]:
        return [getattr(self, f"{prefix}_{i}") for i in range(len(self.params))]

    def strength(self) -> float:
        return self.c

    @torch.no_grad()
    def before_task(self, task: Task) -> None:
        torch._foreach_copy_(self._list("start"), [p.detach() for p in self.params])
        torch._foreach_zero_(self._list("path"))

    @torch.no_grad()
    def after_backward(self) -> None:
        # the task loss's gradient tensors themselves, not copies: add_penalty_grad leaves them as they are (the
        # penalised sum becomes .grad), so nothing may change them in place before after_step
        self._grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        torch._foreach_copy_(self._before, [p.detach() for p in self.params])

    def add_penalty_grad(self) -> Tensor | None:
        if not self.quadratic.active:
            return None
        return self.quadratic.add_grad_(self.net, self.strength(), keep_grads=True)

    @torch.no_grad()
    def after_step(self) -> None:
        torch._foreach_sub_(self._before, [p.detach() for p in self.params])  # now theta_before - theta_after
        torch._foreach_addcmul_(self._list("path"), self._before, self._grads)  # w_k -= g_k * (theta_after - theta_before)
        self._grads = []

    @torch.no_grad()
    def after_task(self, task: Task, final: bool = False) -> None:
        names = [n for n, p in self.net.named_parameters() if p.requires_grad]
        omega = {}
        for n, p, w, start in zip(names, self.params, self._list("path"), self._list("start")):
            damped = (p.detach() - start) ** 2 + self.xi
            if self.omega_rule == "masse":
                omega[n] = self.quadratic.importance(n) + torch.relu(w) / damped
            else:
                omega[n] = torch.relu(self.quadratic.importance(n) + w / damped)
        self.quadratic.set(self.net, omega)


StabilizerFactory = Callable[[nn.Module, nn.Module], Stabilizer]
