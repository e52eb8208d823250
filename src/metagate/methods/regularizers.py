"""Quadratic parameter penalties shared by EWC, online EWC and SI, and the Fisher diagonal."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metagate.data.stream import Task
from metagate.nn.dropout import Dropout


def _key(name: str) -> str:
    return name.replace(".", "__")


class QuadraticPenalty(nn.Module):
    """``sum_k importance_k * (theta_k - anchor_k)^2 + offset`` over a model's parameters.

    Buffers are allocated up front (zeros) so that checkpoints load into a fresh instance.
    ``offset`` holds a constant that keeps the value of a sum of several anchored penalties exact
    after they are folded into one (see :meth:`add_anchored`); it has no gradient.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        for n, p in model.named_parameters():
            if p.requires_grad:
                self.register_buffer(f"imp_{_key(n)}", torch.zeros_like(p))
                self.register_buffer(f"anchor_{_key(n)}", torch.zeros_like(p))
        self.register_buffer("offset", torch.zeros(()))
        self.register_buffer("active_flag", torch.zeros((), dtype=torch.bool))
        self.active = False  # host-side copy of active_flag: checked every step without a device sync
        self._diff: list[Tensor] = []  # scratch for add_grad_, allocated on first use
        self._prod: list[Tensor] = []
        self.register_load_state_dict_post_hook(lambda module, _: module._sync_active())

    def _sync_active(self) -> None:
        self.active = bool(self.active_flag)

    def _activate(self) -> None:
        self.active_flag.fill_(True)
        self.active = True

    def importance(self, name: str) -> Tensor:
        return getattr(self, f"imp_{_key(name)}")

    def anchor(self, name: str) -> Tensor:
        return getattr(self, f"anchor_{_key(name)}")

    @torch.no_grad()
    def set(self, model: nn.Module, importance: dict[str, Tensor]) -> None:
        """Replace the importance and anchor the penalty at the model's current parameters."""
        for n, p in model.named_parameters():
            if n in importance:
                self.importance(n).copy_(importance[n])
                self.anchor(n).copy_(p)
        self.offset.zero_()
        self._activate()

    @torch.no_grad()
    def add_anchored(self, model: nn.Module, importance: dict[str, Tensor]) -> None:
        """Add a new term ``F (theta - theta_now)^2`` to the existing sum of terms.

        ``sum_t F_t (theta - a_t)^2 = F (theta - a)^2 + C`` with ``F = sum_t F_t``,
        ``a = sum_t F_t a_t / F`` and ``C >= 0``: one buffer pair holds any number of tasks, with the
        same value and gradient as separate penalties.
        """
        for n, p in model.named_parameters():
            if n not in importance:
                continue
            f_old, a_old, f_new = self.importance(n), self.anchor(n), importance[n]
            f_sum = f_old + f_new
            safe = torch.where(f_sum > 0, f_sum, torch.ones_like(f_sum))
            a_sum = torch.where(f_sum > 0, (f_old * a_old + f_new * p) / safe, p)
            # constant left over: sum of F_t (a_t - a)^2 for the two merged terms
            self.offset += (f_old * (a_old - a_sum) ** 2 + f_new * (p - a_sum) ** 2).sum()
            f_old.copy_(f_sum)
            a_old.copy_(a_sum)
        self._activate()

    def forward(self, model: nn.Module) -> Tensor:
        """The penalty's value."""
        total = self.offset.clone()
        params = dict(model.named_parameters())
        for n in self.names:
            total = total + (self.importance(n) * (params[n] - self.anchor(n)) ** 2).sum()
        return total

    @torch.no_grad()
    def add_grad_(self, model: nn.Module, scale: float, keep_grads: bool = False) -> Tensor:
        """Add ``scale`` times this penalty's gradient, ``2 F (theta - a)``, to every parameter's
        ``.grad`` and return ``scale`` times its value: the same as ``(scale * self(model)).backward()``
        up to rounding, without building an autograd graph.

        Per tensor, four passes into two scratch buffers reused every step: ``d = theta - a``, ``fd = F d``, the value's share ``fd . d`` (a dot product: no temporary) and ``grad + 2 scale fd``.
        ``keep_grads``: the gradient tensors are left as they are; the sum goes into a scratch tensor that becomes
        the parameter's ``.grad`` (SI keeps the task loss's gradient this way without copying it)."""
        named = dict(model.named_parameters())
        params = [named[n] for n in self.names]
        if len(self._diff) != len(params) or self._diff[0].device != params[0].device:  # scratch, reused every step
            self._diff = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
            self._prod = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]
        values = []
        for i, (n, p) in enumerate(zip(self.names, params)):
            if p.grad is self._diff[i]:  # the sum of the last step is still the gradient (zeroed, not set to None)
                self._diff[i] = torch.empty_like(p, memory_format=torch.contiguous_format)
            d, fd = self._diff[i], self._prod[i]
            torch.sub(p, self.anchor(n), out=d)  # theta - a
            torch.mul(d, self.importance(n), out=fd)  # F (theta - a)
            values.append(torch.dot(fd.view(-1), d.view(-1)))  # sum F (theta - a)^2
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            if keep_grads:
                p.grad = torch.add(grad, fd, alpha=2.0 * scale, out=d)
            elif p.grad is None:
                p.grad = grad.add_(fd, alpha=2.0 * scale)
            else:
                grad.add_(fd, alpha=2.0 * scale)
        return scale * (torch.stack(values).sum() + self.offset)


def _linear_layers(model: nn.Module) -> dict[str, nn.Linear] | None:
    """``model``'s linear layers by name if they hold all its trainable parameters, else ``None``."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    owned = {
        f"{name}.{kind}" if name else kind
        for name, m in layers.items()
        for kind in ("weight", "bias")
        if getattr(m, kind) is not None and getattr(m, kind).requires_grad
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return layers if trainable == owned else None


def _dropout_only_train(method: nn.Module) -> None:
    """Eval mode everywhere but on dropout (batch norm keeps its running statistics untouched)."""
    method.eval()
    for m in method.modules():
        if isinstance(m, (nn.modules.dropout._DropoutNd, Dropout)):
            m.train()


def _closed_form_chunk(
    method: nn.Module, layers: dict[str, nn.Linear], x: Tensor, y_true: Tensor, task: Task, sampled: bool
) -> dict[str, Tensor] | None:
    """Sum over the chunk of per-sample squared gradients of ``log p(y|x)``, for linear layers only.

    A linear layer ``o = W a + b`` has per-sample gradient ``g a^T`` (``g = d log p / d o``), so
    ``sum_i (g_i a_i^T)^2 = (g^2)^T (a^2)`` and the bias term is ``sum_i g_i^2``: one forward and one
    backward of the summed log-likelihood, no per-sample weight gradients. Masks, label masking and
    dropout act inside the forward, so ``a`` and ``g`` already carry them. ``None`` if a layer sees a
    non-2-D input or runs twice in the forward (then the closed form does not hold).
    """
    inputs: dict[str, Tensor] = {}
    outputs: dict[str, Tensor] = {}
    valid = True

    def capture(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
            nonlocal valid
            if name in inputs or args[0].ndim != 2:
                valid = False
            inputs[name], outputs[name] = args[0].detach(), out

        return hook

    handles = [m.register_forward_hook(capture(name)) for name, m in layers.items()]
    try:
        with torch.enable_grad():
            logits = method(x, task)
            if not valid:
                return None
            if sampled:
                y = torch.multinomial(torch.softmax(logits.detach(), dim=1), 1).squeeze(1)
            else:
                y = y_true
            total = torch.log_softmax(logits, dim=1).gather(1, y.unsqueeze(1)).sum()
            names = [n for n in layers if n in outputs and outputs[n].requires_grad]
            grads = torch.autograd.grad(total, [outputs[n] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    out: dict[str, Tensor] = {}
    for name, g in zip(names, grads):
        if g is None:
            continue
        layer, g2 = layers[name], g.detach().pow(2)
        prefix = f"{name}." if name else ""
        if layer.weight.requires_grad:
            out[f"{prefix}weight"] = g2.T @ inputs[name].pow(2)
        if layer.bias is not None and layer.bias.requires_grad:
            out[f"{prefix}bias"] = g2.sum(0)
    return out


def fisher_diagonal(
    method: nn.Module,
    model: nn.Module,
    task: Task,
    num_samples: int,
    labels: Literal["sampled", "true"] = "sampled",
    chunk: int | None = None,
    dropout: bool = False,
    closed_form: bool = True,
) -> dict[str, Tensor]:
    """Diagonal Fisher information of ``model``'s parameters on ``task``'s training inputs.

    ``E_x E_{y ~ p(y|x)} [(d log p(y|x) / d theta)^2]``, the plain mean over ``num_samples`` inputs
    (at most the task's training set, drawn without replacement), with labels drawn from the model's
    own predictive distribution (Kirkpatrick et al. 2017) or, with ``labels="true"``, the empirical
    Fisher. ``method(x, task)`` must give the (masked) logits and ``model`` be the sub-module holding
    the parameters.

    ``dropout``: run dropout as in training (each input its own dropout mask, the label drawn from
    that same dropped-out output; Masse et al.'s XdG code does this); otherwise eval mode.
    ``closed_form``: when every trainable parameter belongs to an ``nn.Linear`` used once on 2-D
    inputs, per-sample squared gradients come in closed form from each layer's input and output
    gradient (see :func:`_closed_form_chunk`); otherwise per-sample gradients with ``vmap`` (with
    dropout on, the vmap path draws the label from a separate dropped-out forward).
    """
    was_training = method.training
    if dropout:
        _dropout_only_train(method)
    else:
        method.eval()
    n = min(num_samples, task.num_train)
    idx = torch.randperm(task.num_train, device=task.x_train.device)[:n]
    xs, ys_true = task.x_train[idx], task.y_train[idx]
    try:
        layers = _linear_layers(model) if closed_form else None
        if layers is not None:
            fisher = {k: torch.zeros_like(v) for k, v in model.named_parameters() if v.requires_grad}
            step = chunk or 1024
            for start in range(0, n, step):
                part = _closed_form_chunk(
                    method, layers, xs[start : start + step], ys_true[start : start + step], task, labels == "sampled"
                )
                if part is None:  # a layer the closed form does not cover: start again with vmap
                    layers = None
                    break
                for k, v in part.items():
                    fisher[k] += v
        if layers is None:
            fisher = _vmap_fisher_sum(method, model, task, xs, ys_true, labels, chunk, dropout)
    finally:
        method.train(was_training)
    return {k: v / n for k, v in fisher.items()}


def _vmap_fisher_sum(
    method: nn.Module,
    model: nn.Module,
    task: Task,
    xs: Tensor,
    ys_true: Tensor,
    labels: Literal["sampled", "true"],
    chunk: int | None,
    dropout: bool,
) -> dict[str, Tensor]:
    """Sum over ``xs`` of per-sample squared gradients of ``log p(y|x)``, by ``vmap`` over ``grad``."""
    prefix = next(k for k, m in method.named_modules() if m is model)
    params = {f"{prefix}.{k}": v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {f"{prefix}.{k}": v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    buffers = {**{k: v for k, v in method.named_buffers()}, **frozen}

    def log_lik(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = functional_call(method, (p, buffers), (x.unsqueeze(0), task))
        return torch.log_softmax(logits, dim=1)[0].gather(0, y.unsqueeze(0)).squeeze(0)

    per_sample = vmap(grad(log_lik), in_dims=(None, 0, 0), randomness="different" if dropout else "error")
    numel = sum(v.numel() for v in params.values())
    chunk = chunk or max(1, min(256, int(3e7 // max(numel, 1))))
    fisher = {k: torch.zeros_like(v) for k, v in params.items()}
    for start in range(0, xs.shape[0], chunk):
        x = xs[start : start + chunk]
        if labels == "sampled":
            with torch.no_grad():
                probs = torch.softmax(method(x, task), dim=1)
            y = torch.multinomial(probs, 1).squeeze(1)
        else:
            y = ys_true[start : start + chunk]
        grads = per_sample(params, x, y)
        for k in fisher:
            fisher[k] += grads[k].pow(2).sum(0)
    return {k[len(prefix) + 1 :]: v for k, v in fisher.items()}
