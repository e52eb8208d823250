"""Synthetic context task families: the embedded default (no download, deterministic, seconds).

Both families label inputs with a fixed random *teacher* network and give every task a context
vector from which its labelling rule follows, so a method that reads the context can, in principle,
solve a task it has never trained on.

* ``gated_teacher``: each task switches on a subset of the teacher's hidden units, namely those
  whose preferred direction (a random unit vector per unit) aligns best with the task's context.
  Nearby contexts share units and labels. Domain-incremental by default (one shared head); each task
  records its oracle mask.
* ``rotated_teacher``: a shared base problem seen through a rotation of the input space by an angle
  per task; the context is (cos, sin) of the angle. Tasks vary smoothly with their context, and
  held-out angles inside and outside the training range test transfer. Inputs lie near a random
  ``latent_dim``-dimensional subspace (as images lie near a manifold), so a rotation is visible in the
  input itself, as in rotated MNIST: one network can learn all angles together (joint training),
  while training them one after another forgets.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from metagate.schema import BenchmarkConfig
from metagate.data.base import BENCHMARKS
from metagate.data.angles import AngleFields, angle_schedule
from metagate.data.stream import Stream, Task


class Teacher:
    """A fixed random two-layer ReLU network ``x -> argmax W2 (mask * centred relu(W1 x))``."""

    def __init__(self, input_dim: int, hidden_units: int, num_classes: int, gen: torch.Generator) -> None:
        self.w1 = torch.randn(hidden_units, input_dim, generator=gen) / math.sqrt(input_dim)
        self.w2 = torch.randn(num_classes, hidden_units, generator=gen)
        # E[relu(z)] for z ~ N(0, |w|^2): centring keeps the classes balanced under any mask.
        self.mean_act = self.w1.norm(dim=1) / math.sqrt(2 * math.pi)

    def label(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        h = torch.relu(x @ self.w1.T) - self.mean_act
        if mask is not None:
            h = h * mask.to(h.dtype)
        return (h @ self.w2.T).argmax(dim=1)


def _noisy_labels(y: Tensor, num_classes: int, rate: float, gen: torch.Generator) -> Tensor:
    """Replace a fraction ``rate`` of labels by uniformly drawn ones."""
    if rate <= 0:
        return y
    flip = torch.rand(y.shape, generator=gen) < rate
    return torch.where(flip, torch.randint(num_classes, y.shape, generator=gen), y)


class SampledTasksConfig(BenchmarkConfig):
    """Fields of every family whose tasks label Gaussian inputs with a random teacher."""

    num_tasks: int = Field(5, ge=1)
    input_dim: int = Field(16, ge=2)
    num_classes: int = Field(4, ge=2)
    train_per_task: int = Field(4000, ge=1, description="training samples per task, val_fraction of them held out for validation")
    test_per_task: int = Field(1000, ge=1)
    label_noise: float = Field(0.0, ge=0, le=1, description="fraction of labels replaced by random ones")

    def memory_estimate(self) -> int:
        built = self.num_tasks + getattr(self, "heldout_inside", 0) + getattr(self, "heldout_outside", 0)
        return built * (self.train_per_task + self.test_per_task) * (4 * self.input_dim + 8)


class _TeacherFamilyConfig(SampledTasksConfig):
    hidden_units: int = Field(64, ge=2, description="teacher hidden units")


@BENCHMARKS.register("gated_teacher")
class GatedTeacher:
    """Tasks made by switching on context-selected hidden units of one random teacher."""

    class Config(_TeacherFamilyConfig):
        name: Literal["gated_teacher"] = "gated_teacher"
        context_dim: int = Field(8, ge=1)
        mask_density: float = Field(0.25, gt=0, le=1, description="fraction of teacher units a task uses")
        context_noise: float = Field(0.0, ge=0, description="std of noise on the published context")
        scenario: Literal["domain", "task"] = Field(
            "domain", description="domain: one shared head; task: own labels per task (label masking)"
        )

    @staticmethod
    def build(cfg: "GatedTeacher.Config", seed: int) -> Stream:  # type: ignore[override]
        gen = torch.Generator().manual_seed(seed)
        teacher = Teacher(cfg.input_dim, cfg.hidden_units, cfg.num_classes, gen)
        unit_dirs = torch.nn.functional.normalize(torch.randn(cfg.hidden_units, cfg.context_dim, generator=gen), dim=1)
        k = max(1, round(cfg.mask_density * cfg.hidden_units))
        tasks = []
        for t in range(cfg.num_tasks):
            ctx = torch.nn.functional.normalize(torch.randn(cfg.context_dim, generator=gen), dim=0)
            mask = torch.zeros(cfg.hidden_units, dtype=torch.bool)
            mask[(unit_dirs @ ctx).topk(k).indices] = True
            offset = t * cfg.num_classes if cfg.scenario == "task" else 0
            xs, ys = [], []
            for n in (cfg.train_per_task, cfg.test_per_task):
                x = torch.randn(n, cfg.input_dim, generator=gen)
                y = _noisy_labels(teacher.label(x, mask), cfg.num_classes, cfg.label_noise, gen)
                xs.append(x)
                ys.append(y + offset)
            published = ctx + cfg.context_noise * torch.randn(cfg.context_dim, generator=gen)
            tasks.append(
                Task(
                    index=t,
                    name=f"gated-{t}",
                    x_train=xs[0],
                    y_train=ys[0],
                    x_test=xs[1],
                    y_test=ys[1],
                    context=published,
                    classes=tuple(range(offset, offset + cfg.num_classes)),
                    oracle_mask=[mask],
                )
            )
        num_outputs = cfg.num_classes * (cfg.num_tasks if cfg.scenario == "task" else 1)
        return Stream("gated_teacher", tasks, (cfg.input_dim,), num_outputs, cfg.scenario, cfg.context_dim)


@BENCHMARKS.register("rotated_teacher")
class RotatedTeacher:
    """One base problem seen through a rotation of the input space by an angle per task."""

    class Config(_TeacherFamilyConfig, AngleFields):
        name: Literal["rotated_teacher"] = "rotated_teacher"
        num_tasks: int = Field(5, ge=1)
        max_angle: float = Field(
            120.0, gt=0, le=360, description="training angles span [0, max_angle] degrees (180 maps the input subspace onto itself)"
        )
        latent_dim: int = Field(
            6, ge=0, description="inputs lie near a subspace of this dimension (0: isotropic, rotations invisible)"
        )
        input_noise: float = Field(0.05, ge=0, description="std of isotropic noise off the subspace")

        @model_validator(mode="after")
        def _even_input(self) -> "RotatedTeacher.Config":
            if self.input_dim % 2:
                raise ValueError(f"input_dim must be even (rotation planes), got {self.input_dim}")
            if self.latent_dim > self.input_dim:
                raise ValueError(f"latent_dim ({self.latent_dim}) must not exceed input_dim ({self.input_dim})")
            return self

    @staticmethod
    def build(cfg: "RotatedTeacher.Config", seed: int) -> Stream:  # type: ignore[override]
        gen = torch.Generator().manual_seed(seed)
        teacher = Teacher(cfg.input_dim, cfg.hidden_units, cfg.num_classes, gen)
        basis, _ = torch.linalg.qr(torch.randn(cfg.input_dim, cfg.input_dim, generator=gen))
        k = cfg.latent_dim or cfg.input_dim
        # the base inputs' subspace, scaled so that E|x|^2 matches an isotropic standard normal
        subspace = torch.linalg.qr(torch.randn(cfg.input_dim, k, generator=gen))[0] * (cfg.input_dim / k) ** 0.5

        def base_inputs(n: int) -> Tensor:
            if not cfg.latent_dim:
                return torch.randn(n, cfg.input_dim, generator=gen)
            z = torch.randn(n, k, generator=gen) @ subspace.T
            return z + cfg.input_noise * torch.randn(n, cfg.input_dim, generator=gen)
        train_angles, heldout_angles = angle_schedule(cfg, gen)

        def make(index: int, angle: float, name: str) -> Task:
            rotation = _plane_rotation(cfg.input_dim, math.radians(angle), basis)
            xs, ys = [], []
            for n in (cfg.train_per_task, cfg.test_per_task):
                base = base_inputs(n)
                xs.append(base @ rotation.T)
                ys.append(_noisy_labels(teacher.label(base), cfg.num_classes, cfg.label_noise, gen))
            rad = math.radians(angle)
            return Task(
                index=index,
                name=name,
                x_train=xs[0],
                y_train=ys[0],
                x_test=xs[1],
                y_test=ys[1],
                context=torch.tensor([math.cos(rad), math.sin(rad)]),
                classes=tuple(range(cfg.num_classes)),
                info={"angle": angle},
            )

        tasks = [make(i, a, f"rot-{a:g}") for i, a in enumerate(train_angles)]
        heldout = [make(cfg.num_tasks + i, a, f"heldout-rot-{a:g}") for i, a in enumerate(heldout_angles)]
        return Stream("rotated_teacher", tasks, (cfg.input_dim,), cfg.num_classes, "domain", 2, heldout)


def _plane_rotation(dim: int, radians: float, basis: Tensor) -> Tensor:
    """Rotation by ``radians`` in each of the ``dim/2`` planes spanned by pairs of basis columns."""
    c, s = math.cos(radians), math.sin(radians)
    block = torch.tensor([[c, -s], [s, c]])
    return basis @ torch.block_diag(*[block] * (dim // 2)) @ basis.T
