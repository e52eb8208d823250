"""MARK (Hurtado, Raymond & Soto, "Optimizing Reusable Knowledge for Continual Learning via Metalearning",
NeurIPS 2021): a convolutional knowledge base shared by all tasks, queried per sample by per-task mask
functions, and enriched by meta-learning."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.func import functional_call

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, Method, MethodReport

# --------------------------------------------------------------------------- networks


def conv_plan(size: int, blocks: int, kernels: str) -> list[tuple[int, int]]:
    """(kernel, padding) per conv block for square inputs of side ``size``. ``code``: the official code's
    unpadded kernels ``size // 8``, ``size // 10``, ``2`` (``models/conv.py:20``; F^t uses the first two,
    ``conv.py:103,108``); ``3x3``: 3x3 with padding 1 (any input size, e.g. 8x8 digits)."""
    if kernels == "3x3":
        return [(3, 1)] * blocks
    ks = [size // 8, size // 10, 2][:blocks]
    if blocks > 3 or min(ks) < 1:
        raise ValueError(
            f"method.kernels=code gives kernels {ks} for {size}x{size} inputs and at most 3 blocks "
            f"(asked: {blocks}); the code's sizes need inputs of at least 20x20 and 3 KB blocks: use method.kernels=3x3"
        )
    return [(k, 0) for k in ks]


def _side_after(side: int, plan: list[tuple[int, int]]) -> int:
    for k, pad in plan:
        side = side + 2 * pad - k + 1
        if side < 1:
            raise ValueError(f"the conv blocks {plan} leave no pixels; use method.kernels=3x3 or fewer blocks")
        side = side // 2 if side >= 2 else side
    return side


def _pool(h: Tensor) -> Tensor:
    """2x2 max-pool (sides shorter than 2 are left alone)."""
    kh, kw = (2 if h.shape[2] >= 2 else 1), (2 if h.shape[3] >= 2 else 1)
    return F.max_pool2d(h, (kh, kw)) if (kh, kw) != (1, 1) else h


class KnowledgeBase(nn.Module):
    """The KB (``models/conv.py`` ``Shared``): conv -> ReLU -> 2x2 max-pool per block, each block's output
    multiplied by its mask (per sample and channel), then flatten -> linear -> ReLU -> dropout."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int], latent: int, kernels: str, dropout: float) -> None:
        super().__init__()
        c, size, _ = input_shape
        plan = conv_plan(size, len(channels), kernels)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, k, padding=p) for a, b, (k, p) in zip([c, *channels[:-1]], channels, plan))
        side = _side_after(size, plan)
        self.fc = nn.Linear(channels[-1] * side * side, latent)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.widths = list(channels)

    def forward(self, x: Tensor, masks: list[Tensor] | None = None) -> Tensor:
        h = x
        for i, conv in enumerate(self.convs):
            h = _pool(torch.relu(conv(h)))
            if masks is not None:
                h = h * masks[i][:, :, None, None]
        return self.dropout(torch.relu(self.fc(h.flatten(1))))


class FeatureExtractor(nn.Module):
    """F^t (``models/conv.py:101-117``): conv -> batch norm -> ReLU -> 2x2 max-pool per block, then
    flatten -> linear -> ReLU."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int], latent: int, kernels: str) -> None:
        super().__init__()
        c, size, _ = input_shape
        plan = conv_plan(size, len(channels), kernels)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, k, padding=p) for a, b, (k, p) in zip([c, *channels[:-1]], channels, plan))
        self.norms = nn.ModuleList(nn.BatchNorm2d(b) for b in channels)
        self.fc = nn.Linear(channels[-1] * _side_after(size, plan) ** 2, latent)

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for conv, norm in zip(self.convs, self.norms):
            h = _pool(torch.relu(norm(conv(h))))
        return torch.relu(self.fc(h.flatten(1)))


class MaskFunction(nn.Module):
    """M^t (``models/conv.py:125-134``, ``151-155``): one linear layer + activation per KB block, from
    F^t's features to a scale per channel of that block, per sample."""

    def __init__(self, latent: int, widths: list[int], activation: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(latent, w) for w in widths)
        self.activation = torch.relu if activation == "relu" else torch.sigmoid

    def forward(self, features: Tensor) -> list[Tensor]:
        return [self.activation(layer(features)) for layer in self.layers]


class MarkNet(nn.Module):
    """The KB, and per task (trained and held-out, by slot) F^t, M^t and the head C^t."""

    def __init__(self, cfg: "Mark.Config", input_shape: tuple[int, ...], classes: list[int]) -> None:
        super().__init__()
        self.kb = KnowledgeBase(input_shape, cfg.kb_channels, cfg.latent, cfg.kernels, cfg.kb_dropout)
        self.features = nn.ModuleList(FeatureExtractor(input_shape, cfg.f_channels, cfg.latent, cfg.kernels) for _ in classes)
        self.masks = nn.ModuleList(MaskFunction(cfg.latent, cfg.kb_channels, cfg.mask_activation) for _ in classes)
        self.heads = nn.ModuleList(nn.Linear(cfg.latent, n) for n in classes)


# --------------------------------------------------------------------------- the meta step's pieces


class Plateau(NamedTuple):
    """``torch.optim.lr_scheduler.ReduceLROnPlateau(mode=min, factor, patience, threshold, rel)`` kept
    on the device: the learning rate, the best loss and the count of steps without improvement."""

    lr: Tensor
    best: Tensor
    bad: Tensor


def plateau_step(state: Plateau, loss: Tensor, factor: float = 0.5, patience: int = 5, threshold: float = 1e-3, eps: float = 1e-8) -> Plateau:
    """One ``ReduceLROnPlateau.step(loss)`` (torch's rule: better = loss < best * (1 - threshold); after
    more than ``patience`` steps that are not, lr *= factor when that changes it by more than ``eps``)."""
    better = loss < state.best * (1 - threshold)
    best = torch.where(better, loss, state.best)
    bad = torch.where(better, torch.zeros_like(state.bad), state.bad + 1)
    reduce = bad > patience
    new_lr = state.lr * factor
    lr = torch.where(reduce & (state.lr - new_lr > eps), new_lr, state.lr)
    return Plateau(lr, best, torch.where(reduce, torch.zeros_like(bad), bad))


def sgd_step(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None], lr: Tensor | float, momentum: float, weight_decay: float) -> None:
    """``torch.optim.SGD``'s update (dampening 0, not Nesterov) in place, with a learning rate that may
    be a device tensor: ``g += wd * p; buf = momentum * buf + g (buf = g at first); p -= lr * buf``."""
    with torch.no_grad():
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.add(p, alpha=weight_decay) if weight_decay else g
            if momentum:
                bufs[i] = g.clone() if bufs[i] is None else bufs[i].mul_(momentum).add_(g)  # type: ignore[union-attr]
                g = bufs[i]  # type: ignore[assignment]
            p.sub_(g * lr)


def clip_norm(grads: list[Tensor], max_norm: float) -> list[Tensor]:
    """``torch.nn.utils.clip_grad_norm_``'s rule on a list of gradients, without a host sync: scaled by
    ``min(1, max_norm / (total L2 norm + 1e-6))``."""
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    return [g * coef for g in grads]


def weighted_kb_direction(deltas: list[list[Tensor]], accs: Tensor) -> list[Tensor]:
    """``sum_i w_i * delta_i / K`` per KB tensor, ``w_i = acc_i / sum_j acc_j`` (``approach.py:151-156``);
    equal weights when every mini-task scored 0 (the code divides by zero there)."""
    k = len(deltas)
    total = accs.sum()
    w = torch.where(total > 0, accs / total.clamp_min(1e-12), torch.full_like(accs, 1.0 / k))
    return [sum(w[i] * deltas[i][j] for i in range(k)) / k for j in range(len(deltas[0]))]  # type: ignore[misc]


# --------------------------------------------------------------------------- the method


Phase = Literal["features", "pretrain", "masks", "kb_sgd", "final"]


@METHODS.register("mark")
class Mark(Method):
    """MARK (Hurtado, Raymond & Soto, "Optimizing Reusable Knowledge for Continual Learning via Metalearning",
    NeurIPS 2021, arXiv 2106.05390; code ``JuliousHurtado/meta-training-setup``, read at commit 0799c70:
    ``models/conv.py``, ``approach.py``, ``utils.py``, ``main.py``, ``configs/config_cifar100.yml``).

    A knowledge base (KB: conv blocks, then a linear layer to a latent vector) is shared by all tasks. Task
    ``t`` owns a feature extractor F^t (a small conv net with batch norm), a mask function M^t (per KB block,
    linear + ReLU from F^t's features to one scale per channel, per sample) and a head C^t. A sample of task
    ``t`` is classified as ``C^t(KB(x; M^t(F^t(x))))``: each KB block's output (after ReLU and max-pool) is
    multiplied by its mask. The task is given at test (task-incremental streams).

    Per task, in the code's order (``approach.py:191-281``), each epoch-phase ``trainer.epochs`` passes over
    the task's training data (the code's ``feats_epochs``, 50):

    1. **features**: F^t and a temporary linear classifier, SGD(``lr_task``, momentum 0.9, weight decay 0.01),
       gradient norms clipped to 0.5 (F^t and the classifier separately); then F^t is frozen
       (``train_representation``, ``approach.py:12-63``).
    2. **pretrain** (first task only, ``pre_train_shared``): the KB and C^0 without masks, SGD(``lr_task``,
       0.9, 0.01) (``approach.py:219-230``).
    3. **masks**: M^t and C^t with the KB masked, SGD(``lr_task``, 0.9, 0.01) (``approach.py:234-244``).
    4. **KB update** (``kb_update``): ``meta`` (``approach.py:249-266``, ``meta_training``): ``meta_epochs``
       times, ``mini_tasks`` mini-tasks, each one batch of the task drawn in turn from a fresh shuffled pass;
       for each, a copy of the KB and a fresh linear classifier take ``inner_steps`` SGD steps (``lr_meta``,
       momentum 0.9, weight decay 0.1, ReduceLROnPlateau(0.5, patience 5, threshold 1e-3) on the step's loss)
       on that batch with the task's masks; its accuracy on the batch afterwards (train mode) weights its KB
       change ``delta_i = theta_i - theta``; the KB then takes one SGD step (``outer_lr`` = ``lr_meta`` x 0.1,
       weight decay 0.1, no momentum; made anew every meta-epoch) along ``D = sum_i w_i delta_i / K`` with
       ``w_i = acc_i / sum_j acc_j``. ``sgd`` (the paper's "without meta-learning" ablation, ``use_meta=False``):
       an epoch-phase training the KB and C^t on the task with its masks, SGD(``outer_lr``, weight decay 0.1).
       ``none``: the KB is not updated.
    5. **final**: M^t and C^t again, a fresh SGD(``lr_task``, 0.9, 0.01) (``approach.py:270-281``).

    **The meta step's direction** (``meta_direction``). The code (``approach.py:151-161``, ``utils.py:70-84``)
    writes ``D = sum_i w_i (new_i - old) / K`` into the KB's ``.grad`` and calls ``SGD.step()``, so the KB moves
    to ``theta - outer_lr * (D + 0.1 theta)``: *against* the mini-tasks' weighted change. The paper describes the
    KB update as meta-learning in the manner of Reptile: the mini-tasks' weight changes, averaged with accuracy
    weights, are applied to the KB at the meta learning rate, i.e. the KB moves *toward* the adapted weights,
    ``theta + outer_lr * D`` (only the paper's abstract and introduction could be read where this was written;
    the rule follows the issue's reading of the paper's algorithm and Reptile's update, which the code's
    ``meta_training`` follows in every other respect). ``toward`` (default) implements that; ``away`` reproduces
    the code's sign; nothing else differs between the two (weights, ``1 / K``, weight decay, rates). Default
    ``toward``: it is the stated rule, and with ``away`` the "meta-learning" undoes what the mini-tasks learned.
    ``mark_meta_alignment`` in ``results.json`` is the cosine between each task's KB change over its meta phase
    and the summed ``D`` (+1 toward, -1 against, when the step on ``D`` outweighs the weight decay; ``D`` itself
    is mostly the inner loop's weight decay, so at the code's rates both signs read about +1). Measured
    (``experiments/mark_split_fmnist.sh``, ``mark-split-fmnist``, seeds 0-2, at commit 681358a): at the code's
    rates the meta phase moves the KB by 3.3e-4 (toward) or 2.8e-4 (away) of its norm per task and ACC is
    96.9 ± 1.8% either way, BWT 0.0; with a 100x larger step on ``D`` (``outer_lr=0.1``, decay 0.001; seeds 0-1)
    the KB moves 2.8e-3 / 2.2e-3 per task with alignment +1.00 / -1.00, and ACC is still 95.7 ± 0.6% for both.
    On this stream the KB's meta-learning does not change accuracy in either direction (``freeze_kb_after=1``
    gives the same 96.9%): the masks and heads carry the tasks.

    Ablations of the paper's ablation study: ``kb_update=sgd`` (no meta-learning: the KB trains by SGD on the
    task, the code's ``use_meta=False``), ``masks=false`` (the KB unmasked; the code's ``use_mask=False`` replaces
    the masks by ones), ``freeze_kb_after=1`` (the KB trained on the first task only, then frozen).

    Defaults are the code's CIFAR-100 configuration (``configs/config_cifar100.yml`` and ``main.py``'s flags):
    ``lr_task=0.1``, ``lr_meta=0.01``, ``latent=128``, batch 128 (``trainer.batch_size``), 50 epochs per phase
    (``feats_epochs``; ``trainer.epochs``), ``meta_epochs=10``, ``mini_tasks=10``, ``inner_steps=40``, KB blocks
    64, 128, 256 channels (``conv.py:180``), F^t 32, 32 channels (``conv.py:87``), ReLU masks (``use_relu``),
    dropout 0.5 after the KB's linear layer (``conv.py:37``). See ``configs/mark-*.yaml``.

    Differences from the code, all deliberate:

    * Heads: each C^t has one output per class of its task, written into the stream's label-masked logits
      (the same cross-entropy as the code's per-task head). The temporary classifiers (phase 1, mini-tasks)
      are as in the code.
    * ``kernels=3x3`` (3x3 convolutions with padding 1) for inputs the code's kernel formula cannot take
      (8x8 digits); ``kernels=code`` (default) uses the code's sizes. Grey-scale inputs have 1 channel.
    * The mini-task inner loop runs on tensor copies of the KB's weights (``torch.func.functional_call``)
      with torch's SGD and ReduceLROnPlateau rules re-written to keep the learning rate on the device
      (:func:`sgd_step`, :func:`plateau_step`; a test checks them against torch's classes), so a training step
      reads nothing back from the device. The masks of a mini-task are computed once (F^t and M^t are fixed
      during it and its batch does not change: the code recomputes the same values at each inner step);
      F^t's batch-norm running statistics are left as they were (the code updates them on a copy it discards).
    * Mini-task ``k`` of a meta-epoch is slice ``k`` of a fresh permutation of the task's training data, always
      ``mini_task_size`` (default ``trainer.batch_size``) samples, further permutations appended when the task
      has fewer than ``mini_tasks x size`` samples (the code takes batch ``k`` of a fresh shuffled loader, whose
      last batch may be smaller, and restarts the loader when it runs out).
    * A mini-task whose inner loop diverges (non-finite weights) gets weight 0 and change 0 (the code would
      write NaN into the KB: on split Fashion-MNIST, seed 2, task 1, one of them ended the run with a NaN loss);
      ``mark_meta_diverged_mini_tasks`` counts them per task. The accuracy weights fall back to equal weights
      when all mini-tasks score 0 (the code divides by 0).
    * ``inner_clip`` (off by default, as in the code) clips the inner loop's gradient norms as the code's
      commented-out lines would (0.5). ``mark-split-fmnist`` turns it on: with the code's rates the 2-class
      Fashion-MNIST tasks drive the masked KB's logits so high (training loss exactly 0) that on seed 2, task 1,
      11 of 30 mini-tasks diverged and a finite one moved the KB to 2.7e17.
    * With ``masks=false`` F^t and M^t are not trained (nothing reads them; the code trains F^t anyway).
    * The meta-learning phase runs inside the training step that starts phase 5 (the Trainer counts the
      epoch-phases through :meth:`epochs_for`); ``trainer.lr`` / ``trainer.optimizer`` are unused (MARK's
      phases have their own SGDs); ``trainer.iterations_per_task`` is refused.
    * Data: metagate's split streams (standardised inputs, no augmentation, the code has none either); the
      code's validation split (15%) is metagate's ``benchmark.val_fraction``.
    """

    class Config(BaseMethodConfig):
        name: Literal["mark"] = "mark"
        lr_task: float = Field(0.1, gt=0, description="SGD rate of F^t, the KB's pre-training, M^t and C^t (code: lr_task 0.1)")
        lr_meta: float = Field(0.01, gt=0, description="SGD rate of a mini-task's inner loop (code: lr_meta 0.01)")
        outer_lr: float | None = Field(
            None, gt=0, description="rate of the KB's meta step and of kb_update=sgd (code: lr_meta * 0.1; None: that)"
        )
        latent: int = Field(128, ge=1, description="F^t's and the KB's output size (code: latent_dim 128)")
        kb_channels: list[int] = Field(default_factory=lambda: [64, 128, 256], min_length=1, description="KB conv blocks (code: 64, 128, 256)")
        f_channels: list[int] = Field(default_factory=lambda: [32, 32], min_length=1, description="F^t conv blocks (code: 32, 32)")
        kernels: Literal["code", "3x3"] = Field("code", description="code: kernels size//8, size//10, 2 unpadded; 3x3: padded 3x3")
        kb_dropout: float = Field(0.5, ge=0, lt=1, description="dropout after the KB's linear layer (code: 0.5)")
        mask_activation: Literal["relu", "sigmoid"] = Field("relu", description="M^t's output activation (code: use_relu true)")
        momentum: float = Field(0.9, ge=0, description="momentum of the task phases' SGD (code: 0.9)")
        weight_decay: float = Field(0.01, ge=0, description="weight decay of the task phases' SGD (code: 0.01)")
        clip: float = Field(0.5, gt=0, description="gradient-norm clip while F^t trains (code: 0.5)")
        pretrain_kb: bool = Field(True, description="train the KB with C^0, unmasked, on the first task (code: pre_train_shared)")
        kb_update: Literal["meta", "sgd", "none"] = Field("meta", description="meta: meta-learning; sgd: the no-meta ablation; none")
        meta_direction: Literal["toward", "away"] = Field(
            "toward", description="toward: KB += outer_lr * D (the paper, Reptile); away: the code's SGD step with D as gradient"
        )
        meta_epochs: int = Field(10, ge=1, description="meta steps per task (code: 10)")
        mini_tasks: int = Field(10, ge=1, description="mini-tasks per meta step (code: 10)")
        inner_steps: int = Field(40, ge=1, description="SGD steps on one mini-task (code: inner_loop 40)")
        mini_task_size: int = Field(0, ge=0, description="samples per mini-task (0: trainer.batch_size, the code's loader batch)")
        inner_momentum: float = Field(0.9, ge=0, description="momentum of the inner loop (code: 0.9)")
        inner_weight_decay: float = Field(0.1, ge=0, description="weight decay of the inner loop (code: 0.1)")
        inner_plateau: bool = Field(True, description="ReduceLROnPlateau(0.5, 5, 1e-3) on the inner loss (code: yes)")
        inner_clip: float = Field(
            0.0, ge=0, description="> 0: clip the inner loop's gradient norm (KB copy and classifier apart) to this (code: off; "
            "its commented-out lines, approach.py:108-109, clip to 0.5)",
        )
        meta_weight_decay: float = Field(0.1, ge=0, description="weight decay of the meta step and of kb_update=sgd (code: 0.1)")
        masks: bool = Field(True, description="false: the KB unmasked (the paper's no-mask ablation; code use_mask)")
        freeze_kb_after: int = Field(0, ge=0, description="k > 0: the KB is updated on the first k tasks only (ablation: 1)")

        @model_validator(mode="after")
        def _check(self) -> "Mark.Config":
            if any(c < 1 for c in [*self.kb_channels, *self.f_channels]):
                raise ValueError("kb_channels and f_channels need widths >= 1")
            return self

    name = "mark"
    context_input_refusal = "mark queries its knowledge base from the input through F^t and M^t; context_input is not used"
    per_task_heads_refusal = "mark has a head per task already (task-incremental streams); leave method.heads=shared"
    scenarios = ("task",)
    cfg: Config

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        cfg, stream = self.cfg, self.stream
        if self.trainer_cfg.iterations_per_task:
            raise ValueError("mark runs trainer.epochs passes per phase; leave trainer.iterations_per_task unset (0)")
        shape = tuple(stream.input_shape)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise ValueError(f"mark's conv networks need square images [C, H, W], not input shape {shape}")
        tasks = [*stream.tasks, *stream.heldout]
        self.slot = {t.index: i for i, t in enumerate(tasks)}
        self.class_index = [torch.nonzero(self.class_row(t)).flatten() for t in tasks]  # outputs of each task, made once
        self.label_position = []  # per task: stream label -> position in the task's head
        for idx in self.class_index:
            table = torch.full((self.class_mask.shape[1],), -1, dtype=torch.long, device=self.device)
            table[idx] = torch.arange(idx.numel(), device=self.device)
            self.label_position.append(table)
        self.model = MarkNet(cfg, shape, [len(c) for c in self.class_index]).to(self.device)  # type: ignore[assignment]
        self.outer_lr = cfg.outer_lr if cfg.outer_lr is not None else cfg.lr_meta * 0.1  # approach.py:259,262
        # per trained task, what its meta-learning did to the KB (read only for results.json): the KB's change
        # over the meta phase relative to its norm, the cosine of that change with the summed meta directions
        # sum D (+1: toward the mini-tasks' changes, -1: against them), the mini-tasks' mean accuracy, and how many
        # mini-tasks were left out because their inner loop diverged
        self.register_buffer("meta_stats", torch.full((len(stream.tasks), 4), float("nan"), device=self.device))
        self.optimizer = None  # type: ignore[assignment]  # one SGD per phase, made as the phase starts
        self._phases: list[Phase] = []
        self._meta_before: Phase | None = None
        self._phase_steps = 0
        self._step = 0
        self._phase = -1
        self._probe: nn.Linear | None = None  # the features phase's temporary classifier

    # ---------------------------------------------------------------- schedule

    def kb_trains(self, position: int) -> bool:
        """Whether the KB is updated on the task at ``position`` (``freeze_kb_after`` > 0 stops it)."""
        return not self.cfg.freeze_kb_after or position < self.cfg.freeze_kb_after

    def schedule(self, task: Task) -> tuple[list[Phase], Phase | None]:
        """The task's epoch-phases, and the phase that the meta-learning runs before (None: no meta)."""
        cfg = self.cfg
        pos = self.position(task)
        phases: list[Phase] = ["features"] if cfg.masks else []
        if pos == 0 and cfg.pretrain_kb and self.kb_trains(pos):
            phases.append("pretrain")
        phases.append("masks")
        meta_before: Phase | None = None
        if self.kb_trains(pos) and cfg.kb_update == "sgd":
            phases.append("kb_sgd")
        elif self.kb_trains(pos) and cfg.kb_update == "meta":
            meta_before = "final"
        phases.append("final")
        return phases, meta_before

    def position(self, task: Task) -> int:
        return next((i for i, t in enumerate(self.stream.tasks) if t.index == task.index), len(self.stream.tasks))

    def epochs_for(self, task: Task, epochs: int) -> int:
        return epochs * len(self.schedule(task)[0])

    def _params_of(self, phase: Phase, slot: int) -> list[nn.Parameter]:
        m = self.model
        if phase == "features":
            assert self._probe is not None
            return [*m.features[slot].parameters(), *self._probe.parameters()]
        if phase == "pretrain":
            return [*m.kb.parameters(), *m.heads[slot].parameters()]
        if phase == "kb_sgd":
            return [*m.kb.parameters(), *m.heads[slot].parameters()]
        return [*m.masks[slot].parameters(), *m.heads[slot].parameters()]  # masks, final

    def _enter(self, phase_index: int, task: Task) -> None:
        """Start epoch-phase ``phase_index`` of ``task``: what trains, its SGD (and the meta-learning before it)."""
        phase = self._phases[phase_index]
        slot = self.slot[task.index]
        if phase == self._meta_before:
            self.meta_learn(task)
        for p in self.parameters():
            p.requires_grad_(False)
        params = self._params_of(phase, slot)
        for p in params:
            p.requires_grad_(True)
        cfg = self.cfg
        if phase == "kb_sgd":  # approach.py:262: SGD(lr_meta * 0.1, weight_decay=0.1), no momentum
            self.optimizer = torch.optim.SGD(params, lr=self.outer_lr, weight_decay=cfg.meta_weight_decay)
        else:  # approach.py:22, 225, 240, 277
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr_task, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        self._phase = phase_index

    # ---------------------------------------------------------------- forward

    def task_masks(self, x: Tensor, slot: int) -> list[Tensor] | None:
        if not self.cfg.masks:
            return None
        return self.model.masks[slot](self.model.features[slot](x))

    def place(self, out: Tensor, slot: int) -> Tensor:
        """A head's outputs written into the stream's logits; other outputs ``-inf`` (label masking)."""
        logits = out.new_full((out.shape[0], self.class_mask.shape[1]), float("-inf"))
        return logits.index_copy(1, self.class_index[slot], out)

    def forward(self, x: Tensor, task: Task, task_ids: Tensor | None = None) -> Tensor:
        if task_ids is not None:
            raise ValueError("mark trains one task at a time (no mixed-task batches)")
        slot = self.slot[task.index]
        return self.place(self.model.heads[slot](self.model.kb(x, self.task_masks(x, slot))), slot)

    # ---------------------------------------------------------------- hooks

    def before_task(self, task: Task) -> None:
        self._phases, self._meta_before = self.schedule(task)
        n = int(self.training_data(task).y.shape[0])
        self._phase_steps = self.trainer_cfg.epochs * math.ceil(n / self.trainer_cfg.batch_size)
        self._step = 0
        self._phase = -1
        slot = self.slot[task.index]
        self._probe = nn.Linear(self.cfg.latent, len(self.class_index[slot]), device=self.device) if self.cfg.masks else None

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        index = min(self._step // self._phase_steps, len(self._phases) - 1)
        if index != self._phase:
            self._enter(index, task)
        phase = self._phases[index]
        slot = self.slot[task.index]
        m = self.model
        self.optimizer.zero_grad(set_to_none=True)
        if phase == "features":  # approach.py:32-41
            assert self._probe is not None
            logits = self._probe(m.features[slot](batch.x))
            loss = F.cross_entropy(logits, self.class_position(batch.y, slot))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.features[slot].parameters(), self.cfg.clip)
            torch.nn.utils.clip_grad_norm_(self._probe.parameters(), self.cfg.clip)
        else:
            masks = None if phase == "pretrain" else self.task_masks(batch.x, slot)  # pretrain: only_shared (:226)
            out = m.heads[slot](m.kb(batch.x, masks))
            loss = F.cross_entropy(out, self.class_position(batch.y, slot))
            loss.backward()
        self.optimizer.step()
        self._step += 1
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        if self._meta_before is not None and self._phase < self._phases.index(self._meta_before):
            self.meta_learn(task)  # not reached with a full schedule; kept for a task cut short
        for p in self.parameters():
            p.requires_grad_(False)  # frozen between tasks; each phase turns on what it trains
        self._probe = None
        self.optimizer = None  # type: ignore[assignment]

    def class_position(self, y: Tensor, slot: int) -> Tensor:
        """Stream labels -> positions within the task's head (its classes in stream order)."""
        return self.label_position[slot][y]

    # ---------------------------------------------------------------- meta-learning

    def meta_learn(self, task: Task) -> None:
        """``meta_epochs`` meta steps on the KB (``approach.py:257-266``, ``meta_training`` :118-163)."""
        cfg = self.cfg
        slot = self.slot[task.index]
        data = self.training_data(task)
        n = int(data.y.shape[0])
        size = min(cfg.mini_task_size or self.trainer_cfg.batch_size, n)
        kb_params = list(self.model.kb.parameters())
        start = torch.cat([p.detach().flatten() for p in kb_params])
        directions, mean_acc, dropped = torch.zeros_like(start), start.new_zeros(()), start.new_zeros(())
        for _ in range(cfg.meta_epochs):
            order = torch.cat([torch.randperm(n, device=self.device) for _ in range(math.ceil(cfg.mini_tasks * size / n))])
            deltas, accs = [], []
            for k in range(cfg.mini_tasks):  # approach.py:123-147: mini-task k is batch k of a fresh shuffled pass
                idx = order[k * size : (k + 1) * size]
                adapted, acc = self.mini_task(data.x[idx], self.class_position(data.y[idx], slot), slot)
                # a mini-task whose inner loop diverged adds nothing (the code would write its NaN into the KB)
                finite = torch.stack([torch.isfinite(a).all() for a in adapted]).all()
                deltas.append([torch.where(finite, a - p.detach(), torch.zeros_like(a)) for a, p in zip(adapted, kb_params)])
                accs.append(torch.where(finite, acc, torch.zeros_like(acc)))
                dropped += (~finite).float()
            direction = weighted_kb_direction(deltas, torch.stack(accs))
            self.meta_step(kb_params, direction)
            directions += torch.cat([d.flatten() for d in direction])
            mean_acc += torch.stack(accs).mean() / cfg.meta_epochs
        pos = self.position(task)
        if pos < self.meta_stats.shape[0]:
            change = torch.cat([p.detach().flatten() for p in kb_params]) - start
            self.meta_stats[pos, 0] = change.norm() / start.norm().clamp_min(1e-12)
            self.meta_stats[pos, 1] = F.cosine_similarity(change, directions, dim=0)
            self.meta_stats[pos, 2] = mean_acc
            self.meta_stats[pos, 3] = dropped

    def meta_step(self, kb_params: list[nn.Parameter], direction: list[Tensor]) -> None:
        """One fresh SGD(outer_lr, weight decay) step on the KB with ``-D`` (``toward``) or ``D`` (``away``,
        the code: ``set_grads`` then ``opti_shared.step()``, ``approach.py:158-160``) as its gradient."""
        sign = -1.0 if self.cfg.meta_direction == "toward" else 1.0
        sgd_step(kb_params, [sign * d for d in direction], [None] * len(kb_params), self.outer_lr, 0.0, self.cfg.meta_weight_decay)

    def mini_task(self, x: Tensor, y: Tensor, slot: int) -> tuple[list[Tensor], Tensor]:
        """A copy of the KB and a fresh classifier trained ``inner_steps`` SGD steps on one batch with the task's
        masks (``train_meta_batch``, ``approach.py:86-116``); returns the copy's KB weights and its accuracy on
        the batch afterwards (train mode, as the code's second call, :146)."""
        cfg = self.cfg
        kb = self.model.kb
        names = [n for n, _ in kb.named_parameters()]
        weights = [p.detach().clone().requires_grad_(True) for p in kb.parameters()]
        clf = nn.Linear(cfg.latent, len(self.class_index[slot]), device=self.device)  # approach.py:125
        head = [clf.weight.detach().requires_grad_(True), clf.bias.detach().requires_grad_(True)]
        with torch.no_grad():
            saved = {k: v.clone() for k, v in self.model.features[slot].state_dict().items()}
            masks = self.task_masks(x, slot)  # fixed during the mini-task (F^t, M^t frozen; one batch)
            self.model.features[slot].load_state_dict(saved)  # running statistics as they were
        params = [*weights, *head]
        bufs: list[Tensor | None] = [None] * len(params)
        plateau = Plateau(torch.full((), cfg.lr_meta, device=self.device), torch.full((), math.inf, device=self.device), torch.zeros((), device=self.device))

        def logits() -> Tensor:
            return F.linear(functional_call(kb, dict(zip(names, weights)), (x, masks)), head[0], head[1])

        for _ in range(cfg.inner_steps):
            with torch.enable_grad():
                loss = F.cross_entropy(logits(), y)
                grads = list(torch.autograd.grad(loss, params))
            if cfg.inner_clip > 0:  # approach.py:108-109 (commented out there): the KB copy and the classifier apart
                grads = [*clip_norm(grads[: len(weights)], cfg.inner_clip), *clip_norm(grads[len(weights) :], cfg.inner_clip)]
            sgd_step(params, grads, bufs, plateau.lr, cfg.inner_momentum, cfg.inner_weight_decay)
            if cfg.inner_plateau:  # scheduler.step(loss) after opti.step() (approach.py:112-114)
                plateau = plateau_step(plateau, loss.detach())
        with torch.no_grad():
            acc = (logits().argmax(1) == y).float().mean()
        return [w.detach() for w in weights], acc

    # ---------------------------------------------------------------- state and figures

    def get_extra_state(self) -> dict[str, Any]:
        return {}  # every optimiser lives within one phase; checkpoints fall between tasks

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pass

    @torch.no_grad()
    def sample_masks(self, task: Task, limit: int = 256) -> Tensor | None:
        """Per-sample masks of ``task`` on its first ``limit`` test inputs, ``[samples, KB channels]`` (eval mode)."""
        if not self.cfg.masks:
            return None
        was = self.training
        self.eval()
        masks = self.task_masks(task.x_test[:limit], self.slot[task.index])
        self.train(was)
        return torch.cat(masks, dim=1)  # type: ignore[arg-type]

    def unit_mask(self, task: Task) -> Tensor:
        """The KB channels the task uses: scale above 0 on at least half of its test inputs (``masks=false``: all)."""
        m = self.sample_masks(task)
        if m is None:
            return torch.ones(sum(self.cfg.kb_channels), dtype=torch.bool)
        return (m > 0).float().mean(0) >= 0.5

    def report(self, task: Task | None = None) -> MethodReport:
        """Adds the figures of MARK's per-sample masks and meta-learning (:meth:`_mask_figures`)."""
        out = super().report(task)
        if task is None:
            out.figures.update(self._mask_figures())
        return out

    @torch.no_grad()
    def _mask_figures(self) -> dict[str, Any]:
        """MARK's masks are continuous and per sample: per task the mean fraction of KB channels with a
        scale above 0 (``mark_mask_sample_density``), the mean scale, how far a sample's mask is from its task's
        mean mask (``mark_mask_within_task_cosine``: mean cosine of each sample's mask with its task's mean), and
        the cosine between tasks' mean masks (``mark_mask_between_task_cosine``, matrix, and its off-diagonal mean)."""
        stats = self.meta_stats.cpu()
        rows = [None if bool(torch.isnan(r[0])) else [float(v) for v in r] for r in stats]
        meta = {
            "mark_meta_kb_change": [None if r is None else r[0] for r in rows],
            "mark_meta_alignment": [None if r is None else r[1] for r in rows],
            "mark_meta_mini_task_acc": [None if r is None else r[2] for r in rows],
            "mark_meta_diverged_mini_tasks": [None if r is None else int(r[3]) for r in rows],
        }
        per = [self.sample_masks(t) for t in self.stream.tasks]
        if any(m is None for m in per):
            return {"mark_masks": False, **meta}
        means = torch.stack([m.mean(0) for m in per])  # type: ignore[union-attr]
        unit = F.normalize(means, dim=1)
        between = unit @ unit.T
        t = len(per)
        off = between[~torch.eye(t, dtype=torch.bool, device=between.device)]
        return {
            "mark_masks": True,
            "mark_mask_sample_density": [float((m > 0).float().mean()) for m in per],  # type: ignore[operator]
            "mark_mask_mean": [float(m.mean()) for m in per],  # type: ignore[union-attr]
            "mark_mask_within_task_cosine": [
                float((F.normalize(m, dim=1) @ u).mean()) for m, u in zip(per, unit)  # type: ignore[arg-type]
            ],
            "mark_mask_between_task_cosine": between.tolist(),
            "mark_mask_between_task_cosine_mean": float(off.mean()) if t > 1 else None,
            **meta,
        }
