"""What hypernetwork continual learning shares: ``hnet`` (von Oswald et al., ICLR 2020) and ``hypermask``
(Książek & Spurek 2023, built on the former's ``hypnettorch``).

* the task's input to the hypernetwork: a learned embedding per task (``embedding=learned``, drawn from
  ``N(0, 1)`` as in both codes) or the task's context vector through a learned linear map
  (``embedding=context``, metagate's comparison: an untrained task gets its generated tensors zero-shot);
* the hypernetwork (:class:`~metagate.nn.hypernetwork.HyperNetwork`, optionally chunked) emitting one tensor
  per parameter tensor of the target, the backbone, which runs with given weights through
  ``torch.func.functional_call`` (any backbone is a weights-in target that way);
* the output regulariser: the hypernetwork's outputs for the earlier tasks saved just before each task
  (``hypnettorch``/``hypercl`` ``get_current_targets``), ``R = (1/n) sum_j || h(e_j) - h*(e_j) ||^2`` over
  the ``n`` regularised earlier tasks (``calc_fix_target_reg``); ``reg_subset = k > 0`` regularises a random
  subset of ``k`` earlier tasks per step (the code's ``batch_size`` argument, ``hnet_reg_batch_size``; von
  Oswald et al. Sec. 3.1 mention it to cut the cost of long task sequences); off by default;
* the bookkeeping (position in the stream, iterations of the task, tasks trained) and the task-agnostic
  test: entropy task inference (predict with every trained task's weights, take the lowest-entropy one:
  HyperMask's ``entropy.py``, hypercl's HNET+ENT).

Subclasses define ``task_weights(task)`` (the target's weights for a task, cached until the next step) and
``train_step``.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from metagate.data.stream import Task
from metagate.methods.base import BaseMethodConfig, Method, MethodReport
from metagate.nn.backbones import BackboneConfig
from metagate.nn.hypernetwork import HyperNetwork


class HypernetCLConfig(BaseMethodConfig):
    backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(hidden=[1000, 1000], dropout=0.0))
    embedding: Literal["learned", "context"] = Field(
        "learned", description="the hypernetwork's input: a learned embedding per task, or the task's context"
    )
    embedding_dim: int = Field(24, ge=1, description="size of a learned task embedding (both codes, permuted: 24)")
    context_projection: bool = Field(
        True, description="embedding=context: a learned linear map context -> embedding_dim (false: the context itself)"
    )
    hnet_hidden: list[int] = Field(default_factory=lambda: [100, 100], description="hypernetwork hidden widths")
    activation: Literal["elu", "relu", "none"] = Field("elu", description="hypernetwork activation")
    beta: float = Field(5e-4, ge=0, description="output regulariser strength")
    reg_subset: int = Field(
        0, ge=0, description="regularise a random subset of this many earlier tasks per step (0: all; the code's hnet_reg_batch_size)"
    )
    chunk_size: int = Field(
        0, ge=0, description="chunked hypernetwork: outputs per chunk, one chunk embedding per chunk (0: not chunked)"
    )
    chunk_emb_dim: int = Field(8, ge=1, description="size of a chunk embedding (chunk_size > 0)")
    task_inference: Literal["given", "entropy"] = Field(
        "given", description="given: the task's own weights at test; entropy: the trained task whose prediction has the lowest entropy"
    )


class HypernetCL(Method):
    """Base of the hypernetwork-CL methods (see the module docstring)."""

    scenarios = ("task", "domain")
    cfg: HypernetCLConfig
    hnet_init: Literal["torch", "xavier"] = "torch"

    context_input_refusal = "{name} takes the context through its hypernetwork (method.embedding=context), not context_input"
    per_task_heads_refusal = "{name} has one target network with one output layer: method.heads=shared"

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.names = [n for n, _ in self.model.named_parameters()]
        shapes = [p.shape for p in self.model.parameters()]
        tasks = [*self.stream.tasks, *self.stream.heldout]
        rows = max(t.index for t in tasks) + 1
        if cfg.embedding == "learned":
            self.embeddings = nn.Parameter(torch.randn(rows, cfg.embedding_dim, device=self.device))  # N(0, 1)
            in_dim = cfg.embedding_dim
        else:
            contexts = torch.zeros(rows, self.stream.context_dim)
            for t in tasks:
                contexts[t.index] = t.context.float().cpu()
            self.register_buffer("contexts", contexts.to(self.device), persistent=False)
            self.projection = (nn.Linear(self.stream.context_dim, cfg.embedding_dim) if cfg.context_projection else nn.Identity()).to(self.device)
            in_dim = cfg.embedding_dim if cfg.context_projection else self.stream.context_dim
        self.hnet = HyperNetwork(
            in_dim, shapes, cfg.hnet_hidden, cfg.activation, cfg.chunk_size, cfg.chunk_emb_dim, self.hnet_init
        ).to(self.device)
        # State that must survive a checkpoint, allocated here so a fresh method loads any checkpoint:
        self.register_buffer("targets", torch.zeros(self.stream.num_tasks, self.hnet.num_outputs, device=self.device))
        self.register_extra_buffers()
        self.register_buffer("tasks_trained", torch.zeros((), dtype=torch.long, device=self.device))
        self.register_buffer("task_step", torch.zeros((), dtype=torch.long, device=self.device))
        self._task_iterations = 0
        self._position = 0
        self._steps = 0  # ``task_step`` on the host, so that a training step never reads it back
        self._cache: dict[int, dict[str, Tensor]] = {}
        # task indices as device tensors, made once (a host list copied to the device would sync each step)
        self._index_tensors: dict[tuple[int, ...], Tensor] = {}
        self.register_load_state_dict_post_hook(lambda module, _: module._after_load())

    def _after_load(self) -> None:
        self._cache.clear()
        self._steps = int(self.task_step)  # one read, at load time

    def count_step(self) -> None:
        """One more optimiser step on the current task (device counter and its host mirror)."""
        self.task_step += 1
        self._steps += 1

    def index_tensor(self, indices: list[int]) -> Tensor:
        """``indices`` as a long tensor on the device, cached (the default lists are made in ``begin_task``). A
        list first seen inside a step (``reg_subset``'s random subsets) is copied from pinned host memory without
        waiting for the device (a plain ``torch.tensor(..., device=cuda)`` synchronises: the CUDA test caught it)."""
        key = tuple(indices)
        if key not in self._index_tensors:
            host = torch.tensor(indices, dtype=torch.long)
            if self.device.type == "cuda":
                host = host.pin_memory()
            self._index_tensors[key] = host.to(self.device, non_blocking=True)
        return self._index_tensors[key]

    def register_extra_buffers(self) -> None:
        """A subclass's own checkpointed buffers (registered between ``targets`` and ``tasks_trained``)."""

    # ---------------------------------------------------------------- hypernetwork

    def hnet_input(self, indices: list[int], params: dict[str, Tensor] | None = None) -> Tensor:
        """The hypernetwork's inputs for the tasks with these indices, ``[k, in_dim]`` (``params``: values for
        the context projection's ``weight`` / ``bias`` instead of its own, for the lookahead)."""
        idx = self.index_tensor(indices)
        if self.cfg.embedding == "learned":
            return self.embeddings[idx]
        if params and isinstance(self.projection, nn.Linear):
            return torch.nn.functional.linear(self.contexts[idx], params["weight"], params["bias"])
        return self.projection(self.contexts[idx])

    def target(self, x: Tensor, weights: dict[str, Tensor]) -> Tensor:
        """The backbone run with ``weights`` (by parameter name; those missing: its own)."""
        return functional_call(self.model, weights, (x,))

    def forward(self, x: Tensor, task: Task, task_ids: Tensor | None = None) -> Tensor:
        return self.mask_logits(self.target(x, self.task_weights(task)), task, task_ids)

    def task_weights(self, task: Task) -> dict[str, Tensor]:
        raise NotImplementedError

    # ---------------------------------------------------------------- output regulariser

    def begin_task(self, task: Task) -> None:
        """Position and iteration count of ``task``; the earlier tasks' outputs saved as the regulariser's
        targets (``get_current_targets``: every earlier task, recomputed now)."""
        self._position = next(i for i, t in enumerate(self.stream.tasks) if t.index == task.index)
        n = int(self.training_data(task).y.shape[0])
        tc = self.trainer_cfg
        self._task_iterations = tc.iterations_per_task or tc.epochs * math.ceil(n / tc.batch_size)
        self.task_step.zero_()
        self._steps = 0
        earlier = self.earlier_indices()
        self._index_tensors.clear()  # the last task's lists and random subsets: the cache stays bounded by a task's steps
        for indices in ([task.index], earlier, [task.index, *earlier]):  # the lists a step asks for by default
            self.index_tensor(indices)
        with torch.no_grad():
            if self._position > 0:
                self.targets[: self._position] = self.hnet.flat(self.hnet_input(self.earlier_indices()))
        self._cache.clear()

    def earlier_indices(self) -> list[int]:
        return [t.index for t in self.stream.tasks[: self._position]]

    def regularised_positions(self) -> list[int]:
        """Stream positions of the earlier tasks regularised at this step: all, or with ``reg_subset = k``
        a uniformly random ``k`` of them without replacement (global torch generator; all when there are
        no more than ``k``), in increasing order."""
        pos, k = self._position, self.cfg.reg_subset
        if k <= 0 or pos <= k:
            return list(range(pos))
        return sorted(torch.randperm(pos)[:k].tolist())

    def output_regularizer(self, outputs: Tensor, positions: list[int]) -> Tensor:
        """``(1/n) sum_j || outputs_j - h*(e_j) ||^2`` over the ``n`` rows of ``outputs [n, num_outputs]``, the
        current outputs for the earlier tasks at stream ``positions`` (``calc_fix_target_reg``)."""
        if positions == list(range(len(positions))):
            saved = self.targets[: len(positions)]  # a view: no gather
        else:
            saved = self.targets[self.index_tensor(positions)]  # reg_subset's random subsets: no sync (index_tensor)
        return (outputs - saved).pow(2).sum() / len(positions)

    def after_task(self, task: Task) -> None:
        self.tasks_trained.fill_(self._position + 1)
        self._cache.clear()

    # ---------------------------------------------------------------- test time

    def candidates(self) -> list[Task]:
        """The tasks entropy inference chooses among: those trained so far (the first before any)."""
        return self.stream.tasks[: max(1, int(self.tasks_trained))]

    def infer(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits from the weights of the candidate task whose softmax has the lowest entropy, per sample, and
        which task that was (its position in ``candidates()``) (HyperMask ``entropy.py:21-77``)."""
        logits = torch.stack([self.mask_logits(self.target(x, self.task_weights(c)), c) for c in self.candidates()])
        entropy = torch.special.entr(torch.softmax(logits, dim=-1)).sum(-1)  # [tasks, batch]; 0 log 0 = 0
        chosen = entropy.argmin(dim=0)
        return logits[chosen, torch.arange(x.shape[0], device=x.device)], chosen

    @torch.no_grad()
    def predict(self, x: Tensor, task: Task) -> Tensor:
        if self.cfg.task_inference == "entropy":
            return self.infer(x)[0]
        return self(x, task)

    def report(self, task: Task | None = None) -> MethodReport:
        """At test time: nothing with entropy inference, else the task's context or identity (its embedding); each
        task adds its learned embedding (float32; nothing with ``embedding=context``): the hypernetwork is shared."""
        out = super().report(task)
        if task is None:
            c = self.cfg
            out.test_time_info = "none" if c.task_inference == "entropy" else "context" if c.embedding == "context" else "task_id"
            out.task_bytes = [c.embedding_dim * 4 if c.embedding == "learned" else 0 for _ in self.stream.tasks]
        return out

    @torch.no_grad()
    def task_inference_results(self) -> dict[str, Any]:
        """Which task entropy inference picks on each task's test set (``task_inference=entropy``)."""
        out: dict[str, Any] = {"task_inference": self.cfg.task_inference}
        if self.cfg.task_inference == "entropy":
            was = self.training
            self.eval()
            accs = []
            for pos, t in enumerate(self.stream.tasks):
                hits = 0
                for start in range(0, t.num_test, self.trainer_cfg.eval_batch_size):
                    chosen = self.infer(t.x_test[start : start + self.trainer_cfg.eval_batch_size])[1]
                    hits += int((chosen == pos).sum())
                accs.append(hits / max(1, t.num_test))
            self.train(was)
            out["task_inference_acc"] = accs
            out["task_inference_acc_mean"] = sum(accs) / len(accs)
        return out
