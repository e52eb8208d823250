"""Deep Generative Replay (Shin, Lee, Kim & Kim, "Continual Learning with Deep Generative Replay", NeurIPS
2017): a scholar (generator + solver) rehearses earlier tasks with generated inputs labelled by the previous
solver."""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, Method, MethodReport
from metagate.methods.components.generative import VAE, WGANGP, GeneratorConfig, image_grid


@METHODS.register("dgr")
class DGR(Method):
    """DGR (Shin et al. 2017). The scholar is a generator and a solver (the backbone). Training task ``t``
    (1-based), with ``G_{t-1}``, ``S_{t-1}`` the scholar frozen at the end of the previous task, each step

    * draws as many replayed inputs ``x' ~ G_{t-1}`` as the batch holds, labelled ``y' = argmax S_{t-1}(x')``;
    * trains the new generator on the real batch and ``x'``: its loss is ``r L(real) + (1 - r) L(replay)``
      (the mixing of real and replayed data with the importance ``r`` of the new task, paper Sec. 3, and as in
      kuc2477/pytorch-deep-generative-replay's ``train_a_batch``: the critic's and the VAE's losses weighted);
    * trains the new solver on ``r CE(S(x), y) + (1 - r) CE(S(x'), y')`` (paper, Sec. 3.2, the solver's loss).

    ``r = new_importance`` (default ``1/t``: every task so far weighs the same, the paper's choice for tasks of
    equal size; ``r = 1`` on the first task). Generators (:mod:`~metagate.methods.components.generative`):
    ``generator.kind=wgan_gp`` as in the paper (unconditional WGAN-GP; one critic update per batch, a generator
    update every ``critic_iters`` batches, Adam ``lr`` 1e-4, betas (0, 0.9)), or ``vae`` (van de Ven et al.
    2020's cheaper choice; set ``generator.lr=0.001``, ``beta1=0.9``, ``beta2=0.999``, ``z_dim=100`` as their code).
    The generator is not reset between tasks (the paper trains the new scholar from the old one).

    Labels by scenario: class-incremental: the previous solver's argmax over the classes of tasks ``< t``;
    domain-incremental: over all outputs; task-incremental: a replayed input is labelled for *every* earlier
    task, ``argmax`` over that task's classes, and its loss is the mean over those tasks of the label-masked
    cross-entropy (van de Ven et al.'s task-incremental replay; Shin et al. did not run this scenario).

    Differences: generator and solver are trained in the same steps (the paper trains the generator, then the
    solver, each for its own iterations); one batch of replayed samples per step for both.
    """

    class Config(BaseMethodConfig):
        name: Literal["dgr"] = "dgr"
        generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
        new_importance: float | None = Field(None, gt=0, le=1, description="weight r of the new task's data (null: 1/t at task t, 1-based)")
        reset_optimizer: bool = Field(True, description="fresh solver optimiser at every task")

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
        self.gen_steps = 0  # host mirror of the WGAN's step count within the task
        self.task_number = 0
        self.register_buffer("grid_noise", torch.randn(100, g.z_dim, generator=torch.Generator().manual_seed(0)).to(self.device))

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self.task_number = task.index + 1
        self.gen_steps = 0
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

    @torch.no_grad()
    def replay(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` inputs from the previous generator and the previous solver's labels: ``[n]`` (class and
        domain) or ``[t-1, n]`` (task-incremental: one label per earlier task)."""
        gen, solver = self.previous
        x = gen.generate(n)  # type: ignore[operator]
        logits = solver(x)
        if self.stream.scenario == "task":
            masked = logits.unsqueeze(0).masked_fill(~self._old_task_rows.unsqueeze(1), float("-inf"))
            return x, masked.argmax(-1)
        if self.stream.scenario == "class":
            logits = logits.masked_fill(~self._old_classes, float("-inf"))
        return x, logits.argmax(-1)

    def replay_loss(self, x: Tensor, y: Tensor, task: Task) -> Tensor:
        logits = self.model(x)
        if self.stream.scenario != "task":
            return F.cross_entropy(logits, y)
        rows = self._old_task_rows  # [k, outputs]
        masked = logits.unsqueeze(0).masked_fill(~rows.unsqueeze(1), float("-inf"))  # [k, n, outputs]
        return F.cross_entropy(masked.flatten(0, 1), y.flatten())

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        r = self.importance()
        replayed = self.replay(batch.x.shape[0]) if self.previous else None
        # the solver
        self.optimizer.zero_grad(set_to_none=True)
        loss_new = self.task_loss(batch, task)
        loss = loss_new if replayed is None else r * loss_new + (1 - r) * self.replay_loss(*replayed, task)
        loss.backward()
        self.optimizer.step()
        out = {"loss": loss.detach()}
        out.update(self.generator_step(batch.x, None if replayed is None else replayed[0], r))
        return out

    def generator_step(self, real: Tensor, replayed: Tensor | None, r: float) -> dict[str, Tensor]:
        if isinstance(self.gen, VAE):
            self.gen.opt.zero_grad(set_to_none=True)
            loss = self.gen.loss(real) if replayed is None else r * self.gen.loss(real) + (1 - r) * self.gen.loss(replayed)
            loss.backward()
            self.gen.opt.step()
            return {"generator_loss": loss.detach()}
        gan: WGANGP = self.gen  # type: ignore[assignment]
        out = {}
        if self.gen_steps > 0 and self.gen_steps % gan.cfg.critic_iters == 0:  # the code: a generator step, then critic_iters critic steps
            gan.g_opt.zero_grad(set_to_none=True)
            g_loss = gan.generator_loss(gan.generate(real.shape[0]))
            g_loss.backward()
            gan.g_opt.step()
        gan.c_opt.zero_grad(set_to_none=True)
        c_loss = gan.critic_loss(real, gan.generate(real.shape[0]))
        if replayed is not None:
            c_loss = r * c_loss + (1 - r) * gan.critic_loss(replayed, gan.generate(real.shape[0]))
        c_loss.backward()
        gan.c_opt.step()
        self.gen_steps += 1
        out["critic_loss"] = c_loss.detach()
        return out

    # ---------------------------------------------------------------- state, pictures

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
        """After each task, a grid of the generator's samples (:meth:`_images`)."""
        return MethodReport(images=self._images(task)) if task is not None else super().report()

    @torch.no_grad()
    def _images(self, task: Task) -> dict[str, Tensor]:
        """A 10 x 10 grid of the generator's samples after each task (fixed noise for the WGAN)."""
        self.gen.eval()
        if isinstance(self.gen, VAE):
            z = self.grid_noise[:, : self.gen.cfg.z_dim]
            x = self.gen.range.from_unit(torch.sigmoid(self.gen.decoder(z))).reshape(100, *self.gen.shape)
        else:
            x = self.gen.to_data(self.gen.raw(self.grid_noise))
        self.gen.train()
        return {f"samples_task{task.index}.png": image_grid(x, 10, self.gen.range.lo.flatten(), self.gen.range.hi.flatten()) if x.ndim == 2
                else image_grid(x, 10, self.gen.range.lo[0], self.gen.range.hi[0])}
