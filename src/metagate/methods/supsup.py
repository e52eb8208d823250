"""SupSup, supermasks in superposition (Wortsman, Ramanujan, Liu, Kembhavi, Rastegari, Yosinski & Farhadi,
"Supermasks in Superposition", NeurIPS 2020): a fixed random network, a binary supermask per task learned by
edge-popup scores, and the task inferred at test time by the gradient of the output entropy with respect to the
masks' mixing weights."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.func import functional_call

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, Method, MethodReport
from metagate.nn.backbones import BackboneConfig
from metagate.nn.gates import BitMask, binarize_ste


@METHODS.register("supsup")
class SupSup(Method):
    """SupSup (Wortsman et al., NeurIPS 2020; code ``RAIVNLab/supsup``, read at 6a31878: ``models/modules.py``,
    ``models/module_util.py``, ``models/init.py``, ``adaptors.py``, ``trainers/reinit.py``, ``main.py``,
    ``experiments/GNu/MNISTPerm/FC-250-tasks/supsup_h.py``).

    Every conv and linear weight of the backbone, the output layer included, is fixed at a random signed constant,
    ``sign(w) * gain / sqrt(fan_in)`` with the ReLU gain ``sqrt(2)`` (``init.py:7-11``; no biases: they are zero
    and frozen here). Task ``t`` learns a real score per weight, initialised ``kaiming_uniform(a=sqrt(5))``
    (``module_util.py:8-11``); its supermask is ``1[score >= 0]`` with a straight-through gradient
    (``GetSubnetFast``, ``module_util.py:118-125``, used by ``FastMultitaskMaskConv``, ``modules.py:113-156``), and
    the task runs the network with ``W * M_t``. After the task its mask is kept as bits and its scores dropped, so
    no later task can change an earlier task's function: backward transfer is exactly zero.

    ``task_inference=oneshot`` (the GNu scenario: the task is not given at test, ``test_time_info`` ``none``):
    the masks of the ``k`` tasks learned so far are superposed, ``W * sum_i alpha_i M_i`` with ``alpha_i = 1/k``;
    the entropy of the softmax output on the first ``inference_samples`` inputs of a batch is differentiated with
    respect to ``alpha``, and the task with the most negative gradient is chosen for the whole batch
    (``se_oneshot_minimization`` with ``se_oneshot_entropy_minimization``, ``adaptors.py:76-122,368-373``; the
    code's ``data_to_repeat = 1``: one input decides, batches of ``test_batch_size = 128``). The batch is then
    predicted with the chosen task's mask (and, in a task-incremental stream, that task's classes).

    ``transfer`` (the paper's "SupSup with transfer", ``rn18-supsup-transfer.py``: ``--reinit-adapt running_mean``
    with ``trainers/reinit.py:110-123``): a new task's scores start at the mean of the earlier tasks' final scores
    (the code's rescaling by ``norm(mean) / norm(mean)`` is the identity), so its first mask is the running mean's
    sign pattern; a task not trained yet is predicted with that mask (its zero-shot accuracy). Without transfer, a
    task not trained yet is predicted with the mask of its own initial scores.

    Defaults as the permuted-MNIST run (``supsup_h.py``): RMSprop ``lr = 1e-4`` (``main.py:234-235``, made afresh
    per task), no schedule, 1000 iterations per task (``iter_lim``), batch 128 (``args.py:20-24``), FC 1024-1024
    (``models/small.py:34-49``).

    Differences, all deliberate:

    * The network is metagate's backbone (``mlp`` or ``cnn``), its biases zero and frozen (the code's layers have
      none); the output layer is masked as in the code. The code's permuted runs give each task its own 10 of 500
      outputs (``unshared_labels``); here a domain-incremental stream shares its outputs, which the task's mask on
      the output layer makes task-specific anyway, and a task-incremental stream masks labels.
    * The budget is the trainer's (``trainer.epochs`` or ``trainer.iterations_per_task``); ``trainer.lr`` /
      ``trainer.optimizer`` are unused (``lr``). Scores for a task are drawn from a generator seeded by the run and
      the task (the code draws all tasks' scores at construction), so a task's initial mask does not depend on the
      tasks before it.
    * ``1[score >= 0]`` vs :func:`~metagate.nn.gates.binarize_ste`'s ``score > 0``: they differ only at a score of
      exactly 0.
    * Task inference chooses among the tasks trained so far and runs on every batch of ``inference_batch`` inputs
      of an evaluation call (the code: every test batch); a wrongly inferred batch is predicted with the wrong
      task's mask (the code counts it as wrong without predicting it).
    """

    class Config(BaseMethodConfig):
        name: Literal["supsup"] = "supsup"
        backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(hidden=[1024, 1024]))
        lr: float = Field(1e-4, gt=0, description="RMSprop rate on the scores (code, permuted MNIST: 1e-4)")
        task_inference: Literal["given", "oneshot"] = Field(
            "given", description="given: the task's mask at test (GG); oneshot: the entropy gradient over superposed masks picks it (GNu)"
        )
        inference_samples: int = Field(1, ge=1, description="inputs of a batch whose entropy decides its task (code: data_to_repeat 1)")
        inference_batch: int = Field(128, ge=1, description="inputs that share one inferred task (code: test_batch_size 128)")
        transfer: bool = Field(False, description="start a task's scores at the mean of the earlier tasks' (reinit_adapt running_mean)")

    name = "supsup"
    context_input_refusal = "supsup selects a task's supermask by its identity (or infers it); context_input is for methods without masks"
    per_task_heads_refusal = "supsup masks its output layer per task: leave method.heads=shared"
    scenarios = ("task", "domain")
    cfg: Config

    @classmethod
    def config_problem(cls, cfg: BaseMethodConfig) -> str | None:
        problem = super().config_problem(cfg)
        if problem:
            return problem
        if cfg.backbone.kind not in ("mlp", "cnn"):
            return f"supsup masks the weights of an mlp or cnn backbone (no batch norm), not {cfg.backbone.kind}"
        return None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.weight_names = [f"{n}.weight" for n, m in self.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name in self.weight_names:  # init.py:7-11 signed_constant (fan_in, relu gain)
                w = params[name]
                fan_in = w[0].numel()
                w.copy_(w.sign() * math.sqrt(2.0) / math.sqrt(fan_in))
            for m in self.model.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                    m.bias.zero_()
        self.model.requires_grad_(False)
        self.shapes = [tuple(params[n].shape) for n in self.weight_names]
        self.scores = nn.ParameterList(nn.Parameter(torch.zeros(s, device=self.device)) for s in self.shapes)
        rows = max(t.index for t in [*self.stream.tasks, *self.stream.heldout]) + 1
        self.stored = nn.ModuleList(nn.ModuleList(BitMask(torch.zeros(s, dtype=torch.bool)) for s in self.shapes) for _ in range(rows)).to(self.device)
        self.register_buffer("score_seed", torch.randint(2**62, ()), persistent=True)
        self.register_buffer("trained", torch.zeros(rows, dtype=torch.bool))  # which rows hold a learned mask
        self.register_buffer("order", torch.full((rows,), -1, dtype=torch.long))  # the position each task was trained at
        for i, s in enumerate(self.shapes):  # the sum of the trained tasks' final scores (transfer's running mean)
            self.register_buffer(f"score_sum_{i}", torch.zeros(s, device=self.device))
        self._current: int | None = None
        self._dense: dict[Any, list[Tensor]] = {}
        self.optimizer = torch.optim.RMSprop(self.scores.parameters(), lr=self.cfg.lr)
        self.register_load_state_dict_post_hook(lambda module, _: module._dense.clear())

    # ---------------------------------------------------------------- masks

    def initial_scores(self, index: int) -> list[Tensor]:
        """``kaiming_uniform(a=sqrt(5))`` scores of task ``index`` (bound ``1 / sqrt(fan_in)``), from a generator
        seeded by the run and the task; with ``transfer`` and a trained task, the trained tasks' mean score."""
        n = int(self.trained.sum())
        if self.cfg.transfer and n > 0:
            return [getattr(self, f"score_sum_{i}") / n for i in range(len(self.shapes))]
        gen = torch.Generator().manual_seed(int(self.score_seed) + 7919 * index)
        out = []
        for s in self.shapes:
            bound = 1.0 / math.sqrt(math.prod(s[1:]))
            out.append((torch.rand(s, generator=gen) * 2 - 1).mul_(bound).to(self.device))
        return out

    def task_masks(self, task: Task) -> list[Tensor]:
        """The task's supermask as floats: stored bits once trained, else the mask of the scores it would start
        from (cached until the next task or load)."""
        if task.index == self._current:
            with torch.no_grad():
                return [(s >= 0).float() for s in self.scores]
        if task.index not in self._dense:
            if bool(self.trained[task.index]):
                self._dense[task.index] = [m.float() for m in self.stored[task.index]]
            else:
                self._dense[task.index] = [(s >= 0).float() for s in self.initial_scores(task.index)]
        return self._dense[task.index]

    def run(self, x: Tensor, masks: list[Tensor]) -> Tensor:
        params = dict(self.model.named_parameters())
        return functional_call(self.model, {n: params[n] * m for n, m in zip(self.weight_names, masks)}, (x,))

    def forward(self, x: Tensor, task: Task, task_ids: Tensor | None = None) -> Tensor:
        if self.training and task.index == self._current:
            masks = [binarize_ste(s, 0.0) + (s == 0).to(s.dtype).detach() for s in self.scores]  # 1[s >= 0], straight through
        else:
            masks = self.task_masks(task)
        return self.mask_logits(self.run(x, masks), task, task_ids)

    # ---------------------------------------------------------------- task inference

    def candidates(self) -> list[Task]:
        """Trained tasks in training order (the first task before any is trained)."""
        done = [t for t in [*self.stream.tasks, *self.stream.heldout] if bool(self.trained[t.index])]
        return sorted(done, key=lambda t: int(self.order[t.index])) or [self.stream.tasks[0]]

    def _stacked(self, tasks: list[Task]) -> list[Tensor]:
        key = ("stack", tuple(t.index for t in tasks))
        if key not in self._dense:
            per = [self.task_masks(t) for t in tasks]
            self._dense[key] = [torch.stack([p[i] for p in per]) for i in range(len(self.shapes))]
        return self._dense[key]

    def infer(self, x: Tensor) -> Tensor:
        """Position in ``candidates()`` of the task inferred for the batch ``x`` (one for all of it): the most
        negative gradient of the mean output entropy of its first ``inference_samples`` inputs with respect to
        the superposition weights ``alpha = 1/k`` (``adaptors.py:94-112``)."""
        tasks = self.candidates()
        stacked = self._stacked(tasks)
        with torch.enable_grad():
            alphas = torch.full((len(tasks),), 1.0 / len(tasks), device=x.device, requires_grad=True)
            masks = [(alphas.view(-1, *([1] * (m.ndim - 1))) * m).sum(0) for m in stacked]
            logits = self.run(x[: self.cfg.inference_samples], masks)
            entropy = -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(1).mean()
            (grad,) = torch.autograd.grad(entropy, alphas)
        return grad.argmin()

    @torch.no_grad()
    def predict(self, x: Tensor, task: Task) -> Tensor:
        if self.cfg.task_inference == "given":
            return self(x, task)
        tasks = self.candidates()
        out = []
        for start in range(0, x.shape[0], self.cfg.inference_batch):
            chunk = x[start : start + self.cfg.inference_batch]
            chosen = tasks[int(self.infer(chunk))]  # evaluation, not a training step: one read per batch
            out.append(self.mask_logits(self.run(chunk, self.task_masks(chosen)), chosen))
        return torch.cat(out)

    # ---------------------------------------------------------------- hooks

    def before_task(self, task: Task) -> None:
        self._current = task.index
        with torch.no_grad():
            for s, init in zip(self.scores, self.initial_scores(task.index)):
                s.copy_(init)
        self.optimizer = torch.optim.RMSprop(self.scores.parameters(), lr=self.cfg.lr)  # a new optimiser per task (main.py:231-239, inside the task loop)

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self(batch.x, task, batch.task_ids), batch.y)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach()}

    @torch.no_grad()
    def after_task(self, task: Task) -> None:
        self.stored[task.index] = nn.ModuleList(BitMask(s >= 0) for s in self.scores).to(self.device)
        for i, s in enumerate(self.scores):
            getattr(self, f"score_sum_{i}").add_(s)
        self.order[task.index] = int(self.trained.sum())
        self.trained[task.index] = True
        self._current = None
        self._dense.clear()

    def get_extra_state(self) -> dict[str, Any]:  # checkpoints fall between tasks; each task makes its RMSprop afresh
        return {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------- figures

    @torch.no_grad()
    def unit_mask(self, task: Task) -> Tensor:
        """Which weights the task's supermask keeps, over every masked tensor, flattened."""
        return torch.cat([m.flatten() for m in self.task_masks(task)]).bool()

    def report(self, task: Task | None = None) -> MethodReport:
        """At the end of the stream: what it uses at test time, bytes per task (:meth:`_task_bytes`) and its own
        figures (:meth:`_figures`)."""
        out = super().report(task)
        if task is None:
            out.test_time_info = "none" if self.cfg.task_inference == "oneshot" else "task_id"
            out.task_bytes = [self._task_bytes(t) for t in self.stream.tasks]
            out.figures.update(self._figures())
        return out

    def _task_bytes(self, task: Task) -> int:
        """The task's supermask as bits (1 per weight); the random weights are shared (a seed would do)."""
        return sum(math.ceil(math.prod(s) / 8) for s in self.shapes)

    @torch.no_grad()
    def _figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"task_inference": self.cfg.task_inference, "supsup": {"transfer": self.cfg.transfer}}
        if self.cfg.task_inference == "oneshot":
            was = self.training
            self.eval()
            tasks, accs = self.candidates(), []
            for t in self.stream.tasks:
                want = next((p for p, c in enumerate(tasks) if c.index == t.index), -1)
                hits = batches = 0
                for start in range(0, t.num_test, self.cfg.inference_batch):
                    chunk = t.x_test[start : start + self.cfg.inference_batch]
                    hits += int(self.infer(chunk) == want) * chunk.shape[0]
                    batches += chunk.shape[0]
                accs.append(hits / max(1, batches))
            self.train(was)
            out["task_inference_acc"] = accs
            out["task_inference_acc_mean"] = sum(accs) / len(accs)
        return out
