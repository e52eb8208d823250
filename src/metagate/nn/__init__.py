"""Networks: backbones with per-unit masks, the gated-layer toolkit (``gates``), optimisers (``optim``)."""

from metagate.nn.backbones import CNN, MLP, BackboneConfig, GatedBackbone, ResNet18, build_backbone
from metagate.nn.optim import MasseAdam

__all__ = ["CNN", "MLP", "BackboneConfig", "GatedBackbone", "MasseAdam", "ResNet18", "build_backbone"]
