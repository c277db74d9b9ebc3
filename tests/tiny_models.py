"""Tiny random-weight models of each supported ViT-family type, and an independent reference forward."""

from __future__ import annotations

import copy

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


def backbone_of(model):
    return getattr(model, model.base_model_prefix)


def layers_of(backbone):
    return backbone.layers if hasattr(backbone, "layers") else backbone.encoder.layer


def reference_logits(base_model, prompts: list[torch.Tensor], pixel_values, deep: bool, num_prefix: int,
                     key_mask: torch.Tensor | None = None, **embed_kwargs):
    """Hand-written VPT forward on an unwrapped copy of the base model: embeddings, insert prompts after the prefix
    tokens, loop over the layers (replacing the prompt slice at every layer when deep), strip, final norm, head.

    `key_mask` (batch, tokens) is an optional bool padding mask over the unprompted tokens; prompts are always
    visible, so the reference builds the padded mask from it by hand.
    """
    model = copy.deepcopy(base_model)
    backbone = backbone_of(model)
    num_prompts = prompts[0].shape[0]
    batch = pixel_values.shape[0]
    hidden = backbone.embeddings(pixel_values, **embed_kwargs)

    mask = None
    if key_mask is not None:
        keys = torch.cat([key_mask[:, :num_prefix], torch.ones(batch, num_prompts, dtype=torch.bool),
                          key_mask[:, num_prefix:]], dim=1)
        mask = keys[:, None, None, :].expand(batch, 1, keys.shape[1], keys.shape[1])
        if model.config._attn_implementation == "eager":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)

    for i, layer in enumerate(layers_of(backbone)):
        if i == 0 or deep:
            rest = hidden[:, num_prefix:] if i == 0 else hidden[:, num_prefix + num_prompts:]
            hidden = torch.cat([hidden[:, :num_prefix], prompts[i].expand(batch, -1, -1), rest], dim=1)
        hidden = layer(hidden, mask)
    hidden = torch.cat([hidden[:, :num_prefix], hidden[:, num_prefix + num_prompts:]], dim=1)
    sequence = backbone.layernorm(hidden)

    model_type = model.config.model_type
    if model_type in ("vit", "deit"):
        return model.classifier(sequence[:, 0])
    patch_tokens = sequence[:, num_prefix:]
    return model.classifier(torch.cat([sequence[:, 0], patch_tokens.mean(dim=1)], dim=1))


def prompts_of(peft_model, adapter: str = "default") -> list[torch.Tensor]:
    """The prompt parameters of each prompted layer, in model order (shallow: only the first layer has any)."""
    from peft_visual_prompt import VisualPromptLayer

    return [m.visual_prompt_embeddings[adapter] for m in peft_model.modules()
            if isinstance(m, VisualPromptLayer) and adapter in m.visual_prompt_embeddings]
