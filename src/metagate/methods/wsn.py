"""WSN, winning subnetworks (Kang, Mina, Madjid, Yoon, Hasegawa-Johnson, Hwang & Yoo, "Forget-free Continual
Learning with Winning Subnetworks", ICML 2022): per-weight scores pick the top-c% weights of each layer as a
task's subnetwork; weights used by earlier tasks are reused but frozen; each task's binary mask is kept,
compressed."""

from __future__ import annotations

import heapq
import math
from collections import Counter
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, Method, MethodReport
from metagate.nn.backbones import BackboneConfig
from metagate.nn.gates import BitMask, pack_bits, topk_ste


def huffman_bits(symbols: list[int]) -> int:
    """Length in bits of the Huffman code of ``symbols`` (the coded message; a single-symbol message costs one
    bit per symbol)."""
    counts = Counter(symbols)
    if len(counts) <= 1:
        return len(symbols)
    heap = [(c, i) for i, c in enumerate(counts.values())]
    heapq.heapify(heap)
    total, nxt = 0, len(heap)
    while len(heap) > 1:  # each merge adds its weight once per level: the sum of merges is the coded length
        a, _ = heapq.heappop(heap)
        b, _ = heapq.heappop(heap)
        total += a + b
        heapq.heappush(heap, (a + b, nxt))
        nxt += 1
    return total


@METHODS.register("wsn")
class WSN(Method):
    """WSN (Kang et al., ICML 2022; code ``ihaeyong/WSN``: ``main_wsn_pmnist.py``, ``networks/subnet.py``,
    ``networks/mlp.py``, ``scripts/wsn/wsn_pmnist.sh``, read at f066982).

    Every hidden conv / linear layer has weights ``W`` and one score tensor ``S`` (``w_m``, shared by all tasks,
    ``kaiming_uniform(a=sqrt(5))``, ``subnet.py:140-145``). Task ``t`` runs ``W * M`` with ``M`` the top ``c`` of
    ``|S|`` in each layer (``GetSubnetFaster``: ``|S| >= `` its ``(1 - c)``-percentile, ``percentile`` with
    ``k = 1 + round((1 - c)(n - 1))``, gradient straight through, ``subnet.py:12-24,104-116``). Weights and scores
    train together (Adam over all parameters, ``main_wsn_pmnist.py:171-176``), except that the gradient of every
    weight in the union of the earlier tasks' masks is zeroed (``consolidated_masks``,
    ``main_wsn_pmnist.py:54-75``): a task reuses the earlier tasks' weights as they are and trains only free ones.
    After the task its mask is kept (``per_task_masks``, ``main_wsn_pmnist.py:210``) and joins the union
    (``main_wsn_pmnist.py:213-226``). Each task has its own unmasked output layer (``multi_head``,
    ``mlp.py:27-30,57-60``). A task is predicted with its mask and head, so earlier tasks are bit-identical
    forever (zero backward transfer).

    Defaults as the permuted-MNIST script (``wsn_pmnist.sh``): Adam ``lr = 1e-3``, ``c = 0.5`` (``--sparsity``
    default 0.5, ``main_wsn_pmnist.py:326,333``), hidden 100 x 2 without biases (``mlp.py:19-20``), batch 10,
    5 epochs (``main_wsn_pmnist.py:296``); the code's schedule (``lr_patience 6`` epochs) never fires within its
    5 epochs.

    The masks are stored as bits (1 per masked weight) and reported compressed: the paper compresses each task's
    binary mask with Huffman coding (the code imports ``utils_huffman.comp_decomp_mask_huffman``, which is not in
    the repository). Here each mask's packed bits are cut into ``symbol_bits``-bit symbols and Huffman-coded;
    ``task_bytes`` counts the coded mask (and the code table's symbols are ignored) plus the head.

    Differences, all deliberate:

    * The backbone is metagate's (``mlp`` or ``cnn``) with its hidden biases zero and frozen (the code's layers have
      none); the per-task heads keep their bias. A task-incremental stream gives each head one output per class
      with label masking.
    * The budget is the trainer's (``trainer.epochs``, ``trainer.batch_size``); ``trainer.lr`` is used with Adam
      (the ready configs set the code's 1e-3). The code keeps the epoch with the best validation loss; here the last
      one is kept. Adam is made afresh at every task (as the code).
    * The percentile is computed on the device (``kthvalue`` without ``.item()``), so a step reads nothing back.
    """

    class Config(BaseMethodConfig):
        name: Literal["wsn"] = "wsn"
        backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(hidden=[100, 100]))
        c: float = Field(0.5, gt=0, le=1, description="fraction of each layer's weights a task's subnetwork keeps (code: 0.5)")
        symbol_bits: int = Field(8, ge=1, le=16, description="bits per Huffman symbol when a mask is compressed")

    name = "wsn"
    context_input_refusal = "wsn selects a task's weights by its mask (task identity); context_input is for methods without masks"
    per_task_heads_refusal = "wsn already trains a head per task (as the code): leave method.heads=shared"
    scenarios = ("task", "domain")
    cfg: Config

    @classmethod
    def config_problem(cls, cfg: BaseMethodConfig) -> str | None:
        problem = super().config_problem(cfg)
        if problem:
            return problem
        if cfg.backbone.kind not in ("mlp", "cnn"):
            return f"wsn masks the weights of an mlp or cnn backbone, not {cfg.backbone.kind}"
        return None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        feat = self.model.head.in_features
        self.model.head = nn.Identity()  # type: ignore[assignment]
        rows = max(t.index for t in [*self.stream.tasks, *self.stream.heldout]) + 1
        self.heads = nn.ModuleList(nn.Linear(feat, self.stream.num_outputs) for _ in range(rows)).to(self.device)
        self.weight_names = [f"{n}.weight" for n, m in self.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for m in self.model.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                    m.bias.zero_()
                    m.bias.requires_grad_(False)
        shapes = [tuple(params[n].shape) for n in self.weight_names]
        self.scores = nn.ParameterList()
        for s in shapes:  # subnet.py:140-145
            p = nn.Parameter(torch.empty(s, device=self.device))
            nn.init.kaiming_uniform_(p, a=math.sqrt(5))
            self.scores.append(p)
        for i, s in enumerate(shapes):  # the union of the earlier tasks' masks (consolidated_masks)
            self.register_buffer(f"used_{i}", torch.zeros(s, dtype=torch.bool, device=self.device))
        self.stored = nn.ModuleList(nn.ModuleList(BitMask(torch.zeros(s, dtype=torch.bool)) for s in shapes) for _ in range(rows)).to(self.device)
        self.register_buffer("trained", torch.zeros(rows, dtype=torch.bool))
        self.register_buffer("coded_bits", torch.zeros(rows, dtype=torch.long))  # each stored mask's Huffman-coded size
        self._current: int | None = None
        self._free: list[Tensor] = []
        self._dense: dict[int, list[Tensor]] = {}
        self.optimizer = self.make_optimizer(self.parameters())
        self.register_load_state_dict_post_hook(lambda module, _: module._dense.clear())

    def used(self) -> list[Tensor]:
        return [getattr(self, f"used_{i}") for i in range(len(self.weight_names))]

    # ---------------------------------------------------------------- masks

    def score_masks(self) -> list[Tensor]:
        """The current top-c masks of ``|S|`` (straight-through to the scores)."""
        return [topk_ste(s.abs(), self.cfg.c) for s in self.scores]

    def task_masks(self, task: Task) -> list[Tensor]:
        """A trained task's stored mask; a task not trained yet: the scores' current top-c mask."""
        if task.index not in self._dense:
            if task.index != self._current and bool(self.trained[task.index]):
                self._dense[task.index] = [m.float() for m in self.stored[task.index]]
            else:
                with torch.no_grad():
                    return [m.detach() for m in self.score_masks()]
        return self._dense[task.index]

    def forward(self, x: Tensor, task: Task, task_ids: Tensor | None = None) -> Tensor:
        masks = self.score_masks() if self.training and task.index == self._current else self.task_masks(task)
        params = dict(self.model.named_parameters())
        h = functional_call(self.model, {n: params[n] * m for n, m in zip(self.weight_names, masks)}, (x,))
        return self.mask_logits(self.heads[task.index](h), task, task_ids)

    # ---------------------------------------------------------------- hooks

    def before_task(self, task: Task) -> None:
        self._current = task.index
        self._free = [(~u).float() for u in self.used()]
        self.heads.requires_grad_(False)
        self.heads[task.index].requires_grad_(True)
        self.optimizer = self.make_optimizer([*self.model.parameters(), *self.scores, *self.heads[task.index].parameters()])

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self(batch.x, task, batch.task_ids), batch.y)
        loss.backward()
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, free in zip(self.weight_names, self._free):  # main_wsn_pmnist.py:54-75
                g = params[name].grad
                if g is not None:
                    g.mul_(free)
        self.optimizer.step()
        return {"loss": loss.detach()}

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        masks = [m.bool() for m in self.score_masks()]
        self.stored[task.index] = nn.ModuleList(BitMask(m) for m in masks).to(self.device)
        for u, m in zip(self.used(), masks):
            u.logical_or_(m)
        self.trained[task.index] = True
        self.coded_bits[task.index] = sum(self.coded_size(m) for m in masks)
        self.heads[task.index].requires_grad_(False)
        self._current = None
        self._free = []
        self._dense.clear()

    def get_extra_state(self) -> dict[str, Any]:  # checkpoints fall between tasks; each task makes its Adam afresh
        return {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def coded_size(self, mask: Tensor) -> int:
        """Huffman-coded bits of one mask cut into ``symbol_bits``-bit symbols (host side, between tasks)."""
        bits = mask.flatten().to(torch.long).cpu()
        k = self.cfg.symbol_bits
        pad = (-bits.numel()) % k
        if pad:
            bits = torch.cat([bits, bits.new_zeros(pad)])
        weights = 2 ** torch.arange(k)
        return huffman_bits((bits.view(-1, k) * weights).sum(1).tolist())

    # ---------------------------------------------------------------- figures

    @torch.no_grad()
    def unit_mask(self, task: Task) -> Tensor:
        """Which backbone weights the task's subnetwork keeps, flattened."""
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
        """The task's Huffman-coded mask (whole bytes) and its head (float32)."""
        head = sum(p.numel() for p in self.heads[task.index].parameters()) * 4
        return math.ceil(int(self.coded_bits[task.index]) / 8) + head

    @torch.no_grad()
    def _figures(self) -> dict[str, Any]:
        packed = sum(pack_bits(m).numel() for m in self.used()) * 8
        used = torch.cat([u.flatten() for u in self.used()])
        return {"wsn": {"mask_bits_packed": packed, "mask_bits_coded": [int(self.coded_bits[t.index]) for t in self.stream.tasks],
                        "capacity_used": float(used.float().mean())}}
