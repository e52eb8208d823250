"""PackNet (Mallya & Lazebnik, "PackNet: Adding Multiple Tasks to a Single Network by Iterative Pruning", CVPR 2018):
train a task on the free weights, prune the smallest of them by magnitude, retrain the rest, freeze them; each task
is predicted with the weights of the tasks up to it and its own head."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, Method, MethodReport
from metagate.nn.backbones import BackboneConfig
from metagate.nn.gates import BitMask


@METHODS.register("packnet")
class PackNet(Method):
    """PackNet (Mallya & Lazebnik, CVPR 2018; code ``arunmallya/packnet``, ``src/prune.py``, ``src/main.py``,
    ``src/scripts/run_sequence.sh``, read at 7b6032c).

    Every conv and linear weight of the backbone but the classifier (the code's ``shared`` part) has an owner: the
    task that trained it, or none (free). Task ``t`` takes every free weight (``make_finetuning_mask``,
    ``prune.py:125-137``) and trains them with its new head; weights owned by earlier tasks receive no gradient
    (``make_grads_zero``, ``prune.py:69-89``) but are used in the forward pass. Then the ``prune`` fraction of the
    task's own weights with the smallest magnitude is released, set to zero (``pruning_mask``: the
    ``round(prune * n)``-th smallest ``|w|`` is the cut, ``prune.py:26-48``; ``prune.py:60-67``), and the rest is
    retrained (``post_prune_epochs``) with the released weights held at zero (``make_pruned_zero``,
    ``prune.py:91-98``, after every step). Task ``t`` is predicted with the weights owned by tasks ``0..t`` and its
    head (``apply_mask``, ``prune.py:100-107``), so every earlier task's function is bit-identical forever (zero
    backward transfer). Each task's ownership is stored as a binary mask (1 bit per masked weight).

    Defaults as the code's sequence script (``run_sequence.sh``): training with SGD, momentum 0.9, ``lr = 1e-3``,
    decayed by 0.1 after half of it (``--lr_decay_every 10`` of ``--finetune_epochs 20``; ``utils.step_lr``),
    ``prune = 0.75`` of a task's weights (``PRUNE_STR 0.75,0.75,-1``: the last task is not pruned), retraining
    with ``lr = 1e-4`` (``retrain_lr`` null: a tenth of ``lr``, as 1e-4 is of 1e-3) for a third of the task
    (``--post_prune_epochs 10`` after 20), biases trained on the first task only (``TAG='nobias-nobn'``:
    ``--train_biases`` off after the ImageNet stage, which trains them), batch 32 (``main.py:45``); the classifier
    is a new ``nn.Linear`` per task.

    Differences, all deliberate:

    * The first task is trained from scratch (the code starts from an ImageNet VGG-16 pruned by 50%); the
      ``prune`` fraction applies to it as to the others (``prune_first``: its own fraction, the code's 0.5 for
      ImageNet).
    * The budget is the trainer's: a task's steps are split into training (``1 - retrain_fraction``, code: 20 of 30
      epochs) and retraining; ``trainer.lr`` / ``trainer.optimizer`` are unused (``lr``, ``retrain_lr``). The code
      keeps the epoch with the best test accuracy (``Manager.train``); here the last one is kept.
    * Pruning happens inside the step that starts the retraining, on the device (the cut is a ``kthvalue`` of the
      task's weights with the others set to infinity), so no step reads a value back.
    * A task-incremental stream gives each head one output per class with label masking (the code's heads have the
      task's classes only). A task never trained is predicted with every weight trained so far and its untrained
      head.
    """

    class Config(BaseMethodConfig):
        name: Literal["packnet"] = "packnet"
        backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(hidden=[256, 256]))
        prune: float = Field(0.75, ge=0, lt=1, description="fraction of a task's weights released after training (code: 0.75)")
        prune_first: float | None = Field(None, ge=0, lt=1, description="the first task's fraction (null: prune; code's ImageNet: 0.5)")
        prune_last: bool = Field(False, description="prune the stream's last task too (code: -1, not pruned)")
        lr: float = Field(1e-3, gt=0, description="SGD rate while a task trains (code: 1e-3)")
        lr_decay_at: float = Field(0.5, gt=0, le=1, description="fraction of the training phase after which the rate is multiplied by 0.1 (code: 10 of 20 epochs)")
        retrain_lr: float | None = Field(None, gt=0, description="SGD rate while the pruned task retrains (null: 0.1 x lr, the code's 1e-4 after 1e-3)")
        retrain_fraction: float = Field(1 / 3, ge=0, lt=1, description="share of a task's steps spent retraining after pruning (code: 10 of 30 epochs)")
        momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (code: 0.9)")
        train_biases: bool = Field(False, description="train biases after the first task (code: off, 'nobias')")

    name = "packnet"
    context_input_refusal = "packnet selects a task's weights by their owner (task identity); context_input is for methods without masks"
    per_task_heads_refusal = "packnet already trains a head per task (as the code): leave method.heads=shared"
    scenarios = ("task", "domain")
    cfg: Config

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        feat = self.model.head.in_features
        self.model.head = nn.Identity()  # type: ignore[assignment]
        rows = max(t.index for t in [*self.stream.tasks, *self.stream.heldout]) + 1
        self.heads = nn.ModuleList(nn.Linear(feat, self.stream.num_outputs) for _ in range(rows)).to(self.device)
        self.weight_names = [f"{n}.weight" for n, m in self.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        params = dict(self.model.named_parameters())
        shapes = [tuple(params[n].shape) for n in self.weight_names]
        # owner of each weight: 0 free, k the k-th trained task (the code's previous_masks); per task its bits
        for i, s in enumerate(shapes):
            self.register_buffer(f"owner_{i}", torch.zeros(s, dtype=torch.uint8, device=self.device))
        self.owned = nn.ModuleList(
            nn.ModuleList(BitMask(torch.zeros(s, dtype=torch.bool)) for s in shapes) for _ in range(rows)
        ).to(self.device)
        self.register_buffer("position", torch.full((rows,), -1, dtype=torch.long))  # training order (-1: not yet)
        self.register_buffer("tasks_trained", torch.zeros((), dtype=torch.long))
        self._dense: dict[int, list[Tensor]] = {}
        self._k = 0  # the current task's owner value (host side)
        self._training_index: int | None = None
        self._own: list[Tensor] = []
        self._step = 0
        self._phase_steps = (0, 0)
        self._cut: list[int] = []
        self.register_load_state_dict_post_hook(lambda module, _: module._dense.clear())

    def owners(self) -> list[Tensor]:
        return [getattr(self, f"owner_{i}") for i in range(len(self.weight_names))]

    # ---------------------------------------------------------------- forward

    def task_masks(self, task: Task) -> list[Tensor]:
        """Weights usable by ``task``: owned by it or an earlier task (``apply_mask``); a task not trained yet (or
        the one training) sees every weight trained so far and the free ones."""
        if task.index in self._dense:
            return self._dense[task.index]
        pos = int(self.position[task.index])  # read at evaluation, never in a training step
        if pos < 0 or task.index == self._training_index:
            return [torch.ones_like(o, dtype=torch.float32) for o in self.owners()]  # not cached: the owners change
        masks = [((o >= 1) & (o <= pos + 1)).float() for o in self.owners()]
        self._dense[task.index] = masks
        return masks

    def forward(self, x: Tensor, task: Task, task_ids: Tensor | None = None) -> Tensor:
        params = dict(self.model.named_parameters())
        if task.index == self._training_index:  # training: pruned weights are zero already, later tasks do not exist
            h = self.model(x)
        else:
            weights = {n: params[n] * m for n, m in zip(self.weight_names, self.task_masks(task))}
            h = functional_call(self.model, weights, (x,))
        return self.mask_logits(self.heads[task.index](h), task, task_ids)

    # ---------------------------------------------------------------- hooks

    def _sgd(self, lr: float) -> torch.optim.Optimizer:
        params = [p for p in [*self.model.parameters(), *self.heads[self._training_index].parameters()] if p.requires_grad]
        return torch.optim.SGD(params, lr=lr, momentum=self.cfg.momentum)

    @torch.no_grad()
    def before_task(self, task: Task) -> None:
        cfg, tc = self.cfg, self.trainer_cfg
        self._training_index = task.index
        self._dense.pop(task.index, None)
        first = int(self.tasks_trained) == 0
        self._k = int(self.tasks_trained) + 1
        free = []
        for o in self.owners():  # make_finetuning_mask
            free.append(int((o == 0).sum()))
            o.masked_fill_(o == 0, self._k)
        total = tc.iterations_per_task or self.epochs_for(task, tc.epochs) * -(-task.num_train // tc.batch_size)
        last = task.index == self.stream.tasks[-1].index
        prune = cfg.prune_first if first and cfg.prune_first is not None else cfg.prune
        retrain = 0 if (last and not cfg.prune_last) or prune == 0 else int(round(total * cfg.retrain_fraction))
        self._phase_steps = (total - retrain, retrain)
        self._cut = [int(round(prune * n)) for n in free]  # pruning_mask's cutoff_rank, over the task's own weights
        self._step = 0
        for m in self.model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                m.bias.requires_grad_(first or cfg.train_biases)
        self.heads.requires_grad_(False)
        self.heads[task.index].requires_grad_(True)
        self._own = [(o == self._k).float() for o in self.owners()]
        self.optimizer = self._sgd(cfg.lr)

    @torch.no_grad()
    def _prune(self) -> None:
        """``SparsePruner.prune`` on the device: release the ``cut`` smallest ``|w|`` the task owns, zero them."""
        params = dict(self.model.named_parameters())
        for name, o, cut, i in zip(self.weight_names, self.owners(), self._cut, range(len(self._cut))):
            if cut <= 0:
                continue
            w = params[name]
            mine = o == self._k
            value = torch.where(mine, w.abs(), torch.full_like(w, float("inf"))).flatten().kthvalue(cut).values
            remove = mine & (w.abs() <= value)
            o.masked_fill_(remove, 0)
            w.masked_fill_(remove, 0.0)
            self._own[i] = (o == self._k).float()
        retrain = self.cfg.retrain_lr if self.cfg.retrain_lr is not None else 0.1 * self.cfg.lr
        self.optimizer = self._sgd(retrain)  # main.py:256: a new SGD for the post-prune training

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        cfg = self.cfg
        train_steps = self._phase_steps[0]
        if self._step == train_steps and self._phase_steps[1] > 0:
            self._prune()
        if self._step < train_steps:
            lr = cfg.lr * (0.1 if self._step >= cfg.lr_decay_at * train_steps else 1.0)  # utils.step_lr
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self(batch.x, task, batch.task_ids), batch.y)
        loss.backward()
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, own in zip(self.weight_names, self._own):  # make_grads_zero: only the task's own weights train
                g = params[name].grad
                if g is not None:
                    g.mul_(own)
        self.optimizer.step()
        if self._step >= train_steps:  # make_pruned_zero (a no-op before pruning: nothing is free then)
            with torch.no_grad():
                for name, o in zip(self.weight_names, self.owners()):
                    params[name].masked_fill_(o == 0, 0.0)
        self._step += 1
        return {"loss": loss.detach()}

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        if self._phase_steps[1] > 0 and self._step <= self._phase_steps[0]:  # no retraining step ran: prune anyway
            self._prune()
        self.owned[task.index] = nn.ModuleList(BitMask(o == self._k) for o in self.owners()).to(self.device)
        self.position[task.index] = int(self.tasks_trained)
        self.tasks_trained += 1
        self.model.requires_grad_(True)
        self.heads[task.index].requires_grad_(False)
        self._training_index = None
        self._own = []
        self._dense.clear()

    def get_extra_state(self) -> dict[str, Any]:  # checkpoints fall between tasks; each phase makes its SGD afresh
        return {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------- figures

    @torch.no_grad()
    def unit_mask(self, task: Task) -> Tensor:
        """Which backbone weights the task uses (its own and its predecessors'), flattened."""
        return torch.cat([m.flatten() for m in self.task_masks(task)]).bool()

    def report(self, task: Task | None = None) -> MethodReport:
        """At the end of the stream: what it uses at test time, bytes per task (:meth:`_task_bytes`) and its own
        figures (:meth:`_figures`)."""
        out = super().report(task)
        if task is None:
            out.test_time_info = "task_id"  # a task's mask and head are chosen by its identity
            out.task_bytes = [self._task_bytes(t) for t in self.stream.tasks]
            out.figures.update(self._figures())
        return out

    def _task_bytes(self, task: Task) -> int:
        """The task's ownership bits (1 per masked weight) and its head (float32)."""
        return sum(m.nbytes for m in self.owned[task.index]) + sum(p.numel() for p in self.heads[task.index].parameters()) * 4

    @torch.no_grad()
    def _figures(self) -> dict[str, Any]:
        owners = torch.cat([o.flatten() for o in self.owners()])
        owned = [float(torch.cat([m.bool().flatten() for m in self.owned[t.index]]).float().mean()) for t in self.stream.tasks]
        return {"packnet": {"free_fraction": float((owners == 0).float().mean()), "owned_fraction": owned}}
