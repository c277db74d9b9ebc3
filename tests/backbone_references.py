"""Independent, hand-written VPT forwards for the ViT-like families added by issue 13: CLIP / MetaCLIP 2, SigLIP /
SigLIP 2, DINOv3, I-JEPA, ViT-MSN and ViT-MAE.

Same signature as `references.py`: `(base_model, pixel_values, prompts, deep, num_prefix=..., **inputs) -> dict`, with
`prompts` = {layer index: (P, C) tensor}. Each reference writes the model's forward out by hand: embeddings, any
pre-encoder op (CLIP's pre-layernorm), prompts inserted after the prefix tokens, every base layer (unwrapped, called on
a sequence the reference builds), prompts stripped, then the model's own post-processing, pooling and heads. They only
borrow the base model's modules as weight holders and never touch the plugin.
"""

from __future__ import annotations

import copy

import torch
from torch.nn import functional as F


def prompted_encoder(layers, hidden, prompts: dict, deep: bool, num_prefix: int, key_mask=None, eager=False,
                     **layer_kwargs) -> list[torch.Tensor]:
    """Runs `layers` on `hidden` with prompts after `num_prefix` tokens. Returns the prompt-free hidden states (the
    input first, then every layer's output). `key_mask` (batch, tokens) is an optional bool padding mask over the
    unprompted tokens: the reference builds its 4D form by hand, prompts always visible."""
    first = min(prompts)
    if deep:
        assert sorted(prompts) == list(range(first, len(layers))), "deep prompts cover a final span of layers"
    else:
        assert len(prompts) == 1, "shallow prompts are inserted at one layer"
    num_prompts = prompts[first].shape[0]
    batch = hidden.shape[0]

    def mask_for(prompted: bool):
        if key_mask is None:
            return None
        keys = key_mask
        if prompted:
            keys = torch.cat([key_mask[:, :num_prefix], torch.ones(batch, num_prompts, dtype=torch.bool),
                              key_mask[:, num_prefix:]], dim=1)
        mask = keys[:, None, None, :].expand(batch, 1, keys.shape[1], keys.shape[1])
        if eager:
            mask = torch.zeros(mask.shape, dtype=hidden.dtype).masked_fill(~mask, torch.finfo(hidden.dtype).min)
        return mask

    def strip(tokens):
        return torch.cat([tokens[:, :num_prefix], tokens[:, num_prefix + num_prompts:]], dim=1)

    states = [hidden]
    for i, layer in enumerate(layers):
        if i < first:
            hidden = layer(hidden, mask_for(False), **layer_kwargs)
            states.append(hidden)
            continue
        if i == first or (deep and i in prompts):
            rest = hidden[:, num_prefix:] if i == first else hidden[:, num_prefix + num_prompts:]
            hidden = torch.cat([hidden[:, :num_prefix], prompts[i].to(hidden.dtype).expand(batch, -1, -1), rest],
                               dim=1)
        hidden = layer(hidden, mask_for(True), **layer_kwargs)
        states.append(strip(hidden))
    return states


def _eager(model) -> bool:
    return model.config._attn_implementation == "eager"


# ----------------------------------------------------------------------------------------------- CLIP, MetaCLIP 2


def clip_reference(base_model, pixel_values, prompts, deep, num_prefix: int = 1, **inputs) -> dict:
    """CLIP's vision tower: embeddings, pre-layernorm, prompted layers, CLS through the post-layernorm (pooler);
    `visual_projection` of the pooler (image_embeds); the classifier on the mean of the patch tokens; for a two-tower
    model the normalised image and text embeddings and their scaled similarity."""
    model = copy.deepcopy(base_model)
    vision = model if hasattr(model, "embeddings") else model.vision_model
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
    states = prompted_encoder(vision.encoder.layers, hidden, prompts, deep, num_prefix)
    sequence = states[-1]
    pooled = vision.post_layernorm(sequence[:, 0])
    out = {"last_hidden_state": sequence, "pooler_output": pooled, "hidden_states": states}
    if hasattr(model, "classifier"):
        out["logits"] = model.classifier(sequence[:, 1:].mean(dim=1))
    if hasattr(model, "visual_projection"):
        out["image_embeds"] = model.visual_projection(pooled)
    if hasattr(model, "text_model"):
        text = model.text_model(input_ids=inputs["input_ids"]).pooler_output
        text_embeds = model.text_projection(text)
        image, text_embeds = out["image_embeds"], text_embeds
        image = image / image.norm(p=2, dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(p=2, dim=-1, keepdim=True)
        out["image_embeds"], out["text_embeds"] = image, text_embeds
        out["logits_per_image"] = image @ text_embeds.t() * model.logit_scale.exp()
    return out


# ------------------------------------------------------------------------------------------------ SigLIP, SigLIP 2


def siglip_reference(base_model, pixel_values, prompts, deep, num_prefix: int = 0, **inputs) -> dict:
    """SigLIP's vision tower: embeddings, prompted layers (no CLS: prompts first), post-layernorm, the attention-
    pooling head over all (image) tokens; the classifier on the mean of the tokens (SigLIP 2: the mean over the
    unpadded patches). SigLIP 2 takes `pixel_attention_mask` and `spatial_shapes` (variable resolution)."""
    model = copy.deepcopy(base_model)
    vision = model if hasattr(model, "embeddings") else model.vision_model
    key_mask = inputs.get("pixel_attention_mask")
    if "spatial_shapes" in inputs:
        hidden = vision.embeddings(pixel_values, inputs["spatial_shapes"])
    else:
        hidden = vision.embeddings(pixel_values)
    states = prompted_encoder(vision.encoder.layers, hidden, prompts, deep, num_prefix,
                              key_mask=None if key_mask is None else key_mask.bool(), eager=_eager(model))
    sequence = vision.post_layernorm(states[-1])
    out = {"last_hidden_state": sequence, "hidden_states": states}
    if vision.use_head:
        head = vision.head
        probe = head.probe.expand(sequence.shape[0], -1, -1)
        padding = None if key_mask is None else ~key_mask.bool()
        pooled = head.attention(probe, sequence, sequence, key_padding_mask=padding)[0]
        pooled = pooled + head.mlp(head.layernorm(pooled))
        out["pooler_output"] = pooled[:, 0]
    if hasattr(model, "classifier"):
        if key_mask is None:
            features = sequence.mean(dim=1)
        else:
            weights = key_mask[..., None].to(sequence.dtype)
            features = (sequence * weights).sum(dim=1) / weights.sum(dim=1)
        out["logits"] = model.classifier(features)
    return out


# ---------------------------------------------------------------------------------------------------------- DINOv3


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def dinov3_layer(layer, hidden, cos, sin, num_patches: int):
    """A `DINOv3ViTLayer` written out: the rotary embedding rotates the queries and keys of the last `num_patches`
    tokens only (what the reference asserts about prompts placed before them), softmax attention, layer scale, MLP."""
    attention = layer.attention
    batch, length, width = hidden.shape
    heads, head_dim = attention.num_heads, attention.head_dim

    x = layer.norm1(hidden)

    def split(t):
        return t.view(batch, length, heads, head_dim).transpose(1, 2)

    q, k, v = split(attention.q_proj(x)), split(attention.k_proj(x)), split(attention.v_proj(x))
    start = length - num_patches
    q = torch.cat([q[..., :start, :], q[..., start:, :] * cos + _rotate_half(q[..., start:, :]) * sin], dim=-2)
    k = torch.cat([k[..., :start, :], k[..., start:, :] * cos + _rotate_half(k[..., start:, :]) * sin], dim=-2)
    probs = torch.softmax((q @ k.transpose(-1, -2)) * head_dim**-0.5, dim=-1, dtype=torch.float32).to(q.dtype)
    attended = (probs @ v).transpose(1, 2).reshape(batch, length, width)
    hidden = hidden + layer.layer_scale1(attention.o_proj(attended))
    return hidden + layer.layer_scale2(layer.mlp(layer.norm2(hidden)))


def dinov3_reference(base_model, pixel_values, prompts, deep, num_prefix: int = 1, **inputs) -> dict:
    """DINOv3: embeddings ([CLS, registers, patches]), rotary cos/sin of the patch grid, prompted layers written out
    (`dinov3_layer`), final norm, CLS pooler; backbones: the chosen stages (normed), patch tokens as a grid."""
    model = copy.deepcopy(base_model)
    hidden = model.embeddings(pixel_values)
    cos, sin = model.rope_embeddings(pixel_values)
    num_patches = hidden.shape[1] - num_prefix

    class Layer:
        def __init__(self, layer):
            self.layer = layer

        def __call__(self, tokens, mask):
            assert mask is None
            return dinov3_layer(self.layer, tokens, cos, sin, num_patches)

    states = prompted_encoder([Layer(layer) for layer in model.model.layer], hidden, prompts, deep, num_prefix)
    sequence = model.norm(states[-1])
    out = {"last_hidden_state": sequence, "pooler_output": sequence[:, 0], "hidden_states": states}
    if hasattr(model, "out_features"):
        config = model.config
        batch, patch = pixel_values.shape[0], config.patch_size
        maps = []
        for index, (stage, tokens) in enumerate(zip(model.stage_names, states)):
            if index == len(states) - 1 or config.apply_layernorm:
                tokens = model.norm(tokens)
            if stage in model.out_features:
                tokens = tokens[:, num_prefix:]
                if config.reshape_hidden_states:
                    tokens = tokens.reshape(batch, pixel_values.shape[2] // patch, pixel_values.shape[3] // patch,
                                            -1).permute(0, 3, 1, 2)
                maps.append(tokens)
        out["feature_maps"] = tuple(maps)
    return out


# ------------------------------------------------------------------------------------ I-JEPA, ViT-MSN, ViT-MAE


def _plain_vit(model):
    return model if hasattr(model, "embeddings") else getattr(model, model.base_model_prefix)


def ijepa_reference(base_model, pixel_values, prompts, deep, num_prefix: int = 0, **inputs) -> dict:
    """I-JEPA: embeddings (no CLS), prompted layers, layernorm; the optional pooler (dense + tanh on the first
    token); the classifier on the mean of all tokens."""
    model = copy.deepcopy(base_model)
    backbone = _plain_vit(model)
    states = prompted_encoder(backbone.layers, backbone.embeddings(pixel_values), prompts, deep, num_prefix)
    sequence = backbone.layernorm(states[-1])
    out = {"last_hidden_state": sequence, "hidden_states": states}
    pooler = getattr(backbone, "pooler", None)
    out["pooler_output"] = None if pooler is None else torch.tanh(pooler.dense(sequence[:, 0]))
    if hasattr(model, "classifier"):
        out["logits"] = model.classifier(sequence.mean(dim=1))
    return out


def vit_msn_reference(base_model, pixel_values, prompts, deep, num_prefix: int = 1, **inputs) -> dict:
    """ViT-MSN: embeddings (CLS first), prompted layers, layernorm; the classifier on the CLS token."""
    model = copy.deepcopy(base_model)
    backbone = _plain_vit(model)
    states = prompted_encoder(backbone.layers, backbone.embeddings(pixel_values), prompts, deep, num_prefix)
    sequence = backbone.layernorm(states[-1])
    out = {"last_hidden_state": sequence, "hidden_states": states}
    if hasattr(model, "classifier"):
        out["logits"] = model.classifier(sequence[:, 0])
    return out


def vit_mae_reference(base_model, pixel_values, prompts, deep, num_prefix: int = 1, *, noise=None, **inputs) -> dict:
    """ViT-MAE without masking: embeddings with the given shuffle `noise` (CLS first, then the shuffled patches),
    prompted layers, layernorm. Returns the shuffled `last_hidden_state` and `ids_restore`, as the model does."""
    model = copy.deepcopy(base_model)
    hidden, mask, ids_restore = model.embeddings(pixel_values, noise=noise)
    states = prompted_encoder(model.layers, hidden, prompts, deep, num_prefix)
    return {"last_hidden_state": model.layernorm(states[-1]), "ids_restore": ids_restore, "mask": mask,
            "hidden_states": states}
