"""Memory Replay GANs (Wu, Herranz, Liu, Wang, van de Weijer & Raducanu, "Memory Replay GANs: learning to
generate images from new categories without forgetting", NeurIPS 2018): a class-conditional WGAN-GP with an
AC-GAN head that learns new classes without forgetting old ones, by joint retraining with replay or by
replay alignment."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, Method, MethodReport
from metagate.methods.components.generative import WGANGP, GeneratorConfig, image_grid
from metagate.nn.backbones import BackboneConfig, build_backbone


class ACHead(nn.Module):
    """The critic's AC-GAN classifier as the method's model: ``predict`` (the accuracy matrix) reads it."""

    def __init__(self, gan: WGANGP) -> None:
        super().__init__()
        self.gan = [gan]  # not a submodule here: the GAN is registered once, on the method

    def forward(self, x: Tensor) -> Tensor:
        return self.gan[0].critic(x)[1]


@METHODS.register("mergan")
class MeRGAN(Method):
    """MeRGAN (Wu et al. 2018; official code ``WuChenshen/MeRGAN``, TensorFlow, ``mergan.py`` at 5285f6b).

    A conditional WGAN-GP (:class:`~metagate.methods.components.generative.WGANGP` with ``num_classes``: the
    generator's batch norms take a scale and an offset per class, the critic has an AC-GAN head over all the
    stream's classes) is trained on each task's classes in turn. Per iteration (``mergan.py:344-373``): one
    generator step (not at the first iteration), then ``critic_iters`` = 5 critic steps, each on a new real
    batch; here one Trainer step is one critic step on its batch, with the generator step before every 5th
    (so ``trainer.iterations_per_task = 5 x`` the code's ``ITERS``; MNIST: 4001 -> 20005). Losses
    (``mergan.py:146-166``): critic ``mean D(G(z, y)) - mean D(x) + 10 GP + CE(AC(x), y)``; generator
    ``-mean D(G(z, y)) + CE(AC(G(z, y)), y)``, with ``y`` the real batch's labels. Adam 1e-4, betas (0, 0.9)
    for both, its state reset at every task (``mergan.py:340``); the critic carries over; the generator of the
    previous task is kept frozen as ``G_old`` (``mergan.py:386-392``).

    With old classes ``c = 1..K`` (those of earlier tasks), ``m = batch // K`` noise vectors per old class
    (``REDUCE_BATCH``, the MNIST/SVHN setting), each class generated in its own batch-norm batch:

    * ``variant=replay_alignment`` (``--RA``, ``mergan.py:269-281``): the generator loss adds
      ``lambda_RA / K * sum_c ||G_old(z, c) - G(z, c)||^2 / 2`` (``tf.nn.l2_loss``: half the sum of squares, over
      the ``[-1, 1]`` outputs), the same ``z`` for both. ``lambda_ra`` default 1e-3, the code's MNIST value
      (``train.sh``; the argparse default is 1e-4, SVHN 1e-2).
    * ``variant=joint_retraining`` (``--JTR``, ``mergan.py:285-319``): per old class, the critic adds
      ``mean D(G(z, c)) - mean D(G_old(z, c)) + CE(AC(G_old(z, c)), c)`` (old samples taken as real, no
      gradient penalty on them) and the generator ``-mean D(G(z, c)) + CE(AC(G(z, c)), c)``, summed over classes.
    * ``variant=finetune`` (the code without ``--RA`` / ``--JTR``): sequential fine-tuning.

    Evaluation as the paper's (``mergan.py:200-228``): a classifier trained on the real training data of all
    the stream's classes (here ``evaluator``, a backbone trained by the method itself at the end of the first
    task, never used in training) classifies ``eval_samples`` generated images of every class learned so far;
    ``results.json`` gets ``generated_class_acc`` (row ``t``: per class after task ``t``, ``null`` for classes
    not yet learned) and ``generated_acc`` (their mean per row), and ``evaluator_test_acc`` (the evaluator's accuracy on the real test images). After each task a grid of 10 samples per
    learned class from fixed noise is saved (``samples_task<t>.png``; the code saves 100 per class,
    ``mergan.py:181-195``). ``predict`` is the AC-GAN head's (label-masked in task-incremental streams).

    Differences, all deliberate:

    * The code trains one class per task on MNIST / SVHN (32 x 32, padded) and LSUN; here a task holds the
      stream's classes for it (split streams: 2 per task by default), the real batch carries its labels, and
      the "old classes" are those of earlier tasks. 28 x 28 images: the generator makes 32 x 32 and crops the
      centre; the critic takes 28 x 28 (its last map is 4 x 4 as in the code).
    * Outputs: the data are standardised; the generator's ``tanh`` is mapped to the per-channel range of the
      first task's inputs (:class:`DataRange`), alignment is on the ``tanh`` outputs as in the code.
    * ``lambda_ra`` multiplies a sum over pixels and samples, as in the code: on images smaller than the code's
      32 x 32 the same value aligns less per pixel (8 x 8 digits: 16 times less). The ready configs keep the
      code's 1e-3; the slow test uses 0.1 on digits.
    * Variants are exclusive here; the code's flags could combine ``--RA`` and ``--JTR``.
    * The code's evaluator is a pretrained TF classifier (``pretrain/``) scoring 100 batches of 64 per class;
      ``eval_samples`` (640) is smaller for CPU budgets. The code also re-initialises every variable with
      ``beta`` in its name per task (Adam's powers, already covered); there are none else here.
    """

    class Config(BaseMethodConfig):
        name: Literal["mergan"] = "mergan"
        variant: Literal["replay_alignment", "joint_retraining", "finetune"] = Field("replay_alignment", description="RA, JTR or sequential fine-tuning (SFT)")
        gan: GeneratorConfig = Field(default_factory=GeneratorConfig, description="the WGAN-GP (kind must be wgan_gp)")
        lambda_ra: float = Field(1e-3, ge=0, description="replay alignment weight (code, MNIST: RA_factor 1e-3)")
        evaluator: BackboneConfig = Field(default_factory=lambda: BackboneConfig(kind="cnn", hidden=[128]), description="the classifier that scores generated samples")
        evaluator_epochs: int = Field(2, ge=1, description="epochs of the evaluator over all classes' real training data")
        eval_samples: int = Field(640, ge=10, description="generated samples per class scored after each task (code: 6400)")

    name = "mergan"
    cfg: Config
    scenarios = ("task", "class")

    context_input_refusal = per_task_heads_refusal = "mergan classifies with its critic's AC-GAN head: context_input=none, heads=shared"

    @classmethod
    def config_problem(cls, cfg: BaseMethodConfig) -> str | None:
        if cfg.gan.kind != "wgan_gp":  # type: ignore[attr-defined]
            return "mergan is a conditional WGAN-GP: method.gan.kind=wgan_gp"
        return super().config_problem(cfg)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.stream
        self.gan = WGANGP(self.cfg.gan, s.input_shape, s.tasks[0].x_train, num_classes=s.num_outputs).to(self.device)
        self.model = ACHead(self.gan)  # type: ignore[assignment]
        self.optimizer = self.gan.c_opt  # nothing else trains; keeps the base class's optimiser slot meaningful
        self.evaluator = build_backbone(self.cfg.evaluator, s.input_shape, s.num_outputs).to(self.device)
        self.register_buffer("evaluator_ready", torch.zeros((), dtype=torch.bool, device=self.device))
        self.register_buffer("evaluator_acc", torch.zeros((), device=self.device))  # its accuracy on all real test images
        self.register_buffer("grid_noise", torch.randn(10, self.cfg.gan.z_dim, generator=torch.Generator().manual_seed(0)).to(self.device))
        self.register_buffer("gen_acc", torch.full((s.num_tasks, s.num_outputs), float("nan"), device=self.device))
        self.old: list[nn.Module] = []  # the frozen previous generator (not state: copied at each task's start)
        self.step = 0

    # ---------------------------------------------------------------- training

    def before_task(self, task: Task) -> None:
        self.gan.reset_optimizers()
        self.optimizer = self.gan.c_opt
        self.step = 0
        old = [c for t in self.stream.tasks[: task.index] for c in t.classes if c not in task.classes]
        self.old_classes = sorted(set(old))
        if self.old_classes and self.cfg.variant != "finetune":
            g = copy.deepcopy(self.gan.generator).eval()
            g.requires_grad_(False)
            self.old = [g]
            m = max(1, self.trainer_cfg.batch_size // len(self.old_classes))  # REDUCE_BATCH
            self.old_labels = torch.arange(len(self.old_classes), device=self.device).repeat_interleave(m)
            self.old_labels = torch.as_tensor(self.old_classes, device=self.device)[self.old_labels]
            self.per_class = m
        else:
            self.old = []

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        gan, cfg = self.gan, self.cfg
        out: dict[str, Tensor] = {}
        k = len(self.old_classes)
        if self.step > 0 and self.step % gan.cfg.critic_iters == 0:  # mergan.py:348: a generator step, then the critic's
            gan.g_opt.zero_grad(set_to_none=True)
            g_loss = gan.generator_loss(gan.to_data(gan.raw(gan.noise(batch.x.shape[0], self.device), batch.y)), batch.y)
            if self.old:
                z = gan.noise(self.old_labels.shape[0], self.device)
                new = gan.raw(z, self.old_labels, groups=k)
                if cfg.variant == "replay_alignment":
                    with torch.no_grad():
                        target = self.old[0](z, self.old_labels, groups=k)
                    ra = cfg.lambda_ra / k * 0.5 * (new - target).pow(2).sum()
                    g_loss = g_loss + ra
                    out["alignment"] = ra.detach()
                else:  # joint retraining: -D(G(z, c)) + CE(AC(G(z, c)), c) per class, summed
                    d_new, ac_new = gan.critic(gan.to_data(new))
                    g_loss = g_loss + k * (-d_new.mean() + F.cross_entropy(ac_new, self.old_labels))  # type: ignore[arg-type]
            g_loss.backward()
            gan.g_opt.step()
            out["generator_loss"] = g_loss.detach()
        gan.c_opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            fake = gan.to_data(gan.raw(gan.noise(batch.x.shape[0], self.device), batch.y))
        c_loss = gan.critic_loss(batch.x, fake, batch.y)
        if self.old and cfg.variant == "joint_retraining":
            z = gan.noise(self.old_labels.shape[0], self.device)
            with torch.no_grad():
                x_old = gan.to_data(self.old[0](z, self.old_labels, groups=k))
                x_new = gan.to_data(gan.raw(z, self.old_labels, groups=k))
            d_old, ac_old = gan.critic(x_old)
            d_new, _ = gan.critic(x_new)
            # per class: mean D(new) - mean D(old) + CE(AC(old), c), summed over the K classes (equal groups)
            c_loss = c_loss + k * (d_new.mean() - d_old.mean() + F.cross_entropy(ac_old, self.old_labels))  # type: ignore[arg-type]
        c_loss.backward()
        gan.c_opt.step()
        self.step += 1
        out["loss"] = c_loss.detach()
        return out

    # ---------------------------------------------------------------- evaluation of the generator

    def train_evaluator(self) -> None:
        """The classifier of generated samples: trained on the real training data of all the stream's classes."""
        x = torch.cat([t.x_train for t in self.stream.tasks])
        y = torch.cat([t.y_train for t in self.stream.tasks])
        opt = torch.optim.Adam(self.evaluator.parameters(), lr=1e-3)
        self.evaluator.train()
        for _ in range(self.cfg.evaluator_epochs):
            order = torch.randperm(len(y), device=self.device)
            for i in range(0, len(y), 128):
                idx = order[i : i + 128]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(self.evaluator(x[idx]), y[idx]).backward()
                opt.step()
        self.evaluator.eval()
        self.evaluator_ready.fill_(True)
        with torch.no_grad():
            hits = sum((self.evaluator(t.x_test).argmax(1) == t.y_test).sum() for t in self.stream.tasks)
            self.evaluator_acc.fill_(hits / sum(t.num_test for t in self.stream.tasks))

    @torch.no_grad()
    def generated_accuracy(self, classes: list[int]) -> Tensor:
        """Per class: the share of ``eval_samples`` generated images (batches of 64) the evaluator assigns to it."""
        accs = []
        for c in classes:
            hits = torch.zeros((), device=self.device)
            done = 0
            while done < self.cfg.eval_samples:
                n = min(64, self.cfg.eval_samples - done)
                labels = torch.full((n,), c, dtype=torch.long, device=self.device)
                x = self.gan.generate(n, labels)
                hits += (self.evaluator(x).argmax(1) == c).sum()
                done += n
            accs.append(hits / self.cfg.eval_samples)
        return torch.stack(accs)

    def after_task(self, task: Task) -> None:
        if not bool(self.evaluator_ready):
            self.train_evaluator()
        learned = sorted({c for t in self.stream.tasks[: task.index + 1] for c in t.classes})
        self.gen_acc[task.index, learned] = self.generated_accuracy(learned)

    def report(self, task: Task | None = None) -> MethodReport:
        if task is not None:
            return MethodReport(images=self._images(task))
        out = super().report(task)
        out.figures.update(self._generated_figures())
        return out

    def _generated_figures(self) -> dict[str, Any]:
        rows = [[None if v != v else v for v in row] for row in self.gen_acc.cpu().tolist()]
        means = [None if all(v is None for v in r) else sum(v for v in r if v is not None) / sum(v is not None for v in r) for r in rows]
        return {"generated_class_acc": rows, "generated_acc": means, "evaluator_test_acc": float(self.evaluator_acc)}

    @torch.no_grad()
    def _images(self, task: Task) -> dict[str, Tensor]:
        """Rows: the classes learned so far; columns: 10 samples from fixed noise (one batch per class)."""
        learned = sorted({c for t in self.stream.tasks[: task.index + 1] for c in t.classes})
        k = len(learned)
        labels = torch.as_tensor(learned, device=self.device).repeat_interleave(10)
        x = self.gan.to_data(self.gan.raw(self.grid_noise.repeat(k, 1), labels, groups=k))
        return {f"samples_task{task.index}.png": image_grid(x, k, self.gan.range.lo[0], self.gan.range.hi[0])}

    def get_extra_state(self) -> dict[str, Any]:
        return {"g": self.gan.g_opt.state_dict(), "c": self.gan.c_opt.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.gan.g_opt.load_state_dict(copy.deepcopy(state["g"]))
        self.gan.c_opt.load_state_dict(copy.deepcopy(state["c"]))
        self.optimizer = self.gan.c_opt
