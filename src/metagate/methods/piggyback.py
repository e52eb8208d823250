"""Piggyback (Mallya, Davis & Lazebnik, "Piggyback: Adapting a Single Network to Multiple Tasks by Learning to
Mask Weights", ECCV 2018): a binary mask per weight of a frozen backbone, learned per task through real-valued
scores and a straight-through threshold, with a new output layer per task."""

from __future__ import annotations

import glob
import math
import os
import warnings
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


class TorchvisionFeatures(nn.Module):
    """A torchvision classification network without its last linear layer: ``forward(x)`` gives the features
    the classifier would see. Inputs are resized to ``input_size`` (bilinear) when it is set."""

    def __init__(self, net: nn.Module, input_size: int | None) -> None:
        super().__init__()
        last = None
        for name in ("fc", "classifier", "head"):
            if isinstance(getattr(net, name, None), nn.Linear):
                last = name
        if last is None:  # e.g. VGG: classifier is a Sequential ending in a Linear
            seq = getattr(net, "classifier", None)
            if isinstance(seq, nn.Sequential) and isinstance(seq[-1], nn.Linear):
                self.num_features = seq[-1].in_features
                seq[-1] = nn.Identity()
            else:
                raise ValueError(f"{type(net).__name__}: no final linear layer (fc / classifier) found to replace by per-task heads")
        else:
            self.num_features = getattr(net, last).in_features
            setattr(net, last, nn.Identity())
        self.net = net
        self.input_size = input_size

    def forward(self, x: Tensor) -> Tensor:
        if self.input_size is not None and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.net(x).flatten(1)


def read_weights(path: str) -> dict[str, Tensor]:
    """A ``state_dict`` from ``path`` (tensors only: ``weights_only``); a file that is not one is a one-line
    ``ValueError`` (torch's own text, which may advise ``weights_only=False``, is never passed on: that
    would run whatever code the file holds)."""
    try:
        with warnings.catch_warnings():  # torch's warnings about a foreign file's pickle protocol: the error below says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch raises many kinds for a damaged or foreign file)
        raise ValueError(
            f"method.weights={path} is not a weights file torch can read safely ({type(e).__name__}); "
            "give a state_dict saved with torch.save(model.state_dict(), PATH)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ValueError(f"method.weights={path} holds a {type(state).__name__}, not a state_dict (names -> tensors)")
    return state


def torchvision_backbone(arch: str, weights: str | None, input_shape: tuple[int, ...], input_size: int | None) -> TorchvisionFeatures:
    """torchvision's ``arch`` with the pretrained weights found on disk (``weights``, else torch hub's cache),
    its classifier removed; a clear one-line error when torchvision or the weights are absent."""
    try:
        import torchvision  # noqa: PLC0415  (optional: only this option needs it)
    except ImportError:
        raise ValueError(
            "method.pretrain=torchvision needs the torchvision package, which is not installed here "
            "(pip install torchvision, with the weights file on disk), or use method.pretrain=first_task"
        ) from None
    if len(input_shape) != 3 or input_shape[0] != 3:
        raise ValueError(f"torchvision's ImageNet backbones take 3-channel images, not inputs of shape {input_shape}; use method.pretrain=first_task")
    path = weights
    if path is None:
        hub = os.path.join(os.environ.get("TORCH_HOME", os.path.expanduser("~/.cache/torch")), "hub", "checkpoints")
        found = sorted(glob.glob(os.path.join(hub, f"{arch}-*.pth")))
        if not found:
            raise ValueError(
                f"method.pretrain=torchvision: no {arch} weights on disk (looked for {hub}/{arch}-*.pth); "
                "give the file as method.weights=PATH, or use method.pretrain=first_task"
            )
        path = found[-1]
    if not os.path.isfile(path):
        raise ValueError(f"method.weights={path}: no such file")
    builder = getattr(torchvision.models, arch, None)
    if builder is None:
        raise ValueError(f"torchvision.models has no {arch!r}")
    net = builder()
    try:
        net.load_state_dict(read_weights(path))
    except RuntimeError:  # torch's text lists every mismatched tensor over many lines
        raise ValueError(f"method.weights={path} does not fit torchvision's {arch} (names or shapes differ)") from None
    return TorchvisionFeatures(net, input_size)


@METHODS.register("piggyback")
class Piggyback(Method):
    """Piggyback (Mallya, Davis & Lazebnik, ECCV 2018; code ``arunmallya/piggyback``).

    A backbone trained once is frozen. Each task learns a real-valued score ``s`` per weight of every
    conv and linear layer but the classifier; its mask ``m = 1[s > threshold]`` multiplies the weights
    (``W * m``), and the gradient of the loss with respect to ``m`` is passed to ``s`` unchanged (a
    straight-through estimator). A new output layer is trained per task beside the mask. After the task its
    mask is stored as bits (1 bit per weight) and its scores are dropped; the next task starts from fresh
    scores. A task is predicted with its own mask and head (task-aware inference), so the backbone and every
    earlier task's mask and head stay bit-identical: backward transfer is exactly zero.

    **The backbone.** The paper masks ImageNet-trained VGG-16 / ResNet-50 / DenseNet-121 from torchvision.
    No ImageNet weights are at hand here, so ``pretrain`` chooses where the backbone comes from:

    * ``first_task`` (default): the stream's first task plays ImageNet's part. It trains the whole backbone
      and its head with the trainer's optimiser (``trainer.optimizer``, ``trainer.lr``), densely (its mask is
      all ones, as ImageNet's in the paper); the backbone is frozen afterwards and every later task learns a
      mask over it. Make the first task the pre-training set of choice (a larger or more varied one) to
      study that choice.
    * ``file``: the backbone's weights (a ``state_dict`` of the metagate backbone, head excluded) from
      ``weights``, e.g. trained on another data set; every task learns a mask, the first included.
    * ``torchvision``: torchvision's ``torchvision_arch`` with its pretrained weights read from disk
      (``weights``, else torch hub's cache), classifier removed, inputs resized to ``input_size``; a clear
      one-line error when torchvision or the weights are absent (no download is ever tried).

    As in the code (``src/main.py``, ``src/modnets/layers.py``, ``src/networks.py``, ``src/utils.py``,
    ``src/scripts/run_piggyback_training.sh`` of arunmallya/piggyback at 5a6094c):

    * ``Binarizer`` (``layers.py:9-26``): ``0`` where ``s <= threshold``, ``1`` where ``s > threshold``,
      backward the identity; ``DEFAULT_THRESHOLD = 5e-3``; scores start at ``mask_scale = 1e-2`` everywhere
      (``mask_init='1s'``, ``layers.py:93-97``; ``uniform``: ``U(-mask_scale, mask_scale)``).
    * masked layers: every ``ElementWiseConv2d`` / ``ElementWiseLinear`` of the ``shared`` part, i.e. every
      conv and linear layer but the classifier; biases are frozen and unmasked (``layers.py:83-88,175-180``).
    * a new ``nn.Linear`` classifier per data set (``networks.py``, ``add_dataset``), default init.
    * optimisers: Adam on the scores (``lr_mask = 1e-4``) and Adam on the classifier (``lr_classifier =
      1e-4``) (``main.py:427-436``, ``--mask_adam``), step decay ``lr * 0.1 ** floor((epoch - 1) / 15)``
      (``utils.py:6-12``, decay every 15 epochs), batch 32, 30 epochs (``run_piggyback_training.sh``);
      ``mask_scale_gradients`` ``none`` (the script's), ``average`` or ``individual`` (``main.py:165-172``).
    * batch norm: frozen, in eval mode (``train_nobn``, ``--train_bn`` off; ``main.py:174-182``); dropout in
      the backbone stays on while masks train.
    * weights checked unchanged after training (``Manager.check``): here ``tests/test_piggyback.py``.

    Differences, all deliberate:

    * The backbone (above): ImageNet is replaced by the first task, a file, or torchvision's weights on disk.
      Batch size and epochs are the trainer's (``trainer.batch_size``, ``trainer.epochs``); the ready configs
      set the paper's 32 and 30 where they say so. The learning-rate decay counts epochs of
      ``ceil(n / batch_size)`` steps of the task's training data.
    * The code keeps the epoch with the best *test* accuracy (``Manager.train``); here the last epoch's mask
      and head are kept (test data never choose anything).
    * The two Adams are one ``torch.optim.Adam`` with two parameter groups (the same update), made afresh at
      every task and not checkpointed (a checkpoint falls between tasks).
    * A task-incremental stream gives each task's head one output per class of the stream with label masking
      (the code's head has exactly the task's classes: the same function). Only the binarizer is built (the
      ternarizer, ``{-1, 0, 1}``, is an ablation of the paper).
    * A task never trained is predicted with an all-ones mask (the backbone as it is) and its untrained head.
    * ``pretrain=file`` / ``torchvision`` read a weights file when the method is built: the one place a method
      here reads from disk (nothing is ever written or downloaded).
    """

    class Config(BaseMethodConfig):
        name: Literal["piggyback"] = "piggyback"
        backbone: BackboneConfig = Field(default_factory=lambda: BackboneConfig(hidden=[256, 256]))
        pretrain: Literal["first_task", "file", "torchvision"] = Field(
            "first_task", description="where the frozen backbone comes from: the first task (dense), a weights file, or torchvision's weights on disk"
        )
        weights: str | None = Field(None, description="pretrain=file: the backbone's state_dict; torchvision: its .pth (null: torch hub's cache)")
        torchvision_arch: str = Field("resnet18", description="pretrain=torchvision: the torchvision.models architecture")
        input_size: int | None = Field(None, ge=8, description="pretrain=torchvision: resize inputs to this side (null: as they are)")
        threshold: float = Field(5e-3, description="mask = scores > threshold (code: DEFAULT_THRESHOLD = 5e-3)")
        mask_scale: float = Field(1e-2, gt=0, description="initial score (code: mask_scale 1e-2)")
        mask_init: Literal["1s", "uniform"] = Field("1s", description="scores start at mask_scale (1s) or U(-mask_scale, mask_scale)")
        mask_scale_gradients: Literal["none", "average", "individual"] = Field(
            "none", description="divide the scores' gradient by the mean |weight| of the layer (average) or by |weight| (individual)"
        )
        lr_mask: float = Field(1e-4, gt=0, description="Adam on the mask scores (code: 1e-4)")
        lr_classifier: float = Field(1e-4, gt=0, description="Adam on the task's head (code: 1e-4)")
        lr_decay_every: int = Field(15, ge=1, description="epochs between learning-rate decays (code: 15)")
        lr_decay_factor: float = Field(0.1, gt=0, le=1, description="learning-rate decay factor (code: 0.1)")

    name = "piggyback"
    context_input_refusal = "piggyback selects a task's weights by its mask (task identity); context_input is for methods without masks"
    per_task_heads_refusal = "piggyback already trains a head per task: leave method.heads=shared"
    scenarios = ("task", "domain")
    cfg: Config

    @classmethod
    def config_problem(cls, cfg: BaseMethodConfig) -> str | None:
        problem = super().config_problem(cfg)
        if problem:
            return problem
        assert isinstance(cfg, Piggyback.Config)
        if cfg.pretrain == "file" and not cfg.weights:
            return "method.pretrain=file needs method.weights=PATH (a state_dict of the backbone)"
        return None

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        if cfg.pretrain == "torchvision":
            self.model = torchvision_backbone(cfg.torchvision_arch, cfg.weights, self.stream.input_shape, cfg.input_size)  # type: ignore[assignment]
            feat = self.model.num_features
        else:
            feat = self.model.head.in_features
            self.model.head = nn.Identity()  # type: ignore[assignment]  # the per-task heads replace it
            if cfg.pretrain == "file":
                self._load_backbone(cfg.weights or "")
        self.model.to(self.device)
        # masked: every conv and linear weight of the backbone (its classifier is gone)
        self.weight_names = [f"{n}.weight" for n, m in self.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        params = dict(self.model.named_parameters())
        shapes = [tuple(params[n].shape) for n in self.weight_names]
        tasks = [*self.stream.tasks, *self.stream.heldout]
        rows = max(t.index for t in tasks) + 1
        self.heads = nn.ModuleList(nn.Linear(feat, self.stream.num_outputs) for _ in range(rows)).to(self.device)
        self.scores = nn.ParameterList(nn.Parameter(torch.full(s, cfg.mask_scale, device=self.device)) for s in shapes)
        # every task's mask as bits; all ones until trained (the backbone as it is)
        self.stored = nn.ModuleList(
            nn.ModuleList(BitMask(torch.ones(s, dtype=torch.bool)) for s in shapes) for _ in range(rows)
        ).to(self.device)
        self._bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._current: int | None = None  # the task being trained (host side)
        self._dense_phase = False  # training the backbone itself (pretrain=first_task, first task)
        self._step = 0
        self._steps_per_epoch = 1
        self._dense: dict[int, list[Tensor]] = {}
        self.model.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.scores.parameters(), lr=cfg.lr_mask)
        self.register_load_state_dict_post_hook(lambda module, _: module._dense.clear())

    def _load_backbone(self, path: str) -> None:
        if not os.path.isfile(path):
            raise ValueError(f"method.weights={path}: no such file (pretrain=file wants the backbone's state_dict)")
        state = {k: v for k, v in read_weights(path).items() if not k.startswith("head.")}
        try:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
        except RuntimeError:  # shapes that differ: torch's text lists each over many lines
            raise ValueError(f"method.weights={path} does not fit the {self.cfg.backbone.kind} backbone (tensor shapes differ)") from None
        if missing or unexpected:
            raise ValueError(
                f"method.weights={path} does not fit the {self.cfg.backbone.kind} backbone (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )

    # ---------------------------------------------------------------- masks

    def uses_first_task(self, task: Task) -> bool:
        """Whether ``task`` is the one the backbone is trained on (``pretrain=first_task``)."""
        return self.cfg.pretrain == "first_task" and task.index == self.stream.tasks[0].index

    def task_masks(self, task: Task) -> list[Tensor]:
        """The task's binary masks as floats: the current task's from its scores, else the stored bits
        (unpacked once, cached until the next task or load)."""
        if task.index == self._current and not self._dense_phase:
            with torch.no_grad():
                return [(s > self.cfg.threshold).to(s.dtype) for s in self.scores]
        if task.index not in self._dense:
            self._dense[task.index] = [m.float() for m in self.stored[task.index]]
        return self._dense[task.index]

    def masked_weights(self, masks: list[Tensor]) -> dict[str, Tensor]:
        params = dict(self.model.named_parameters())
        return {n: params[n] * m for n, m in zip(self.weight_names, masks)}

    def features(self, x: Tensor, task: Task) -> Tensor:
        if self.uses_first_task(task):
            return self.model(x)  # the backbone as trained (its mask is all ones)
        if self.training and task.index == self._current:
            masks = [binarize_ste(s, self.cfg.threshold) for s in self.scores]
        else:
            masks = self.task_masks(task)
        return functional_call(self.model, self.masked_weights(masks), (x,))

    def forward(self, x: Tensor, task: Task, task_ids: Tensor | None = None) -> Tensor:
        return self.mask_logits(self.heads[task.index](self.features(x, task)), task, task_ids)

    def unit_mask(self, task: Task) -> Tensor:
        """Which backbone weights the task uses, over every masked tensor, flattened."""
        return torch.cat([m.flatten() for m in self.task_masks(task)]).bool()

    # ---------------------------------------------------------------- hooks

    def train(self, mode: bool = True) -> "Piggyback":
        super().train(mode)
        if mode and not self._dense_phase:
            for bn in self._bns:  # train_nobn: batch-norm statistics stay as the backbone's
                bn.eval()
        return self

    def _adam(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        try:
            return torch.optim.Adam(groups, fused=all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"]) or None)
        except RuntimeError:
            return torch.optim.Adam(groups)

    def before_task(self, task: Task) -> None:
        cfg, tc = self.cfg, self.trainer_cfg
        self._current = task.index
        self._dense_phase = self.uses_first_task(task)
        self._step = 0
        self._steps_per_epoch = math.ceil(task.num_train / tc.batch_size)
        self.heads.requires_grad_(False)
        head = self.heads[task.index]
        head.requires_grad_(True)
        self.model.requires_grad_(self._dense_phase)
        if self._dense_phase:  # the backbone is trained on the first task, with the trainer's optimiser
            self.optimizer = self.make_optimizer([*self.model.parameters(), *head.parameters()])
            for bn in self._bns:
                bn.train(self.training)
            return
        with torch.no_grad():
            for s in self.scores:
                if cfg.mask_init == "1s":
                    s.fill_(cfg.mask_scale)  # layers.py:94-95
                else:
                    s.uniform_(-cfg.mask_scale, cfg.mask_scale)
        self.optimizer = self._adam(
            [{"params": list(self.scores), "lr": cfg.lr_mask}, {"params": list(head.parameters()), "lr": cfg.lr_classifier}]
        )
        self.train(self.training)

    def _set_lr(self) -> None:
        """``utils.step_lr``: ``lr * factor ** floor((epoch - 1) / decay_every)`` with 1-based epochs."""
        epoch = self._step // self._steps_per_epoch
        factor = self.cfg.lr_decay_factor ** (epoch // self.cfg.lr_decay_every)
        for group, base in zip(self.optimizer.param_groups, (self.cfg.lr_mask, self.cfg.lr_classifier)):
            group["lr"] = base * factor

    def train_step(self, batch: Batch, task: Task) -> dict[str, Tensor]:
        if not self._dense_phase:
            self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self(batch.x, task, batch.task_ids), batch.y)
        loss.backward()
        if not self._dense_phase and self.cfg.mask_scale_gradients != "none":
            params = dict(self.model.named_parameters())
            for name, s in zip(self.weight_names, self.scores):
                w = params[name].detach().abs()
                s.grad.div_(w.mean() if self.cfg.mask_scale_gradients == "average" else w)  # main.py:165-172
        self.optimizer.step()
        self._step += 1
        return {"loss": loss.detach()}

    def after_task(self, task: Task) -> None:
        if not self._dense_phase:
            with torch.no_grad():
                self.stored[task.index] = nn.ModuleList(BitMask(s > self.cfg.threshold) for s in self.scores).to(self.device)
        self._dense.pop(task.index, None)
        self._current = None
        self._dense_phase = False
        self.model.requires_grad_(False)
        self.heads[task.index].requires_grad_(False)
        self.train(self.training)

    # checkpoints fall between tasks, and every task makes its optimiser afresh
    def get_extra_state(self) -> dict[str, Any]:
        return {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # ---------------------------------------------------------------- figures

    def _task_bytes(self, task: Task) -> int:
        """What the task adds to storage: its mask's bits and its head (float32); the first task under
        ``pretrain=first_task`` adds the backbone itself."""
        head = sum(p.numel() for p in self.heads[task.index].parameters()) * 4
        if self.uses_first_task(task):
            return head + sum(p.numel() * p.element_size() for p in self.model.parameters())
        return head + sum(m.nbytes for m in self.stored[task.index])

    def report(self, task: Task | None = None) -> MethodReport:
        """Each task is predicted with its own mask and head (its identity at test); bytes per task: :meth:`_task_bytes`."""
        out = super().report(task)
        if task is None:
            out.test_time_info = "task_id"
            out.task_bytes = [self._task_bytes(t) for t in self.stream.tasks]
            out.figures["piggyback"] = {
                "pretrain": self.cfg.pretrain,
                "masked_weights": sum(m.numel() for m in self.scores),
                "backbone_bytes": sum(p.numel() * p.element_size() for p in self.model.parameters()),
            }
        return out
