"""Networks: backbones and (later) gated layers and hypernetworks."""

from metagate.nn.backbones import MLP, BackboneConfig, build_backbone

__all__ = ["MLP", "BackboneConfig", "build_backbone"]
