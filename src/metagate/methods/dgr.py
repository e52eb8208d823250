"""Deep Generative Replay (Shin, Lee, Kim & Kim, "Continual Learning with Deep Generative Replay", NeurIPS
2017): a scholar (generator + solver) rehearses earlier tasks with generated inputs labelled by the previous
solver."""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, Method, MethodReport
from metagate.methods.components.generative import VAE, WGANGP, GeneratedSampleScorer, ReplayGeneratorConfig, image_grid
from metagate.nn.backbones import BackboneConfig


@METHODS.register("dgr")
class DGR(Method):
    """DGR (Shin et al. 2017). The scholar is a generator and a solver (the backbone). Training task ``t``
    (1-based), with ``G_{t-1}``, ``S_{t-1}`` the scholar frozen at the end of the previous task, each solver step

    * draws ``replay_batch`` replayed inputs ``x' ~ G_{t-1}``, labelled ``y' = argmax S_{t-1}(x')`` (``replay_targets
      =hard``, the paper's) or by ``S_{t-1}``'s softened outputs (``soft``: van de Ven et al.'s "DGR+distill",
      temperature 2, ``continual-learning`` ``--distill``);
    * trains the solver on ``r CE(S(x), y) + (1 - r) CE(S(x'), y')`` (paper Sec. 3.2);
    * trains the generator for its share of ``generator.iterations_per_task`` (spread evenly over the task's solver
      steps) on ``r L(real) + (1 - r) L(replay)``: the first iteration of a step reuses the step's real batch and
      ``x'`` (van de Ven's ``train_cl`` generates one replay batch per iteration for both models), further ones draw
      their own real batch (uniformly from the task's data) and replay batch.

    Budget and weighting, by the papers' code: the generator trains for its own iterations (Shin et al. train the
    generator and the solver each for their own iterations; kuc2477/pytorch-deep-generative-replay ``main.py``:
    ``--generator-iterations 3000``, ``--solver-iterations 1000``); null = as many as the solver's steps, van de Ven's
    ``options.py`` (``g_iters = iters``), the VAE's default. A WGAN-GP iteration is ``critic_iters`` critic updates
    then one generator update (the WGAN-GP code's ``ITERS``), each critic update on a real batch and a replay batch.
    ``r = new_importance``, default ``1/t`` (van de Ven's ``train.py``: ``rnt = 1./task``; every task weighs the
    same, Shin et al.'s choice for tasks of equal size; kuc2477's code uses a fixed 0.3); ``replay_batch`` default the
    trainer's batch (van de Ven's ``--batch-replay`` default: ``batch``). Generators
    (:mod:`~metagate.methods.components.generative`) bring their own defaults (``generator.kind=vae`` alone is van de
    Ven's VAE: z 100, fc 400-400, Adam 1e-3, betas (0.9, 0.999)); the generator and its optimiser carry over between
    tasks (the new scholar starts from the old one).

    Labels by scenario: class-incremental: ``S_{t-1}``'s outputs over the classes of tasks ``< t``;
    domain-incremental: over all outputs; task-incremental: a replayed input is labelled for *every* earlier
    task over that task's classes, and its loss is the mean over those tasks (van de Ven et al.'s task-incremental
    replay; Shin et al. did not run this scenario).

    Generated-sample figures (``eval_samples > 0``): after each task, ``eval_samples`` inputs of the new generator
    (those it will replay) are scored by a classifier trained on the real training data of all classes (MeRGAN's
    evaluation; trained outside the timed training, with its own seed, no effect on the run): ``results.json`` gets
    ``generated_class_share`` (row ``t``: the share of samples it assigns to each learned class; a class the
    generator forgot gets ~0) and ``generated_class_acc`` (per class: the share of those samples the solver labels as
    that class, i.e. the label quality replay carries), ``generated_acc`` (their mean per row) and
    ``evaluator_test_acc``. The measurement runs in :meth:`artifacts`, after the Trainer's timed training and evaluation.

    Differences: a WGAN-GP or VAE generator, not Shin et al.'s exact networks; the solver and generator steps are
    interleaved within the task rather than run one after the other (the same counts; replay comes from the frozen
    ``G_{t-1}``, ``S_{t-1}`` either way).
    """

    class Config(BaseMethodConfig):
        name: Literal["dgr"] = "dgr"
        generator: ReplayGeneratorConfig = Field(default_factory=ReplayGeneratorConfig)
        new_importance: float | None = Field(None, gt=0, le=1, description="weight r of the new task's data (null: 1/t at task t, 1-based)")
        replay_batch: int | None = Field(None, ge=1, description="replayed inputs per step (null: trainer.batch_size, van de Ven's default)")
        replay_targets: Literal["hard", "soft"] = Field("hard", description="hard: argmax of the previous solver (Shin et al.); soft: its outputs at temperature 2 (van de Ven's DGR+distill)")
        temperature: float = Field(2.0, gt=0, description="distillation temperature for replay_targets=soft (van de Ven's code: 2)")
        reset_optimizer: bool = Field(True, description="fresh solver optimiser at every task")
        eval_samples: int = Field(1000, ge=0, description="generated samples scored after each task (0: no generated-sample figures)")
        evaluator: BackboneConfig = Field(default_factory=lambda: BackboneConfig(kind="mlp", hidden=[400, 400]), description="the classifier that scores generated samples")
        evaluator_epochs: int = Field(2, ge=1, description="epochs of the evaluator over all classes' real training data")

    name = "dgr"
    cfg: Config

    context_input_refusal = per_task_heads_refusal = (
        "{name} labels replayed inputs with the previous solver, which knows no context or task head: context_input=none, heads=shared"
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        g, first = self.cfg.generator, self.stream.tasks[0].x_train
        self.gen: nn.Module = (WGANGP(g, self.stream.input_shape, first) if g.kind == "wgan_gp" else VAE(g, self.stream.input_shape, first)).to(self.device)
        self.previous: list[nn.Module] = []  # [generator, solver] frozen at the end of the previous task (not state)
        self.step = self.solver_steps = 0  # host counters within the task
        self.gen_iteration = 0
        self.task_number = 0
        self.register_buffer("grid_noise", torch.randn(100, g.z_dim, generator=torch.Generator().manual_seed(0)).to(self.device))
        shape = (self.stream.num_tasks, self.stream.num_outputs)
        self.register_buffer("gen_share", torch.full(shape, float("nan"), device=self.device))
        self.register_buffer("gen_acc", torch.full(shape, float("nan"), device=self.device))
        self.register_buffer("evaluator_acc", torch.full((), float("nan"), device=self.device))
        self.scorer = GeneratedSampleScorer(self.cfg.evaluator, self.cfg.evaluator_epochs)

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.task_number = task.index + 1
        self.step = self.gen_iteration = 0
        tc = self.trainer_cfg
        self._task_x = self.training_data(task).x
        self.solver_steps = tc.iterations_per_task or self.epochs_for(task, tc.epochs) * math.ceil(self._task_x.shape[0] / tc.batch_size)
        self.gen_iterations = self.cfg.generator.iterations_per_task or self.solver_steps
        if task.index > 0:
            gen, solver = copy.deepcopy(self.gen).eval(), copy.deepcopy(self.model).eval()
            for p in [*gen.parameters(), *solver.parameters()]:
                p.requires_grad_(False)
            self.previous = [gen, solver]
        old = [c for t in self.stream.tasks[: task.index] for c in t.classes]
        self._old_classes = torch.zeros(self.stream.num_outputs, dtype=torch.bool, device=self.device)
        self._old_classes[old] = True
        self._old_task_rows = self.class_mask[: task.index]  # [t-1, outputs], task-incremental labelling

    def importance(self) -> float:
        return self.cfg.new_importance if self.cfg.new_importance is not None else 1.0 / self.task_number

    # ---------------------------------------------------------------- replay

    def replay_size(self) -> int:
        return self.cfg.replay_batch or self.trainer_cfg.batch_size

    @torch.no_grad()
    def replay_inputs(self, n: int) -> Tensor:
        return self.previous[0].generate(n)  # type: ignore[operator]

    @torch.no_grad()
    def replay(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` inputs from the previous generator and the previous solver's targets, over the allowed outputs
        (-inf elsewhere) for ``soft``, argmax labels for ``hard``: ``[n]`` / ``[n, outputs]`` (class and domain), or
        one per earlier task ``[t-1, n]`` / ``[t-1, n, outputs]`` (task-incremental)."""
        x = self.replay_inputs(n)
        logits = self.previous[1](x)
        if self.stream.scenario == "task":
            logits = logits.unsqueeze(0).masked_fill(~self._old_task_rows.unsqueeze(1), float("-inf"))
        elif self.stream.scenario == "class":
            logits = logits.masked_fill(~self._old_classes, float("-inf"))
        return x, (logits if self.cfg.replay_targets == "soft" else logits.argmax(-1))

    def replay_loss(self, x: Tensor, y: Tensor, task: Task) -> Tensor:
        logits = self.model(x)
        if self.stream.scenario == "task":
            rows = self._old_task_rows  # [k, outputs]
            logits = logits.unsqueeze(0).masked_fill(~rows.unsqueeze(1), float("-inf"))  # [k, n, outputs]
        if self.cfg.replay_targets == "hard":
            return F.cross_entropy(logits.flatten(0, -2), y.flatten())
        # distillation (van de Ven's loss_fn_kd): T^2 * cross-entropy of the softened outputs; the student's over the
        # classes seen so far (class-incremental: old and current, the target zero on the current ones, so replay
        # also pushes the current classes down), its task's (task-incremental), all (domain)
        T = self.cfg.temperature
        target = torch.softmax(y / T, dim=-1)
        if self.stream.scenario == "class":
            logits = logits.masked_fill(~(self._old_classes | self.class_row(task)), float("-inf"))
        logp = torch.log_softmax(logits / T, dim=-1)
        return -(torch.where(target > 0, target * logp, torch.zeros_like(logp))).sum(-1).mean() * T * T

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        r = self.importance()
        replayed = self.replay(self.replay_size()) if self.previous else None
        # the solver
        self.optimizer.zero_grad(set_to_none=True)
        loss_new = self.task_loss(batch, task)
        loss = loss_new if replayed is None else r * loss_new + (1 - r) * self.replay_loss(*replayed, task)
        loss.backward()
        self.optimizer.step()
        out = {"loss": loss.detach()}
        # the generator: its share of generator.iterations_per_task at this solver step
        s, G, S = self.step, self.gen_iterations, self.solver_steps
        for i in range((s + 1) * G // S - s * G // S):
            real = batch.x if i == 0 else self.real_batch(batch.x.shape[0])
            fake = None if replayed is None else (replayed[0] if i == 0 else self.replay_inputs(self.replay_size()))
            out.update(self.generator_iteration(real, fake, r))
        self.step += 1
        return out

    def real_batch(self, n: int) -> Tensor:
        return self._task_x[torch.randint(self._task_x.shape[0], (n,), device=self._task_x.device)]

    def generator_iteration(self, real: Tensor, replayed: Tensor | None, r: float) -> dict[str, Tensor]:
        if isinstance(self.gen, VAE):
            self.gen.opt.zero_grad(set_to_none=True)
            if replayed is None:
                loss = self.gen.loss(real)
            else:  # one pass over both: r * mean over the real inputs + (1 - r) * mean over the replayed ones
                per = self.gen.sample_losses(torch.cat([real, replayed]))
                loss = r * per[: real.shape[0]].mean() + (1 - r) * per[real.shape[0] :].mean()
            loss.backward()
            self.gen.opt.step()
            self.gen_iteration += 1
            return {"generator_loss": loss.detach()}
        gan: WGANGP = self.gen  # type: ignore[assignment]
        if self.gen_iteration > 0:  # the WGAN-GP code: a generator update, then critic_iters critic updates
            gan.g_opt.zero_grad(set_to_none=True)
            gan.generator_loss(gan.generate(real.shape[0])).backward()
            gan.g_opt.step()
        for k in range(gan.cfg.critic_iters):
            x = real if k == 0 else self.real_batch(real.shape[0])
            gan.c_opt.zero_grad(set_to_none=True)
            c_loss = gan.critic_loss(x, gan.generate(x.shape[0]))
            if replayed is not None:
                x_old = replayed if k == 0 else self.replay_inputs(replayed.shape[0])
                c_loss = r * c_loss + (1 - r) * gan.critic_loss(x_old, gan.generate(x_old.shape[0]))
            c_loss.backward()
            gan.c_opt.step()
        self.gen_iteration += 1
        return {"critic_loss": c_loss.detach()}

    # ---------------------------------------------------------------- state, measurement, pictures

    def get_extra_state(self) -> dict[str, Any]:
        opts = {"vae": self.gen.opt.state_dict()} if isinstance(self.gen, VAE) else {"g": self.gen.g_opt.state_dict(), "c": self.gen.c_opt.state_dict()}
        return {**super().get_extra_state(), "generator_optimizers": opts}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        opts = copy.deepcopy(state["generator_optimizers"])
        if isinstance(self.gen, VAE):
            self.gen.opt.load_state_dict(opts["vae"])
        else:
            self.gen.g_opt.load_state_dict(opts["g"])
            self.gen.c_opt.load_state_dict(opts["c"])

    def report(self, task: Task | None = None) -> MethodReport:
        """After each task, the generated-sample figures and a grid of the generator's samples
        (:meth:`_images`); at the end, the figures per task and class."""
        if task is not None:
            return MethodReport(images=self._images(task))
        out = super().report()
        out.figures.update(self._generator_figures())
        return out

    @torch.no_grad()
    def measure_generator(self, task: Task) -> None:
        """The generated-sample figures after ``task`` (see the class docstring); own seed, global RNG restored."""
        learned = sorted({c for t in self.stream.tasks[: task.index + 1] for c in t.classes})
        net = self.scorer.classifier(self.stream, self.device)
        if torch.isnan(self.evaluator_acc):
            hits = sum((net(t.x_test).argmax(1) == t.y_test).sum() for t in self.stream.tasks)
            self.evaluator_acc.fill_(hits / sum(t.num_test for t in self.stream.tasks))
        allowed = torch.zeros(self.stream.num_outputs, dtype=torch.bool, device=self.device)
        allowed[learned] = True
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(task.index)
            was = self.gen.training
            self.gen.eval()
            x = torch.cat([self.gen.generate(min(256, self.cfg.eval_samples - i)) for i in range(0, self.cfg.eval_samples, 256)])  # type: ignore[operator]
            self.gen.train(was)
        truth = net(x).masked_fill(~allowed, float("-inf")).argmax(1)
        label = self.model(x).masked_fill(~allowed, float("-inf")).argmax(1)
        for c in learned:
            mine = truth == c
            self.gen_share[task.index, c] = mine.float().mean()
            self.gen_acc[task.index, c] = (label[mine] == c).float().mean() if bool(mine.any()) else float("nan")

    def _generator_figures(self) -> dict[str, Any]:
        if not self.cfg.eval_samples:
            return {}
        nan_none = lambda rows: [[None if v != v else v for v in row] for row in rows.cpu().tolist()]  # noqa: E731
        share, acc = nan_none(self.gen_share), nan_none(self.gen_acc)
        means = [None if not any(v is not None for v in r) else sum(v for v in r if v is not None) / sum(v is not None for v in r) for r in acc]
        return {"generated_class_share": share, "generated_class_acc": acc, "generated_acc": means, "evaluator_test_acc": float(self.evaluator_acc)}

    @torch.no_grad()
    def _images(self, task: Task) -> dict[str, Tensor]:
        """A 10 x 10 grid of the generator's samples after each task (fixed noise); first the generated-sample
        figures (here: after the Trainer's timed training and its evaluation)."""
        if self.cfg.eval_samples:
            self.measure_generator(task)
        was = self.gen.training
        self.gen.eval()
        if isinstance(self.gen, VAE):
            z = self.grid_noise[:, : self.gen.cfg.z_dim]
            x = self.gen.range.from_unit(torch.sigmoid(self.gen.decoder(z))).reshape(100, *self.gen.shape)
        else:
            x = self.gen.to_data(self.gen.raw(self.grid_noise))
        self.gen.train(was)
        return {f"samples_task{task.index}.png": image_grid(x, 10, self.gen.range.lo.flatten(), self.gen.range.hi.flatten()) if x.ndim == 2
                else image_grid(x, 10, self.gen.range.lo[0], self.gen.range.hi[0])}
