"""Continual-learning metrics: pure functions of the accuracy matrix.

``R[i][j]`` is the accuracy on task j after training task i, for every j (trained or not); ``b[j]``
the accuracy of the untrained model on task j. Fractions in [0, 1]. A metric that is undefined for
a stream (BWT of a single task) is ``None``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

Matrix = Sequence[Sequence[float]] | np.ndarray


def _square(acc_matrix: Matrix) -> np.ndarray:
    r = np.asarray(acc_matrix, dtype=float)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"accuracy matrix must be square and non-empty, got shape {r.shape}")
    return r


def average_accuracy(acc_matrix: Matrix) -> float:
    """ACC: mean accuracy over all tasks after the last task (mean of the last row)."""
    return float(_square(acc_matrix)[-1].mean())


def backward_transfer(acc_matrix: Matrix) -> float | None:
    """BWT (Lopez-Paz & Ranzato, GEM 2017): ``mean_{j<T-1} R[T-1, j] - R[j, j]``; negative = forgetting."""
    r = _square(acc_matrix)
    t = r.shape[0]
    if t < 2:
        return None
    return float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))


def forward_transfer(acc_matrix: Matrix, initial_acc: Sequence[float]) -> float | None:
    """FWT (Lopez-Paz & Ranzato, GEM 2017): ``mean_{j>=1} R[j-1, j] - b[j]``, with ``b`` the accuracy
    of the randomly initialised model: how much training earlier tasks helps a task not yet seen."""
    r = _square(acc_matrix)
    b = np.asarray(initial_acc, dtype=float)
    t = r.shape[0]
    if b.shape != (t,):
        raise ValueError(f"initial accuracies must have length {t}, got shape {b.shape}")
    if t < 2:
        return None
    return float(np.mean([r[j - 1, j] - b[j] for j in range(1, t)]))


def forgetting(acc_matrix: Matrix) -> float | None:
    """Average forgetting (Chaudhry et al., RWalk 2018): for each task j < T-1, the drop from its best
    accuracy after it was trained, ``max_{j<=l<T-1} R[l, j]``, to its final accuracy ``R[T-1, j]``;
    averaged over j. Only rows l >= j count (the paper's matrices hold no earlier rows)."""
    r = _square(acc_matrix)
    t = r.shape[0]
    if t < 2:
        return None
    return float(np.mean([r[j : t - 1, j].max() - r[-1, j] for j in range(t - 1)]))


def zero_shot(acc_matrix: Matrix, initial_acc: Sequence[float]) -> list[float]:
    """Accuracy on task t just before training it: ``R[t-1][t]`` (``b[0]`` for the first task)."""
    r = _square(acc_matrix)
    return [float(initial_acc[0])] + [float(r[t - 1, t]) for t in range(1, r.shape[0])]


def steps_to_fraction(curve: Sequence[Sequence[float]], fraction: float = 0.9) -> int | None:
    """Steps until the accuracy first reaches ``fraction`` of the curve's last value (its final
    accuracy on the task). ``curve`` is ``[(steps, accuracy), ...]``; ``None`` for an empty curve."""
    if not curve:
        return None
    target = fraction * curve[-1][1]
    return int(next(s for s, a in curve if a >= target))


def mask_summary(masks: Sequence[Tensor], contexts: Tensor, oracle: Sequence[Tensor] | None = None) -> dict[str, Any]:
    """Capacity and structure of per-task binary masks (one flat bool tensor per task):
    ``mask_density`` per task, ``mask_overlap`` (pairwise IoU) and its off-diagonal mean,
    ``context_mask_correlation`` (Pearson, over task pairs, of context distance against mask
    distance 1 - IoU) and, with oracle masks, nothing more: their own figures come from the caller."""
    m = torch.stack([x.bool() for x in masks]).float()
    inter = m @ m.T
    union = m.sum(1, keepdim=True) + m.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))
    t = len(masks)
    out: dict[str, Any] = {
        "mask_density": m.mean(1).tolist(),
        "mask_overlap": iou.tolist(),
        "mask_overlap_mean": None,
        "context_mask_correlation": None,
    }
    if t > 1:
        i, j = torch.triu_indices(t, t, 1)
        out["mask_overlap_mean"] = float(iou[i, j].mean())
        if t > 2:
            cdist = (contexts[i] - contexts[j]).norm(dim=1)
            mdist = 1 - iou[i, j]
            if cdist.std() > 0 and mdist.std() > 0:
                out["context_mask_correlation"] = float(torch.corrcoef(torch.stack([cdist, mdist]))[0, 1])
    if oracle is not None:
        o = torch.stack([x.bool() for x in oracle]).float()
        oi = o @ o.T
        ou = o.sum(1, keepdim=True) + o.sum(1) - oi
        oracle_iou = torch.where(ou > 0, oi / ou.clamp_min(1), torch.ones_like(oi))
        if t > 2:
            i, j = torch.triu_indices(t, t, 1)
            a, b = iou[i, j], oracle_iou[i, j]
            if a.std() > 0 and b.std() > 0:
                out["oracle_overlap_correlation"] = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    return out


def summary(acc_matrix: Matrix, initial_acc: Sequence[float]) -> dict[str, float | None]:
    return {
        "acc": average_accuracy(acc_matrix),
        "bwt": backward_transfer(acc_matrix),
        "fwt": forward_transfer(acc_matrix, initial_acc),
        "forgetting": forgetting(acc_matrix),
    }


# --------------------------------------------------------------------------- figures that cannot be gamed (issue 25)
#
# Q alone misleads: its denominator is the method's own just-trained accuracy, and it depends on the window. So
# every table shows beside it the absolute zero-shot gain over XdG + SI (points) and the just-trained accuracy,
# and Q both over the stated window and over every task after the first; and Q's XdG run must match the method
# on density, stabiliser strength and backbone.


def window_tasks(num_tasks: int, last: int | None = None) -> list[int]:
    """The tasks per-task figures average over: every task after the first, or the last ``last`` of them."""
    tasks = list(range(1, num_tasks))
    return tasks if last is None else tasks[-last:]


def _window_mean(values: Sequence[float], tasks: Sequence[int]) -> float | None:
    vals = [float(values[j]) for j in tasks if j < len(values) and values[j] is not None]
    return float(np.mean(vals)) if vals else None


def just_trained(acc_matrix: Matrix, last: int | None = None) -> float | None:
    """Mean accuracy of the window's tasks right after training each, ``R[j][j]``."""
    r = _square(acc_matrix)
    return _window_mean([r[j, j] for j in range(r.shape[0])], window_tasks(r.shape[0], last))


def zero_shot_gain(
    acc_matrix: Matrix, initial_acc: Sequence[float], xdg_acc_matrix: Matrix, xdg_initial_acc: Sequence[float], last: int | None = None
) -> float | None:
    """The absolute zero-shot gain over XdG + SI: mean zero-shot accuracy of the window's tasks minus XdG's on the
    same tasks (a fraction; x 100 for points). Unlike Q it does not shrink or grow with the method's own
    just-trained accuracy. ``None`` when the two runs have different numbers of tasks."""
    r, x = _square(acc_matrix), _square(xdg_acc_matrix)
    if r.shape != x.shape:
        return None
    tasks = window_tasks(r.shape[0], last)
    a, b = _window_mean(zero_shot(r, initial_acc), tasks), _window_mean(zero_shot(x, xdg_initial_acc), tasks)
    return None if a is None or b is None else a - b


def zero_shot_quality(
    acc_matrix: Matrix, initial_acc: Sequence[float], xdg_acc_matrix: Matrix, xdg_initial_acc: Sequence[float], last: int | None = None
) -> float | None:
    """Q = (zs - zs_xdg) / (just trained - zs_xdg), means over the window's tasks: 0 = no better than XdG's random
    masks, 1 = as good before training as after. Always read with :func:`zero_shot_gain` and :func:`just_trained`."""
    gain = zero_shot_gain(acc_matrix, initial_acc, xdg_acc_matrix, xdg_initial_acc, last)
    r, x = _square(acc_matrix), _square(xdg_acc_matrix)
    tasks = window_tasks(r.shape[0], last)
    jt, zx = just_trained(r, last), _window_mean(zero_shot(x, xdg_initial_acc), tasks) if r.shape == x.shape else None
    if gain is None or jt is None or zx is None or abs(jt - zx) < 1e-9:
        return None
    return gain / (jt - zx)


# method config keys that set the stabiliser's strength (compared where both configs have them)
STABILISER_KEYS = ("stabilizer", "c", "xi", "ewc_lambda")


def baseline_mismatch(
    method_config: dict[str, Any], method_density: float | None, xdg_config: dict[str, Any], xdg_density: float | None, tolerance: float = 0.25
) -> list[str]:
    """Why an XdG + SI run is not the like-for-like baseline of a gating method's Q (empty: it is): its mean
    mask density differs by more than ``tolerance`` (relative), a stabiliser setting differs (``stabilizer``,
    ``c``, ``xi``, ``ewc_lambda``, where both configs have the key), or the backbone differs. ``method_config``
    and ``xdg_config`` are the runs' ``method`` sections."""
    out: list[str] = []
    if method_density is not None and xdg_density is not None and abs(method_density - xdg_density) > tolerance * max(xdg_density, 1e-9):
        out.append(f"density {method_density:.3f} vs XdG's {xdg_density:.3f}")
    for key in STABILISER_KEYS:
        if key in method_config and key in xdg_config and method_config[key] != xdg_config[key]:
            out.append(f"{key} {method_config[key]} vs XdG's {xdg_config[key]}")
    if method_config.get("backbone") != xdg_config.get("backbone"):
        out.append("backbone differs")
    return out
