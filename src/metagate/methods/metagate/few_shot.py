"""metagate's few-shot measurement (``few_shot = n``): a task's mask inferred from n labelled examples.

A measurement only, the reference between zero-shot and trained: training, the stored masks and every other figure
stay as they are, bit for bit. Free scores, initialised at the task's logits with the prior (what its zero-shot mask
is the top-k of), take Adam steps on the examples' cross-entropy through the straight-through top-k, the network and
the agent frozen; the examples come from a generator of their own (the trainer's, seeded from the run's seed and the
task), so the global random stream is untouched. On the device, no host read.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from metagate.methods.base import TrainingData


def draw_examples(data: TrainingData, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` examples of ``data`` (all, when it has fewer) drawn without replacement with ``generator`` (on its device)."""
    count = data.y.shape[0]
    idx = torch.randperm(count, generator=generator, device=data.y.device)[: min(n, count)]
    return data.x[idx], data.y[idx]


def fit_mask(initial: Tensor, loss: Callable[[Tensor], Tensor], topk: Callable[[Tensor], Tensor], steps: int, lr: float) -> Tensor:
    """The bool mask ``topk(scores)`` after ``steps`` Adam steps at ``lr`` of free scores started at ``initial`` on
    ``loss(topk(scores))``: only the scores get a gradient (nothing else is changed)."""
    scores = initial.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([scores], lr=lr)
    for _ in range(steps):
        (scores.grad,) = torch.autograd.grad(loss(topk(scores)), [scores])  # nothing else gets a gradient
        optimizer.step()
    with torch.no_grad():
        return topk(scores).bool()


def final_iou(masks: Tensor, final: Tensor) -> list[float]:
    """Per task, the IoU of its row of ``masks`` (bool) with its trained mask (``final``, a float row per task)."""
    m = masks.float()
    inter, union = (m * final).sum(1), ((m + final) > 0).float().sum(1)
    return (inter / union.clamp_min(1)).cpu().tolist()
