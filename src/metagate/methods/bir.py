"""Brain-inspired replay (van de Ven, Siegelmann & Tolias, "Brain-inspired replay for continual learning with
artificial neural networks", Nature Communications 2020): a VAE whose encoder is also the classifier replays
class-conditional samples through its own feedback (decoder) connections, the decoder gated by the class."""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, Method, MethodReport
from metagate.methods.components.generative import DataRange, GeneratedSampleScorer, adam, image_grid
from metagate.methods.stabilizers import SIStabilizer
from metagate.nn.backbones import BackboneConfig


def log_normal_diag(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """``log N(z; mean, exp(logvar))`` summed over the last axis, without the constant (the code's ``log_Normal_diag``)."""
    return (-0.5 * (logvar + (z - mean).pow(2) / logvar.exp())).sum(-1)


class BIRNet(nn.Module):
    """The VAE-classifier hybrid of the code's ``models/vae.py`` (``AutoEncoder``) for flat inputs: encoder
    ``d -> hidden`` (ReLU), classifier from the last hidden layer (``classify="beforeZ"``), ``mu`` and ``logvar``
    (no bias, as ``fc_layer_split``), a per-class Gaussian-mixture prior (``z_class_means``, ``z_class_logvars``,
    initialised N(0, 1)); decoder ``z -> reversed(hidden)`` (ReLU), each hidden layer's pre-activation multiplied by
    the gate of the class (``fc_layer_fixed_gates``: per class a fixed random 0/1 mask, a unit kept with probability
    ``1 - gate_prop``; a soft class vector mixes the masks), and a sigmoid output layer without a gate."""

    def __init__(self, input_shape: tuple[int, ...], hidden: list[int], z_dim: int, classes: int, gate_prop: float, first_x: Tensor) -> None:
        super().__init__()
        self.shape, d = input_shape, math.prod(input_shape)
        widths = [d, *hidden]
        self.encoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], classes)
        self.mu = nn.Linear(widths[-1], z_dim)
        self.logvar = nn.Linear(widths[-1], z_dim, bias=False)
        down = [z_dim, *reversed(hidden)]
        self.decoder = nn.ModuleList(nn.Linear(a, b) for a, b in zip(down[:-1], down[1:]))
        self.output = nn.Linear(down[-1], d)
        for i, w in enumerate(down[1:]):  # fixed masks: buffers, so checkpoints keep them
            self.register_buffer(f"gate_{i}", (torch.rand(classes, w) >= gate_prop).float())
        self.prior_mean = nn.Parameter(torch.randn(classes, z_dim))
        self.prior_logvar = nn.Parameter(torch.randn(classes, z_dim))
        self.range = DataRange(first_x)

    def gates(self) -> list[Tensor]:
        return [getattr(self, f"gate_{i}") for i in range(len(self.decoder))]

    def features(self, x: Tensor) -> Tensor:
        h = x.flatten(1)
        for layer in self.encoder:
            h = torch.relu(layer(h))
        return h

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (the method's predictions)."""
        return self.head(self.features(x))

    def decode(self, z: Tensor, classes: Tensor) -> Tensor:
        """Pixel probabilities ``[B, d]`` for latents ``z`` gated by ``classes``: ``[B]`` ids or ``[B, C]`` probabilities."""
        c = F.one_hot(classes, self.head.out_features).float() if classes.ndim == 1 else classes
        h = z
        for layer, gate in zip(self.decoder, self.gates()):
            h = torch.relu(layer(h) * (c @ gate))
        return torch.sigmoid(self.output(h))

    def sample(self, classes: Tensor) -> Tensor:
        """One input per entry of ``classes`` (data space): ``z`` from that class's prior mode, decoded through its gates."""
        mean, logvar = self.prior_mean[classes], self.prior_logvar[classes]
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        return self.range.from_unit(self.decode(z, classes)).reshape(-1, *self.shape)


@METHODS.register("bir")
class BIR(Method):
    """Brain-inspired replay (van de Ven et al. 2020; official code ``GMvandeVen/brain-inspired-replay``, cited at
    69af567 / 1a030f7). One network (:class:`BIRNet`) is classifier and generator. Training task ``t`` (1-based),
    with the network frozen at the end of task ``t-1`` as the replaying model, each step (``models/vae.py``
    ``train_a_batch``, ``train.py`` ``train_cl``):

    * current batch: ``L_cur = recon + variat + CE``: recon the binary cross-entropy averaged over pixels; variat
      ``-(log p(z|y) - log q(z|x))`` with ``p(z|y)`` the prior mode of the true class, divided by the pixels; CE over
      the outputs of the classes seen so far (class-incremental ``active_classes``); the decoder gated by ``y``;
    * replay (*conditional replay* and *replay through feedback*): ``replay_batch`` classes drawn uniformly among
      earlier tasks' classes, ``z`` from their prior modes, decoded by the frozen network through its class gates;
      the frozen network's scores on them over the old classes are the targets (``--distill``, temperature 2):
      ``L_rep = recon + variat + KD``, the variat's prior the mixture of modes weighted by the softened scores, the
      decoder gated by the same probabilities (*gating based on internal context*), KD ``T^2 * CE`` against the
      softened scores (zero for the current task's classes);
    * ``loss = r L_cur + (1 - r) L_rep`` with ``r = 1/t`` (``rnt``); Adam over all parameters.

    Defaults (``options.py`` ``set_defaults`` for split MNIST, ``--brain-inspired``): z 100, encoder from
    ``backbone.hidden`` (the code: fc 400-400), gates by class with ``gate_prop`` 0.8 of the units masked per class
    (``dg_prop``), Adam lr 1e-3, betas (0.9, 0.999), created once (``reset_optimizer`` false), replay batch = batch,
    distillation temperature 2. ``si_c > 0`` adds SI over all parameters (BI-R + SI; the code sets ``dg_c`` for
    permuted MNIST and CIFAR-100 only: 0.1, its split-MNIST class-incremental ``si_c``, is used, not tuned).

    *Internal replay*: the code replays the output of a pre-trained, frozen conv stack (``--hidden``,
    ``--pre-convE``, ``--freeze-convE``); with fully connected layers only (MNIST: ``depth = 0``) its conv stack is
    empty, the "hidden" level is the input and replay is of inputs: the same here (MLP backbones only; a conv
    stack is not provided). Differences: the stream's standardised inputs are the encoder's input and the
    reconstruction target is their per-pixel range mapped to ``[0, 1]`` (:class:`DataRange`), the code feeds
    ``[0, 1]`` pixels to both; the optimiser and its step counts are the trainer's schedule (``trainer.epochs``;
    the code: 2000 iterations per task); in class-incremental streams ``predict`` scores the classes seen so far
    (the code's ``active_classes``); each step's replay is one batch (class-incremental streams only, the paper's main scenario).

    Generated-sample figures (``eval_samples > 0``, as ``dgr``'s): per learned class, ``eval_samples`` conditional
    samples scored by a classifier trained on all real training data (``generated_class_acc``, ``generated_acc``),
    measured after the Trainer's timed training.
    """

    class Config(BaseMethodConfig):
        name: Literal["bir"] = "bir"
        backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(kind="mlp", hidden=[400, 400]), description="encoder widths (mlp; the code: fc 400-400)")
        z_dim: int = Field(100, ge=1, description="latent size (code: 100)")
        gate_prop: float = Field(0.8, ge=0, lt=1, description="share of each decoder hidden layer masked per class (code, split MNIST: dg_prop 0.8)")
        lr: float = Field(1e-3, gt=0, description="Adam learning rate (code, split MNIST: 0.001)")
        beta1: float = Field(0.9, ge=0, lt=1)
        beta2: float = Field(0.999, ge=0, lt=1)
        temperature: float = Field(2.0, gt=0, description="distillation temperature (code: 2)")
        replay_batch: int | None = Field(None, ge=1, description="replayed samples per step (null: trainer.batch_size)")
        reset_optimizer: bool = Field(False, description="fresh Adam at every task (code: created once)")
        si_c: float = Field(0.0, ge=0, description="SI strength (0: BI-R alone; BI-R + SI: e.g. 0.1)")
        si_xi: float = Field(0.1, gt=0, description="SI damping (code: epsilon 0.1)")
        eval_samples: int = Field(500, ge=0, description="generated samples per learned class scored after each task (0: none)")
        evaluator: BackboneConfig = Field(default_factory=lambda: BackboneConfig(kind="mlp", hidden=[400, 400]), description="the classifier that scores generated samples")
        evaluator_epochs: int = Field(2, ge=1)

    name = "bir"
    cfg: Config
    scenarios = ("class",)
    context_input_refusal = per_task_heads_refusal = "bir's classifier is its VAE's encoder: context_input=none, heads=shared"

    @classmethod
    def config_problem(cls, cfg: BaseMethodConfig) -> str | None:
        if cfg.backbone.kind != "mlp" or not cfg.backbone.hidden:
            return "bir's VAE-classifier is fully connected: method.backbone.kind=mlp with hidden layers, e.g. hidden=[400, 400]"
        return super().config_problem(cfg)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s, c = self.stream, self.cfg
        self.model = BIRNet(s.input_shape, list(c.backbone.hidden), c.z_dim, s.num_outputs, c.gate_prop, s.tasks[0].x_train).to(self.device)  # type: ignore[assignment]
        self.optimizer = self.make_optimizer(self.model.parameters())
        if c.si_c > 0:
            self.set_stabilizer(SIStabilizer(self.model, c.si_c, c.si_xi))
        self.register_buffer("seen", torch.zeros(s.num_outputs, dtype=torch.bool, device=self.device))
        self.register_buffer("gen_acc", torch.full((s.num_tasks, s.num_outputs), float("nan"), device=self.device))
        self.register_buffer("evaluator_acc", torch.full((), float("nan"), device=self.device))
        self.register_buffer("grid_noise", torch.randn(10, c.z_dim, generator=torch.Generator().manual_seed(0)).to(self.device))
        self.previous: list[BIRNet] = []
        self.scorer = GeneratedSampleScorer(c.evaluator, c.evaluator_epochs)

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return adam(params, self.cfg.lr, (self.cfg.beta1, self.cfg.beta2))  # type: ignore[attr-defined]

    @property
    def net(self) -> BIRNet:
        return self.model  # type: ignore[return-value]

    def before_task(self, task: Task) -> None:
        super().before_task(task)
        old = sorted({c for t in self.stream.tasks[: task.index] for c in t.classes})
        self.old_classes = torch.as_tensor(old, dtype=torch.long, device=self.device)
        self.old_mask = torch.zeros(self.stream.num_outputs, dtype=torch.bool, device=self.device)
        self.old_mask[old] = True
        self.seen[list(task.classes)] = True
        self.active = self.seen.clone()  # classes of all tasks so far (the code's active_classes, class-incremental)
        self.task_number = task.index + 1
        if old:
            prev = copy.deepcopy(self.net).eval()
            prev.requires_grad_(False)
            self.previous = [prev]
        else:
            self.previous = []

    # ---------------------------------------------------------------- losses

    def vae_terms(self, x: Tensor, gate: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per sample: reconstruction (mean BCE over pixels), ``z``, ``log q(z|x)``, and the class logits."""
        net = self.net
        h = net.features(x)
        mu, logvar = net.mu(h), net.logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        target = net.range.to_unit(x).flatten(1)
        recon = F.binary_cross_entropy(net.decode(z, gate).clamp(1e-7, 1 - 1e-7), target, reduction="none").mean(1)
        return recon, z, log_normal_diag(z, mu, logvar), net.head(h)

    def current_loss(self, x: Tensor, y: Tensor) -> Tensor:
        net = self.net
        recon, z, log_q, logits = self.vae_terms(x, y)
        log_p = log_normal_diag(z, net.prior_mean[y], net.prior_logvar[y])
        variat = (log_q - log_p) / recon.new_tensor(float(math.prod(net.shape)))
        ce = F.cross_entropy(logits.masked_fill(~self.active, float("-inf")), y, reduction="none")
        return (recon + variat + ce).mean()

    def replay_loss(self, x: Tensor, scores: Tensor) -> Tensor:
        """``scores``: the frozen network's logits on the replayed ``x``, ``-inf`` outside the old classes."""
        net, T = self.net, self.cfg.temperature
        probs = torch.softmax(scores / T, dim=1)  # zero outside the old classes
        recon, z, log_q, logits = self.vae_terms(x, probs)
        comp = log_normal_diag(z.unsqueeze(1), net.prior_mean.unsqueeze(0), net.prior_logvar.unsqueeze(0))  # [B, C]
        log_p = torch.logsumexp(comp + torch.log(probs.clamp_min(1e-40)), dim=1)
        variat = (log_q - log_p) / recon.new_tensor(float(math.prod(net.shape)))
        logp = torch.log_softmax(logits.masked_fill(~self.active, float("-inf")) / T, dim=1)
        kd = -torch.where(probs > 0, probs * logp, torch.zeros_like(logp)).sum(1) * T * T
        return (recon + variat + kd).mean()

    @torch.no_grad()
    def replay(self, n: int) -> tuple[Tensor, Tensor]:
        prev = self.previous[0]
        classes = self.old_classes[torch.randint(len(self.old_classes), (n,), device=self.device)]
        x = prev.sample(classes)
        return x, prev(x).masked_fill(~self.old_mask, float("-inf"))

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        r = 1.0 / self.task_number
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.current_loss(batch.x, batch.y)
        if self.previous:
            loss = r * loss + (1 - r) * self.replay_loss(*self.replay(self.cfg.replay_batch or batch.x.shape[0]))
        loss.backward()
        if self.stabilizer is None:
            self.optimizer.step()
            return {"loss": loss.detach()}
        self.stabilizer.after_backward()
        penalty = self.stabilizer.add_penalty_grad()
        self.optimizer.step()
        self.stabilizer.after_step()
        return {"loss": loss.detach(), "penalty": loss.new_zeros(()) if penalty is None else penalty.detach()}

    @torch.no_grad()
    def predict(self, x: Tensor, task: Task) -> Tensor:
        logits = self(x, task)
        if self.stream.scenario == "class":  # the classes seen so far (the code's active_classes)
            logits = logits.masked_fill(~self.seen, float("-inf"))
        return logits

    # ---------------------------------------------------------------- measurement, pictures

    def report(self, task: Task | None = None) -> MethodReport:
        """After each task, the generated-sample accuracy per class and a sample grid (:meth:`_images`); at the
        end, those accuracies per task and class."""
        if task is not None:
            return MethodReport(images=self._images(task))
        out = super().report()
        out.figures.update(self._generator_figures())
        return out

    @torch.no_grad()
    def _images(self, task: Task) -> dict[str, Tensor]:
        """Per learned class: its generated-sample accuracy (measured here, after the timed training and the
        evaluation; own seed) and a row of 10 samples from fixed noise through its prior mode and gates."""
        learned = sorted({c for t in self.stream.tasks[: task.index + 1] for c in t.classes})
        net = self.net
        if self.cfg.eval_samples:
            scorer = self.scorer.classifier(self.stream, self.device)
            if torch.isnan(self.evaluator_acc):
                hits = sum((scorer(t.x_test).argmax(1) == t.y_test).sum() for t in self.stream.tasks)
                self.evaluator_acc.fill_(hits / sum(t.num_test for t in self.stream.tasks))
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(task.index)
                for c in learned:
                    x = net.sample(torch.full((self.cfg.eval_samples,), c, dtype=torch.long, device=self.device))
                    self.gen_acc[task.index, c] = (scorer(x).argmax(1) == c).float().mean()
        labels = torch.as_tensor(learned, device=self.device).repeat_interleave(10)
        z = net.prior_mean[labels] + self.grid_noise.repeat(len(learned), 1) * torch.exp(0.5 * net.prior_logvar[labels])
        x = net.range.from_unit(net.decode(z, labels)).reshape(-1, *net.shape)
        lo, hi = (net.range.lo.flatten(), net.range.hi.flatten()) if x.ndim == 2 else (net.range.lo[0], net.range.hi[0])
        return {f"samples_task{task.index}.png": image_grid(x, len(learned), lo, hi)}

    def _generator_figures(self) -> dict[str, Any]:
        if not self.cfg.eval_samples:
            return {}
        rows = [[None if v != v else v for v in row] for row in self.gen_acc.cpu().tolist()]
        means = [None if all(v is None for v in r) else sum(v for v in r if v is not None) / sum(v is not None for v in r) for r in rows]
        return {"generated_class_acc": rows, "generated_acc": means, "evaluator_test_acc": float(self.evaluator_acc)}
