"""Continual-learning metrics: pure functions of the accuracy matrix.

``R[i][j]`` is the accuracy on task j after training task i, for every j (trained or not); ``b[j]``
the accuracy of the untrained model on task j. Fractions in [0, 1]. A metric that is undefined for
a stream (BWT of a single task) is ``None``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

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


def summary(acc_matrix: Matrix, initial_acc: Sequence[float]) -> dict[str, float | None]:
    return {
        "acc": average_accuracy(acc_matrix),
        "bwt": backward_transfer(acc_matrix),
        "fwt": forward_transfer(acc_matrix, initial_acc),
        "forgetting": forgetting(acc_matrix),
    }
