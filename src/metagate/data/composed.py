"""The composed teacher: a context family whose ceiling is known and that a mask lookup cannot reach.

Issue 12 found that the ``gated_teacher`` caps what a context -> mask learner can show (its teacher's
mask-dependent offset is out of the student's reach, an 8-d context gives few (context, mask) pairs,
and its oracle lives on the teacher's units), and that a family whose masks are the k units nearest a
context rewards looking up a neighbour. This family fixes both:

* **The student can represent the teacher exactly.** The teacher is one hidden ReLU layer of
  ``hidden_units`` units and a shared linear head, ``y = argmax W2 (m * relu(W1 x))``, with no bias and
  no offset: the student MLP with one hidden layer of the same width, gated after the ReLU (as every
  gating method here gates), computes the same function when its weights equal the teacher's. The
  oracle mask is therefore defined over the *student's* units: unit ``i`` of the teacher is hidden
  unit ``i`` of the student, so a run must use ``method.backbone.hidden=[hidden_units]``.
* **The context composes the mask.** A task is a combination of ``factors`` discrete factor values,
  ``v_f`` in ``0 .. values - 1``. The hidden units are split into ``shared_units`` always-on units and
  one group of ``units_per_group`` units per (factor, value). The map from context to mask is

      mask(c) = shared  U  group(0, v_0(c))  U ... U  group(F-1, v_{F-1}(c))

  where ``v_f(c)`` decodes factor ``f`` from its part of the context: ``encoding=numbers`` (default)
  gives one number per factor, ``c_f = v_f / (values - 1)``, decoded by rounding (a step function:
  the mask is not a linear function of the context, and tasks whose values differ by one step have
  near contexts but disjoint groups), ``encoding=onehot`` gives a one-hot code per factor, decoded by
  argmax (the issue's probe; then the group membership is a linear expansion of the code, and a vote
  over the equally near earlier tasks recovers most of a new mask: Q_vote 0.67x Q_oracle, against
  0.2x with numbers; ``experiments/composed_probe.py``).
  :meth:`ComposedTeacher.mask_from_context` is this map. The teacher's logits add up over the
  groups in the mask, and each group's head weights are centred (zero mean per class over the group's
  units, whose mean activity is equal) and scaled to unit norm per class, so every union of groups
  labels the classes evenly in expectation.
* **A new task composes what earlier tasks taught.** Every task is a combination not trained before;
  the last ``novel_tasks`` tasks each differ from *every* earlier task (novel ones included) in at
  least ``novel_min_differing`` factors (1: any new combination),
  while each factor value was seen in at least ``min_value_tasks`` of the tasks before them. So a new task's mask overlaps moderately with
  any single earlier mask (a single-neighbour lookup is far from it), but every one of its groups was
  trained before (a learner that composes can reach it zero-shot).
* **Held-out contexts** (never trained, evaluated after every task): ``heldout_inside`` untrained
  combinations of trained values, and ``heldout_outside`` tasks whose factor 0 takes the value
  ``values``, which no training task uses (outside the training range: with ``numbers`` its
  context ``values / (values - 1)`` exceeds 1); it has its own group of units, never trained.

Two options hide the structure from a method (issue 25):

* ``encoding=embedded``: each (factor, value) is a fixed random vector in ``R^embed_dim`` (``N(0, 1)``
  entries, drawn from the seed), the context is their sum followed by ``distractors`` dimensions
  drawn afresh for every task (``N(0, 1)``, carrying nothing). No per-number decoding exists, so the
  tasks do not publish ``context_factors`` and the hand rules refuse the stream.
* ``interactions=pairs``: one group of units per (factor i, factor j, value of i, value of j), i < j;
  a task's mask is the union of the groups of its ``F (F - 1) / 2`` value pairs, so no union over
  single factor values composes it. The novel tasks are new combinations each of whose value pairs
  was trained in at least ``min_value_tasks`` earlier tasks (``novel_min_differing`` counts factors,
  so with ``F = 3`` it must be 1: two tasks sharing a value pair agree in 2 of 3 factors). No
  held-out outside value (``heldout_outside=0``).

Tasks whose context is a tuple of factors (``numbers``, ``onehot``) record the decoded tuple in
``info["context_factors"]`` (read by the hand rules ``factor_rule`` and ``stored_composition``).

Domain-incremental (one shared head; tasks conflict, so only the mask tells them apart). Default
sizes are the issue's probe (F = 3, V = 6, 11 units per group, 50 tasks of 5000 samples, the last 10
novel, each differing from every earlier task in at least 2 factors).
"""

from __future__ import annotations

import itertools
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from metagate.data.base import BENCHMARKS
from metagate.data.stream import Stream, Task
from metagate.data.synthetic import SampledTasksConfig, _noisy_labels


class GroupTeacher:
    """``x -> argmax W2 (mask * relu(W1 x))``: unit-norm hidden weights, a head centred and
    normalised per (class, unit group) so that any union of groups gives balanced classes."""

    def __init__(self, input_dim: int, groups: list[range], num_classes: int, gen: torch.Generator) -> None:
        hidden = groups[-1].stop if groups else 0
        self.w1 = torch.nn.functional.normalize(torch.randn(hidden, input_dim, generator=gen), dim=1)
        w2 = torch.randn(num_classes, hidden, generator=gen)
        for g in groups:  # every unit's mean activity is E relu(N(0, 1)) = 1/sqrt(2 pi): centring suffices
            block = w2[:, g.start : g.stop]
            block = block - block.mean(dim=1, keepdim=True) if len(g) > 1 else block
            w2[:, g.start : g.stop] = torch.nn.functional.normalize(block, dim=1)
        self.w2 = w2

    def logits(self, x: Tensor, mask: Tensor) -> Tensor:
        """``W2 (mask * relu(W1 x))``, computed over the mask's units only."""
        on = mask.bool()
        return torch.relu(x @ self.w1[on].T) @ self.w2[:, on].T

    def label(self, x: Tensor, mask: Tensor) -> Tensor:
        return self.logits(x, mask).argmax(dim=1)


@BENCHMARKS.register("composed_teacher")
class ComposedTeacher:
    """Tasks whose masks are unions of unit groups, one group chosen by each discrete context factor."""

    class Config(SampledTasksConfig):
        name: Literal["composed_teacher"] = "composed_teacher"
        num_tasks: int = Field(50, ge=2)
        factors: int = Field(3, ge=2, le=8, description="discrete context factors (F)")
        values: int = Field(6, ge=2, description="values per factor (V)")
        units_per_group: int = Field(11, ge=1, description="hidden units per (factor, value) group")
        shared_units: int = Field(0, ge=0, description="always-on units in every task's mask")
        encoding: Literal["numbers", "onehot", "embedded"] = Field(
            "numbers",
            description="context: one number per factor, v / (V - 1), decoded by rounding (default: the mask is a step "
            "function of it), a one-hot code per factor (the mask is then a linear expansion of the code), or the sum of a "
            "fixed random vector per (factor, value) plus per-task distractor dimensions (no per-number decoding)",
        )
        embed_dim: int = Field(16, ge=1, description="encoding=embedded: dimensions of the (factor, value) vectors")
        distractors: int = Field(0, ge=0, description="encoding=embedded: context dimensions drawn afresh per task, carrying nothing")
        interactions: Literal["single", "pairs"] = Field(
            "single", description="a group per (factor, value), or per (factor i, factor j, value i, value j): no sum over single factors composes the mask"
        )
        novel_tasks: int = Field(10, ge=0, description="the stream's last tasks, each far from every earlier task")
        novel_min_differing: int = Field(2, ge=1, description="factors in which a novel task differs from each earlier task")
        min_value_tasks: int = Field(2, ge=0, description="each factor value appears in at least this many tasks before the novel ones")
        heldout_inside: int = Field(4, ge=0, description="held-out untrained combinations of trained values")
        heldout_outside: int = Field(2, ge=0, description="held-out tasks whose factor 0 takes a value no training task uses")
        input_dim: int = Field(20, ge=2)
        train_per_task: int = Field(5000, ge=1, description="training samples per task, val_fraction of them held out for validation")
        scenario: Literal["domain"] = Field("domain", description="one shared head (the teacher's)")

        @property
        def hidden_units(self) -> int:
            """The teacher's width, which the student's single hidden layer must equal."""
            return self.shared_units + self.units_per_group * self.num_groups

        @property
        def num_groups(self) -> int:
            if self.interactions == "pairs":
                return self.factors * (self.factors - 1) // 2 * self.values**2
            return self.factors * self.values + (1 if self.heldout_outside else 0)

        @property
        def context_dim(self) -> int:
            if self.encoding == "numbers":
                return self.factors
            if self.encoding == "embedded":
                return self.embed_dim + self.distractors
            return self.factors * self.values + (1 if self.heldout_outside else 0)

        @model_validator(mode="after")
        def _enough_combinations(self) -> "ComposedTeacher.Config":
            if self.interactions == "pairs" and self.heldout_outside:
                raise ValueError("interactions=pairs has no outside value: set heldout_outside=0")
            if self.interactions == "pairs" and self.novel_min_differing > self.factors - 2:
                raise ValueError(
                    f"with interactions=pairs a novel task shares value pairs with earlier tasks, so it agrees with some in 2 of "
                    f"{self.factors} factors: set novel_min_differing <= {self.factors - 2}"
                )
            needed = self.num_tasks + self.heldout_inside
            if needed > self.values**self.factors:
                raise ValueError(
                    f"{needed} distinct combinations needed (num_tasks + heldout_inside), but {self.factors} factors "
                    f"of {self.values} values give only {self.values ** self.factors}"
                )
            if self.novel_tasks >= self.num_tasks:
                raise ValueError(f"novel_tasks ({self.novel_tasks}) must be fewer than num_tasks ({self.num_tasks})")
            if (self.num_tasks - self.novel_tasks) < self.values * self.min_value_tasks:
                raise ValueError(
                    f"{self.num_tasks - self.novel_tasks} tasks before the novel ones cannot show each of {self.values} values "
                    f"{self.min_value_tasks} times: lower min_value_tasks or raise num_tasks"
                )
            return self

    # ------------------------------------------------------------------ the map

    @staticmethod
    def groups(cfg: "ComposedTeacher.Config") -> list[range]:
        """Unit ranges: the shared units (if any), then group (f, v) for f, v in order (factor 0's
        outside value last, when there is one)."""
        out = [range(0, cfg.shared_units)] if cfg.shared_units else []
        start = cfg.shared_units
        for _ in range(cfg.num_groups):
            out.append(range(start, start + cfg.units_per_group))
            start += cfg.units_per_group
        return out

    @staticmethod
    def group_index(cfg: "ComposedTeacher.Config", factor: int, value: int) -> int:
        """Position of group (factor, value) among the non-shared groups."""
        if value == cfg.values:  # factor 0's outside value
            return cfg.factors * cfg.values
        return factor * cfg.values + value

    @staticmethod
    def pair_group_index(cfg: "ComposedTeacher.Config", i: int, j: int, vi: int, vj: int) -> int:
        """Position of group (factor i, factor j, value i, value j), i < j, among the non-shared groups (interactions=pairs)."""
        pair = [(a, b) for a in range(cfg.factors) for b in range(a + 1, cfg.factors)].index((i, j))
        return pair * cfg.values**2 + vi * cfg.values + vj

    @staticmethod
    def embeddings(cfg: "ComposedTeacher.Config", seed: int) -> Tensor:
        """``[factors, values + 1, embed_dim]``: the fixed vector of each (factor, value) (encoding=embedded; the
        last value is factor 0's outside one), from a generator of its own so the other encodings' streams are
        unchanged."""
        gen = torch.Generator().manual_seed(seed * 7919 + 17)
        return torch.randn(cfg.factors, cfg.values + 1, cfg.embed_dim, generator=gen)

    @staticmethod
    def encode(cfg: "ComposedTeacher.Config", combo: list[int], table: Tensor | None = None, distractor: Tensor | None = None) -> Tensor:
        """The published context of a combination of factor values (``embedded``: needs the seed's
        ``table`` and the task's ``distractor`` values)."""
        if cfg.encoding == "embedded":
            if table is None:
                raise ValueError("encoding=embedded needs the stream's embedding table (ComposedTeacher.embeddings)")
            summed = sum(table[f, v] for f, v in enumerate(combo))
            extra = distractor if distractor is not None else torch.zeros(cfg.distractors)
            return torch.cat([summed, extra]).float()  # type: ignore[list-item]
        if cfg.encoding == "numbers":
            return torch.tensor([v / (cfg.values - 1) for v in combo], dtype=torch.float32)
        ctx = torch.zeros(cfg.context_dim)
        for f, v in enumerate(combo):
            ctx[ComposedTeacher.group_index(cfg, f, v)] = 1.0
        return ctx

    @staticmethod
    def decode(cfg: "ComposedTeacher.Config", context: Tensor) -> list[int]:
        """Factor values from a context: rounding (``numbers``) or argmax per factor (``onehot``)."""
        if cfg.encoding == "numbers":
            return [int(round(float(c) * (cfg.values - 1))) for c in context]
        values = [int(context[f * cfg.values : (f + 1) * cfg.values].argmax()) for f in range(cfg.factors)]
        if cfg.heldout_outside and context[-1] > context[: cfg.values].max():
            values[0] = cfg.values
        return values

    @staticmethod
    def mask_from_combination(cfg: "ComposedTeacher.Config", combo: list[int]) -> Tensor:
        """Shared units plus, per factor, the group of its value (``interactions=pairs``: per pair of factors,
        the group of their two values)."""
        groups = ComposedTeacher.groups(cfg)
        offset = 1 if cfg.shared_units else 0
        mask = torch.zeros(cfg.hidden_units, dtype=torch.bool)
        if cfg.shared_units:
            mask[: cfg.shared_units] = True
        if cfg.interactions == "pairs":
            chosen = [ComposedTeacher.pair_group_index(cfg, i, j, combo[i], combo[j]) for i, j in itertools.combinations(range(cfg.factors), 2)]
        else:
            chosen = [ComposedTeacher.group_index(cfg, f, v) for f, v in enumerate(combo)]
        for k in chosen:
            g = groups[offset + k]
            mask[g.start : g.stop] = True
        return mask

    @staticmethod
    def mask_from_context(cfg: "ComposedTeacher.Config", context: Tensor) -> Tensor:
        """The documented map: the mask of the combination decoded from the context (not for ``embedded``,
        which has no per-number decoding)."""
        if cfg.encoding == "embedded":
            raise ValueError("encoding=embedded has no per-number decoding: use mask_from_combination on the task's combination")
        return ComposedTeacher.mask_from_combination(cfg, ComposedTeacher.decode(cfg, context))

    # ------------------------------------------------------------------ the stream

    @staticmethod
    def combinations(cfg: "ComposedTeacher.Config", gen: torch.Generator) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """Training combinations (the last ``novel_tasks`` of them novel), held-out inside, held-out
        outside. The novel combinations are drawn first, pairwise ``novel_min_differing`` factors
        apart; then the earlier ones, each that far from every novel one, until every factor value
        appears in ``min_value_tasks`` of them (redrawn otherwise)."""
        k = cfg.novel_min_differing
        if cfg.interactions == "pairs":
            return ComposedTeacher.pair_combinations(cfg, gen)

        def fill(chosen: list[list[int]], count: int, far_from: list[list[int]], exclude: list[list[int]], k: int = k) -> None:
            """Append random distinct combinations at least ``k`` factors from every one in ``far_from``."""
            for _ in range(100):
                if len(chosen) >= count:
                    return
                cand = torch.randint(cfg.values, (4096, cfg.factors), generator=gen)
                if far_from:
                    ok = ((cand[:, None, :] != torch.tensor(far_from)[None]).sum(-1) >= k).all(1)
                    cand = cand[ok]
                for c in cand.tolist():
                    if len(chosen) >= count:
                        return
                    if c in chosen or c in exclude:
                        continue
                    if far_from is chosen and any(sum(x != y for x, y in zip(c, o)) < k for o in chosen):
                        continue  # (rechecked: ``chosen`` grew within this batch)
                    chosen.append(c)

        early_count = cfg.num_tasks - cfg.novel_tasks
        for _ in range(50):
            novel: list[list[int]] = []
            fill(novel, cfg.novel_tasks, novel, [])
            early: list[list[int]] = []
            fill(early, early_count, novel, novel)
            if len(novel) < cfg.novel_tasks or len(early) < early_count:
                continue
            seen = torch.tensor(early).T  # [factors, early tasks]
            if all(int((seen[f] == v).sum()) >= cfg.min_value_tasks for f in range(cfg.factors) for v in range(cfg.values)):
                break
        else:
            raise ValueError(
                f"no stream found with {cfg.novel_tasks} novel tasks {k} factors apart from each other and from each of "
                f"{early_count} earlier tasks, every value seen in {cfg.min_value_tasks} earlier tasks: "
                "lower novel_tasks, novel_min_differing or num_tasks, or raise factors / values"
            )
        train = early + novel
        inside: list[list[int]] = []
        fill(inside, cfg.heldout_inside, [], train, k=1)  # held-out inside: any untrained combination
        outside = [[cfg.values, *torch.randint(cfg.values, (cfg.factors - 1,), generator=gen).tolist()] for _ in range(cfg.heldout_outside)]
        return train, inside, outside

    @staticmethod
    def pair_combinations(cfg: "ComposedTeacher.Config", gen: torch.Generator) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
        """interactions=pairs: the earlier tasks are random distinct combinations; the novel ones are drawn among
        the others whose every value pair appears in ``min_value_tasks`` earlier tasks (each novel one
        ``novel_min_differing`` factors from the other novel ones); held-out inside: any untrained combination."""
        pairs = list(itertools.combinations(range(cfg.factors), 2))
        early_count = cfg.num_tasks - cfg.novel_tasks
        every = list(itertools.product(range(cfg.values), repeat=cfg.factors))
        for _ in range(200):
            order = torch.randperm(len(every), generator=gen).tolist()
            early = [list(every[i]) for i in order[:early_count]]
            seen: dict[tuple[int, int, int, int], int] = {}
            for c in early:
                for i, j in pairs:
                    seen[(i, j, c[i], c[j])] = seen.get((i, j, c[i], c[j]), 0) + 1
            novel: list[list[int]] = []
            for idx in order[early_count:]:
                c = list(every[idx])
                if all(seen.get((i, j, c[i], c[j]), 0) >= max(1, cfg.min_value_tasks) for i, j in pairs) and all(
                    sum(x != y for x, y in zip(c, o)) >= cfg.novel_min_differing for o in novel
                ):
                    novel.append(c)
                if len(novel) == cfg.novel_tasks:
                    break
            if len(novel) == cfg.novel_tasks:
                break
        else:
            raise ValueError(
                f"no stream found with {cfg.novel_tasks} novel tasks whose value pairs each appear in {cfg.min_value_tasks} of "
                f"{early_count} earlier tasks: lower novel_tasks or min_value_tasks, or raise num_tasks"
            )
        train = early + novel
        rest = [list(every[i]) for i in order if list(every[i]) not in train]
        return train, rest[: cfg.heldout_inside], []

    @staticmethod
    def build(cfg: "ComposedTeacher.Config", seed: int) -> Stream:  # type: ignore[override]
        gen = torch.Generator().manual_seed(seed)
        teacher = GroupTeacher(cfg.input_dim, ComposedTeacher.groups(cfg), cfg.num_classes, gen)
        train, inside, outside = ComposedTeacher.combinations(cfg, gen)
        table = ComposedTeacher.embeddings(cfg, seed) if cfg.encoding == "embedded" else None
        noise = torch.Generator().manual_seed(seed * 7919 + 23)  # the distractors' own draws

        def make(index: int, combo: list[int], name: str) -> Task:
            distractor = torch.randn(cfg.distractors, generator=noise) if table is not None else None
            context = ComposedTeacher.encode(cfg, combo, table, distractor)
            mask = ComposedTeacher.mask_from_combination(cfg, combo)
            info: dict[str, float | int | str] = {"combination": ".".join(map(str, combo)), "novel": int(index >= cfg.num_tasks - cfg.novel_tasks)}
            if cfg.encoding != "embedded":  # the context is a tuple of factors (see metagate.methods.components.context_factors)
                info["context_factors"] = info["combination"]
            xs, ys = [], []
            for n in (cfg.train_per_task, cfg.test_per_task):
                x = torch.randn(n, cfg.input_dim, generator=gen)
                xs.append(x)
                ys.append(_noisy_labels(teacher.label(x, mask), cfg.num_classes, cfg.label_noise, gen))
            return Task(
                index=index,
                name=f"{name}-{'.'.join(map(str, combo))}",
                x_train=xs[0],
                y_train=ys[0],
                x_test=xs[1],
                y_test=ys[1],
                context=context,
                classes=tuple(range(cfg.num_classes)),
                oracle_mask=[mask],
                info=info,
            )

        tasks = [make(i, c, "composed") for i, c in enumerate(train)]
        n = cfg.num_tasks
        heldout = [make(n + i, c, "heldout-inside") for i, c in enumerate(inside)]
        heldout += [make(n + len(inside) + i, c, "heldout-outside") for i, c in enumerate(outside)]
        return Stream("composed_teacher", tasks, (cfg.input_dim,), cfg.num_classes, "domain", cfg.context_dim, heldout)


def largest_overlap(masks: list[Tensor]) -> list[float | None]:
    """For each mask, its largest IoU with any earlier mask in the list (``None`` for the first)."""
    out: list[float | None] = [None]
    for t in range(1, len(masks)):
        a = masks[t].bool()
        ious = [float((a & b.bool()).sum() / (a | b.bool()).sum().clamp_min(1)) for b in masks[:t]]
        out.append(max(ious))
    return out


__all__ = ["ComposedTeacher", "GroupTeacher", "largest_overlap"]
