"""The pair stream: a real-image composition stream whose tasks are ordered pairs of classes (issue 25).

A task is an ordered pair of classes ``(a, b)`` of a real image data set (Fashion-MNIST by default;
scikit-learn's digits for tests in seconds; MNIST, KMNIST, EMNIST, CIFAR-10 / CIFAR-100 when their files
are found, see :mod:`metagate.data.sources`). With ``scenario=domain`` (default) images of class ``a`` are
labelled 0 and images of class ``b`` are labelled 1 by one shared 2-way head: ``(a, b)`` and ``(b, a)``
conflict, so only the task's context can tell them apart. ``scenario=task`` gives every class its own
output unit and masks the labels to the task's two classes (then the order does not matter).

The last ``novel_tasks`` tasks are ordered pairs never trained whose classes were each trained in at least
``min_class_tasks`` earlier pairs, in both positions (each at least once as ``a`` and once as ``b``): a
learner that composes (position, class) knowledge can solve them zero-shot. Everything else is drawn at
random (seeded): the classes used (``classes`` of the data set's, in a seeded order), the ordered pairs.

Contexts (``context``):

* ``given`` (default): the two class identities, ``onehot(a) ++ onehot(b)`` over the stream's classes
  (``2 x classes`` numbers). The tasks publish ``info["context_factors"] = "a.b"`` (positions in the
  stream's class list), so the hand rules (``factor_rule``, ``stored_composition``) apply.
* ``prototypes``: from data. For each of ``a`` and ``b``, the mean of ``prototype_shots`` (n = 5 by
  default) *labelled training images of the task* of that class, standardised and flattened, times a
  fixed random projection ``P`` (``[D, prototype_dim]``, entries ``N(0, 1/D)``, from the seed), computed
  before the task trains; the two projected prototypes are concatenated. It uses labelled data of the
  task, so it is a few-shot context, not a description given before any data (tables call it so); no
  hand rule applies.

Sizes: ``train_per_class`` / ``test_per_class`` images of each class per task (seeded subsets; ``None``:
all of them), ``val_fraction`` of the training cap as validation images, taken from a validation pool
carved once from the data set's training split (no image is both trained and validated on). The
issue's probe (MLP 256-256 with hidden-unit masks, 40 ordered pairs of Fashion-MNIST for 1 epoch of 1000
images per class, 10 novel pairs): random masks 51.8 / 53.3% zero-shot on the novel pairs (chance 50),
a block of units per (position, class) 81.6 / 89.7%, trained alone 96.0 / 97.3%.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from metagate.data.base import BENCHMARKS
from metagate.data.images import ImageBenchmarkConfig, carve_validation, channel_stats, generator, load, provenance, standardized, subset, _take
from metagate.data.sources import data_set_size, num_classes
from metagate.data.stream import Stream, Task


@BENCHMARKS.register("pairs")
class Pairs:
    """Ordered class pairs (a, b) of a real image data set with one shared 2-way head; the last tasks are novel pairs."""

    class Config(ImageBenchmarkConfig):
        name: Literal["pairs"] = "pairs"
        num_tasks: int = Field(50, ge=2)
        novel_tasks: int = Field(10, ge=0, description="the stream's last tasks: ordered pairs never trained, their classes seen before")
        min_class_tasks: int = Field(2, ge=1, description="earlier pairs each class of a novel pair appears in (in both positions among them)")
        classes: int | None = Field(None, ge=3, description="classes used (a seeded subset of the data set's; null: all, at most 20)")
        context: Literal["given", "prototypes"] = Field("given", description="the two class identities, or 5-shot prototypes of the task's two classes")
        prototype_shots: int = Field(5, ge=1, description="context=prototypes: labelled training images averaged per class")
        prototype_dim: int = Field(8, ge=1, description="context=prototypes: size of each projected prototype")
        train_per_class: int | None = Field(1000, ge=1, description="training images per class per task (null: all)")
        test_per_class: int | None = Field(500, ge=1, description="test images per class per task (null: all)")
        scenario: Literal["domain", "task"] = Field("domain", description="domain: one 2-way head (a -> 0, b -> 1); task: per-class outputs, label masking")

        @property
        def num_classes_used(self) -> int:
            return self.classes or min(num_classes(self.dataset, self.emnist_split), 20)

        def memory_estimate(self) -> int:
            """The loaded data set (raw and standardised) plus every task's two classes' images."""
            n_train, n_test, numel = data_set_size(self.dataset, self.emnist_split)
            per_class = lambda n, cap: min(cap or n, n // max(num_classes(self.dataset, self.emnist_split), 1))  # noqa: E731
            per_task = 2 * (per_class(n_train, self.train_per_class) + per_class(n_test, self.test_per_class))
            return 4 * numel * (2 * (n_train + n_test) + self.num_tasks * per_task)

        @model_validator(mode="after")
        def _enough_pairs(self) -> "Pairs.Config":
            total = num_classes(self.dataset, self.emnist_split)
            if self.classes is not None and self.classes > total:
                raise ValueError(f"classes={self.classes}, but {self.dataset} has {total}")
            c = self.num_classes_used
            if self.num_tasks > c * (c - 1):
                raise ValueError(f"{self.num_tasks} ordered pairs needed, {c} classes give {c * (c - 1)}: lower num_tasks or raise classes")
            if self.novel_tasks >= self.num_tasks:
                raise ValueError(f"novel_tasks ({self.novel_tasks}) must be fewer than num_tasks ({self.num_tasks})")
            return self

    @staticmethod
    def pairs(cfg: "Pairs.Config", seed: int) -> tuple[list[int], list[tuple[int, int]]]:
        """The classes used (original labels) and the ordered pairs of positions in that list, the novel ones last:
        drawn at random until every class of a novel pair appears in ``min_class_tasks`` earlier pairs, among
        them at least once first and once second."""
        total = num_classes(cfg.dataset, cfg.emnist_split)
        c = cfg.num_classes_used
        used = torch.randperm(total, generator=generator(seed, "pair-classes"))[:c].sort().values.tolist()
        every = [(a, b) for a in range(c) for b in range(c) if a != b]
        gen = generator(seed, "pair-order")
        early_count = cfg.num_tasks - cfg.novel_tasks
        for _ in range(1000):
            order = torch.randperm(len(every), generator=gen).tolist()
            early = [every[i] for i in order[:early_count]]
            novel = [every[i] for i in order[early_count : cfg.num_tasks]]
            first = {k: sum(p[0] == k for p in early) for k in range(c)}
            second = {k: sum(p[1] == k for p in early) for k in range(c)}
            if all(first[k] >= 1 and second[k] >= 1 and first[k] + second[k] >= cfg.min_class_tasks for p in novel for k in p):
                return used, early + novel
        raise ValueError(
            f"no order of {cfg.num_tasks} pairs found whose {cfg.novel_tasks} novel pairs' classes each appear in {cfg.min_class_tasks} "
            "earlier pairs in both positions: raise num_tasks, lower novel_tasks or classes"
        )

    @staticmethod
    def build(cfg: "Pairs.Config", seed: int) -> Stream:  # type: ignore[override]
        full = load(cfg)
        val_share = cfg.val_fraction
        data, x_val, y_val, _, _ = carve_validation(full, cfg.model_copy(update={"train_per_task": None}), seed)
        train_cap = cfg.train_per_class
        val_cap = None if cfg.train_per_class is None else max(1, round(val_share * cfg.train_per_class))
        used, pairs = Pairs.pairs(cfg, seed)
        c = len(used)
        stats = channel_stats(data.x_train) if cfg.normalize else None
        dim = int(torch.tensor(data.input_shape).prod())
        projection = torch.randn(dim, cfg.prototype_dim, generator=generator(seed, "prototype-projection")) / math.sqrt(dim)
        domain = cfg.scenario == "domain"
        tasks = []
        for t, (a, b) in enumerate(pairs):
            parts: list[Tensor] = []
            for split, x, y, cap in (("train", data.x_train, data.y_train, train_cap), ("test", data.x_test, data.y_test, cfg.test_per_class),
                                     ("val", x_val, y_val, val_cap)):
                xs, ys = [], []
                for pos, k in enumerate((a, b)):
                    members = (y == used[k]).nonzero().squeeze(1)
                    members = _take(members, subset(len(members), cap, generator(seed, f"pair-{split}", t * 2 + pos)))
                    xs.append(standardized(x[members], stats))
                    ys.append(torch.full((len(members),), pos if domain else used[k], dtype=torch.long))
                parts += [torch.cat(xs), torch.cat(ys)]
            if cfg.context == "given":
                context = torch.zeros(2 * c)
                context[a], context[c + b] = 1.0, 1.0
            else:
                protos = []
                for pos in (0, 1):
                    own = (parts[1] == (pos if domain else used[(a, b)[pos]])).nonzero().squeeze(1)
                    shots = own[torch.randperm(len(own), generator=generator(seed, "prototype-shots", t * 2 + pos))[: cfg.prototype_shots]]
                    protos.append(parts[0][shots].mean(0).flatten() @ projection)
                context = torch.cat(protos)
            info: dict[str, float | int | str] = {
                "dataset": data.name, "pair": f"{full.class_names[used[a]]}|{full.class_names[used[b]]}",
                "novel": int(t >= cfg.num_tasks - cfg.novel_tasks), "combination": f"{a}.{b}",
            }
            if cfg.context == "given":
                info["context_factors"] = f"{a}.{b}"  # the context's decoded tuple (see metagate.methods.components.context_factors)
            tasks.append(Task(
                index=t, name=f"pair-{used[a]}-{used[b]}", x_train=parts[0], y_train=parts[1], x_test=parts[2], y_test=parts[3],
                context=context, classes=(0, 1) if domain else tuple(sorted((used[a], used[b]))), x_val=parts[4], y_val=parts[5], info=info,
            ))
        outputs = 2 if domain else full.num_classes
        context_dim = 2 * c if cfg.context == "given" else 2 * cfg.prototype_dim
        return Stream(f"pairs-{data.name}", tasks, data.input_shape, outputs, cfg.scenario, context_dim, provenance=provenance(full))


__all__ = ["Pairs"]
