"""VPT for SigLIP and SigLIP 2: the vision tower's transformer layers (`SiglipEncoderLayer`, `Siglip2EncoderLayer`).

`SiglipVisionModel`, `SiglipForImageClassification`, `SiglipModel` (vision tower only) and SigLIP 2's equivalents.
SigLIP has no CLS token (0 prefix tokens): prompts go in front of the patch tokens and are stripped after the last
prompted layer, before the post-layernorm, so the attention-pooling head (`head`, which attends over all tokens), the
classifier's mean over tokens and `last_hidden_state` see the base model's layout. SigLIP 2's variable-resolution
inputs come with `pixel_attention_mask` over padding patches; the encoder's 4D mask is padded at the prompt positions
(prompts are visible to every query; they attend to what the first token attends to), as for ViT.
"""

from __future__ import annotations

from .base import BackboneFamily
from .clip import VISION_MODEL_LAYERS, VISION_TOWER_LAYERS, refuse_text_towers
from .vit import ViTPromptLayer

TARGET_MODULES = {
    "siglip": VISION_TOWER_LAYERS,
    "siglip_vision_model": VISION_MODEL_LAYERS,
    "siglip2": VISION_TOWER_LAYERS,
    "siglip2_vision_model": VISION_MODEL_LAYERS,
}


def num_prefix_tokens(model_config: dict) -> int:
    """No CLS token: prompts go first."""
    return 0


FAMILY = BackboneFamily(ViTPromptLayer, TARGET_MODULES, num_prefix_tokens, validate_targets=refuse_text_towers)
