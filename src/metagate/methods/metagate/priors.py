"""metagate's priors: the score per task and unit added to the agent's standardised logits (``prior_kind``).

Each prior holds a row per task slot (training tasks, then held-out ones) as buffers, so they round-trip through
checkpoints. ``scores(slots)`` is read in every step (no host read); ``update`` runs at task boundaries only, on the
device: it may change the rows of the tasks not trained yet and not in training (``open_rows``), never a row whose
task has started, so the regulariser and the consolidation see the score each stored task was trained with.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from metagate.methods.metagate.stored import Stored
from metagate.seeds import METHOD_DRAW_OFFSET
from metagate.nn.gates import standardise

PriorKind = Literal["random", "usage", "repel"]


class RandomPrior(nn.Module):
    """``prior_kind=random``: a fixed random score ``r_t ~ N(0, 1)`` per task and unit, drawn once from the run's seed
    (a generator of its own, so the global random stream is untouched). It keeps the masks of tasks with similar
    contexts apart, as XdG's random masks do (their limit as the prior's weight grows)."""

    def __init__(self, slots: int, units: int, device: torch.device) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(torch.initial_seed() + METHOD_DRAW_OFFSET)
        self.register_buffer("random", torch.randn(slots, units, generator=gen).to(device))

    def scores(self, slots: Tensor) -> Tensor:
        return self.random[slots]

    def update(self, stored: Stored | None, open_rows: Tensor, contexts: Tensor) -> None:
        """At a task boundary: nothing changes (the random scores are fixed)."""


class UsagePrior(RandomPrior):
    """``prior_kind=usage``: a task's score is ``std(-u) + 0.1 r_t``, ``u`` the number of stored masks that use each
    unit (standardised per layer like the agent's logits), ``r_t`` its random score as a tie-break: a new task's
    non-context part goes to the least-used units. A row is fixed when its task starts; the rows of tasks not trained
    yet follow the usage at every task boundary, so a task's zero-shot evaluation after the previous task uses exactly
    the mask it then starts training with."""

    TIE_BREAK = 0.1  # the weight of the task's random score added to its standardised negative usage

    def __init__(self, slots: int, units: int, device: torch.device, widths: list[int]) -> None:
        super().__init__(slots, units, device)
        self.widths = widths
        self.register_buffer("fixed", self.TIE_BREAK * self.random.clone())  # the score of each row, as last updated

    def scores(self, slots: Tensor) -> Tensor:
        return self.fixed[slots]

    def usage(self, stored: Stored, contexts: Tensor) -> Tensor:
        """How many stored masks use each unit, ``[units]`` (the same for every row)."""
        return stored[1].sum(0)

    def update(self, stored: Stored | None, open_rows: Tensor, contexts: Tensor) -> None:
        usage = torch.zeros_like(self.fixed[0]) if stored is None else self.usage(stored, contexts)
        score = standardise(-usage, self.widths) + self.TIE_BREAK * self.random  # [slots, units]
        self.fixed.copy_(torch.where(open_rows.unsqueeze(1), score, self.fixed))


class RepelPrior(UsagePrior):
    """``prior_kind=repel``: as usage, but each stored mask counts in a row's usage with how unrelated its task is to
    the row's, ``u_t = sum_i w(c_t, c_i) M_i`` (:meth:`weights`), so a new task is pushed away from the units of
    unrelated tasks but not from those of tasks sharing a factor value. Every row gets its own usage (a
    ``[slots, stored] @ [stored, units]`` product at task boundaries, never in a step)."""

    TOLERANCE = 1e-3  # rescaled context numbers closer than this count as the same value

    def weights(self, contexts: Tensor, stored_slots: Tensor) -> Tensor:
        """``w[s, i]`` in [0, 1], how unrelated the task of row ``s`` is to the stored task of slot ``stored_slots[i]``:
        the fraction of context numbers in which the two differ, ``contexts`` (a row per slot) rescaled to [0, 1] over
        their range and two values the same when closer than ``TOLERANCE``. On the device, no host read.

        Why a count of differing numbers and not a distance (Euclidean, 1 - cosine): overlap with a task that shares
        a factor value was measured to cost almost nothing while overlap with an unrelated one costs forgetting, and
        the composed teacher gives neighbouring values of a factor (one step apart, near in any distance) disjoint
        unit groups: a distance would call a task differing by one step in every factor (sharing nothing) closer than
        one that shares two factors and is far in the third. The fraction is 0 for the same context, 1 for a task
        sharing no value, and k / dims for one differing in k numbers. Contexts whose numbers never repeat
        (continuous ones, angles) give weight 1 to every other task: repel is then usage exactly, up to a task's own
        stored mask (weight 0)."""
        differ = (contexts.unsqueeze(1) - contexts[stored_slots].unsqueeze(0)).abs() > self.TOLERANCE  # [slots, stored, dims]
        return differ.float().mean(-1)

    def usage(self, stored: Stored, contexts: Tensor) -> Tensor:
        """Each row's usage, ``[slots, units]``: the stored masks weighted by :meth:`weights`."""
        return self.weights(contexts, stored[0]) @ stored[1]


def make_prior(kind: PriorKind, slots: int, widths: list[int], device: torch.device) -> RandomPrior:
    """The prior of ``method.prior_kind`` for ``slots`` tasks over the units of layers of ``widths``."""
    if kind == "random":
        return RandomPrior(slots, sum(widths), device)
    return (UsagePrior if kind == "usage" else RepelPrior)(slots, sum(widths), device, widths)
