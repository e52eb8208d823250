"""Context-dependent gating, XdG (Masse, Grant & Freedman, PNAS 2018), with SI or EWC."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Method
from metagate.methods.stabilizers import EWCStabilizer, SIStabilizer
from metagate.nn.backbones import BackboneConfig
from metagate.nn.dropout import Dropout
from metagate.nn.gates import BitMask, random_unit_masks


@METHODS.register("xdg")
class XdG(Method):
    """XdG: each task gets a fixed random binary mask over the hidden units of every hidden layer,
    each unit kept with probability ``1 - gate_fraction`` (paper: 80% gated), drawn once from the
    run's seed. Gating multiplies a hidden layer's activity *after* dropout; a gated-off unit has no
    output, so its incoming weights get no gradient on that task. Weights are protected by SI or EWC
    (``stabilizer``), Adam's state is reset at every task, and a task is predicted with its own mask
    (task-aware inference; tasks not yet trained use their own mask too).

    Defaults follow the paper's permuted-MNIST setting in the authors' code
    (nmasse/Context-Dependent-Gating, ``parameters.py`` / ``run_models.py``): MLP 2 x 2000, dropout 0.5
    on hidden layers, 0.2 on the input, Adam 1e-3 (batch 256 in the ready config), 80% gating,
    SI ``c = 0.035``, ``xi = 0.01``; EWC strength 10 on an accumulated Fisher anchored at the latest
    task. Differences, all deliberate:

    * SI consolidates as the XdG code does, ``Omega += relu(w) / (Delta^2 + xi)``
      (``SIStabilizer(omega_rule="masse")``).
    * EWC: the code's penalty is ``10 * sum F (theta - theta*)^2`` with a Fisher estimate that is a
      quarter of the mean over 2048 sampled-label gradients (it divides by the full batch size but
      uses a quarter of each batch). Here the Fisher is the plain mean over ``fisher_samples`` and
      the penalty ``ewc_lambda / 2 * sum F~ (theta - theta*)^2`` (online EWC, gamma 1), so
      ``ewc_lambda = 5`` gives the same penalty.
    * Biases start at zero and the output bias stays at zero, as in the code; weights start as
      PyTorch's default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, the code's range.
    * Masks are per-unit Bernoulli draws like the code's, from a torch generator per task (seeded
      from the run seed), so a task's mask does not depend on how many tasks came before.

    Supports task- and domain-incremental streams (with label masking in the former).
    """

    class Config(BaseMethodConfig):
        name: Literal["xdg"] = "xdg"
        backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(hidden=[2000, 2000], dropout=0.5))
        gate_fraction: float = Field(0.8, ge=0, lt=1, description="fraction of hidden units gated off per task")
        input_dropout: float = Field(0.2, ge=0, lt=1, description="dropout on the input (paper, MNIST: keep 0.8)")
        stabilizer: Literal["si", "ewc", "none"] = "si"
        c: float = Field(0.035, ge=0, description="SI strength")
        xi: float = Field(0.01, gt=0, description="SI damping")
        ewc_lambda: float = Field(5.0, ge=0, description="EWC strength (lambda/2 * F * dtheta^2)")
        fisher_samples: int = Field(2048, ge=1, description="inputs for the EWC Fisher (code: 32 x 64)")

    name = "xdg"
    scenarios = ("task", "domain")
    gates = True
    cfg: Config

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        with torch.no_grad():
            for module in self.model.modules():
                if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                    module.bias.zero_()
        self.model.head.bias.requires_grad_(False)
        self.optimizer = self.make_optimizer(self.model.parameters())
        self.input_dropout = Dropout(cfg.input_dropout) if cfg.input_dropout > 0 else nn.Identity()  # cheap CPU draw
        # One mask per task (training and held-out), from a per-task generator seeded off the run's RNG.
        self.register_buffer("mask_seed", torch.randint(2**62, ()), persistent=True)
        tasks = [*self.stream.tasks, *self.stream.heldout]
        self.masks = nn.ModuleDict({str(t.index): self._draw(t.index) for t in tasks})
        self._dense: dict[int, list[Tensor]] = {}
        if cfg.stabilizer == "si":
            self.set_stabilizer(SIStabilizer(self.model, cfg.c, cfg.xi, omega_rule="masse"))
        elif cfg.stabilizer == "ewc":
            self.set_stabilizer(
                EWCStabilizer(self.model, self, cfg.ewc_lambda, cfg.fisher_samples, "sampled", online=True, gamma=1.0)
            )
        self.register_load_state_dict_post_hook(lambda module, _: module._dense.clear())

    def _draw(self, index: int) -> nn.ModuleList:
        gen = torch.Generator().manual_seed(int(self.mask_seed) + 7919 * index)
        keep = 1.0 - self.cfg.gate_fraction
        return nn.ModuleList(BitMask(m).to(self.device) for m in random_unit_masks(self.model.gated_widths, keep, gen))

    def task_masks(self, task: Task) -> list[Tensor]:
        """The task's per-layer unit masks as floats on the device (unpacked once, then cached)."""
        if task.index not in self._dense:
            if str(task.index) not in self.masks:
                self.masks[str(task.index)] = self._draw(task.index)
            self._dense[task.index] = [m.float() for m in self.masks[str(task.index)]]
        return self._dense[task.index]

    def forward(self, x: Tensor, task: Task, task_ids: Tensor | None = None) -> Tensor:
        logits = self.model(self.input_dropout(x), unit_masks=self.task_masks(task))
        return self.mask_logits(logits, task, task_ids)

    def unit_mask(self, task: Task) -> Tensor:
        return torch.cat(self.task_masks(task)).bool()
