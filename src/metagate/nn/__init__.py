"""Networks: backbones with per-unit masks, and the gated-layer toolkit (``gates``)."""

from metagate.nn.backbones import CNN, MLP, BackboneConfig, GatedBackbone, ResNet18, build_backbone

__all__ = ["CNN", "MLP", "BackboneConfig", "GatedBackbone", "ResNet18", "build_backbone"]
