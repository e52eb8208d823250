"""Every seed a run derives from its one ``seed``, named in one place.

A run is reproducible from its config's ``seed`` alone: each random stream it needs (a task's batches, a
task's few-shot examples, the validation split, a method's own draws) is seeded from it by a fixed rule
here, so two streams never share a seed by accident and a resumed run draws what an uninterrupted one drew.
"""

from __future__ import annotations

# Added to a seed for a second, independent stream beside the one that seed already drives (a prime, so it
# never lines up with the multipliers below). Each use has its own name; they share the value by history
# (changing one changes the numbers of every run that draws from it).
FEW_SHOT_OFFSET = 104_729  # a few-shot measurement's examples: added to the task's seed (another stream than its batches')
VALIDATION_SPLIT_OFFSET = 104_729  # the validation split carved from each task's training data: added to seed x 7919
METHOD_DRAW_OFFSET = 104_729  # a method's fixed draws made once when it is built (nearest_context's tie-break, metagate's prior scores): added to its seed

TASK_SEED_RUN = 1_000_003  # task_seed's multiplier of the run's seed
TASK_SEED_TASK = 7_919  # task_seed's multiplier of the task's index; also the validation split's multiplier of the seed


def task_seed(seed: int, task_index: int) -> int:
    """A seed per (run seed, task): each task's randomness is independent of how the run got there,
    so a resumed run draws the same batches and dropout masks as an uninterrupted one (``task_index``
    -1: the method's initial weights, before any task)."""
    return (seed * TASK_SEED_RUN + task_index * TASK_SEED_TASK + 1) % 2**63


def few_shot_seed(seed: int, task_index: int) -> int:
    """The generator seed of a task's few-shot examples (drawn before it trains)."""
    return (task_seed(seed, task_index) + FEW_SHOT_OFFSET) % 2**63


def validation_split_seed(seed: int) -> int:
    """The generator seed of the validation split carved from every task's training data."""
    return seed * TASK_SEED_TASK + VALIDATION_SPLIT_OFFSET
