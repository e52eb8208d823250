"""HAT, hard attention to the task (Serrà, Surís, Miron & Karatzoglou, "Overcoming Catastrophic Forgetting with
Hard Attention to the Task", ICML 2018): a learned, almost-binary attention mask per task over every hidden layer's
units; weights that earlier tasks attend to are shielded from later gradients."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, Method, MethodReport
from metagate.nn.backbones import CNN, BackboneConfig
from metagate.nn.dropout import Dropout
from metagate.nn.gates import soft_mask


@METHODS.register("hat")
class HAT(Method):
    """HAT (Serrà et al., ICML 2018; code ``joansj/hat``, ``src/approaches/hat.py`` and ``src/networks/mlp_hat.py``,
    read at 6fd0b9d).

    Every gated layer ``l`` (the backbone's hidden units or conv channels) has a task embedding ``e_l^t`` (an
    ``nn.Embedding`` row, ``N(0, 1)``); its attention ``a_l^t = sigmoid(s e_l^t)`` multiplies the layer's output
    (after ReLU and dropout, ``mlp_hat.py:51-59``). During an epoch ``s`` grows linearly with the position of the
    batch, ``s = (s_max - 1/s_max) i / N + 1/s_max`` (``hat.py:120``); evaluation uses ``s_max``. The loss is
    ``CE + c * reg`` with ``reg = sum_l sum a_l^t (1 - a_l^{<t}) / sum_l sum (1 - a_l^{<t})`` (``hat.py:196-209``;
    on the first task ``sum a / count``), ``a^{<t}`` the element-wise maximum of the earlier tasks' attentions at
    ``s_max`` (``hat.py:86-95``). After the backward pass, every weight's gradient is multiplied by
    ``1 - min(a_out^{<t}, a_in^{<t})`` of the units it connects (biases: ``1 - a_out^{<t}``; the first layer by its
    output alone; ``hat.py:131-135``, ``get_view_for``); the embeddings' gradient is compensated,
    ``* s_max / s * (cosh(clamp(s e, +-50)) + 1) / (cosh(e) + 1)`` (``hat.py:137-142``); the gradient's norm is
    clipped to ``clipgrad`` (``hat.py:145``), plain SGD steps, and the embeddings are clamped to ``+-6``
    (``hat.py:148-151``). Each task has its own output layer (``mlp_hat.py:27-29``), so a task is predicted with its
    attention and its head (task-aware).

    Defaults as the code: ``c = 0.75`` ("grid search ... chosen was 0.75", ``hat.py:25``), ``s_max = 400``
    (``hat.py:26``), SGD ``lr = 0.05`` (``run.py:18``), ``lr_min = 1e-4``, ``lr_factor = 3``, ``lr_patience = 5``,
    ``clipgrad = 10000`` (``hat.py:11``), ``thres_cosh = 50``, ``thres_emb = 6`` (``hat.py:106``); the MLP is
    2 x 2000 with input dropout 0.2 and hidden dropout 0.5 (``mlp_hat.py:8``), batch 64 (``hat.py:11``). The
    learning rate follows the code's schedule (``hat.py:49-84``): after every epoch the validation loss (the same
    criterion, at ``s_max``) is computed; an improvement keeps a copy of the model, ``lr_patience`` epochs without
    one divide the rate by ``lr_factor``, a rate below ``lr_min`` stops the task, and the best copy is restored at
    the task's end.

    Differences, all deliberate:

    * The schedule runs on the device: the validation loss, the best copy, the patience and the rate are tensors
      updated inside the step that ends an epoch, so no step waits on a read-back; after the stop, the remaining
      steps compute and discard zero-size updates (the same result as the code's ``break``). Without a validation
      split (``benchmark.val_fraction = 0``) the rate stays at ``lr`` and the last model is kept.
    * The budget is the trainer's (``trainer.epochs`` or ``trainer.iterations_per_task``; the code runs up to 200
      epochs, ``run.py:17``); ``trainer.lr`` / ``trainer.optimizer`` are unused (the SGD step is applied by hand).
    * Backbones: ``mlp`` and ``cnn`` (conv channels gated per channel after pooling, then the fully connected
      layers; the first fully connected weight's input view repeats each channel's attention over its positions,
      as ``alexnet_hat.py`` does); the AlexNet of the paper's CIFAR runs is not built. A task-incremental stream
      gives each head one output per class with label masking (the code's heads have the task's classes only).
    * The regulariser's denominator is kept above ``1e-12`` (the code divides by zero once every unit is taken).
    * Weights protected by an attention of exactly 1 (in float32, ``sigmoid(s_max e)`` is 1 for ``e`` above about
      0.05) never change again; attentions strictly between 0 and 1 let a little change through, as in the code:
      HAT promises little forgetting, not none (``tests/test_isolation.py`` checks both).
    """

    class Config(BaseMethodConfig):
        name: Literal["hat"] = "hat"
        backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(hidden=[2000, 2000], dropout=0.5))
        input_dropout: float = Field(0.2, ge=0, lt=1, description="dropout on the input (code: pdrop1 0.2)")
        c: float = Field(0.75, ge=0, description="attention regulariser strength (code: lamb 0.75)")
        s_max: float = Field(400.0, gt=1, description="largest sigmoid scale, reached at each epoch's end (code: smax 400)")
        lr: float = Field(0.05, gt=0, description="SGD learning rate at each task's start (code: 0.05)")
        lr_min: float = Field(1e-4, gt=0, description="the task stops once its rate falls below this (code: 1e-4)")
        lr_factor: float = Field(3.0, gt=1, description="rate divisor after lr_patience epochs without a better validation loss (code: 3)")
        lr_patience: int = Field(5, ge=1, description="epochs without improvement before the rate drops (code: 5)")
        clipgrad: float = Field(10000.0, gt=0, description="gradient norm clip (code: 10000)")
        thres_cosh: float = Field(50.0, gt=0, description="clamp of s * e inside the compensation's cosh (code: 50)")
        thres_emb: float = Field(6.0, gt=0, description="embeddings are clamped to +-thres_emb after each step (code: 6)")

    name = "hat"
    gates = True
    scenarios = ("task", "domain")
    per_task_heads_refusal = "hat already trains a head per task (as the code): leave method.heads=shared"
    cfg: Config

    @classmethod
    def config_problem(cls, cfg: BaseMethodConfig) -> str | None:
        problem = super().config_problem(cfg)
        if problem:
            return problem
        if cfg.backbone.kind not in ("mlp", "cnn"):
            return f"hat gates the layers of an mlp or cnn backbone, not {cfg.backbone.kind} (use method.backbone.kind=mlp or cnn)"
        return None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        feat = self.model.head.in_features
        self.model.head = nn.Identity()  # type: ignore[assignment]  # a head per task replaces it
        rows = max(t.index for t in [*self.stream.tasks, *self.stream.heldout]) + 1
        self.heads = nn.ModuleList(nn.Linear(feat, self.stream.num_outputs) for _ in range(rows)).to(self.device)
        widths = self.model.gated_widths
        self.embeddings = nn.ParameterList(nn.Parameter(torch.randn(rows, w, device=self.device)) for w in widths)  # nn.Embedding's init
        for i, w in enumerate(widths):  # a^{<t}: the earlier tasks' attention, element-wise maximum (zeros: none yet)
            self.register_buffer(f"mask_pre_{i}", torch.zeros(w, device=self.device))
        self.register_buffer("tasks_trained", torch.zeros((), dtype=torch.long))
        self.input_dropout = Dropout(cfg.input_dropout) if cfg.input_dropout > 0 else nn.Identity()
        self.layers = self._gated_modules()
        self._views: dict[str, Tensor] = {}
        self._s = cfg.s_max
        self._current: int | None = None
        self._step = 0
        self._steps_per_epoch = 1
        self._num_train = 1
        self._restricted = False  # whether earlier tasks' attention restricts the gradients (host side)
        self._val: tuple[Tensor, Tensor] | None = None
        self._best: list[Tensor] = []
        self.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)  # unused: the step is by hand
        self.register_load_state_dict_post_hook(lambda module, _: module._views.clear())

    def _gated_modules(self) -> list[nn.Module]:
        """The conv / linear layer behind each gated layer, in forward order."""
        if isinstance(self.model, CNN):
            return [*self.model.convs, *self.model.hidden]
        return list(self.model.hidden)  # type: ignore[arg-type]

    # ---------------------------------------------------------------- attention

    def mask_pre(self) -> list[Tensor]:
        return [getattr(self, f"mask_pre_{i}") for i in range(len(self.embeddings))]

    def attention(self, index: int, s: float) -> list[Tensor]:
        """``sigmoid(s e_l^t)`` for every gated layer (``mlp_hat.py:65-71``)."""
        return [soft_mask(e[index], s) for e in self.embeddings]

    def gradient_views(self) -> dict[str, Tensor]:
        """``1 - min(a_out^{<t}, a_in^{<t})`` per weight and ``1 - a_out^{<t}`` per bias of every gated layer
        (``get_view_for``), computed once per task from the cumulative attention."""
        if self._views:
            return self._views
        pre = self.mask_pre()
        views: dict[str, Tensor] = {}
        n_conv = len(self.model.convs) if isinstance(self.model, CNN) else 0
        for l, layer in enumerate(self.layers):
            w = layer.weight  # type: ignore[union-attr]
            post = pre[l].view(-1, *([1] * (w.ndim - 1))).expand_as(w)
            if l == 0:
                view = post
            else:
                a_in = pre[l - 1]
                if l == n_conv and n_conv > 0:  # first fully connected layer after the convs: each channel over its positions
                    a_in = a_in.repeat_interleave(w.shape[1] // a_in.numel())
                view = torch.minimum(post, a_in.view(1, -1, *([1] * (w.ndim - 2))).expand_as(w))
            views[f"layer{l}.weight"] = 1 - view
            views[f"layer{l}.bias"] = 1 - pre[l]
        self._views = views
        return views

    def forward(self, x: Tensor, task: Task, task_ids: Tensor | None = None) -> Tensor:
        s = self._s if self.training and task.index == self._current else self.cfg.s_max
        h = self.model.features(self.input_dropout(x), unit_masks=self.attention(task.index, s))
        return self.mask_logits(self.heads[task.index](h), task, task_ids)

    def regulariser(self, masks: list[Tensor]) -> Tensor:
        """``hat.py:196-209``: the attention used that earlier tasks left free, as a fraction of the free units."""
        if not self._restricted:
            return sum(m.sum() for m in masks) / sum(m.numel() for m in masks)  # type: ignore[return-value]
        free = [1 - mp for mp in self.mask_pre()]
        reg = sum((m * f).sum() for m, f in zip(masks, free))
        return reg / torch.clamp(sum(f.sum() for f in free), min=1e-12)  # type: ignore[operator,arg-type]

    def criterion(self, x: Tensor, y: Tensor, task: Task, s: float, task_ids: Tensor | None = None) -> Tensor:
        masks = self.attention(task.index, s)
        h = self.model.features(self.input_dropout(x), unit_masks=masks)
        logits = self.mask_logits(self.heads[task.index](h), task, task_ids)
        return F.cross_entropy(logits, y) + self.cfg.c * self.regulariser(masks)

    # ---------------------------------------------------------------- hooks

    def trainable(self, task: Task) -> list[Tensor]:
        return [*self.model.parameters(), *self.heads[task.index].parameters(), *self.embeddings]

    def before_task(self, task: Task) -> None:
        tc = self.trainer_cfg
        self._current = task.index
        self._step = 0
        self._steps_per_epoch = -(-task.num_train // tc.batch_size)
        self._num_train = task.num_train
        self._views.clear()
        self._restricted = int(self.tasks_trained) > 0  # read between tasks, not in a step
        x_val, y_val = task.split("val")
        self._val = (x_val, y_val) if len(y_val) else None
        dev = self.device
        self._lr = torch.tensor(self.cfg.lr, device=dev)
        self._patience = torch.tensor(self.cfg.lr_patience, device=dev)
        self._best_loss = torch.tensor(float("inf"), device=dev)
        self._best = [p.detach().clone() for p in self.trainable(task)] if self._val is not None else []

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        cfg = self.cfg
        b = self._step % self._steps_per_epoch
        self._s = (cfg.s_max - 1 / cfg.s_max) * (b * self.trainer_cfg.batch_size) / self._num_train + 1 / cfg.s_max  # hat.py:120
        params = self.trainable(task)
        for p in params:
            p.grad = None
        loss = self.criterion(batch.x, batch.y, task, self._s, batch.task_ids)
        loss.backward()
        with torch.no_grad():
            if self._restricted:  # hat.py:131-135
                views = self.gradient_views()
                for l, layer in enumerate(self.layers):
                    for kind in ("weight", "bias"):
                        p = getattr(layer, kind)
                        if p is not None and p.grad is not None:
                            p.grad.mul_(views[f"layer{l}.{kind}"])
            s = self._s
            for e in self.embeddings:  # hat.py:137-142
                if e.grad is not None:
                    num = torch.cosh(torch.clamp(s * e, -cfg.thres_cosh, cfg.thres_cosh)) + 1
                    e.grad.mul_(cfg.s_max / s * num / (torch.cosh(e) + 1))
            grads = [p for p in params if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(grads, cfg.clipgrad)  # hat.py:145
            for p in grads:
                p.sub_(self._lr * p.grad)
            for e in self.embeddings:  # hat.py:148-151
                e.clamp_(-cfg.thres_emb, cfg.thres_emb)
        self._step += 1
        if self._val is not None and self._step % self._steps_per_epoch == 0:
            self._end_epoch(task)
        return {"loss": loss.detach()}

    @torch.no_grad()
    def _end_epoch(self, task: Task) -> None:
        """``hat.py:60-78`` on the device: validation loss, best copy, patience, rate (0 once below ``lr_min``)."""
        assert self._val is not None
        was = self.training
        self.eval()
        x, y = self._val
        bs = self.trainer_cfg.eval_batch_size
        total = torch.zeros((), device=self.device)
        for start in range(0, len(y), bs):  # the criterion at s_max, weighted by batch size (hat.py:180-189)
            total += self.criterion(x[start : start + bs], y[start : start + bs], task, self.cfg.s_max) * len(y[start : start + bs])
        loss = total / len(y)
        self.train(was)
        better = loss < self._best_loss
        self._best_loss = torch.where(better, loss, self._best_loss)
        for kept, p in zip(self._best, self.trainable(task)):
            kept.copy_(torch.where(better, p, kept))
        patience = torch.where(better, self._patience.new_tensor(self.cfg.lr_patience), self._patience - 1)
        drop = ~better & (patience <= 0)
        lr = torch.where(drop, self._lr / self.cfg.lr_factor, self._lr)
        self._patience = torch.where(drop, patience.new_tensor(self.cfg.lr_patience), patience)
        self._lr = torch.where(lr < self.cfg.lr_min, torch.zeros_like(lr), lr)  # the code's break: no further update

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        for kept, p in zip(self._best, self.trainable(task)):  # hat.py:84: restore the best validation model
            p.copy_(kept)
        self._best = []
        for mp, a in zip(self.mask_pre(), self.attention(task.index, self.cfg.s_max)):  # hat.py:86-95
            mp.copy_(torch.maximum(mp, a) if int(self.tasks_trained) > 0 else a)
        self.tasks_trained += 1
        self._views.clear()
        self._current = None
        self._restricted = False
        self._s = self.cfg.s_max

    def get_extra_state(self) -> dict[str, Any]:  # checkpoints fall between tasks; the SGD step keeps no state
        return {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------- figures

    @torch.no_grad()
    def unit_mask(self, task: Task) -> Tensor:
        """The units the task attends to (attention at ``s_max`` above 0.5), over every gated layer."""
        return torch.cat(self.attention(task.index, self.cfg.s_max)) > 0.5

    def report(self, task: Task | None = None) -> MethodReport:
        """At the end of the stream: what it uses at test time, bytes per task (:meth:`_task_bytes`) and its own
        figures (:meth:`_figures`)."""
        out = super().report(task)
        if task is None:
            out.task_bytes = [self._task_bytes(t) for t in self.stream.tasks]
            out.figures.update(self._figures())
        return out

    def _task_bytes(self, task: Task) -> int:
        """The task's embeddings and head (float32); the attention is recomputed from the embeddings."""
        emb = sum(e.shape[1] for e in self.embeddings) * 4
        return emb + sum(p.numel() for p in self.heads[task.index].parameters()) * 4

    @torch.no_grad()
    def _figures(self) -> dict[str, Any]:
        used = torch.cat(self.mask_pre())
        return {"hat": {"capacity_used": float((used > 0.5).float().mean()), "attention_binary": float(((used == 0) | (used == 1)).float().mean())}}
