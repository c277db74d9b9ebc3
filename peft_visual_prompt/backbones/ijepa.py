"""VPT for I-JEPA: `IJepaModel`, `IJepaForImageClassification` (layers `layers.N`, ViT layers).

I-JEPA has no CLS token (0 prefix tokens): prompts go in front of the patch tokens and are stripped after the last
prompted layer, so the classifier's mean over all tokens and the optional pooler (which reads the first token, a
patch) see the base model's layout.
"""

from __future__ import annotations

from .base import BackboneFamily
from .vit import ViTPromptLayer

TARGET_MODULES = {"ijepa": r"(.*\.)?layers\.\d+"}


def num_prefix_tokens(model_config: dict) -> int:
    """No CLS token."""
    return 0


FAMILY = BackboneFamily(ViTPromptLayer, TARGET_MODULES, num_prefix_tokens)
