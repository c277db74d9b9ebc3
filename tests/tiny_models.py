"""Tiny random-weight models of each supported ViT-family type (the hand-written reference forwards are in
`references.py`, the table of every supported model class in `model_table.py`)."""

from __future__ import annotations

import torch
from transformers import (
    DeiTConfig,
    DeiTForImageClassification,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

IMAGE_SIZE = 32
COMMON = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, num_labels=5)

VIT_FAMILY = {
    # model_type: (config class, model class, extra config, prefix tokens)
    "vit": (ViTConfig, ViTForImageClassification, dict(image_size=IMAGE_SIZE, patch_size=8), 1),
    "deit": (DeiTConfig, DeiTForImageClassification, dict(image_size=IMAGE_SIZE, patch_size=8), 2),
    "dinov2": (Dinov2Config, Dinov2ForImageClassification, dict(image_size=IMAGE_SIZE, patch_size=8), 1),
    "dinov2_with_registers": (
        Dinov2WithRegistersConfig, Dinov2WithRegistersForImageClassification,
        dict(image_size=IMAGE_SIZE, patch_size=8, num_register_tokens=3), 4,
    ),
}


def tiny_model(model_type: str = "vit", attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    config_cls, model_cls, extra, _ = VIT_FAMILY[model_type]
    torch.manual_seed(seed)
    config = config_cls(**{**COMMON, **extra, **overrides})
    model = model_cls(config)
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def pixels(batch: int = 2, size: int = IMAGE_SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def prompts_of(peft_model, adapter: str = "default") -> list[torch.Tensor]:
    """The prompt parameters of each prompted layer, in model order (shallow: only the first layer has any)."""
    from peft_visual_prompt import VisualPromptLayer

    return [m.visual_prompt_embeddings[adapter] for m in peft_model.modules()
            if isinstance(m, VisualPromptLayer) and adapter in m.visual_prompt_embeddings]
