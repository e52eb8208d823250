"""PathNet (Fernando, Banarse, Blundell, Zwols, Ha, Rusu, Pritzel & Wierstra, "PathNet: Evolution Channels
Gradient Descent in Super Neural Networks", arXiv 1701.08734, 2017), in the continual-learning form of HAT's
re-implementation (Serrà et al., ICML 2018, code ``joansj/hat``): paths through layers of modules evolved by
binary tournament while they train, the best path frozen after each task, a head per task."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, Method, MethodReport, TrainingData
from metagate.nn.backbones import BackboneConfig
from metagate.nn.pathnet import PathNetwork, bank_params, matching_factor


@METHODS.register("pathnet")
class PathNet(Method):
    """PathNet (Fernando et al. 2017) as re-implemented for continual learning in HAT's code (``joansj/hat``,
    ``src/approaches/pathnet.py`` and ``src/networks/alexnet_pathnet.py``, read at 6fd0b9d).

    The network has ``L`` layers of ``M = modules`` modules each; a path names ``N = active`` modules per layer,
    and a layer's output is the sum of its path's modules' outputs (each module: linear or 3x3 conv, ReLU,
    dropout, pooling). Task ``t`` has its own head. While task ``t`` trains, a population of ``P = population``
    paths (HAT: 2, a binary tournament) is evolved:

    * at the start of the task every module not on an earlier task's best path is reset to its initial
      weights (``pathnet.py:50-58``, "reinit modules not in bestPath"); each path gets ``N`` distinct random
      modules per layer (``pathnet.py:61-72``);
    * ``generations`` times: each path in turn trains (plain SGD, gradients clipped to norm ``clipgrad``) on
      the modules of its path that no earlier best path holds (``unfreeze_path``, ``alexnet_pathnet.py:115-131``)
      for ``evals_per_path`` rounds, each round followed by the loss of that path on held-out data (its fitness). The
      model with the lowest fitness loss so far is kept (a snapshot) and its path is the winner; each path
      has its own learning rate, divided by ``lr_factor`` after ``lr_patience`` rounds without improving, and
      stops when it falls below ``lr_min`` (``pathnet.py:79-126``);
    * at the end of a generation the model goes back to the snapshot, and every other path becomes a copy of
      the winner in which each entry mutates with probability ``1 / (N L)`` by adding an integer in
      ``[-2, 2]`` modulo ``M`` (``pathnet.py:128-144``), with the winner's learning rate and a fresh patience;
    * after the last generation the winner is the task's best path, frozen for good (``pathnet.py:150``).

    A task is predicted with its best path and its head (task-aware inference). Frozen modules and earlier
    heads receive no update afterwards, so backward transfer is exactly zero.

    Defaults from HAT's code: ``M = 16``, ``N = 3`` ("better config found by us", ``alexnet_pathnet.py:27-31``;
    the paper's Sec. 2.4 / 2.5 configurations are ``M = 10, N = 3`` and ``M = 20, N = 5``), ``P = 2``,
    ``generations = 20`` ("grid search [5, 10, 20, 50, 100, 200]; best was 20"), SGD ``lr = 0.05``,
    ``lr_min = 1e-4``, ``lr_factor = 3``, ``lr_patience = 5``, ``clipgrad = 1000`` (``pathnet.py:12``,
    ``run.py``), ``evals_per_path = 10`` (``nepochs // generations`` with HAT's 200 epochs), and module widths
    ``width_factor`` times the backbone's, chosen so the modules hold about as many parameters as the backbone
    they replace (HAT: ``expand_factor = 0.258``, "match num params"; null here computes it).

    Differences, all deliberate:

    * The training budget is the trainer's: the task's steps (``trainer.epochs`` passes, or
      ``trainer.iterations_per_task``) are split evenly into ``generations x population x evals_per_path``
      rounds (HAT: rounds of one epoch, ``P x 200`` epochs a task). Fitness is scored on ``fitness_fraction``
      (10%) of the task's *training* data, held out from its training (a fixed split per task); HAT scores on
      a validation split it carves (10% too), but here the benchmark's validation split stays untouched, so
      PathNet's validation figures are held out like every other method's (issue 25). ``trainer.lr`` / ``trainer.optimizer`` are unused: the
      SGD step is applied by hand with each path's own learning rate.
    * The whole search runs on the device: the paths, fitness, winner and learning rates are tensors, and
      choosing, snapshotting and mutating are masked tensor operations, so a training step never waits on a
      read-back. Where HAT stops early (every path's rate below ``lr_min``) the remaining steps are computed
      and discarded (zero updates): the same result.
    * Modules are applied as in HAT's AlexNet (ReLU, dropout, max-pooling per module, summed) over metagate's
      layouts: ``kind=mlp`` (a linear bank per hidden layer; HAT has no MLP PathNet) or ``kind=cnn`` (3x3
      conv banks, padding 1, 2x2 pooling, then linear banks); dropout is ``backbone.dropout`` on linear
      modules and none on conv modules. A task-incremental stream gives each head one output per class with
      label masking (HAT's heads have the task's classes only: the same function).
    * A task never trained is predicted with modules ``0 .. N-1`` of every layer (HAT's unset best path is
      ``-1``, the last module ``N`` times).
    """

    class Config(BaseMethodConfig):
        name: Literal["pathnet"] = "pathnet"
        backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(hidden=[256, 256]))
        modules: int = Field(16, ge=1, description="M, modules per layer (HAT: 16)")
        active: int = Field(3, ge=1, description="N, modules of a layer on a path (HAT: 3)")
        width_factor: float | None = Field(
            None, gt=0, le=1, description="module width / backbone layer width (null: match the backbone's parameters, HAT's rule)"
        )
        population: int = Field(2, ge=2, description="P, paths in the tournament (HAT: 2, binary)")
        generations: int = Field(20, ge=1, description="tournament generations per task (HAT: 20)")
        evals_per_path: int = Field(10, ge=1, description="training rounds of a path per generation, each then scored on the held-out training data (HAT: 200 // 20)")
        lr: float = Field(0.05, gt=0, description="SGD learning rate of every path at the task's start (HAT: 0.05)")
        lr_min: float = Field(1e-4, gt=0, description="a path whose rate falls below this stops (HAT: 1e-4)")
        lr_factor: float = Field(3.0, gt=1, description="rate divisor after lr_patience rounds without improving (HAT: 3)")
        lr_patience: int = Field(5, ge=1, description="rounds without a better fitness loss before the rate drops (HAT: 5)")
        clipgrad: float = Field(1000.0, gt=0, description="gradient norm clip (HAT: 1000)")
        fitness_fraction: float = Field(
            0.1, gt=0, lt=1, description="share of each task's training data held out from its training to score paths (not the validation split)"
        )

        @model_validator(mode="after")
        def _fits(self) -> "PathNet.Config":
            if self.active > self.modules:
                raise ValueError(f"active={self.active} modules per path cannot exceed modules={self.modules} per layer")
            return self

    name = "pathnet"
    context_input_refusal = "pathnet selects a task's modules by its path (task identity); context_input is for methods without paths"
    per_task_heads_refusal = "pathnet already trains a head per task: leave method.heads=shared"
    scenarios = ("task", "domain")
    cfg: Config

    @classmethod
    def config_problem(cls, cfg: BaseMethodConfig) -> str | None:
        problem = super().config_problem(cfg)
        if problem:
            return problem
        if cfg.backbone.kind not in ("mlp", "cnn"):
            return f"pathnet builds its module banks over an mlp or cnn layout, not {cfg.backbone.kind}"
        if not cfg.backbone.gated_widths():
            return "pathnet needs at least one hidden layer to hold modules, e.g. method.backbone.hidden=[256, 256]"
        return None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        cfg, bb = self.cfg, self.cfg.backbone
        shape = self.stream.input_shape
        channels = bb.channels if bb.kind == "cnn" else []
        backbone_params = sum(p.numel() for n, p in self.model.named_parameters() if not n.startswith("head."))
        self.width_factor = cfg.width_factor or matching_factor(bb.kind, shape, channels, bb.hidden, cfg.modules, backbone_params)
        rows = max(t.index for t in [*self.stream.tasks, *self.stream.heldout]) + 1
        self.model = PathNetwork(  # type: ignore[assignment]
            bb.kind, shape, channels, bb.hidden, cfg.modules, self.width_factor, self.stream.num_outputs, rows, bb.dropout
        ).to(self.device)
        self.bank_params = bank_params(bb.kind, shape, channels, bb.hidden, cfg.modules, self.width_factor)
        L, M, N, P = self.model.num_layers, cfg.modules, cfg.active, cfg.population
        dev = self.device
        # kept across tasks (checkpointed)
        self.register_buffer("best_path", torch.arange(N, device=dev).repeat(rows, L, 1))  # [rows, L, N]
        self.register_buffer("trained", torch.zeros(rows, dtype=torch.bool, device=dev))
        self.register_buffer("frozen", torch.zeros(L, M, dtype=torch.bool, device=dev))
        for i, bank in enumerate(self.model.banks):
            self.register_buffer(f"initial_weight_{i}", bank.weight.detach().clone())
            self.register_buffer(f"initial_bias_{i}", bank.bias.detach().clone())
        # the tournament of the task in training (rebuilt at every task)
        self.register_buffer("paths", torch.zeros(P, L, N, dtype=torch.long, device=dev), persistent=False)
        self.register_buffer("path_lr", torch.zeros(P, device=dev), persistent=False)
        self.register_buffer("path_best", torch.zeros(P, device=dev), persistent=False)
        self.register_buffer("patience", torch.zeros(P, device=dev), persistent=False)
        self.register_buffer("best_overall", torch.zeros((), device=dev), persistent=False)
        self.register_buffer("winner", torch.zeros((), dtype=torch.long, device=dev), persistent=False)
        self.register_buffer("path_ids", torch.arange(P, device=dev), persistent=False)
        self._snapshot: list[Tensor] = []
        self._current: int | None = None
        self._ends: list[int] = []
        self._segment = 0
        self._step = 0
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=cfg.lr)  # unused: updates are applied by hand

    # ---------------------------------------------------------------- paths

    def layer_mask(self, path: Tensor) -> Tensor:
        """``[L, M]`` bool: the modules ``path`` (``[L, N]``) uses."""
        return torch.zeros_like(self.frozen).scatter_(1, path, True)

    def winner_path(self) -> Tensor:
        return self.paths.index_select(0, self.winner.view(1))[0]

    def task_path(self, task: Task) -> Tensor:
        """The task's best path; while it trains, the current winner's."""
        return self.winner_path() if task.index == self._current else self.best_path[task.index]

    def forward(self, x: Tensor, task: Task, task_ids: Tensor | None = None, path: Tensor | None = None) -> Tensor:
        path = self.task_path(task) if path is None else path
        return self.mask_logits(self.model(x, path, task.index, self.training), task, task_ids)

    def unit_mask(self, task: Task) -> Tensor:
        """The modules the task's path uses, over all ``L x M`` modules, flattened."""
        return self.layer_mask(self.task_path(task)).flatten()

    def _params(self, task: Task) -> list[Tensor]:
        """What one task's training can change: the module banks and the task's head."""
        head = self.model.heads[task.index]
        return [t for b in self.model.banks for t in (b.weight, b.bias)] + [head.weight, head.bias]

    # ---------------------------------------------------------------- hooks

    def fitness_split(self, task: Task) -> tuple[Tensor, Tensor]:
        """Indices of the task's training data that train it and of those that score its paths (``fitness_fraction``
        of them, at least one): a fixed split per task (its own generator, so the run's random stream is unchanged)."""
        cached = getattr(self, "_fitness_split", None)
        if cached is not None and cached[0] == (task.index, task.num_train):
            return cached[1]
        n = task.num_train
        gen = torch.Generator().manual_seed(1_000_003 * (task.index + 1))
        order = torch.randperm(n, generator=gen).to(task.y_train.device)
        k = min(max(1, round(self.cfg.fitness_fraction * n)), n - 1)
        split = (order[k:].sort().values, order[:k].sort().values)
        self._fitness_split = ((task.index, task.num_train), split)
        return split

    def training_data(self, task: Task) -> TrainingData:
        train, _ = self.fitness_split(task)
        return TrainingData(task.x_train[train], task.y_train[train])

    def before_task(self, task: Task) -> None:
        cfg, tc = self.cfg, self.trainer_cfg
        if task.num_train < 2:
            raise ValueError("pathnet holds out part of a task's training data to score its paths: the task needs 2 samples or more")
        steps = tc.iterations_per_task or tc.epochs * math.ceil(len(self.fitness_split(task)[0]) / tc.batch_size)
        rounds = cfg.generations * cfg.population * cfg.evals_per_path
        if steps < rounds:
            raise ValueError(
                f"pathnet splits a task's {steps} steps into generations x population x evals_per_path = {rounds} rounds; "
                "give it more steps (trainer.epochs / trainer.iterations_per_task) or fewer generations / evals_per_path"
            )
        self._ends = [(j + 1) * steps // rounds for j in range(rounds)]
        self._segment, self._step, self._current = 0, 0, task.index
        L, M, N, P = self.model.num_layers, cfg.modules, cfg.active, cfg.population
        with torch.no_grad():
            for i, bank in enumerate(self.model.banks):  # modules on no best path start again from their initial weights
                keep = self.frozen[i]
                bank.weight.copy_(torch.where(keep.view(-1, *[1] * (bank.weight.ndim - 1)), bank.weight, getattr(self, f"initial_weight_{i}")))
                bank.bias.copy_(torch.where(keep.view(-1, 1), bank.bias, getattr(self, f"initial_bias_{i}")))
            self.paths.copy_(torch.rand(P, L, M, device=self.device).argsort(-1)[..., :N])  # N distinct modules per layer
            self.path_lr.fill_(cfg.lr)
            self.path_best.fill_(math.inf)
            self.patience.fill_(cfg.lr_patience)
            self.best_overall.fill_(math.inf)
            self.winner.zero_()
            self._snapshot = [p.detach().clone() for p in self._params(task)]

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        cfg = self.cfg
        p = (self._segment // cfg.evals_per_path) % cfg.population
        params = self._params(task)
        for t in params:
            t.grad = None
        loss = F.cross_entropy(self(batch.x, task, batch.task_ids, path=self.paths[p]), batch.y)
        loss.backward()
        with torch.no_grad():
            trainable = self.layer_mask(self.paths[p]) & ~self.frozen  # unfreeze_path: on the path, on no best path
            grads = []
            for i, bank in enumerate(self.model.banks):
                keep = trainable[i].to(bank.weight.dtype)
                grads += [bank.weight.grad * keep.view(-1, *[1] * (bank.weight.ndim - 1)), bank.bias.grad * keep.view(-1, 1)]
            grads += [params[-2].grad, params[-1].grad]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            coef = (cfg.clipgrad / (norm + 1e-6)).clamp(max=1.0)  # clip_grad_norm
            step = self.path_lr[p] * coef * (self.path_lr[p] >= cfg.lr_min)  # a stopped path trains no more
            for t, g in zip(params, grads):
                t.sub_(step * g)
        for t in params:
            t.grad = None
        self._step += 1
        while self._segment < len(self._ends) and self._ends[self._segment] == self._step:
            self._end_round(task, self._segment)
            self._segment += 1
        return {"loss": loss.detach()}

    @torch.no_grad()
    def fitness_loss(self, task: Task, path: Tensor) -> Tensor:
        """Mean cross-entropy of ``path`` on the task's held-out training data (:meth:`fitness_split`), dropout off
        (a device scalar)."""
        _, held = self.fitness_split(task)
        x, y = task.x_train[held], task.y_train[held]
        total = x.new_zeros(())
        bs = self.trainer_cfg.eval_batch_size
        for start in range(0, y.shape[0], bs):
            logits = self.mask_logits(self.model(x[start : start + bs], path, task.index, False), task)
            total = total + F.cross_entropy(logits, y[start : start + bs], reduction="sum")
        return total / y.shape[0]

    @torch.no_grad()
    def _end_round(self, task: Task, j: int) -> None:
        """After a path's training round: its fitness, the snapshot of the best model, its learning rate; after
        a generation's last round, back to the snapshot and the losers replaced by mutants of the winner."""
        cfg = self.cfg
        P, R = cfg.population, cfg.evals_per_path
        p = (j // R) % P
        val = self.fitness_loss(task, self.paths[p])
        live = self.path_lr[p] >= cfg.lr_min
        better = live & (val < self.best_overall)  # pathnet.py:106-110
        for snap, t in zip(self._snapshot, self._params(task)):
            snap.copy_(torch.where(better, t, snap))
        self.winner.copy_(torch.where(better, p, self.winner))
        self.best_overall.copy_(torch.where(better, val, self.best_overall))
        improved = val < self.path_best[p]  # pathnet.py:113-125
        patience = torch.where(improved, float(cfg.lr_patience), self.patience[p] - 1)
        decay = ~improved & (patience <= 0)
        lr = torch.where(decay, self.path_lr[p] / cfg.lr_factor, self.path_lr[p])
        patience = torch.where(decay, float(cfg.lr_patience), patience)
        self.path_best[p] = torch.where(live & improved, val, self.path_best[p])
        self.patience[p] = torch.where(live, patience, self.patience[p])
        self.path_lr[p] = torch.where(live, lr, self.path_lr[p])
        if p != P - 1 or j % R != R - 1:
            return
        for snap, t in zip(self._snapshot, self._params(task)):  # pathnet.py:129: restore the best model
            t.copy_(snap)
        L, M, N = self.model.num_layers, cfg.modules, cfg.active
        won = self.winner_path().expand(P, L, N)
        flip = torch.rand(P, L, N, device=self.device) < 1.0 / (N * L)  # pathnet.py:134-144
        shift = torch.randint(-2, 3, (P, L, N), device=self.device)
        mutants = torch.where(flip, torch.remainder(won + shift, M), won)
        loser = self.path_ids != self.winner
        self.paths.copy_(torch.where(loser.view(P, 1, 1), mutants, self.paths))
        self.path_best.copy_(torch.where(loser, math.inf, self.path_best))
        self.path_lr.copy_(torch.where(loser, self.path_lr.index_select(0, self.winner.view(1)), self.path_lr))
        self.patience.copy_(torch.where(loser, float(cfg.lr_patience), self.patience))

    def after_task(self, task: Task) -> None:
        with torch.no_grad():
            best = self.winner_path()
            self.best_path[task.index] = best  # pathnet.py:150
            self.trained[task.index] = True
            self.frozen |= self.layer_mask(best)
        self._current = None
        self._snapshot = []

    # no optimiser state: every path's SGD is stateless, and checkpoints fall between tasks
    def get_extra_state(self) -> dict[str, Any]:
        return {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------- figures

    def report(self, task: Task | None = None) -> MethodReport:
        """Each task is predicted through its own path and head (its identity at test); bytes per task and the paths'
        figures: :meth:`_task_bytes`, :meth:`_path_figures`."""
        out = super().report(task)
        if task is None:
            out.test_time_info = "task_id"
            out.task_bytes = [self._task_bytes(t) for t in self.stream.tasks]
            out.figures.update(self._path_figures())
        return out

    def _task_bytes(self, task: Task) -> int:
        """What the task adds to storage: its path (one byte per module index) and its head (float32)."""
        return self.best_path[task.index].numel() * (1 if self.cfg.modules <= 256 else 2) + sum(
            p.numel() * 4 for p in self.model.heads[task.index].parameters()
        )

    @torch.no_grad()
    def _path_figures(self) -> dict[str, Any]:
        """The best path of every trained task, the modules it uses per layer, how many of them earlier tasks
        had frozen already (reuse), how many it froze anew, and the share of all modules frozen at the end."""
        seen = torch.zeros_like(self.frozen)
        paths, used, reused, new = [], [], [], []
        for t in self.stream.tasks:
            if not bool(self.trained[t.index]):
                continue
            mask = self.layer_mask(self.best_path[t.index])
            paths.append(self.best_path[t.index].tolist())
            used.append(mask.sum(1).tolist())
            reused.append(int((mask & seen).sum()))
            new.append(int((mask & ~seen).sum()))
            seen |= mask
        return {
            "pathnet": {
                "modules": self.cfg.modules,
                "active": self.cfg.active,
                "layers": self.model.num_layers,
                "module_widths": self.model.widths,
                "width_factor": self.width_factor,
                "bank_params": self.bank_params,
                "paths": paths,
                "modules_used_per_layer": used,
                "modules_reused": reused,
                "modules_newly_frozen": new,
                "frozen_fraction": float(self.frozen.float().mean()),
            }
        }
