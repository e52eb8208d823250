"""hnet (von Oswald, Henning, Sacramento & Grewe, "Continual learning with hypernetworks", ICLR 2020): a
hypernetwork emits all of the target network's weights from a task embedding, and an output regulariser keeps
the weights it emits for earlier tasks where they were."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, MethodReport
from metagate.methods.components.hypernet_cl import HypernetCL, HypernetCLConfig


@METHODS.register("hnet")
class HNet(HypernetCL):
    """Hypernetwork continual learning (von Oswald et al., ICLR 2020; code ``chrhenning/hypercl``, the
    classifier of its MNIST experiments with the task given, ``cl_scenario=1``; library ``hypnettorch``).

    A hypernetwork ``h`` (:class:`~metagate.nn.hypernetwork.HyperNetwork`; chunked with ``chunk_size > 0``)
    maps task ``t``'s embedding ``e_t`` to every weight and bias of the target (the backbone, run with those
    weights through ``torch.func.functional_call``; its own parameters are never used). Training task ``t``
    minimises, over the hypernetwork's weights ``theta`` (chunk embeddings included) and ``e_t`` alone,

        CE(target(x; h(e_t, theta))) + beta * (1 / n) * sum_j || h*(e_j) - h(e_j, theta + dTheta) ||^2

    over the ``n`` earlier tasks ``j`` (all of them; ``reg_subset = k``: a random ``k`` per step), with
    ``h*(e_j)`` the outputs saved just before task ``t`` and ``dTheta`` the lookahead: the step Adam would take
    on the task loss alone, held constant (``lookahead=false``: ``dTheta = 0``, the simplified regulariser).
    Earlier embeddings stay as they were learned. Two Adams, fresh at every task.

    What the code does, and where (``chrhenning/hypercl`` at 10e58f9; ``mnist/`` is the paper's split and
    permuted MNIST; the classifier hypernetwork alone is HNET with the task given):

    * training step: ``mnist/train_splitMNIST.py:train_class_one_t``: ``weights = hnet.forward(t)``, the task
      loss backward, then ``dTheta = opstep.calc_delta_theta(optimizer, use_sgd_change=False, lr,
      detach_dt=True)`` (``utils/optim_step.py:adam_step``: ``m' = b1 m + (1-b1) g``, ``v' = b2 v + (1-b2) g^2``,
      ``dTheta = -lr sqrt(1-b2^s) / (1-b1^s) * m' / (sqrt(v') + eps)`` without changing Adam's state), then
      ``class_beta * hreg.calc_fix_target_reg(hnet, t, targets, dTheta=dTheta, batch_size=hnet_reg_batch_size)``
      backward and both optimisers' steps. ``no_lookahead=False`` in ``train_args_default.py`` for both
      benchmarks (here ``lookahead=true``). ``calc_fix_target_reg`` (``utils/hnet_regularizer.py``): squared
      error summed over all outputs (every weight, output heads of other tasks included: ``inds_of_out_heads``
      is not passed), summed over the regularised tasks and divided by their number; with ``batch_size`` a
      random subset (``np.random.choice`` without replacement). Targets: ``get_current_targets`` at the task's
      start.
    * optimisers: ``optim.Adam(hnet.theta, lr=class_lr)`` and ``optim.Adam([hnet.get_task_emb(t)],
      lr=class_lr_emb)``, both made anew for each task; ``theta`` contains the chunk embeddings, not the task
      embeddings (``mnist/chunked_hyper_model.py:theta``).
    * initialisation (``mnist/train_utils.py:generate_classifier``): every hypernetwork weight matrix
      Xavier-uniform, every bias 0, task embeddings ``N(0, std_normal_temb=1)``, chunk embeddings
      ``N(0, std_normal_emb=1)`` (``hnet_init = xavier`` here).
    * chunked hypernetwork (``mnist/chunked_hyper_model.py``): one hypernetwork emitting ``chunk_dim`` values
      from ``[task embedding, chunk embedding]``, run for every chunk, the chunks concatenated and cut to the
      target's size.
    * defaults, ``mnist/train_args_default.py`` (the paper's values; ``_set_default_permuted`` and
      ``_set_default_split``): permuted MNIST: target MLP 1000-1000 (ReLU), task embedding 24, chunk embedding 8,
      chunks of 78000, hypernetwork [25, 25] with ELU, beta 0.1, Adam 1e-4 (embeddings too), 5000 iterations,
      batch 128, inputs padded to 32 x 32, the first task unpermuted; with a 100-100 target ("small
      capacity"): embedding 64, chunk embedding 12, chunks of 2000, hypernetwork [100, 75, 50], beta 0.05.
      Split MNIST: target 400-400, embedding 96, chunk embedding 96, chunks of 42000, hypernetwork [10, 10]
      with ReLU, beta 0.01, Adam 1e-3, 2000 iterations, batch 128. See ``configs/hnet-*.yaml``.

    Differences, all deliberate:

    * This class's defaults are the permuted values *without* chunking (``chunk_size=0``: the hypernetwork
      emits all target weights at once, as in the paper's Sec. 3.1 and as HyperMask does); the ready configs
      set the code's chunking.
    * Output layout: metagate's streams have one output layer over all classes with label masking
      (task-incremental split) or one 10-unit layer (domain-incremental permuted); the code has a head per task
      (``cl_scenario=1``: ``n_out = out_dim * num_tasks``) whose unused heads the hypernetwork still emits and
      regularises. With a hypernetwork emitting all weights per task the two are the same model up to those
      unused rows. Fashion-MNIST at 28 x 28 (the code pads MNIST to 32 x 32 on permuted).
    * The earlier tasks' outputs come from one batched hypernetwork call (the code calls it per task), and
      the output layer's weight gradient is written into a buffer kept across steps; same numbers.
    * ``embedding=context`` (metagate's comparison, not in the paper): the hypernetwork's input is the task's
      context through a learned linear map (``context_projection``), trained with ``theta`` (and shifted by
      the lookahead with it), so an untrained task gets weights zero-shot from its context.
    * ``task_inference=entropy`` (the code's HNET+ENT, ``--infer_with_entropy``): the code picks the task per
      test batch of one sample; here per sample too, among the tasks trained so far.
    * Iterations: ``trainer.iterations_per_task`` takes full batches over reshuffled passes (the code's
      ``next_train_batch`` runs on across epochs).
    """

    class Config(HypernetCLConfig):
        name: Literal["hnet"] = "hnet"
        embedding_dim: int = Field(24, ge=1, description="size of a learned task embedding (code, permuted: 24)")
        hnet_hidden: list[int] = Field(default_factory=lambda: [25, 25], description="hypernetwork hidden widths (code, permuted: [25, 25])")
        activation: Literal["elu", "relu", "none"] = Field("elu", description="hypernetwork activation (code, permuted: ELU)")
        beta: float = Field(0.1, ge=0, description="output regulariser strength (code, permuted: class_beta 0.1)")
        lookahead: bool = Field(True, description="regularise h(e_j, theta + dTheta), dTheta Adam's step on the task loss (code: no_lookahead=False)")
        emb_lr: float | None = Field(None, gt=0, description="learning rate of the task embedding (None: trainer.lr; code: class_lr_emb = class_lr)")

    name = "hnet"
    cfg: Config
    hnet_init = "xavier"  # mnist/train_utils.py:generate_classifier

    @classmethod
    def config_problem(cls, cfg: BaseMethodConfig) -> str | None:
        problem = super().config_problem(cfg)
        if problem:
            return problem
        if not cfg.reset_optimizer:
            return "hnet trains a new task embedding with a new Adam at every task (as the code): method.reset_optimizer=true"
        return None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if self.cfg.lookahead and self.trainer_cfg.optimizer != "adam":
            raise ValueError("hnet's lookahead computes Adam's step (as the code): trainer.optimizer=adam, or method.lookahead=false")
        self.model.requires_grad_(False)  # the target's own weights are never used: the hypernetwork emits them all
        self._scratch: dict[str, tuple[Tensor, Tensor]] = {}  # lookahead work buffers, kept across steps (not state)
        self.optimizer = self.make_hnet_optimizer()

    # ---------------------------------------------------------------- parameters

    def theta(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters shared by all tasks (regularised, shifted by the lookahead): the hypernetwork's
        (chunk embeddings included) and, with ``embedding=context``, the context projection's."""
        named = [(f"hnet.{n}", p) for n, p in self.hnet.named_parameters()]
        if self.cfg.embedding == "context":
            named += [(f"projection.{n}", p) for n, p in self.projection.named_parameters()]
        return named

    def make_hnet_optimizer(self) -> torch.optim.Optimizer:
        """Adam over ``theta`` at ``trainer.lr`` and over the task embeddings at ``emb_lr`` (the code's two Adams;
        one with two parameter groups here: the same updates). Only the current task's embedding gets a
        gradient; under a fresh Adam the others' update is exactly 0."""
        t = self.trainer_cfg
        groups: list[dict[str, Any]] = [{"params": [p for _, p in self.theta()]}]
        if self.cfg.embedding == "learned":
            groups.append({"params": [self.embeddings], "lr": self.cfg.emb_lr or t.lr})
        if t.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum)
        fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for g in groups for p in g["params"])
        try:
            return torch.optim.Adam(groups, lr=t.lr, fused=fused or None)
        except RuntimeError:  # torch < 2.4 has no fused Adam on CPU
            return torch.optim.Adam(groups, lr=t.lr)

    # ---------------------------------------------------------------- weights

    def weights_from(self, flat: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.names, self.hnet.split(flat)))

    def task_weights(self, task: Task) -> dict[str, Tensor]:
        """All target weights of ``task`` (cached until the next step)."""
        if task.index not in self._cache:
            with torch.no_grad():
                flat = self.hnet.flat(self.hnet_input([task.index]))[0]
                self._cache[task.index] = {k: v.detach() for k, v in self.weights_from(flat).items()}
        return self._cache[task.index]

    def inputs(self, current: list[int], earlier: list[int]) -> Tensor:
        """Hypernetwork inputs for the current task and the earlier ones; the earlier embeddings detached
        (the code trains only the current one)."""
        if self.cfg.embedding == "learned" and earlier:
            return torch.cat([self.hnet_input(current), self.hnet_input(earlier).detach()])
        return self.hnet_input(current + earlier)

    # ---------------------------------------------------------------- hooks

    def before_task(self, task: Task) -> None:
        self.begin_task(task)
        self.optimizer = self.make_hnet_optimizer()  # train_class_one_t: new Adams for every task

    def lookahead_params(self) -> dict[str, Tensor]:
        """``theta + dTheta`` by name, ``dTheta`` Adam's next step from the current gradients and state, without
        changing the state (``utils/optim_step.py:adam_step``; ``detach_dt=True``: ``dTheta`` is a constant).
        ``hnet.out.weight`` (nearly all parameters) comes as a plain tensor in a kept buffer (its gradient is
        routed to the parameter by the hypernetwork's output layer); the others as ``p + dTheta``."""
        group = self.optimizer.param_groups[0]
        lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
        out: dict[str, Tensor] = {}
        for name, p in self.theta():
            g = p.grad
            if g is None:
                continue
            if name not in self._scratch or self._scratch[name][0].shape != p.shape:
                self._scratch[name] = (torch.zeros_like(p), torch.zeros_like(p))  # zeros: paged in now, not mid-task
            m, v = self._scratch[name]
            state = self.optimizer.state.get(p, {})
            step = self._steps + 1  # Adam's step count: a fresh Adam per task, one step per training step (read on the host)
            # m' = sm * m_, v' = sv * v_ (the scales folded into the last pass: 5 passes over the tensor)
            if "exp_avg" in state:
                m_ = torch.add(state["exp_avg"], g, alpha=(1 - b1) / b1, out=m)
                torch.addcmul(state["exp_avg_sq"], g, g, value=(1 - b2) / b2, out=v)
                sm, sv = b1, b2
            else:  # Adam's first step: zero moments
                m_ = g
                torch.mul(g, g, out=v)
                sm, sv = 1 - b1, 1 - b2
            # dTheta = -lr sqrt(1-b2^s)/(1-b1^s) * m' / (sqrt(v') + eps) = coef * m_ / (sqrt(v_) + eps / sqrt(sv))
            v.sqrt_().add_(eps / math.sqrt(sv))
            coef = -lr * math.sqrt(1 - b2**step) / (1 - b1**step) * sm / math.sqrt(sv)
            if name == "hnet.out.weight":
                out[name] = torch.addcdiv(p.detach(), m_, v, value=coef, out=v)
            else:
                out[name] = p + torch.div(m_, v, out=m).mul_(coef)
        return out

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        self._cache.clear()
        self.optimizer.zero_grad(set_to_none=True)
        earlier = self.regularised_positions() if self.cfg.beta > 0 else []
        earlier_idx = [self.stream.tasks[j].index for j in earlier]
        lookahead = self.cfg.lookahead and bool(earlier)
        # without the lookahead: the current task and the earlier ones in one call
        flat = self.hnet.flat(self.inputs([task.index], [] if lookahead else earlier_idx))
        logits = self.mask_logits(self.target(batch.x, self.weights_from(flat[0])), task, batch.task_ids)
        ce = F.cross_entropy(logits, batch.y)
        out = {"ce": ce.detach()}
        if not earlier:
            loss = ce
            loss.backward()
        elif not lookahead:
            reg = self.output_regularizer(flat[1:], earlier)
            loss = ce + self.cfg.beta * reg
            loss.backward()
        else:
            ce.backward()  # the task loss's gradient first: dTheta is Adam's step on it
            shifted = self.lookahead_params()
            proj = {k.split(".", 1)[1]: v for k, v in shifted.items() if k.startswith("projection.")}
            hnet_params = {k.split(".", 1)[1]: v for k, v in shifted.items() if k.startswith("hnet.")}
            z = self.hnet_input(earlier_idx, proj or None)
            if self.cfg.embedding == "learned":
                z = z.detach()
            reg = self.output_regularizer(self.hnet.flat(z, hnet_params), earlier)
            (self.cfg.beta * reg).backward()
            loss = ce.detach() + self.cfg.beta * reg.detach()
        if earlier:
            out.update(output_reg=reg.detach(), reg_tasks=torch.full((), float(len(earlier)), device=self.device))
        self.optimizer.step()
        self.count_step()
        return {"loss": loss.detach(), **out}

    # ---------------------------------------------------------------- results

    @torch.no_grad()
    def report(self, task: Task | None = None) -> MethodReport:
        """Adds the hypernetwork's size against the target network's and what entropy inference picks."""
        out = super().report(task)
        if task is None:
            hnet_params, target_params = sum(p.numel() for _, p in self.theta()), self.hnet.num_outputs
            out.figures.update(
                hnet_params=hnet_params,
                target_params=target_params,
                compression_ratio=hnet_params / target_params,  # the code's compression_ratio_class (theta only)
                **self.task_inference_results(),
            )
        return out
