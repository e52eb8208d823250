"""Experience replay with a reservoir buffer (Chaudhry et al., "On Tiny Episodic Memories in Continual
Learning", 2019; reservoir sampling, Vitter 1985), the standard replay reference point."""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, Method


@METHODS.register("er")
class ER(Method):
    """ER (Chaudhry et al. 2019, "ER-reservoir"): every training step adds the incoming batch to a memory of
    ``buffer_size`` samples by reservoir sampling (the ``n``-th sample of the stream takes a slot with
    probability ``buffer_size / n``, a uniformly chosen one, so the memory is at every moment a uniform sample
    of everything seen), draws ``replay_batch`` samples uniformly from the memory, and takes one step on the
    cross-entropy of the current batch and the replayed one concatenated (as the paper's Algorithm 1 and
    Mammoth's ``er.py``). Replayed samples keep their task, so task-incremental label masking stays per sample.

    ``balanced=true``: class-balanced memory: each of the stream's ``C`` output classes gets ``buffer_size // C``
    slots, filled by a reservoir over that class's own samples (a uniform sample of every class seen; the
    memory is only full once every class has been seen). Defaults: ``buffer_size`` 500 (Mammoth's smallest
    standard buffer on split MNIST-style streams; set it per stream), ``replay_batch`` = ``trainer.batch_size``
    (``0``), Adam's state kept across tasks (one objective over the whole stream).

    Differences: the replayed samples are drawn before the current batch is added (Mammoth's order; the
    paper adds first), and a step's samples compete for slots together (a vectorised reservoir: two samples
    of one batch drawing the same slot leave the later one, as sequential insertion would).
    """

    class Config(BaseMethodConfig):
        name: Literal["er"] = "er"
        buffer_size: int = Field(500, ge=1, description="samples the memory holds")
        replay_batch: int = Field(0, ge=0, description="replayed samples per step (0: trainer.batch_size)")
        balanced: bool = Field(False, description="class-balanced memory: buffer_size // classes slots per class, a reservoir each")
        reset_optimizer: bool = Field(False, description="fresh optimiser state at every task")

    name = "er"
    cfg: Config

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        m, shape = self.cfg.buffer_size, self.stream.input_shape
        self.classes = self.stream.num_outputs
        if self.cfg.balanced:
            self.per_class = m // self.classes
            if self.per_class < 1:
                raise ValueError(f"er: balanced=true needs buffer_size >= the stream's {self.classes} classes, got {m}")
            m = self.per_class * self.classes
        # one spare row past the end takes every write that is not kept (no boolean indexing: no host sync)
        self.register_buffer("mem_x", torch.zeros(m + 1, *shape, device=self.device))
        self.register_buffer("mem_y", torch.zeros(m + 1, dtype=torch.long, device=self.device))
        self.register_buffer("mem_task", torch.zeros(m + 1, dtype=torch.long, device=self.device))
        self.register_buffer("filled", torch.zeros(m + 1, device=self.device))  # 1 where a slot holds a sample
        self.register_buffer("seen", torch.zeros(self.classes if self.cfg.balanced else 1, dtype=torch.long, device=self.device))
        self.capacity = m
        self.steps = 0  # host mirror: no replay before the first insertion
        self.seen_host = 0  # host mirror of seen.sum(): samples inserted so far

    def replay_size(self) -> int:
        return self.cfg.replay_batch or self.trainer_cfg.batch_size

    @torch.no_grad()
    def insert(self, x: Tensor, y: Tensor, task_ids: Tensor) -> None:
        """Reservoir insertion of a batch (see the class docstring)."""
        n = x.shape[0]
        if self.cfg.balanced:
            onehot = F.one_hot(y, self.classes)
            rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # position of each sample among its class in the batch
            pos = self.seen[y] + rank  # 0-based index of the sample in its class's stream
            j = (torch.rand(n, device=x.device) * (pos + 1).float()).long()
            j = torch.where(pos < self.per_class, pos, j)
            slot = torch.where(j < self.per_class, y * self.per_class + j, torch.full_like(j, self.capacity))
            self.seen += onehot.sum(0)
        else:
            pos = self.seen + torch.arange(n, device=x.device)
            j = (torch.rand(n, device=x.device) * (pos + 1).float()).long()
            j = torch.where(pos < self.capacity, pos, j)
            slot = torch.where(j < self.capacity, j, torch.full_like(j, self.capacity))
            self.seen += n
        self.seen_host += n
        # sequential order among equal slots: the last writer wins (index_copy_ keeps the last on CPU; on CUDA
        # one of them)
        self.mem_x.index_copy_(0, slot, x)
        self.mem_y.index_copy_(0, slot, y)
        self.mem_task.index_copy_(0, slot, task_ids)
        self.filled.index_fill_(0, slot, 1.0)
        self.filled[self.capacity :].zero_()  # the overflow slot (a view's fill: an indexed assignment syncs on CUDA)

    def sample(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """``k`` samples drawn uniformly, with replacement, from the filled slots (inverse CDF on the device: no sync).

        Without ``balanced`` the filled slots are the first ``min(seen, buffer_size)`` (reservoir insertion fills
        them in order), a count the host keeps: the inverse CDF of that prefix is ``floor(u n)``, the same draw as
        the general path's ``searchsorted`` without the cumulative sum. Rows are gathered with ``index_select``
        (on CPU several times faster than indexing with a tensor)."""
        if self.cfg.balanced:
            cdf = self.filled[: self.capacity].cumsum(0)
            idx = torch.searchsorted(cdf, torch.rand(k, device=cdf.device) * cdf[-1], right=True).clamp_(max=self.capacity - 1)
        else:
            n = min(self.seen_host, self.capacity)
            idx = (torch.rand(k, device=self.mem_x.device) * n).long().clamp_(max=n - 1)
        return self.mem_x.index_select(0, idx), self.mem_y.index_select(0, idx), self.mem_task.index_select(0, idx)

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        task_ids = batch.task_ids if batch.task_ids is not None else self._task_index(task, batch.y.shape[0])
        x, y, ids = batch.x, batch.y, task_ids
        if self.steps > 0:
            rx, ry, rt = self.sample(self.replay_size())
            x, y, ids = torch.cat([x, rx]), torch.cat([y, ry]), torch.cat([ids, rt])
        self.insert(batch.x, batch.y, task_ids)
        self.steps += 1
        return super().train_step(Batch(x, y, ids), task)

    def _task_index(self, task: Task, n: int) -> Tensor:
        cached = self._task_ids.get(task.index)
        if cached is None or cached.shape[0] < n:
            cached = self._task_ids[task.index] = torch.full((max(n, self.trainer_cfg.batch_size),), task.index, dtype=torch.long, device=self.device)
        return cached[:n]

    @property
    def _task_ids(self) -> dict[int, Tensor]:
        if not hasattr(self, "_task_id_cache"):
            self._task_id_cache: dict[int, Tensor] = {}
        return self._task_id_cache

    def task_loss(self, batch: Batch, task: Task) -> Tensor:
        # per-sample task ids matter for label masking and per-task heads only; else one forward for all
        ids = batch.task_ids if (self.label_masking or self.num_heads > 1 or self.cfg.context_input != "none") else None
        return F.cross_entropy(self(batch.x, task, ids), batch.y)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "steps": self.steps}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.steps = int(state["steps"])
        self.seen_host = int(self.seen.sum())  # the buffers load before the extra state: one sync, at load
