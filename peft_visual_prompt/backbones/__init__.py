"""The family table: every backbone family the tuner supports, one row each (`family.FAMILY`).

Adding a family is one file in this folder that defines its `VisualPromptLayer` subclass and its `FAMILY` row, plus
that row in `FAMILIES` below. Nothing else in the package names a family.
"""

from __future__ import annotations

from typing import Optional

from . import beit, clip, data2vec_vision, dinov3, ijepa, siglip, swin, vit, vit_mae, vit_msn
from .base import BackboneFamily, config_patch_size, square_side

FAMILIES: list[BackboneFamily] = [
    vit.FAMILY, swin.FAMILY, clip.FAMILY, siglip.FAMILY, dinov3.FAMILY, ijepa.FAMILY, vit_msn.FAMILY, vit_mae.FAMILY,
    beit.FAMILY, data2vec_vision.FAMILY,
]

# Model types whose layers a supported family's wrapper would misread, even with explicit target_modules.
UNSUPPORTED_RELATIVES = {
    "swinv2": "Swinv2 uses cosine attention with a learnt logit scale, a continuous position bias computed by an MLP "
              "and post-norm blocks, which the Swin wrapper does not implement",
    "donut-swin": "Donut-Swin has its own attention code",
    "timm_wrapper": "timm models need torchvision, which this package does not depend on (and which cannot be installed "
                    "in its test environment), so their layers are untested",
}

# For `target_modules` on a ViT-like model of no supported type: its layers take (hidden_states, attention_mask).
GENERIC_FAMILY = vit.FAMILY


def family_for(model_type: Optional[str]) -> Optional[BackboneFamily]:
    return next((f for f in FAMILIES if model_type in f.target_modules), None)


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES for t in f.target_modules)


__all__ = ["BackboneFamily", "FAMILIES", "GENERIC_FAMILY", "UNSUPPORTED_RELATIVES", "config_patch_size", "family_for",
           "square_side", "supported_model_types"]
