"""The Method interface every continual-learning method implements, and its registry.

A Method owns its networks, optimisers and the state that fights forgetting. The Trainer drives it
through a few hooks and never knows which method it drives:

    before_task(task) -> train_step(batch, task)* -> after_task(task)
    predict(x, task) -> logits        (evaluation, any task, trained or not)
    report(task | None) -> MethodReport   (what it adds to the results: after a task, at the end)

Optional, for methods that need them: ``training_data(task)`` (what the batches are drawn from: joint
training's union of tasks), ``epochs_for(task, epochs)`` (passes per task: methods trained in phases) and
``few_shot(task, generator)`` (a measurement before a task trains).

State (weights, optimiser, importance, masks, ...) round-trips through ``state_dict()`` /
``load_state_dict()``: buffers are allocated at construction so a fresh method loads any checkpoint
of the same config, and the optimiser state rides along as the module's extra state.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from metagate.schema import MethodConfig, TrainerConfig
from metagate.data.stream import Scenario, Stream, Task
from metagate.methods.stabilizers import Stabilizer
from metagate.nn.backbones import BackboneConfig, build_backbone
from metagate.nn.film import FiLMNet
from metagate.registry import Registry


class Batch(NamedTuple):
    """A minibatch. ``task_ids`` is per-sample task index, set only when a batch mixes tasks."""

    x: Tensor
    y: Tensor
    task_ids: Tensor | None = None


class TrainingData(NamedTuple):
    """What the Trainer batches over for one task (tensors on the method's device)."""

    x: Tensor
    y: Tensor
    task_ids: Tensor | None = None


TestTimeInfo = Literal["none", "task_id", "context"]


@dataclass
class MethodReport:
    """What a method adds to its run's results (:meth:`Method.report`).

    After each task: ``images``, the pictures the run folder keeps of that moment (file name ending ``.png`` ->
    ``[C, H, W]`` or ``[H, W]`` values in ``[0, 1]``; generators' sample grids). At the end of the stream: what the
    method uses at test time besides the input (``test_time_info``), the bytes each task added to what it keeps
    (``task_bytes``, one per training task, ``None`` where it does not count them), each task's binary mask over
    its gated units (``unit_masks``, gating methods; the Trainer adds their density and overlap), and any further
    figures for ``results.json`` (``figures``)."""

    test_time_info: TestTimeInfo = "none"
    task_bytes: list[int | None] | None = None
    unit_masks: list[Tensor | None] | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    images: dict[str, Tensor] = field(default_factory=dict)


class BaseMethodConfig(MethodConfig):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    reset_optimizer: bool = Field(True, description="fresh optimiser state at every task")
    context_input: Literal["none", "concat", "film"] = Field(
        "none",
        description="how a method without gating sees the task's context vector. concat: appended to every input "
        "(MLP backbones). film: FiLM conditioning (Perez et al., AAAI 2018): a linear generator, part of the model "
        "(trained, and protected by EWC/SI), maps the context to a per-unit scale gamma and shift beta for every "
        "hidden layer, h = relu(gamma * (W x + b) + beta) (per channel on conv layers; the paper's FiLM sits after "
        "batch norm, before the ReLU, and these backbones have no norm); gamma = 1 + delta_gamma with the generator "
        "at zero, so the net starts as the plain net (MLP and CNN backbones)",
    )
    heads: Literal["shared", "per_task"] = Field(
        "shared",
        description="shared: one output layer; per_task: an output layer per task, chosen by the task's identity at test "
        "(domain-incremental streams: the task-aware counterpart of a task-agnostic method)",
    )


class Method(nn.Module):
    """Base class: a backbone, an optimiser, label masking for task-incremental streams."""

    Config: ClassVar[type[BaseMethodConfig]] = BaseMethodConfig
    name: ClassVar[str] = "base"
    scenarios: ClassVar[tuple[Scenario, ...]] = ("task", "domain", "class")
    gates: ClassVar[bool] = False  # gating methods mask hidden units: the backbone needs gated layers
    # Why the method refuses method.context_input (it selects what a task uses another way; "{name}" is replaced
    # by its name), and why it refuses method.heads=per_task (it has its own heads or one output layer).
    # None: accepted (gating methods refuse context_input with the gating message).
    context_input_refusal: ClassVar[str | None] = None
    per_task_heads_refusal: ClassVar[str | None] = None

    @classmethod
    def config_problem(cls, cfg: BaseMethodConfig) -> str | None:
        """What makes ``cfg`` impossible for this method, found before anything is built (else ``None``)."""
        if cls.gates and not cfg.backbone.gated_widths():
            return (
                f"{cls.name} gates hidden units, but the {cfg.backbone.kind} backbone has no hidden layer "
                "(method.backbone.hidden=[]): give it at least one, e.g. method.backbone.hidden=[256]"
            )
        refusal = cls.context_input_refusal or (
            "{name} uses the context through its masks; context_input is for methods without gating (finetune, si, ewc, joint, ...)"
            if cls.gates else None
        )
        if cfg.context_input != "none" and refusal:
            return refusal.replace("{name}", cls.name)
        if cfg.heads != "shared" and cls.per_task_heads_refusal:
            return cls.per_task_heads_refusal.replace("{name}", cls.name)
        if cfg.context_input == "concat" and cfg.backbone.kind != "mlp":
            return f"context_input=concat appends the context to a flat input: it needs backbone.kind=mlp, not {cfg.backbone.kind}"
        if cfg.context_input == "film" and cfg.backbone.kind not in ("mlp", "cnn"):
            return f"context_input=film modulates the hidden layers of an mlp or cnn backbone, not {cfg.backbone.kind}"
        if cfg.context_input == "film" and not cfg.backbone.gated_widths():
            return "context_input=film modulates hidden layers, but the mlp has none: give it one, e.g. method.backbone.hidden=[256]"
        return None

    def __init__(self, cfg: BaseMethodConfig, stream: Stream, trainer: TrainerConfig, device: torch.device) -> None:
        super().__init__()
        problem = self.config_problem(cfg)  # the config layer asks first; this catches a method built directly
        if problem:
            raise ValueError(problem)
        if stream.scenario not in self.scenarios:
            raise ValueError(
                f"method {self.name!r} supports the {', '.join(self.scenarios)}-incremental scenario(s), "
                f"not {stream.scenario!r} (benchmark {stream.name!r})"
            )
        self.cfg = cfg
        self.trainer_cfg = trainer
        self.stream = stream
        self.device = device
        self.num_heads = 1
        if cfg.heads == "per_task":
            if stream.scenario != "domain":
                raise ValueError(
                    f"method.heads=per_task is for domain-incremental streams ({stream.name} is {stream.scenario}-incremental: "
                    "task-incremental streams already restrict each task to its own outputs); use method.heads=shared"
                )
            self.num_heads = stream.num_tasks + len(stream.heldout)  # a head for every task that is ever evaluated
        input_shape: tuple[int, ...] = stream.input_shape
        if cfg.context_input != "none":
            tasks = [*stream.tasks, *stream.heldout]
            rows = torch.zeros(max(t.index for t in tasks) + 1, stream.context_dim)
            for t in tasks:
                rows[t.index] = t.context.float().cpu()
            self.register_buffer("task_contexts", rows, persistent=False)  # by task index
        if cfg.context_input == "concat":
            input_shape = (stream.input_dim + stream.context_dim,)
        self.model = build_backbone(cfg.backbone, input_shape, stream.num_outputs * self.num_heads)
        if cfg.context_input == "film":  # the generator is a submodule of the model: trained and stabilised with it
            self.model = FiLMNet(self.model, stream.context_dim)  # type: ignore[assignment]
        self.register_buffer("class_mask", stream.class_mask(), persistent=False)
        self.label_masking = stream.scenario == "task"
        self.stabilizer: Stabilizer | None = None  # set by methods that protect weights (EWC, SI, ...)
        self.to(device)
        self.optimizer = self.make_optimizer(self.model.parameters())

    def set_stabilizer(self, stabilizer: Stabilizer) -> None:
        self.stabilizer = stabilizer.to(self.device)

    # ---------------------------------------------------------------- optimiser

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """SGD or Adam from the trainer config, over the parameters that train (frozen ones are left out)."""
        t = self.trainer_cfg
        params = [p for p in params if p.requires_grad]
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum)
        # The fused kernel: one pass per tensor, and on CPU it avoids the foreach path's slow sqrt of
        # zero moments (gating leaves most units' Adam state at exactly zero, which doubled its time).
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
        try:
            return torch.optim.Adam(params, lr=t.lr, fused=fused or None)
        except RuntimeError:  # torch < 2.4 has no fused Adam on CPU: the same update, computed per tensor
            return torch.optim.Adam(params, lr=t.lr)

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # a copy: torch keeps the given moment tensors when device and dtype match, so a state dict
        # loaded in the process that made it would share (and advance) the source's Adam moments
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))

    # ---------------------------------------------------------------- forward

    def class_row(self, task: Task) -> Tensor:
        """Which outputs ``task`` may use (for held-out tasks, built from their classes)."""
        if task.index < self.class_mask.shape[0]:
            return self.class_mask[task.index]
        row = torch.zeros(self.class_mask.shape[1], dtype=torch.bool, device=self.class_mask.device)
        row[list(task.classes)] = True
        return row

    def mask_logits(self, logits: Tensor, task: Task, task_ids: Tensor | None = None) -> Tensor:
        """The task's own head (``heads=per_task``), then task-incremental label masking: outputs of
        other tasks get ``-inf``."""
        if self.num_heads > 1:
            per_head = logits.view(logits.shape[0], self.num_heads, -1)
            if task_ids is None:
                logits = per_head[:, task.index]
            else:
                logits = per_head.gather(1, task_ids.view(-1, 1, 1).expand(-1, 1, per_head.shape[2])).squeeze(1)
        if not self.label_masking:
            return logits
        allowed = self.class_mask[task_ids] if task_ids is not None else self.class_row(task)
        return logits.masked_fill(~allowed, float("-inf"))

    def task_context(self, x: Tensor, task: Task, task_ids: Tensor | None = None) -> Tensor:
        """The context vector of each sample's task, ``[batch, context_dim]`` (``context_input`` not ``none``):
        ``task``'s, or per sample by ``task_ids`` in a mixed batch. Indexing only: no host sync."""
        ctx = self.task_contexts[task_ids] if task_ids is not None else self.task_contexts[task.index].expand(x.shape[0], -1)
        return ctx.to(x.dtype)

    def model_input(self, x: Tensor, task: Task, task_ids: Tensor | None = None) -> Tensor:
        """What the backbone sees: ``x``, with ``context_input=concat`` followed by the task's context."""
        if self.cfg.context_input != "concat":
            return x
        return torch.cat([x.flatten(1), self.task_context(x, task, task_ids)], dim=1)

    def forward(self, x: Tensor, task: Task, task_ids: Tensor | None = None) -> Tensor:
        """Logits for inputs of ``task`` (or of the per-sample ``task_ids``), label-masked; with
        ``context_input=film`` the model takes the per-sample context beside the input."""
        if self.cfg.context_input == "film":
            logits = self.model(x, self.task_context(x, task, task_ids))
        else:
            logits = self.model(self.model_input(x, task, task_ids))
        return self.mask_logits(logits, task, task_ids)

    # ---------------------------------------------------------------- hooks

    def before_task(self, task: Task) -> None:
        if self.cfg.reset_optimizer:
            self.optimizer = self.make_optimizer(self.model.parameters())
        if self.stabilizer is not None:
            self.stabilizer.before_task(task)

    def training_data(self, task: Task) -> TrainingData:
        return TrainingData(task.x_train, task.y_train)

    def epochs_for(self, task: Task, epochs: int) -> int:
        """Passes over ``training_data(task)`` the Trainer runs for ``task`` given ``trainer.epochs``: a method
        that trains in several phases per task (MARK) asks for one ``epochs`` per phase. Default: ``epochs``."""
        return epochs

    def task_loss(self, batch: Batch, task: Task) -> Tensor:
        return F.cross_entropy(self(batch.x, task, batch.task_ids), batch.y)

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        """One optimiser step; returns detached loss tensors (no host sync). With a stabiliser, its
        penalty's gradient is added after the task loss's (which the stabiliser sees alone)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.task_loss(batch, task)
        loss.backward()
        if self.stabilizer is None:
            self.optimizer.step()
            return {"loss": loss.detach()}
        self.stabilizer.after_backward()
        penalty = self.stabilizer.add_penalty_grad()  # the penalty's gradient, added without autograd
        self.optimizer.step()
        self.stabilizer.after_step()
        return {"loss": loss.detach(), "penalty": loss.new_zeros(()) if penalty is None else penalty.detach()}

    def after_task(self, task: Task) -> None:
        if self.stabilizer is not None:
            self.stabilizer.after_task(task, final=self.is_final(task))

    def is_final(self, task: Task) -> bool:
        """Whether ``task`` is the stream's last training task (held-out tasks are never trained)."""
        return task.index == self.stream.tasks[-1].index

    @torch.no_grad()
    def predict(self, x: Tensor, task: Task) -> Tensor:
        return self(x, task)

    def few_shot(self, task: Task, generator: torch.Generator) -> AbstractContextManager[None] | None:
        """A measurement before ``task`` trains (after its zero-shot evaluation): a context in which ``predict`` for
        ``task`` uses what the method infers from a few labelled training examples of it, drawn with ``generator``
        (the Trainer's, seeded from the run's seed and the task), else ``None`` (the default: no such measurement).
        Entering and leaving it must change no parameter, buffer, optimiser state or the global random stream: it
        only measures, and training then proceeds as without it."""
        return None

    def report(self, task: Task | None = None) -> MethodReport:
        """What the method adds to its run's results (:class:`MethodReport`): after training ``task`` the Trainer
        asks with it and keeps the ``images``; at the end of the stream it asks with ``None`` and keeps the rest.
        A method extends ``super().report(task)``; the default reports nothing after a task, and at the end what
        the base class knows: ``task_id`` at test time with label masking, a head per task or gating, ``context``
        with a context input, else ``none``; a gating method's ``unit_mask`` of every task."""
        if task is not None:
            return MethodReport()
        if self.gates or self.label_masking or self.num_heads > 1:
            info: TestTimeInfo = "task_id"  # a task's mask, head or label set is chosen by its identity
        else:
            info = "context" if self.cfg.context_input != "none" else "none"
        masks = [self.unit_mask(t) for t in self.stream.tasks]
        return MethodReport(test_time_info=info, unit_masks=None if any(m is None for m in masks) else masks)

    def unit_mask(self, task: Task) -> Tensor | None:
        """For gating methods: the task's binary mask over all gated units, flattened (else ``None``)."""
        return None

    def head_bytes(self) -> int:
        """Bytes of one task's output layer (float32) with ``heads=per_task``, else 0 (the head is shared)."""
        if self.num_heads == 1:
            return 0
        head = self.model.head if hasattr(self.model, "head") else None
        if head is None:
            return 0
        return (head.weight.numel() + (head.bias.numel() if head.bias is not None else 0)) * 4 // self.num_heads


METHODS: Registry[type[Method]] = Registry("method", group="metagate.methods")


def create_method(cfg: MethodConfig, stream: Stream, trainer: TrainerConfig, device: torch.device) -> Method:
    """The method ``cfg.name`` built for ``stream``."""
    cls = METHODS.get(cfg.name)
    return cls(cfg, stream, trainer, device)  # type: ignore[arg-type]
