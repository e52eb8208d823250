"""Discrete context factors: what the structure-aware references (``factor_rule``, ``stored_composition``)
read from a task, and the one-line refusal for a stream whose context is not such a tuple.

A benchmark whose published context is a tuple of discrete factors (the composed family's ``numbers`` and
``onehot`` encodings, the pair stream with given contexts) records the decoded tuple in
``task.info["context_factors"]`` as ``"v0.v1..."``: the same values the context decodes to by the
benchmark's documented rule (rounding, argmax, the class identities), written out so a method need not
know each benchmark's encoding. Benchmarks whose context hides its factors (``encoding=embedded``,
``context=prototypes``) do not record it, and these references refuse them.
"""

from __future__ import annotations

from metagate.data.stream import Stream, Task

KEY = "context_factors"


def factors_of(task: Task) -> tuple[int, ...]:
    """The task's factor values, decoded from its context by the benchmark's rule."""
    return tuple(int(v) for v in str(task.info[KEY]).split("."))


def require_factors(stream: Stream, method: str) -> None:
    """Refuse (one line) a stream some of whose tasks publish no discrete factors, or tuples of unequal length."""
    tasks = [*stream.tasks, *stream.heldout]
    if not tasks or any(KEY not in t.info for t in tasks):
        raise ValueError(
            f"{method} needs a context that is a tuple of discrete factors (composed_teacher with encoding=numbers or "
            f"onehot, pairs with context=given); {stream.name}'s context publishes none: use ridge_context or nearest_context"
        )
    if len({len(factors_of(t)) for t in tasks}) != 1:
        raise ValueError(f"{method}: the tasks of {stream.name} publish factor tuples of different lengths")
