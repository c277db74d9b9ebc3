"""VPT for ViT-MSN: `ViTMSNModel`, `ViTMSNForImageClassification` (layers `layers.N`, ViT layers).

A ViT with a CLS token (1 prefix token); the classifier reads the CLS token after the final layernorm.
"""

from __future__ import annotations

from .base import BackboneFamily
from .vit import ViTPromptLayer

TARGET_MODULES = {"vit_msn": r"(.*\.)?layers\.\d+"}


def num_prefix_tokens(model_config: dict) -> int:
    """The CLS token."""
    return 1


FAMILY = BackboneFamily(ViTPromptLayer, TARGET_MODULES, num_prefix_tokens)
