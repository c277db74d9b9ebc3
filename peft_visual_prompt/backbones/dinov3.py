"""VPT for DINOv3 ViT: `DINOv3ViTModel`, `DINOv3ViTBackbone` (layers `model.layer.N`, `DINOv3ViTLayer`).

The sequence is `[CLS, registers, patches]`, so prompts go after 1 + num_register_tokens prefix tokens. DINOv3's
rotary position embedding (`apply_rotary_pos_emb`) rotates the queries and keys of the LAST num_patches tokens only
and leaves everything in front of them unrotated, so prompts placed between the registers and the patches get no
position, as everywhere else, and the patches keep their rotations: the layers run unchanged (`position_embeddings`
is passed through). Prompts are stripped after the last prompted layer, before the final norm, the CLS pooler and
the backbone's feature maps.
"""

from __future__ import annotations

from .base import BackboneFamily
from .vit import ViTPromptLayer

TARGET_MODULES = {"dinov3_vit": r"(.*\.)?model\.layer\.\d+"}


def num_prefix_tokens(model_config: dict) -> int:
    """CLS plus the register tokens."""
    return 1 + int(model_config.get("num_register_tokens", 0) or 0)


FAMILY = BackboneFamily(ViTPromptLayer, TARGET_MODULES, num_prefix_tokens)
