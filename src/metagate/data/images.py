"""Image benchmarks on real data sets: permuted, rotated and split streams, each task with a context.

* ``permuted`` (Goodfellow et al. 2013; Kirkpatrick et al. 2017): a fixed random permutation of the
  pixel positions per task (the same for every channel); task 0 sees the original images when
  ``identity_first`` (default). Domain-incremental, one shared head. The context carries the task's
  identity but nothing about its permutation -- a *negative control* for context-driven methods:
  ``random`` (default), a fixed random vector per task with entries ``N(0, 1)``, or ``onehot``, the
  task index one-hot.
* ``rotated`` (Lopez-Paz & Ranzato 2017): the images rotated by an angle per task (counter-clockwise
  as displayed, about the centre, bilinear, black outside); the context is ``(cos, sin)`` of the angle.
  Domain-incremental. Training angles are evenly spaced in ``[0, max_angle]``; held-out angles
  (``Stream.heldout``, test images only, never trained on) lie between training angles and beyond
  ``max_angle``.
* ``split`` (Zenke et al. 2017; van de Ven et al. 2020): disjoint groups of classes per task in a
  seeded class order. ``scenario: task`` (label masking: ``Task.classes`` lists the task's output
  units) or ``class`` (one head over all classes seen). Output unit ``j`` is the ``j``-th class in the
  class order, so task ``t`` owns units ``t*k .. t*k+k-1``. The context describes the task's classes
  by *prototypes*: for each class (in output-unit order) the mean of ``prototype_shots`` training
  images of the task, standardised and flattened to ``D = C*H*W`` values, times a fixed random
  projection ``P`` of shape ``[D, prototype_dim]`` with entries ``N(0, 1/D)``; the ``k`` projected
  prototypes are concatenated (``context_dim = k * prototype_dim``). Since it is built from labelled
  training images of the task itself, it is a *few-shot* context (5-shot by default), not a
  description given before any data: tables call it so.

Randomness: every draw comes from its own generator seeded by (run seed, purpose, index), so the
permutations, the class order, the angle order, the projection and the prototype images are fixed
by the seed alone (a cap on the samples per task does not change them). Inputs are standardised
per channel with the training set's mean and standard deviation (``normalize``), shapes stay
``[N, C, H, W]``; everything lives in memory as tensors.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import Tensor

from metagate.data.base import BENCHMARKS
from metagate.data.angles import AngleFields, angle_schedule
from metagate.data.sources import (
    DatasetName,
    EmnistSplit,
    ImageData,
    data_set_size,
    load_dataset,
    num_classes,
)
from metagate.data.provenance import fingerprint_files, fingerprint_tensors
from metagate.data.stream import Stream, Task
from metagate.schema import BenchmarkConfig


def generator(seed: int, purpose: str, index: int = 0) -> torch.Generator:
    """A generator for one purpose, seeded by (seed, purpose, index) through SHA-256 (stable across runs)."""
    digest = hashlib.sha256(f"{seed}/{purpose}/{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)


class ImageBenchmarkConfig(BenchmarkConfig):
    """Fields every image benchmark has."""

    dataset: DatasetName = Field("fashion_mnist", description="fashion_mnist, mnist, kmnist, emnist, digits, cifar10, cifar100, mnist1d")
    emnist_split: EmnistSplit = Field("balanced", description="EMNIST split (dataset=emnist only)")
    root: str | None = Field(None, description="folder searched first for the data files")
    download: bool = Field(False, description="fetch a missing data set with torchvision")
    train_per_task: int | None = Field(None, ge=1, description="cap on training samples per task, val_fraction of them held out for validation: a seeded random subset per task (null: all)")
    test_per_task: int | None = Field(None, ge=1, description="cap on test samples per task: a seeded random subset per task (null: all)")
    normalize: bool = Field(True, description="standardise inputs per channel with the training set's mean and std")

    @field_validator("root")
    @classmethod
    def _root_names_a_folder(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("is empty: name the folder that holds the data files, or null to search the usual places")
        return value

    def input_size(self) -> int:
        return data_set_size(self.dataset, self.emnist_split)[2]

    def memory_estimate(self) -> int:
        """The loaded data set (raw and standardised) plus every task's (and held-out task's) tensors."""
        n_train, n_test, numel = data_set_size(self.dataset, self.emnist_split)
        tasks = getattr(self, "num_tasks", 1)
        share = 1 / tasks if self.name == "split" else 1.0  # split: each task holds its classes only
        built = tasks + getattr(self, "heldout_inside", 0) + getattr(self, "heldout_outside", 0)
        per_task = sum(min(cap or n, int(n * share)) for n, cap in ((n_train, self.train_per_task), (n_test, self.test_per_task)))
        return 4 * numel * (2 * (n_train + n_test) + built * per_task)


def load(cfg: ImageBenchmarkConfig) -> ImageData:
    return load_dataset(cfg.dataset, cfg.root, cfg.download, cfg.emnist_split)


def provenance(data: ImageData) -> dict[str, object]:
    """Where ``data`` was read from and the fingerprint of the files read (or of the generated tensors)."""
    print_ = fingerprint_files(data.files) if data.files else fingerprint_tensors((data.x_train, data.y_train, data.x_test, data.y_test))
    return {"dataset": data.name, "location": data.location, "found_via": data.found_via, **print_}


def carve_validation(
    data: ImageData, cfg: ImageBenchmarkConfig, seed: int
) -> tuple[ImageData, Tensor, Tensor, int | None, int | None]:
    """Split the data set's training images once, by the seed, into a training pool and a validation
    pool (``val_fraction`` of them): every task's training data come from the first, its validation
    data from the second, so no image is both trained on and validated on, in any task.

    Returns the data with the training pool as its train split, the validation pool, and the caps on
    training and validation samples per task: ``train_per_task`` is split like the data set, as the
    synthetic streams split theirs (``None``: the whole pool)."""
    n_val = round(cfg.val_fraction * len(data.y_train))
    order = torch.randperm(len(data.y_train), generator=generator(seed, "validation-pool"))
    val, train = order[:n_val].sort().values, order[n_val:].sort().values
    pool = replace(data, x_train=data.x_train[train], y_train=data.y_train[train])
    if cfg.train_per_task is None:
        return pool, data.x_train[val], data.y_train[val], None, None
    val_cap = round(cfg.val_fraction * cfg.train_per_task)
    return pool, data.x_train[val], data.y_train[val], cfg.train_per_task - val_cap, val_cap


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and standard deviation of ``[N, C, H, W]`` images, shaped ``[1, C, 1, 1]``."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return mean, std


def standardized(x: Tensor, stats: tuple[Tensor, Tensor] | None) -> Tensor:
    if stats is None:
        return x.contiguous()
    return ((x - stats[0]) / stats[1]).contiguous()


def subset(n: int, cap: int | None, gen: torch.Generator) -> Tensor | None:
    """Indices of a random subset of ``cap`` of ``n`` samples (sorted), or ``None`` for all of them."""
    if cap is None or cap >= n:
        return None
    return torch.randperm(n, generator=gen)[:cap].sort().values


def _take(x: Tensor, idx: Tensor | None) -> Tensor:
    return x if idx is None else x[idx]


# --------------------------------------------------------------------------- permuted


@BENCHMARKS.register("permuted")
class Permuted:
    """Permuted images: a fixed pixel permutation per task, one shared head (domain-incremental)."""

    class Config(ImageBenchmarkConfig):
        name: Literal["permuted"] = "permuted"
        num_tasks: int = Field(10, ge=1)
        identity_first: bool = Field(True, description="task 0 sees the unpermuted images")
        context: Literal["random", "onehot"] = Field(
            "random", description="uninformative context: a random vector per task, or the task index one-hot"
        )
        context_dim: int = Field(8, ge=1, description="size of the random context (onehot: num_tasks)")

    @staticmethod
    def permutations(cfg: "Permuted.Config", seed: int, num_pixels: int) -> list[Tensor]:
        """The pixel permutation of each task (index tensors of length ``num_pixels``)."""
        return [
            torch.arange(num_pixels)
            if t == 0 and cfg.identity_first
            else torch.randperm(num_pixels, generator=generator(seed, "permutation", t))
            for t in range(cfg.num_tasks)
        ]

    @staticmethod
    def contexts(cfg: "Permuted.Config", seed: int) -> Tensor:
        if cfg.context == "onehot":
            return torch.eye(cfg.num_tasks)
        return torch.stack([torch.randn(cfg.context_dim, generator=generator(seed, "context", t)) for t in range(cfg.num_tasks)])

    @staticmethod
    def build(cfg: "Permuted.Config", seed: int) -> Stream:  # type: ignore[override]
        full = load(cfg)
        data, x_val, y_val, train_cap, val_cap = carve_validation(full, cfg, seed)
        c, h, w = data.input_shape
        stats = channel_stats(data.x_train) if cfg.normalize else None
        contexts = Permuted.contexts(cfg, seed)
        tasks = []
        for t, perm in enumerate(Permuted.permutations(cfg, seed, h * w)):
            splits = []
            for split, x, y, cap in (
                ("train", data.x_train, data.y_train, train_cap),
                ("test", data.x_test, data.y_test, cfg.test_per_task),
                ("val", x_val, y_val, val_cap),
            ):
                idx = subset(len(y), cap, generator(seed, f"{split}-subset", t))
                xs = standardized(_take(x, idx), stats).flatten(2)[:, :, perm].reshape(-1, c, h, w)
                splits += [xs, _take(y, idx).clone()]
            tasks.append(
                Task(
                    index=t, name=f"perm-{t}", x_train=splits[0], y_train=splits[1], x_test=splits[2], y_test=splits[3],
                    context=contexts[t].clone(), classes=tuple(range(data.num_classes)),
                    info={"dataset": data.name, "identity": int(t == 0 and cfg.identity_first)},
                    x_val=splits[4], y_val=splits[5],
                )
            )
        return Stream(f"permuted-{data.name}", tasks, (c, h, w), data.num_classes, "domain", contexts.shape[1], provenance=provenance(full))


# --------------------------------------------------------------------------- rotated


def rotate(images: Tensor, degrees: float, chunk: int = 8192) -> Tensor:
    """Images ``[N, C, H, W]`` rotated counter-clockwise (as displayed) by ``degrees`` about their
    centre; bilinear interpolation, zeros outside the original frame."""
    if degrees % 360 == 0:
        return images.clone()
    rad = math.radians(degrees)
    c, s = math.cos(rad), math.sin(rad)
    # affine_grid maps output coordinates (x right, y down) to input coordinates: the inverse rotation
    theta = torch.tensor([[c, -s, 0.0], [s, c, 0.0]], dtype=images.dtype, device=images.device)
    out = []
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk]
        grid = F.affine_grid(theta.expand(part.shape[0], 2, 3), list(part.shape), align_corners=False)
        out.append(F.grid_sample(part, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    return torch.cat(out) if out else images.clone()


@BENCHMARKS.register("rotated")
class Rotated:
    """Rotated images: an angle per task, context (cos, sin) of the angle (domain-incremental)."""

    class Config(ImageBenchmarkConfig, AngleFields):
        name: Literal["rotated"] = "rotated"

        @model_validator(mode="after")
        def _rotatable(self) -> "Rotated.Config":
            if self.dataset == "mnist1d":
                raise ValueError("rotated needs square images; mnist1d holds 1x40 signals (use permuted or split)")
            return self

    @staticmethod
    def angles(cfg: "Rotated.Config", seed: int) -> tuple[list[float], list[float]]:
        """Training angles (in training order) and held-out angles, in degrees (see :func:`angle_schedule`)."""
        return angle_schedule(cfg, generator(seed, "angle-order"))

    @staticmethod
    def build(cfg: "Rotated.Config", seed: int) -> Stream:  # type: ignore[override]
        full = load(cfg)
        data, x_val, y_val, train_cap, val_cap = carve_validation(full, cfg, seed)
        c, h, w = data.input_shape
        if h != w:
            raise ValueError(f"rotated needs square images, {data.name} has {h}x{w}")
        stats = channel_stats(data.x_train) if cfg.normalize else None
        train_angles, heldout_angles = Rotated.angles(cfg, seed)

        def make(index: int, angle: float, name: str, heldout: bool) -> Task:
            parts = []
            for split, x, y, cap in (
                ("train", data.x_train, data.y_train, train_cap),
                ("test", data.x_test, data.y_test, cfg.test_per_task),
                ("val", x_val, y_val, val_cap),
            ):
                if heldout and split != "test":  # held-out angles are never trained on: no training data
                    parts += [data.x_train[:0].clone(), data.y_train[:0].clone()]
                    continue
                idx = subset(len(y), cap, generator(seed, f"{split}-subset", index))
                parts += [standardized(rotate(_take(x, idx), angle), stats), _take(y, idx).clone()]
            rad = math.radians(angle)
            return Task(
                index=index, name=name, x_train=parts[0], y_train=parts[1], x_test=parts[2], y_test=parts[3],
                context=torch.tensor([math.cos(rad), math.sin(rad)]), classes=tuple(range(data.num_classes)),
                info={"dataset": data.name, "angle": angle}, x_val=parts[4], y_val=parts[5],
            )

        tasks = [make(i, a, f"rot-{a:g}", False) for i, a in enumerate(train_angles)]
        heldout = [make(cfg.num_tasks + i, a, f"heldout-rot-{a:g}", True) for i, a in enumerate(heldout_angles)]
        return Stream(f"rotated-{data.name}", tasks, (c, h, w), data.num_classes, "domain", 2, heldout, provenance(full))


# --------------------------------------------------------------------------- split


@BENCHMARKS.register("split")
class Split:
    """Split images: disjoint class groups per task, task- or class-incremental, 5-shot prototype contexts."""

    class Config(ImageBenchmarkConfig):
        name: Literal["split"] = "split"
        num_tasks: int = Field(5, ge=1)
        classes_per_task: int | None = Field(None, ge=1, description="null: the data set's classes // num_tasks")
        scenario: Literal["task", "class"] = Field("task", description="task: label masking per task; class: one head")
        shuffle_classes: bool = Field(True, description="seeded class order (false: classes 0, 1, 2, ... in order)")
        prototype_shots: int = Field(5, ge=1, description="training images averaged into each class prototype")
        prototype_dim: int = Field(8, ge=1, description="size of each projected class prototype")

        @model_validator(mode="after")
        def _enough_classes(self) -> "Split.Config":
            total = num_classes(self.dataset, self.emnist_split)
            k = self.classes_per_task or total // self.num_tasks
            if k < 1:
                raise ValueError(
                    f"num_tasks={self.num_tasks} is more tasks than {self.dataset}'s {total} classes (each task needs "
                    f"a class of its own); lower benchmark.num_tasks to at most {total // 2 if self.scenario == 'task' else total}"
                )
            if k * self.num_tasks > total:
                raise ValueError(
                    f"num_tasks={self.num_tasks} x classes_per_task={k} need {self.num_tasks * k} classes, "
                    f"{self.dataset} has {total}; lower benchmark.num_tasks or benchmark.classes_per_task"
                )
            if k == 1 and self.scenario == "task":
                # under label masking a one-class task is answered right whatever the model does (100%)
                raise ValueError(
                    f"num_tasks={self.num_tasks} gives tasks of one class each ({self.dataset} has {total}), which score 100% "
                    f"under label masking (scenario=task) whatever the model learns; use benchmark.num_tasks <= {total // 2} "
                    "or benchmark.classes_per_task >= 2, or benchmark.scenario=class"
                )
            return self

    @staticmethod
    def class_order(cfg: "Split.Config", seed: int, total: int) -> list[list[int]]:
        """The original class labels of each task, in output-unit order."""
        k = cfg.classes_per_task or total // cfg.num_tasks
        order = torch.randperm(total, generator=generator(seed, "class-order")) if cfg.shuffle_classes else torch.arange(total)
        return [order[t * k : (t + 1) * k].tolist() for t in range(cfg.num_tasks)]

    @staticmethod
    def build(cfg: "Split.Config", seed: int) -> Stream:  # type: ignore[override]
        full = load(cfg)
        data, x_val, y_val, train_cap, val_cap = carve_validation(full, cfg, seed)
        groups = Split.class_order(cfg, seed, data.num_classes)
        k = len(groups[0])
        stats = channel_stats(data.x_train) if cfg.normalize else None
        unit = torch.full((data.num_classes,), -1, dtype=torch.long)  # original label -> output unit
        for j, c in enumerate(c for g in groups for c in g):
            unit[c] = j
        dim = int(torch.tensor(data.input_shape).prod())
        projection = torch.randn(dim, cfg.prototype_dim, generator=generator(seed, "prototype-projection")) / math.sqrt(dim)
        tasks = []
        for t, group in enumerate(groups):
            classes = torch.tensor(group)
            parts = []
            for split, x, y, cap in (
                ("train", data.x_train, data.y_train, train_cap),
                ("test", data.x_test, data.y_test, cfg.test_per_task),
                ("val", x_val, y_val, val_cap),
            ):
                members = torch.isin(y, classes).nonzero().squeeze(1)
                idx = subset(len(members), cap, generator(seed, f"{split}-subset", t))
                members = _take(members, idx)
                parts += [standardized(x[members], stats), unit[y[members]]]
            prototypes = []
            for j, c in enumerate(group):
                own = (parts[1] == t * k + j).nonzero().squeeze(1)
                if len(own) == 0:
                    raise ValueError(
                        f"task {t} has no training image of class {c} ({data.class_names[c]}): with val_fraction={cfg.val_fraction} "
                        f"and train_per_task={cfg.train_per_task}, {len(parts[1])} training images are left to the task; "
                        "lower benchmark.val_fraction or raise benchmark.train_per_task"
                    )
                shots = own[torch.randperm(len(own), generator=generator(seed, "prototype-shots", c))[: cfg.prototype_shots]]
                prototypes.append(parts[0][shots].mean(0).flatten() @ projection)
            tasks.append(
                Task(
                    index=t, name=f"split-{t}", x_train=parts[0], y_train=parts[1], x_test=parts[2], y_test=parts[3],
                    context=torch.cat(prototypes), classes=tuple(range(t * k, (t + 1) * k)), x_val=parts[4], y_val=parts[5],
                    info={"dataset": data.name, "labels": ",".join(map(str, group)), "class_names": ",".join(data.class_names[c] for c in group)},
                )
            )
        stream_name = f"split-{data.name}"
        return Stream(stream_name, tasks, data.input_shape, k * cfg.num_tasks, cfg.scenario, k * cfg.prototype_dim, provenance=provenance(full))
