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
import torch.nn.functional as F
from torch import Tensor, nn

Activation = Literal["elu", "relu", "none"]

# Output layers at least this wide (the paper-size hypernetworks: 2M outputs) take the faster matrix layouts for
# a few input rows (measured on one thread with MKL, 2M x 100 weight: forward 0.07 s instead of 0.20 s for 2 rows,
# weight gradient 0.09 s instead of 0.20 s); equal up to float rounding. Narrower ones compute exactly what
# nn.Linear's autograd does (hypermask's recorded small runs stay bit-identical).
LARGE_OUTPUT = 1 << 20


class _OutputLayer(torch.autograd.Function):
    """``addmm(bias, h, weight.T)`` (what ``nn.Linear`` computes) whose weight gradient is written straight into
    ``sink.grad``: into a buffer the hypernetwork keeps across steps when ``sink.grad`` is ``None`` (the usual case
    after ``zero_grad(set_to_none=True)``), else accumulated into it. The output layer holds nearly all of a large
    hypernetwork's parameters (205M in the paper's permuted configuration); autograd would allocate (and the
    CPU allocator map and page in) a fresh gradient of that size at every step. ``weight`` may be another value
    than ``sink`` (``theta + dTheta`` of the lookahead regulariser): its gradient lands in ``sink.grad``, the
    gradient with respect to ``theta`` when ``dTheta`` is held constant. Below ``LARGE_OUTPUT`` outputs the
    numbers are autograd's (``grad.T @ h``, ``grad @ weight``, ``grad.sum(0)``: checked bit for bit in the tests;
    a second backward in the same step accumulates with one ``addmm_``, equal up to rounding); from there on,
    with 2-5 input rows, the forward product and the weight gradient take faster layouts (equal up to rounding)."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, owner: "HyperNetwork") -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(h, weight)
        ctx.owner = owner
        if h.shape[0] > 1 and weight.shape[0] >= LARGE_OUTPUT:  # MKL is up to 3x faster on this layout for few rows
            out = torch.empty(h.shape[0], weight.shape[0], dtype=h.dtype, device=h.device)
            return torch.add(torch.mm(weight, h.t()).t(), bias, out=out)
        return torch.addmm(bias, h, weight.t())

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]  # noqa: ANN205
        h, weight = ctx.saved_tensors
        owner: HyperNetwork = ctx.owner
        sink = owner.out.weight
        if sink.requires_grad:
            rank_one = 1 < h.shape[0] <= 5 and sink.shape[0] >= LARGE_OUTPUT  # k rank-1 updates beat MKL's gemm here
            if sink.grad is None:
                buf = owner._grad_buffer
                if buf is None or buf.shape != sink.shape or buf.dtype != sink.dtype or buf.device != sink.device:
                    buf = owner._grad_buffer = torch.empty_like(sink)
                if rank_one:
                    torch.outer(grad[0], h[0], out=buf)
                    for i in range(1, h.shape[0]):
                        buf.addr_(grad[i], h[i])
                else:
                    torch.mm(grad.t(), h, out=buf)
                sink.grad = buf
            elif rank_one:
                for i in range(h.shape[0]):
                    sink.grad.addr_(grad[i], h[i])
            else:
                sink.grad.addmm_(grad.t(), h)
        grad_h = grad.mm(weight) if ctx.needs_input_grad[0] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[2] else None
        return grad_h, None, grad_b, None


class HyperNetwork(nn.Module):
    """``z [k, in_dim] -> [k, sum(prod(shape))]``: hidden layers with ``activation``, a linear output.

    ``chunk_size > 0``: a chunked hypernetwork (von Oswald et al. 2020, Sec. 3.3; ``hypercl``'s
    ``ChunkedHyperNetworkHandler``, ``hypnettorch``'s ``ChunkedHMLP``): the output layer emits ``chunk_size``
    values, and the network runs once per chunk ``c`` of the flat target, on ``[z, chunk_embedding_c]``; the
    chunks are concatenated and the surplus of the last one dropped. The chunk embeddings
    (``[num_chunks, chunk_emb_dim]``, drawn from ``N(0, 1)`` as in the code) are parameters shared by all tasks.
    All chunks of all ``k`` inputs go through the network as one batch.

    ``init``: ``torch`` (``nn.Linear``'s default, ``hypnettorch``'s ``HMLP``, which HyperMask uses) or
    ``xavier`` (Xavier-uniform weights, zero biases: ``hypercl``'s ``mnist/train_utils.py:generate_classifier``).
    """

    def __init__(
        self,
        in_dim: int,
        target_shapes: Sequence[Sequence[int]],
        hidden: Sequence[int],
        activation: Activation = "elu",
        chunk_size: int = 0,
        chunk_emb_dim: int = 8,
        init: Literal["torch", "xavier"] = "torch",
    ) -> None:
        super().__init__()
        self.target_shapes = [tuple(int(d) for d in s) for s in target_shapes]
        self.sizes = [math.prod(s) for s in self.target_shapes]
        self.num_outputs = sum(self.sizes)
        self.chunk_size = int(chunk_size)
        self.num_chunks = math.ceil(self.num_outputs / self.chunk_size) if self.chunk_size > 0 else 1
        widths = [in_dim + (chunk_emb_dim if self.chunk_size > 0 else 0), *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers.append(nn.Linear(a, b))
            if activation == "elu":
                layers.append(nn.ELU())
            elif activation == "relu":
                layers.append(nn.ReLU())
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(widths[-1], self.chunk_size if self.chunk_size > 0 else self.num_outputs)
        if init == "xavier":
            for m in [*self.body, self.out]:
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
        if self.chunk_size > 0:
            self.chunk_embeddings = nn.Parameter(torch.randn(self.num_chunks, chunk_emb_dim))
        self._grad_buffer: Tensor | None = None  # out.weight's gradient, reused across steps (not state)

    def flat(self, z: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        """All outputs, ``[k, num_outputs]`` for ``z [k, in_dim]`` (or ``[num_outputs]`` for ``z [in_dim]``).

        ``params``: values to use instead of the named parameters (``theta + dTheta``; any subset). Every value
        but ``out.weight``'s should be a function of its parameter (``p + dp``) for gradients to reach it;
        ``out.weight``'s may be a plain tensor: its gradient goes to ``out.weight.grad`` (see ``_OutputLayer``)."""
        p = params or {}
        squeeze = z.dim() == 1
        if squeeze:
            z = z.unsqueeze(0)
        k = z.shape[0]
        if self.chunk_size > 0:
            chunks = p.get("chunk_embeddings", self.chunk_embeddings)
            h = torch.cat(
                [z[:, None, :].expand(k, self.num_chunks, z.shape[1]), chunks[None].expand(k, *chunks.shape)], dim=2
            ).reshape(k * self.num_chunks, -1)
        else:
            h = z
        for i, layer in enumerate(self.body):
            if isinstance(layer, nn.Linear) and p:
                h = F.linear(h, p.get(f"body.{i}.weight", layer.weight), p.get(f"body.{i}.bias", layer.bias))
            else:
                h = layer(h)
        out = _OutputLayer.apply(h, p.get("out.weight", self.out.weight), p.get("out.bias", self.out.bias), self)
        if self.chunk_size > 0:
            out = out.reshape(k, self.num_chunks * self.chunk_size)[:, : self.num_outputs]
        return out[0] if squeeze else out

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
