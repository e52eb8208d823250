"""HyperMask (Książek & Spurek, 2023): a hypernetwork emits a semi-binary mask over one target network's
weights per task, from a learned task embedding (or from the task's context)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from metagate.data.stream import Task
from metagate.methods.base import METHODS, BaseMethodConfig, Batch, MethodReport
from metagate.methods.components.hypernet_cl import HypernetCL, HypernetCLConfig
from metagate.nn.hypernetwork import percentile


def ramped_sparsity(iteration: int, sparsity: float, last_iteration: int) -> float:
    """The sparsity at (1-based) ``iteration`` of the first task: rising linearly from 0 to ``sparsity`` at
    ``last_iteration``, then flat (HyperMask ``main.py:89-106``, ``calculate_current_threshold``)."""
    if iteration >= last_iteration or last_iteration <= 0:
        return sparsity
    return sparsity / last_iteration * iteration


def random_crop(x: Tensor, padding: int) -> Tensor:
    """Each image of ``x [B, C, H, W]`` padded by ``padding`` on every side with the batch's smallest value
    (a black pixel in standardised data) and cropped back to ``H x W`` at a uniformly random offset (global
    torch generator): torchvision's ``RandomCrop(size, padding)``, per sample, in one indexing call."""
    b, c, h, w = x.shape
    xp = F.pad(x, (padding,) * 4, value=float(x.amin()))
    i = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    j = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    rows = (i[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (j[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[batch, chan, rows, cols]


@METHODS.register("hypermask")
class HyperMask(HypernetCL):
    """HyperMask (Książek & Spurek, "HyperMask: Adaptive Hypernetwork-based Masks for Continual Learning",
    arXiv 2310.00113; code ``gmum/HyperMask`` on ``hypnettorch``).

    One target network (the backbone, weights ``theta``) and a hypernetwork ``h`` (an MLP with ELU,
    :class:`~metagate.nn.hypernetwork.HyperNetwork`, as ``hypnettorch``'s ``HMLP``) that maps task ``t``'s
    embedding ``e_t`` to one tensor per target parameter tensor. The mask is ``m = |tanh(h(e_t))|``; in every
    tensor but the last (the output bias) entries below the tensor's ``sparsity``-th percentile are set to 0.
    Task ``t`` runs the target with ``theta * m`` (``torch.func.functional_call``); the output bias is
    neither thresholded nor masked. Training task ``t > 0`` minimises

        CE + beta * R / t + lambda * sum_i || (theta_i - theta*_i) * m_i ||_1,
        R = (1 / t) * sum_{j < t} || h(e_j) - h*(e_j) ||^2,

    with ``h*(e_j)`` the outputs for the earlier tasks' embeddings saved just before task ``t`` (all of them
    recomputed at every task), ``theta*`` the target's weights at the start of task ``t``, and ``m_i`` the
    current task's masks (the last one, the output bias's, unthresholded). Gradients reach ``theta``, the
    hypernetwork, the current embedding and, through ``R``, the earlier tasks' embeddings. On the first task
    the sparsity rises linearly from 0 to ``sparsity`` over its iterations; evaluation always uses the full
    ``sparsity``. Adam is fresh at every task.

    What the code does, and where (``main.py``, ``datasets.py`` of gmum/HyperMask at 674bf9b; hypnettorch):

    * masks: ``prepare_network_sparsity`` (``main.py:226-271``): ``|tanh|`` of every hypernetwork output,
      ``torch.where(m >= percentile(m, p), m, 0)`` per tensor except the last (``torchpercentile``: linear
      interpolation, here :func:`~metagate.nn.hypernetwork.percentile`); the hypernetwork emits all target
      parameters, biases included (``main.py:827-834``, ``use_bias=True`` at ``datasets.py:678``), and
      ``apply_mask_to_weights_of_network`` (``main.py:305-370``) multiplies all but the last tensor.
    * sparsity ramp on the first task: ``main.py:619-625`` with ``calculate_current_threshold``
      (``main.py:89-106``), at iteration ``i + 1`` of ``N``; ``adaptive_sparsity=True`` for every benchmark.
    * loss: ``main.py:690-696``; ``R`` from ``hypnettorch.utils.hnet_regularizer.calc_fix_target_reg``
      (squared error summed over all outputs, summed over the earlier tasks, divided by their number,
      ``hnet_regularizer.py:228-278``), called with ``batch_size=-1`` (every earlier task, ``main.py:675-684``)
      and divided again by ``max(1, t)`` in ``main.py:694``; the targets from ``get_current_targets`` at the
      start of the task (``main.py:561-563``). The L1 term (``norm=1``, ``datasets.py:677``) with
      ``norm_regularizer_masking=True`` multiplies the weight change by the current masks before the norm
      (``main.py:641-654``; gradients flow into the masks too: nothing is detached); the anchor is a copy of
      the target's weights at the task's start (``main.py:567``).
    * optimiser: ``torch.optim.Adam`` over hypernetwork (embeddings included) and target, made anew in
      ``train_single_task`` at every task (``main.py:532-538``); no learning-rate schedule for the MNIST
      benchmarks (``lr_scheduler=False``, ``datasets.py:300,566``); the last model is kept
      (``best_model_selection_method="last_model"``, ``datasets.py:295,563``).
    * hypernetwork: ``HMLP`` (``hypnettorch/hnets/mlp_hnet.py``): hidden layers with ELU
      (``datasets.py:676``), a linear output over all target entries, PyTorch's default ``nn.Linear`` init
      (``hypnettorch/utils/torch_utils.py:init_params``), one internal embedding per task drawn from
      ``N(0, 1)``.
    * defaults (the permuted-MNIST "best hyperparameters", ``datasets.py:284-319``): embedding 24, hypernetwork
      [100, 100], beta 5e-4, lambda 1e-3, sparsity 0, masked L1 on, target MLP [1000, 1000], Adam 1e-3, batch
      128, 5000 iterations per task (``trainer.iterations_per_task``). Split MNIST (``datasets.py:550-583``):
      embedding 128, hypernetwork [25, 25], beta 1e-3, lambda 1e-3, sparsity 30, MLP [400, 400], 2000
      iterations, augmentation (``augment=crop``). See ``configs/hypermask-*.yaml``.
    * task identity unknown (``task_inference=entropy``): ``entropy.py:21-77``: every task's mask is tried
      on a sample and the task whose softmax has the lowest entropy is chosen.

    Differences, all deliberate:

    * The target is metagate's backbone (``mlp``; ``cnn`` takes the same path), with its own output layout:
      split streams have one output per class with label masking where the code has a 2-unit head shared by
      all tasks, so here each task's output weights are its own rows; permuted Fashion-MNIST is 28 x 28
      (the code pads MNIST to 32 x 32, ``datasets.py:316``). ``resnet18`` is refused: the code's ResNet keeps
      batch-norm statistics per task (``use_batch_norm_memory``), not built here.
    * The hypernetwork's outputs for the current task and all earlier tasks come from one batched call
      (the same numbers as the code's call per task); the percentile comes from two ``kthvalue`` calls, not a
      sort, and is skipped at sparsity 0 (every value is at least the minimum: nothing is zeroed).
    * ``augment=crop`` (split): the code's ``RandomCrop(28, padding=4)`` on the raw image, then normalisation
      (hypnettorch ``MNISTData.torch_input_transforms``); here the data are standardised already, so the padding
      takes the batch's smallest value (a black pixel there).
    * Iterations: the code draws batches with ``next_train_batch`` (which runs on across reshuffled epochs);
      here ``trainer.iterations_per_task`` takes full batches over reshuffled passes, the last pass cut short.
    * Speed switches, off by default (issue 14 item 5): ``reg_subset = k`` regularises ``k`` random earlier
      tasks per step (``calc_fix_target_reg``'s ``batch_size``, which the code leaves at ``-1``: all);
      ``chunk_size > 0`` makes the hypernetwork chunked (the code's is not). The task embeddings, hypernetwork,
      target call and regulariser are shared with ``hnet`` (``methods/components/hypernet_cl.py``).
    * ``embedding=context`` (metagate's comparison, not in the paper): the hypernetwork's input is the task's
      context vector through a learned linear map (``context_projection``; off: the context itself), so a
      task never trained gets its mask zero-shot from its context.
    * Entropy task inference chooses among the tasks trained so far (the code runs it once, after the last
      task, over all of them); the entropy is over the outputs a task may use (its classes in a
      task-incremental stream).
    """

    class Config(HypernetCLConfig):
        name: Literal["hypermask"] = "hypermask"
        embedding_dim: int = Field(24, ge=1, description="size of a learned task embedding (code, permuted: 24)")
        activation: Literal["elu", "relu", "none"] = Field("elu", description="hypernetwork activation (code: ELU)")
        beta: float = Field(5e-4, ge=0, description="output regulariser strength (code, permuted: 5e-4)")
        lambda_: float = Field(1e-3, ge=0, alias="lambda", description="L1 strength on the target's weight change")
        l1_masked: bool = Field(True, description="L1 on the weight change times the current masks (norm_regularizer_masking)")
        sparsity: float = Field(0.0, ge=0, lt=100, description="percentile (0-100) below which mask values are zeroed")
        sparsity_ramp: bool = Field(True, description="raise the sparsity linearly over the first task (adaptive_sparsity)")
        augment: Literal["none", "crop"] = Field("none", description="crop: random 4-pixel-padded crop of each training image")

    name = "hypermask"
    cfg: Config

    @classmethod
    def config_problem(cls, cfg: BaseMethodConfig) -> str | None:
        problem = super().config_problem(cfg)
        if problem:
            return problem
        if cfg.backbone.kind == "resnet18":
            return (
                "hypermask masks the weights of an mlp or cnn backbone; the code's ResNet keeps batch-norm statistics "
                "per task, which is not built here: use method.backbone.kind=mlp or cnn"
            )
        return None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if self.cfg.augment == "crop" and len(self.stream.input_shape) != 3:
            raise ValueError(f"method.augment=crop needs image inputs [C, H, W], not {self.stream.input_shape}")
        if self.names[-1] != "head.bias":
            raise ValueError(f"hypermask expects the backbone's last parameter to be the output bias, not {self.names[-1]}")
        self.optimizer = self.make_optimizer(self.parameters())

    def register_extra_buffers(self) -> None:
        self.register_buffer("anchor", torch.zeros(self.hnet.num_outputs, device=self.device))  # theta* at the task's start, flat

    # ---------------------------------------------------------------- masks

    def masks_from(self, flat: Tensor, sparsity: float) -> list[Tensor]:
        """Per target tensor ``|tanh(h)|``, values below the tensor's ``sparsity``-th percentile zeroed, except
        in the last tensor (the output bias), from the flat hypernetwork output of one task."""
        masks = self.hnet.split(torch.tanh(flat).abs())
        if sparsity <= 0:
            return masks  # every value is >= the minimum: the code's threshold zeroes nothing
        out = [m * (m >= percentile(m, sparsity)).to(m.dtype) for m in masks[:-1]]
        return [*out, masks[-1]]

    def masked_weights(self, masks: list[Tensor]) -> dict[str, Tensor]:
        """``theta * m`` by parameter name for every tensor but the output bias (left as it is)."""
        params = dict(self.model.named_parameters())
        return {n: params[n] * m for n, m in zip(self.names[:-1], masks[:-1])}

    def task_weights(self, task: Task) -> dict[str, Tensor]:
        """The masked target weights of ``task`` at the full sparsity (cached until the next step)."""
        if task.index not in self._cache:
            with torch.no_grad():
                flat = self.hnet.flat(self.hnet_input([task.index]))[0]
                self._cache[task.index] = {k: v.detach() for k, v in self.masked_weights(self.masks_from(flat, self.cfg.sparsity)).items()}
        return self._cache[task.index]

    # ---------------------------------------------------------------- hooks

    def before_task(self, task: Task) -> None:
        self.begin_task(task)  # position, iterations, the earlier tasks' targets (main.py:561-563)
        if self.cfg.reset_optimizer:  # main.py:532-538: a new Adam at every task
            self.optimizer = self.make_optimizer(self.parameters())
        with torch.no_grad():
            self.anchor.copy_(torch.cat([p.detach().flatten() for p in self.model.parameters()]))  # main.py:567

    def current_sparsity(self) -> float:
        if self._position == 0 and self.cfg.sparsity_ramp:  # main.py:619-625
            return ramped_sparsity(self._steps + 1, self.cfg.sparsity, self._task_iterations)
        return self.cfg.sparsity

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        self._cache.clear()
        self.optimizer.zero_grad(set_to_none=True)
        pos = self._position
        x = random_crop(batch.x, 4) if self.cfg.augment == "crop" else batch.x
        earlier = self.regularised_positions()  # every earlier task (reg_subset: k of them)
        indices = [task.index] + [self.stream.tasks[j].index for j in earlier]
        flat = self.hnet.flat(self.hnet_input(indices))  # the current task and the earlier ones, one call
        masks = self.masks_from(flat[0], self.current_sparsity())
        logits = self.mask_logits(self.target(x, self.masked_weights(masks)), task, batch.task_ids)
        ce = F.cross_entropy(logits, batch.y)
        loss = ce
        out = {"ce": ce.detach()}
        if pos > 0:
            reg = self.output_regularizer(flat[1:], earlier)  # calc_fix_target_reg: mean over the earlier tasks
            l1 = ce.new_zeros(())
            for p, a, m in zip(self.model.parameters(), self.anchor.split(self.hnet.sizes), masks):
                change = p - a.view_as(p)
                l1 = l1 + (change * m if self.cfg.l1_masked else change).abs().sum()
            loss = loss + self.cfg.beta * reg / pos + self.cfg.lambda_ * l1  # main.py:690-696
            out.update(output_reg=reg.detach(), l1=l1.detach(), reg_tasks=torch.full((), float(len(earlier)), device=self.device))
        loss.backward()
        self.optimizer.step()
        self.count_step()
        return {"loss": loss.detach(), **out}

    # ---------------------------------------------------------------- test time

    def task_masks(self, task: Task) -> list[Tensor]:
        """The task's masks at the full sparsity, one per target tensor (the output bias's unapplied)."""
        with torch.no_grad():
            return self.masks_from(self.hnet.flat(self.hnet_input([task.index]))[0], self.cfg.sparsity)

    def unit_mask(self, task: Task) -> Tensor:
        """Which target weights the task uses (mask value above 0), over every masked tensor, flattened."""
        return torch.cat([m.flatten() > 0 for m in self.task_masks(task)[:-1]])

    @torch.no_grad()
    def report(self, task: Task | None = None) -> MethodReport:
        """Adds each task's mean mask value (the masks are semi-binary) and what entropy inference picks."""
        out = super().report(task)
        if task is None:
            means = [float(torch.cat([m.flatten() for m in self.task_masks(t)[:-1]]).mean()) for t in self.stream.tasks]
            out.figures.update(mask_value_mean=means, **self.task_inference_results())
        return out
