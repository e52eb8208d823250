"""metagate: a meta-agent that generates a task's gating mask from the task's context.

This module holds the method's hooks and its Config; the package's other modules, its parts."""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from metagate import metrics
from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, Method, MethodReport
from metagate.methods.metagate.agents import AgentKind, make_agent
from metagate.methods.metagate.contexts import ContextMode, ContextRange, task_contexts
from metagate.methods.metagate.few_shot import draw_examples, final_iou, fit_mask
from metagate.methods.metagate.priors import PriorKind, make_prior
from metagate.methods.metagate.stored import StoredMasks
from metagate.methods.metagate.window import AgentWindow
from metagate.methods.stabilizers import SIStabilizer
from metagate.nn.backbones import BackboneConfig
from metagate.nn.gates import standardise, topk_mask

# Switches removed after validation rejected them (docs/metagate.md): a saved config holding one at its "off" value
# (every run written before the removal) still reads as the same run; any other value is refused.
REMOVED_SWITCHES = ("free_quota", "si_relatedness")


@METHODS.register("metagate")
class MetaGate(Method):
    """metagate: gating masks generated from task context by a meta-agent.

    Idea: XdG gives each task a fixed random unit mask; HAT learns one per task from a task embedding. Neither can
    give a *new* task a useful mask before it trains. Here a meta-agent ``g`` maps the task's context information (a
    vector describing the task: factor values, an angle, an embedding) to mask logits, so masks of related tasks are
    related, and an untrained task's mask is generated from its context (zero-shot transfer).

    Algorithm (task t with context c_t; ``M_i`` the stored binary mask of each trained task i):

    1. *Zero-shot*: before any training on t, its mask is ``topk(std(g(c_t)) + prior * p_t)``, the top
       ``density`` units per hidden layer of the agent's logits (standardised per layer) plus the prior's score
       ``p_t`` (:mod:`.priors`: a fixed random score per task by default, which keeps tasks with similar contexts
       from piling onto the same units; XdG's random masks are its limit as ``prior`` grows).
    2. *Adaptation*: the target network's weights and the mask train on the task. With ``meta_learning``
       (default) the mask stays ``topk(g(c_t))`` and the task loss trains ``g`` itself through a straight-through
       estimator, while an output regulariser ``beta * BCE(g(c_i), M_i)`` over the stored tasks keeps their masks
       reproducible (the hypernetwork-CL regulariser of von Oswald et al. 2020, applied to masks). Without it, a
       free score vector, initialised at ``g(c_t)``, adapts instead and ``g`` only regresses old masks.
    3. *Consolidation*: ``M_t`` is stored (packed bits) and ``g`` regresses the stored pairs ``(c_i, M_i)`` for
       ``consolidation_steps`` steps, so it learns the map from contexts to the masks training found useful.
    4. *No forgetting*: a trained task is always predicted with its stored mask (exactly reproducible), and the
       weights it uses are protected by SI as in XdG (same stabiliser, same defaults), so that a comparison with
       XdG + SI isolates where the mask comes from.

    Relatives: XdG (Masse et al., PNAS 2018), HAT (Serra et al., ICML 2018: per-task unit gates from task
    embeddings), hypernetwork CL (von Oswald et al., ICLR 2020), HyperMask (Książek & Spurek, 2023: semi-binary masks
    from a task embedding), ANML (Beaulieu et al., ECAI 2020: a meta-learned network that gates a prediction network).

    Defaults and how they were chosen (the measurements: ``docs/metagate.md``):

    * SI ``c = 0.035``, ``xi = 0.01``, density 0.2 and the MLP 2 x 256: XdG's settings, so that the comparison
      with XdG + SI changes the mask's source only; the ready configs set the stream's own (chosen on validation).
    * ``prior = 1``: without a prior every task's mask converged to nearly the same units on streams whose contexts
      are alike (rotated Fashion-MNIST), and the shared units forgot. ``prior_kind`` stays ``random`` by default,
      so runs keep their meaning; the default run sets ``repel`` (chosen on validation on the composed teacher).
    * ``agent = mlp`` (bias-free MLP 2 x 128): the first agent, kept as the default so runs keep their meaning;
      ``additive`` (one network per context number, summed: composition of known factor values) is the default
      run's.
    * ``beta = 1``, ``agent_lr = 1e-3``, ``consolidation_steps = 300``: set once, not tuned; ``few_shot_steps``
      and ``few_shot_lr``: chosen on validation (tuning seeds), n fixed in advance.

    Deliberate choices:

    * SI, not HAT-style gradient masking: HAT freezes every unit an earlier task used, which starves later tasks
      of trainable units when masks overlap by design.
    * The MLP agent has no biases (a positively homogeneous function of the context): with biases every context
      starts from nearly the same mask, and fitting the first task's mask teaches the agent a constant.
    * Only trained tasks' contexts shape how a context is read (issue 25's protocol): the additive agent reads each
      number rescaled to [0, 1] over its range among them, refit after each task, as the repel prior's "same value"
      test does (:class:`~.contexts.ContextRange`); a task's zero-shot mask is thus the one it starts training with.
    * Task boundaries only read the device back (caches of the stored masks); a training step never does.

    Switches (each off by default; ``docs/metagate.md`` holds their history and validation figures):
    ``agent=additive`` (:mod:`.agents`); ``prior_kind=usage|repel`` (:mod:`.priors`); ``reg_batch`` /
    ``consolidation_batch`` (k stored masks per step, drawn with replacement: cost flat in the tasks);
    ``agent_every`` (:mod:`.window`); ``few_shot`` (:mod:`.few_shot`, a measurement only). Controls:
    ``context_mode=shuffled|onehot`` (:mod:`.contexts`). Ablations: ``meta_learning=false``, ``adapt=false`` (keep
    the zero-shot mask, train weights only). Supports task- and domain-incremental streams.
    """

    class Config(BaseMethodConfig):
        name: Literal["metagate"] = "metagate"
        backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(hidden=[256, 256], dropout=0.0))
        density: float = Field(0.2, gt=0, le=1, description="fraction of units per hidden layer a mask keeps")
        context_mode: ContextMode = "given"
        meta_learning: bool = Field(True, description="the task loss trains the meta-agent (else it only regresses masks)")
        adapt: bool = Field(True, description="adapt the mask on the task after the zero-shot mask")
        agent: AgentKind = Field(
            "mlp", description="mlp: a bias-free MLP of the whole context; additive: a sum of one small network per context number "
            "(with biases: composition of known factor values; contexts of at most 64 numbers)"
        )
        agent_hidden: list[int] = Field(default_factory=lambda: [128, 128], description="the MLP agent's widths (additive: the first is each number's)")
        reg_batch: int = Field(
            0, ge=0, description="stored masks in the output regulariser per training step: a random k with replacement (0: all; "
            "k > 0 keeps a step's cost flat as tasks accumulate)"
        )
        agent_every: int = Field(
            1, ge=1, description="meta-learning: the agent is updated every k-th step with the task loss's mask gradient "
            "accumulated over the k steps (its mean) and the regulariser once; the mask stays the one the agent gave at the "
            "window's start (1: every step; k > 1 makes k - 1 of k steps as cheap as XdG's)"
        )
        consolidation_batch: int = Field(
            0, ge=0, description="stored masks per consolidation step: a random k with replacement (0: all; k > 0 keeps the "
            "consolidation's cost per task flat)"
        )
        agent_lr: float = Field(1e-3, gt=0)
        mask_lr: float = Field(0.05, gt=0, description="learning rate of the free scores (meta_learning=false)")
        beta: float = Field(1.0, ge=0, description="output regulariser on stored tasks' masks")
        consolidation_steps: int = Field(300, ge=0)
        prior: float = Field(
            1.0, ge=0, description="weight of a fixed random score per task added to the agent's standardised logits (0 = none)"
        )
        prior_kind: PriorKind = Field(
            "random", description="the prior's score: random (a fixed N(0, 1) score per task); usage (the standardised negative "
            "number of stored masks using each unit, fixed at the task's start, plus 0.1 x its random score as a tie-break); "
            "repel (as usage, each stored mask counted with the fraction of context numbers in which its task differs from this one)"
        )
        few_shot: int = Field(
            0, ge=0, description="a measurement only: before a task trains, a mask is inferred from this many labelled "
            "examples of its training split and the task's accuracy with it recorded (few_shot_acc); training is unchanged (0: off)"
        )
        few_shot_steps: int = Field(50, ge=1, description="Adam steps of the few-shot mask's free scores (chosen on validation)")
        few_shot_lr: float = Field(0.01, gt=0, description="learning rate of the few-shot mask's free scores (chosen on validation)")
        c: float = Field(0.035, ge=0, description="SI strength (XdG's default)")
        xi: float = Field(0.01, gt=0, description="SI damping (XdG's default)")

        @model_validator(mode="before")
        @classmethod
        def _removed_switches(cls, data: Any) -> Any:
            if not isinstance(data, dict):
                return data
            for key in REMOVED_SWITCHES:
                if data.get(key, 0) not in (0, None):
                    raise ValueError(f"method.{key} was removed (validation rejected it: docs/metagate.md); leave it out")
            return {k: v for k, v in data.items() if k not in REMOVED_SWITCHES}

    name = "metagate"
    scenarios = ("task", "domain")
    gates = True
    cfg: Config

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        cfg, stream = self.cfg, self.stream
        self.widths = list(self.model.gated_widths)
        num_units = sum(self.widths)
        # The contexts the agent sees: per training task, then per held-out task.
        given = task_contexts(stream, cfg.context_mode)
        self.register_buffer("contexts", given.to(self.device))
        self.prior = make_prior(cfg.prior_kind, len(given), self.widths, self.device)
        self.slot = {t.index: i for i, t in enumerate([*stream.tasks, *stream.heldout])}
        self.register_buffer("slot_ids", torch.arange(len(given), device=self.device), persistent=False)
        self.context_range = ContextRange(given.shape[1], self.device)  # refit after each task on the trained tasks'
        self.agent = make_agent(cfg.agent, given.shape[1], num_units, cfg.agent_hidden).to(self.device)
        self.agent_optimizer = torch.optim.Adam(self.agent.parameters(), lr=cfg.agent_lr)
        self.scores = nn.Parameter(torch.zeros(num_units, device=self.device))
        self.stored = StoredMasks(self.slot_ids[: stream.num_tasks], num_units, self.device)
        # each task's zero-shot mask: what the agent generated from its context just before it trained
        self.register_buffer("zero_shot", torch.zeros(stream.num_tasks, num_units, dtype=torch.bool, device=self.device))
        if cfg.few_shot > 0:  # each task's few-shot mask (for extra_results; never in training), with the switch on only
            self.register_buffer("few_shot_masks", torch.zeros(stream.num_tasks, num_units, dtype=torch.bool, device=self.device))
        self._mask_override: tuple[int, Tensor] | None = None  # (task index, mask) while a few-shot mask is measured
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.current: int | None = None
        self.window = AgentWindow(cfg.agent_every) if cfg.agent_every > 1 else None
        self.set_stabilizer(SIStabilizer(self.model, cfg.c, cfg.xi, omega_rule="masse"))

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The base optimiser, plus the free mask scores (at ``mask_lr``) when they adapt."""
        optimizer = super().make_optimizer(params)
        if getattr(self, "scores", None) is not None and self.cfg.adapt and not self.cfg.meta_learning:
            optimizer.add_param_group({"params": [self.scores], "lr": self.cfg.mask_lr})
        return optimizer

    # ---------------------------------------------------------------- masks

    def agent_input(self, slots: Tensor) -> Tensor:
        """The contexts of the tasks in ``slots`` as the agent reads them (the additive agent: rescaled)."""
        contexts = self.contexts[slots]
        return self.context_range(contexts) if self.agent.rescaled_input else contexts

    def logits(self, slots: Tensor) -> Tensor:
        """The agent's mask logits for the tasks in ``slots`` (rows of ``contexts``), plus the prior: with ``prior``
        > 0 the agent's logits are standardised per layer first, so ``prior`` is the prior's weight relative to the
        context's."""
        z = self.agent(self.agent_input(slots))
        if self.cfg.prior == 0:
            return z
        return standardise(z, self.widths) + self.cfg.prior * self.prior.scores(slots)

    def _topk(self, z: Tensor) -> Tensor:
        return topk_mask(z, self.widths, self.cfg.density)

    def _update_prior(self) -> None:
        """At a task boundary (on the device, no host read): the prior's rows of the tasks not trained yet and not in
        training follow the stored masks."""
        open_ = ~self.stored.trained_rows(self.contexts.shape[0])
        if self.current is not None:
            open_[self.slot[self.current]] = False
        self.prior.update(self.stored.targets, open_, self.context_range(self.contexts))

    def slots(self, task: Task) -> Tensor:
        """The task's row of ``contexts`` as a one-element index tensor on the device (no copy)."""
        i = self.slot[task.index]
        return self.slot_ids[i : i + 1]

    def generated_mask(self, task: Task) -> Tensor:
        return self._topk(self.logits(self.slots(task))[0])

    def mask_for(self, task: Task) -> Tensor:
        """The flat unit mask used for ``task`` now (differentiable while the task trains)."""
        if self._mask_override is not None and self._mask_override[0] == task.index:
            return self._mask_override[1]
        if task.index == self.current:
            if self.cfg.adapt and not self.cfg.meta_learning:
                return self._topk(self.scores)
            if self.cfg.adapt:
                return self.generated_mask(task)
            with torch.no_grad():
                return self.generated_mask(task)
        if task.index in self.stored.dense:  # a trained task: its stored mask
            return self.stored.dense[task.index]
        with torch.no_grad():
            return self.generated_mask(task)

    def unit_mask(self, task: Task) -> Tensor:
        with torch.no_grad():
            return self.mask_for(task).bool()

    def masked_output(self, x: Tensor, mask: Tensor, task: Task, task_ids: Tensor | None = None) -> Tensor:
        """The network's output for ``x`` through the flat unit ``mask``."""
        return self.mask_logits(self.model(x, unit_masks=list(mask.split(self.widths))), task, task_ids)

    def forward(self, x: Tensor, task: Task, task_ids: Tensor | None = None) -> Tensor:
        return self.masked_output(x, self.mask_for(task), task, task_ids)

    # ---------------------------------------------------------------- few-shot

    def few_shot(self, task: Task, generator: torch.Generator) -> AbstractContextManager[None] | None:
        """``few_shot > 0``: a context in which ``task`` is predicted with :meth:`few_shot_mask` (recorded in
        ``few_shot_masks``); else ``None``."""
        if self.cfg.few_shot <= 0:
            return None
        return self._with_few_shot_mask(task, generator)

    @contextmanager
    def _with_few_shot_mask(self, task: Task, generator: torch.Generator) -> Iterator[None]:
        mask = self.few_shot_mask(task, generator)
        self.few_shot_masks[task.index] = mask
        self._mask_override = (task.index, mask.float())
        try:
            yield
        finally:
            self._mask_override = None

    def few_shot_mask(self, task: Task, generator: torch.Generator) -> Tensor:
        """The mask inferred from ``few_shot`` labelled examples of ``task``'s training data (:mod:`.few_shot`), the
        network and the agent frozen and in eval mode. Changes no parameter, gradient, buffer, optimiser state or the
        global random stream; on the device, no host read."""
        x, y = draw_examples(self.training_data(task), self.cfg.few_shot, generator)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                initial = self.logits(self.slots(task))[0]
            loss = lambda mask: F.cross_entropy(self.masked_output(x, mask, task), y)  # noqa: E731
            return fit_mask(initial, loss, self._topk, self.cfg.few_shot_steps, self.cfg.few_shot_lr)
        finally:
            self.train(was_training)

    # ---------------------------------------------------------------- hooks

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        self._update_prior()  # the task's prior row is fixed here (unchanged since the last after_task)
        with torch.no_grad():
            self.zero_shot[task.index] = self.generated_mask(task).bool()
        self.current = task.index
        if self.window is not None:
            self.window.discard()
        if self.cfg.adapt and not self.cfg.meta_learning:
            with torch.no_grad():
                self.scores.copy_(self.logits(self.slots(task))[0])

    def _agent_forward(self, task: Task) -> tuple[Tensor, Tensor | None]:
        """One agent call for a meta-learning step: the current task's logits, and the output regulariser over
        ``reg_batch`` stored tasks (``None`` before any task is stored)."""
        stored = self.stored.batch(self.cfg.reg_batch)
        slots = self.slots(task) if stored is None else torch.cat([self.slots(task), stored[0]])
        z = self.logits(slots)
        return z[0], None if stored is None else F.binary_cross_entropy_with_logits(z[1:], stored[1])

    def _regression_loss(self, k: int = 0) -> Tensor | None:
        """BCE between the agent's logits for the stored tasks' contexts (all, or ``k`` drawn) and their masks."""
        stored = self.stored.batch(k)
        if stored is None:
            return None
        return F.binary_cross_entropy_with_logits(self.logits(stored[0]), stored[1])

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        """One step without host syncs. With ``meta_learning``, one agent forward gives the current task's mask
        logits and the stored tasks' (for the regulariser), and the task loss and the regulariser share one backward
        pass: the regulariser reaches the agent only, so the target network's gradient is the task loss's alone when
        SI reads it; then the SI penalty's backward. With ``agent_every > 1`` the agent runs once per window
        (:class:`~.window.AgentWindow`) and a step trains the network through the window's mask."""
        assert self.stabilizer is not None
        meta = self.cfg.adapt and self.cfg.meta_learning
        window = self.window if meta else None
        reg = None
        if window is not None:
            if not window.is_open:
                z0, reg = self._agent_forward(task)
                window.open(z0, reg, self._topk(z0.detach()))
            mask, reg = window.mask, window.reg
            self.optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(self.masked_output(batch.x, mask, task, batch.task_ids), batch.y)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.agent_optimizer.zero_grad(set_to_none=True)
            if meta:
                z0, reg = self._agent_forward(task)
                loss = F.cross_entropy(self.masked_output(batch.x, self._topk(z0), task, batch.task_ids), batch.y)
            else:
                loss = self.task_loss(batch, task)
        (loss if reg is None or window is not None else loss + self.cfg.beta * reg).backward()
        self.stabilizer.after_backward()
        penalty = self.stabilizer.add_penalty_grad()  # the penalty's gradient, added without autograd
        out = {"loss": loss.detach(), "penalty": loss.new_zeros(()) if penalty is None else penalty.detach()}
        if reg is not None:
            out["mask_reg"] = reg.detach()
        if meta and window is None:
            self.agent_optimizer.step()
        self.optimizer.step()
        self.stabilizer.after_step()
        if window is not None:
            window.stepped(self.agent_optimizer, self.cfg.beta)
        return out

    def after_task(self, task: Task) -> None:
        if self.window is not None:
            self.window.close(self.agent_optimizer, self.cfg.beta)
        with torch.no_grad():
            final = self.mask_for(task).bool()
        self.current = None
        self.stored.store(task.index, final)
        self.context_range.fit(self.contexts, self.stored.trained_rows(self.contexts.shape[0]))  # the contexts known now: the trained tasks'
        self._update_prior()  # the next task (and the zero-shot evaluation of all untrained ones) sees this mask
        for _ in range(self.cfg.consolidation_steps):
            self.agent_optimizer.zero_grad(set_to_none=True)
            loss = self._regression_loss(self.cfg.consolidation_batch)
            assert loss is not None
            loss.backward()
            self.agent_optimizer.step()
        super().after_task(task)

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "agent_optimizer": self.agent_optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.agent_optimizer.load_state_dict(copy.deepcopy(state["agent_optimizer"]))  # a copy, as the base's

    def report(self, task: Task | None = None) -> MethodReport:
        """At the end: bytes per task (the task's stored mask as bits; the agent and the network are shared),
        and how well the agent regenerates each stored mask from its context (IoU)."""
        out = super().report(task)
        if task is None:
            out.task_bytes = [self.stored[t.index].nbytes for t in self.stream.tasks]
            out.figures.update(self._mask_figures())
        return out

    def _mask_figures(self) -> dict[str, Any]:
        with torch.no_grad():
            pairs = [(self.generated_mask(t).bool(), self.stored[t.index].bool()) for t in self.stream.tasks if t.index in self.stored.dense]
        ious = [float((a & b).sum() / (a | b).sum().clamp_min(1)) for a, b in pairs]
        # the same structure figures as the adapted masks', for the zero-shot ones (before adaptation): these
        # measure how the context shapes masks, the adapted ones also what training found
        zs = metrics.mask_summary(list(self.zero_shot.cpu()), self.stream.contexts().cpu())
        out = {
            "agent_mask_reproduction": ious,
            "zero_shot_mask_overlap_mean": zs["mask_overlap_mean"],
            "zero_shot_context_mask_correlation": zs["context_mask_correlation"],
        }
        if self.cfg.few_shot > 0:  # how near each task's few-shot and zero-shot masks came to its trained mask (IoU)
            final = torch.stack([self.stored[t.index].bool() for t in self.stream.tasks]).float()
            for name, masks in (("few_shot", self.few_shot_masks), ("zero_shot", self.zero_shot)):
                out[f"{name}_final_iou"] = final_iou(masks, final)
        return out
