"""VPT for CLIP and MetaCLIP 2: the vision tower's transformer layers (`CLIPEncoderLayer`).

`CLIPVisionModel`, `CLIPVisionModelWithProjection`, `CLIPForImageClassification`, `CLIPModel` (vision tower only), and
MetaCLIP 2's equivalents. The layers are ViT-like (`(hidden_states, attention_mask, **kwargs)`), so the ViT wrapper
serves them: prompts go after the CLS token, between the vision tower's pre-layernorm (applied by the model before the
encoder, so prompts never pass through it) and the first prompted layer, and are stripped after the last one, so
`last_hidden_state`, the CLS pooler (post-layernorm), the classifier's mean over patch tokens and any projection see
the base model's layout. The text tower uses the same layer class, so the layer regex names the vision tower and
`validate_targets` refuses explicit `target_modules` that reach into a text tower.
"""

from __future__ import annotations

from torch import nn

from ..config import VisualPromptConfig
from .base import BackboneFamily
from .vit import ViTPromptLayer

VISION_TOWER_LAYERS = r"(.*\.)?vision_model\.encoder\.layers\.\d+"  # a two-tower model or a classifier on the tower
VISION_MODEL_LAYERS = r"(.*\.)?encoder\.layers\.\d+"  # a bare vision model (its own encoder), or one inside a wrapper

TARGET_MODULES = {
    "clip": VISION_TOWER_LAYERS,
    "clip_vision_model": VISION_MODEL_LAYERS,
    "metaclip_2": VISION_TOWER_LAYERS,
    "metaclip_2_vision_model": VISION_MODEL_LAYERS,
}


def num_prefix_tokens(model_config: dict) -> int:
    """The CLS token."""
    return 1


def refuse_text_towers(model: nn.Module, config: VisualPromptConfig, targets: list[str]) -> None:
    """Visual prompts are image tokens: a layer inside a text tower (a sub-model whose config is a text config) must
    not be prompted, even when an explicit `target_modules` matches it (the towers share their layer class)."""
    for name in targets:
        parts = name.split(".")
        for depth in range(len(parts)):
            owner = model.get_submodule(".".join(parts[:depth])) if depth else model
            model_type = str(getattr(getattr(owner, "config", None), "model_type", "") or "")
            if model_type.endswith("text_model"):
                raise ValueError(
                    f"target_modules matched {name!r}, a layer of the text tower ({type(owner).__name__}). Visual "
                    "prompts are image tokens and go into the vision tower only: leave target_modules unset, or "
                    r"match only `vision_model.encoder.layers.N` (e.g. r'.*vision_model\.encoder\.layers\.\d+')."
                )


FAMILY = BackboneFamily(ViTPromptLayer, TARGET_MODULES, num_prefix_tokens, validate_targets=refuse_text_towers)
