"""Independent, hand-written VPT forwards, one per backbone family, on an unwrapped copy of the base model.

Each reference takes `(base_model, pixel_values, prompts, deep, num_prefix=...)` where `prompts` is
`{layer index: (P, C) tensor}` over the model's transformer layers (ViT family) or blocks (Swin), in model order, and
returns a dict holding every output the model class produces: `logits` (plus `cls_logits`/`distillation_logits` for
DeiT with teacher), `last_hidden_state`, `pooler_output` and `feature_maps` (backbones).

They only borrow the base model's modules as weight holders (embeddings, Linear, LayerNorm, and for the ViT family
whole transformer layers, called on a sequence the reference builds itself) and never touch the plugin.
"""

from __future__ import annotations

import copy
import math

import torch
from torch.nn import functional as F
from transformers import SwinModel

# ------------------------------------------------------------------------------------------------------ ViT family


def _vit_backbone(model):
    return model if hasattr(model, "embeddings") else getattr(model, model.base_model_prefix)


def _vit_layers(backbone):
    return backbone.layers if hasattr(backbone, "layers") else backbone.encoder.layer


def vit_reference(base_model, pixel_values, prompts: dict[int, torch.Tensor], deep: bool, num_prefix: int,
                  key_mask: torch.Tensor | None = None, **embed_kwargs) -> dict:
    """Hand-written VPT forward for ViT, DeiT, DINOv2 and DINOv2-with-registers (every head class and backbones):
    embeddings, insert prompts after the prefix tokens, loop over the layers (replacing the prompt slice at every
    prompted layer when deep), strip, final norm, then the model's own pooling and heads written out.

    `prompts`: deep: {i: prompts of layer i}, the prompted layers being the last ones from the first key on.
    Shallow: a single entry, inserted there and carried to the end. `key_mask` (batch, tokens) is an optional bool
    padding mask over the unprompted tokens; prompts are always visible, so the reference pads it by hand.
    """
    model = copy.deepcopy(base_model)
    backbone = _vit_backbone(model)
    layers = _vit_layers(backbone)
    first = min(prompts)
    if deep:
        assert sorted(prompts) == list(range(first, len(layers))), "deep prompts cover a final span of layers"
    else:
        assert len(prompts) == 1, "shallow prompts are inserted at one layer"
    num_prompts = prompts[first].shape[0]
    batch = pixel_values.shape[0]
    hidden = backbone.embeddings(pixel_values, **embed_kwargs)

    mask = None
    if key_mask is not None:
        keys = torch.cat([key_mask[:, :num_prefix], torch.ones(batch, num_prompts, dtype=torch.bool),
                          key_mask[:, num_prefix:]], dim=1)
        mask = keys[:, None, None, :].expand(batch, 1, keys.shape[1], keys.shape[1])
        if model.config._attn_implementation == "eager":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)

    def strip(tokens):
        return torch.cat([tokens[:, :num_prefix], tokens[:, num_prefix + num_prompts:]], dim=1)

    hidden_states = [hidden]  # prompt-free, as the base model's `hidden_states`
    for i, layer in enumerate(layers):
        if i < first:
            hidden = layer(hidden, None if mask is None else _unprompted(mask, num_prefix, num_prompts))
            hidden_states.append(hidden)
            continue
        if i == first or (deep and i in prompts):
            rest = hidden[:, num_prefix:] if i == first else hidden[:, num_prefix + num_prompts:]
            hidden = torch.cat([hidden[:, :num_prefix], prompts[i].expand(batch, -1, -1), rest], dim=1)
        hidden = layer(hidden, mask)
        hidden_states.append(strip(hidden))
    sequence = backbone.layernorm(hidden_states[-1])
    out = {"hidden_states": hidden_states, "last_hidden_state": sequence}

    vit_like = model.config.model_type in ("vit", "deit")
    if vit_like:
        pooler = getattr(backbone, "pooler", None)
        out["pooler_output"] = pooler(sequence) if pooler is not None else None
    else:  # DINOv2: the normalised CLS token
        out["pooler_output"] = sequence[:, 0]

    if hasattr(model, "cls_classifier"):  # DeiT with teacher: CLS and distillation heads, averaged
        out["cls_logits"] = model.cls_classifier(sequence[:, 0])
        out["distillation_logits"] = model.distillation_classifier(sequence[:, 1])
        out["logits"] = (out["cls_logits"] + out["distillation_logits"]) / 2
    elif hasattr(model, "classifier"):
        if vit_like:
            out["logits"] = model.classifier(sequence[:, 0])
        else:  # DINOv2: CLS next to the mean of the patch tokens (registers excluded)
            out["logits"] = model.classifier(torch.cat([sequence[:, 0], sequence[:, num_prefix:].mean(dim=1)], dim=1))

    if hasattr(model, "out_features"):  # *Backbone: chosen stages, normalised, patch tokens as a grid
        config = model.config
        maps = []
        for stage, tokens in zip(model.stage_names, hidden_states):
            if stage not in model.out_features:
                continue
            if config.apply_layernorm:
                tokens = backbone.layernorm(tokens)
            if config.reshape_hidden_states:
                patch = config.patch_size
                tokens = tokens[:, num_prefix:].reshape(
                    batch, pixel_values.shape[2] // patch, pixel_values.shape[3] // patch, -1
                ).permute(0, 3, 1, 2)
            maps.append(tokens)
        out["feature_maps"] = tuple(maps)
    return out


def _unprompted(mask, num_prefix, num_prompts):
    """The user mask without the prompt rows/columns, for layers before the prompted span."""
    keep = [i for i in range(mask.shape[-1]) if not num_prefix <= i < num_prefix + num_prompts]
    return mask[..., keep, :][..., keep]


# ------------------------------------------------------------------------------------------------------------ Swin


def swin_of(model):
    return model if isinstance(model, SwinModel) else model.swin


def swin_reference(model, pixel_values, prompts: dict[int, torch.Tensor], deep: bool, num_prefix: int = 0, *,
                   shallow_last=None, pool_prompts: bool = False, silence_prompts: bool = False,
                   always_partition: bool | None = None) -> dict:
    """Hand-written Swin forward with VPT prompts, on the (unwrapped) base model's weights, one sample and one window
    at a time: padding, cyclic shift, shift-mask regions (the original slice-based construction), relative position
    index, softmax attention over the explicit [prompts + window tokens] sequence with the bias and mask padded by
    zeros, the window average of prompt outputs, the MLP, the patch merging (with the prompts tiled 4x) and the
    pooling. With every prompt key masked to -inf (`silence_prompts`) it reproduces the base model.

    prompts: {network block index: (P, C)}. Deep: those blocks get their own prompts. Shallow: the single entry is
    inserted at that block and carried through block `shallow_last` (default: the last block).
    Returns logits (if the model has a classifier), pooler_output, last_hidden_state, feature_maps (SwinBackbone, whose
    encoder always partitions), and per stage the token grid before and after patch merging.
    """
    assert num_prefix == 0, "Swin has no prefix tokens"
    swin = swin_of(model)
    config = swin.config
    is_backbone = hasattr(model, "out_features")
    if always_partition is None:
        always_partition = is_backbone
    hidden, (height, width) = swin.embeddings(pixel_values)
    stem = (hidden, height, width)
    batch = hidden.shape[0]
    num_blocks = sum(config.depths)
    shallow_last = num_blocks - 1 if shallow_last is None else shallow_last
    carried, final_prompts = None, None
    before_merge, after_merge = [], []
    index = 0
    for stage in swin.encoder.layers:
        for b, block in enumerate(stage.blocks):
            if deep:
                block_prompts = prompts[index].expand(batch, -1, -1) if index in prompts else None
            else:
                if index in prompts:
                    carried = prompts[index].expand(batch, -1, -1)
                block_prompts = carried if index <= shallow_last else None
            shift = 0 if b % 2 == 0 else config.window_size // 2
            hidden, prompt_out = reference_block(
                block, config, hidden, (height, width), block_prompts, shift, always_partition, silence_prompts
            )
            if not deep:
                carried = prompt_out
            if pool_prompts and index == num_blocks - 1:
                final_prompts = prompt_out
            index += 1
        before_merge.append((hidden, height, width))
        if stage.downsample is not None:
            hidden = reference_merge(stage.downsample, hidden, height, width)
            if carried is not None:
                carried = stage.downsample.reduction(stage.downsample.norm(torch.cat([carried] * 4, dim=-1)))
            height, width = (height + 1) // 2, (width + 1) // 2
        after_merge.append((hidden, height, width))

    out = dict(before_merge=before_merge, after_merge=after_merge)
    if is_backbone:
        maps = []
        for stage, (tokens, h, w) in zip(model.stage_names, [stem] + before_merge):
            if stage in model.out_features:
                tokens = model.hidden_states_norms[stage](tokens)
                maps.append(tokens.reshape(batch, h, w, -1).permute(0, 3, 1, 2))
        out["feature_maps"] = tuple(maps)
        return out
    sequence = swin.layernorm(hidden)
    pooled_tokens = sequence
    if pool_prompts:
        pooled_tokens = torch.cat([sequence, swin.layernorm(final_prompts)], dim=1)
    out["last_hidden_state"] = sequence
    out["pooler_output"] = pooled_tokens.mean(dim=1)
    out["logits"] = model.classifier(out["pooler_output"]) if hasattr(model, "classifier") else None
    return out


def reference_block(block, config, hidden, dims, prompts, shift, always_partition, silence_prompts):
    """One Swin block with prompts, window by window. Returns (tokens, prompt outputs or None)."""
    height, width = dims
    window = config.window_size
    if not always_partition and min(height, width) <= window:  # Swin's rule for small feature maps
        shift, window = 0, min(height, width)
    if window != config.window_size:
        raise ValueError("the reference, like transformers' Swin, has no bias for a shrunk window")
    batch, length, channels = hidden.shape
    attention = block.attention
    heads = attention.num_attention_heads
    head_dim = channels // heads
    area = window * window
    num_prompts = 0 if prompts is None else prompts.shape[1]

    height_pad, width_pad = math.ceil(height / window) * window, math.ceil(width / window) * window
    grid = hidden.new_zeros(batch, height_pad, width_pad, channels)
    grid[:, :height, :width] = block.layernorm_before(hidden).reshape(batch, height, width, channels)
    grid = torch.roll(grid, shifts=(-shift, -shift), dims=(1, 2))

    # Shift-mask regions, as in the original Swin: slices of the shifted (padded) map.
    regions = torch.zeros(height_pad, width_pad, dtype=torch.long)
    if shift > 0:
        label = 0
        for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                regions[rows, cols] = label
                label += 1

    # Relative position bias: token i = (r1, c1), j = (r2, c2) in a window -> table[(r1 - r2 + w - 1) * (2w - 1) + ...]
    coords = [(r, c) for r in range(window) for c in range(window)]
    index = torch.tensor([[(r1 - r2 + window - 1) * (2 * window - 1) + (c1 - c2 + window - 1)
                           for (r2, c2) in coords] for (r1, c1) in coords])
    bias = attention.relative_position_bias.relative_position_bias_table[index].permute(2, 0, 1)  # heads, area, area

    normed_prompts = block.layernorm_before(prompts) if prompts is not None else None
    out_grid = torch.zeros_like(grid)
    prompt_sum = hidden.new_zeros(batch, num_prompts, channels)
    num_windows = (height_pad // window) * (width_pad // window)
    for n in range(batch):
        for top in range(0, height_pad, window):
            for left in range(0, width_pad, window):
                tokens = grid[n, top:top + window, left:left + window].reshape(area, channels)
                labels = regions[top:top + window, left:left + window].reshape(area)
                sequence = tokens if prompts is None else torch.cat([normed_prompts[n], tokens])
                size = num_prompts + area

                def split_heads(x):
                    return x.view(size, heads, head_dim).transpose(0, 1)

                q = split_heads(attention.q_proj(sequence))
                k = split_heads(attention.k_proj(sequence))
                v = split_heads(attention.v_proj(sequence))
                added = torch.zeros(heads, size, size)
                added[:, num_prompts:, num_prompts:] = bias + torch.where(
                    labels[:, None] != labels[None, :], -100.0, 0.0
                )
                if silence_prompts and num_prompts:
                    added[:, :, :num_prompts] = float("-inf")
                scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + added
                out = (scores.softmax(dim=-1) @ v).transpose(0, 1).reshape(size, channels)
                out = attention.o_proj(out)
                out_grid[n, top:top + window, left:left + window] = out[num_prompts:].view(window, window, channels)
                prompt_sum[n] += out[:num_prompts]

    out_grid = torch.roll(out_grid, shifts=(shift, shift), dims=(1, 2))[:, :height, :width]
    hidden = hidden + out_grid.reshape(batch, length, channels)
    hidden = hidden + reference_mlp(block, hidden)
    if prompts is None:
        return hidden, None
    prompts = prompts + prompt_sum / num_windows
    return hidden, prompts + reference_mlp(block, prompts)


def reference_mlp(block, x):
    x = block.layernorm_after(x)
    return block.mlp.fc2(F.gelu(block.mlp.fc1(x)))


def reference_merge(merging, hidden, height, width):
    batch, _, channels = hidden.shape
    grid = hidden.reshape(batch, height, width, channels)
    grid = F.pad(grid, (0, 0, 0, width % 2, 0, height % 2))
    grid = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 1::2]], dim=-1)
    return merging.reduction(merging.norm(grid.reshape(batch, -1, 4 * channels)))


# ====================================================================================================================
# ViT-like families of issue 13: CLIP / MetaCLIP 2, SigLIP / SigLIP 2, DINOv3, I-JEPA, ViT-MSN, ViT-MAE.
# Each writes the model's forward out by hand: embeddings, any pre-encoder op (CLIP's pre-layernorm), prompts inserted
# after the prefix tokens, every base layer (unwrapped; DINOv3's written out with its rotary embedding), prompts
# stripped, then the model's own post-processing, pooling and heads. Extra model inputs come as keyword arguments.


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


# ------------------------------------------------------------------------------------------------------------ BEiT


def beit_relative_bias(bias_module, height: int, width: int) -> torch.Tensor:
    """A BEiT relative position bias for an (height x width) patch grid plus CLS, built by hand from its table:
    (heads, 1 + h*w, 1 + h*w). Patch i=(r1, c1) to j=(r2, c2) reads row (r1 - r2 + h - 1) * (2w - 1) + (c1 - c2 + w - 1);
    CLS to a patch, a patch to CLS and CLS to CLS read the table's last three rows."""
    table = bias_module.relative_position_bias_table
    size = (2 * height - 1) * (2 * width - 1)
    coords = [(r, c) for r in range(height) for c in range(width)]
    index = torch.empty(1 + len(coords), 1 + len(coords), dtype=torch.long)
    index[1:, 1:] = torch.tensor([[(r1 - r2 + height - 1) * (2 * width - 1) + (c1 - c2 + width - 1)
                                   for (r2, c2) in coords] for (r1, c1) in coords])
    index[0, :], index[:, 0], index[0, 0] = size, size + 1, size + 2
    return table[index].permute(2, 0, 1)


def beit_layer(layer, hidden, bias):
    """A `BeitLayer` written out (eval mode): attention with the additive `bias`, layer scale, MLP."""
    attention = layer.attention
    batch, length, width = hidden.shape
    heads = attention.num_attention_heads
    head_dim = width // heads

    def split(t):
        return t.view(batch, length, heads, head_dim).transpose(1, 2)

    x = layer.layernorm_before(hidden)
    q, k, v = split(attention.q_proj(x)), split(attention.k_proj(x)), split(attention.v_proj(x))
    scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5
    if bias is not None:
        scores = scores + bias
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    attended = attention.o_proj((probs @ v).transpose(1, 2).reshape(batch, length, width))
    hidden = hidden + layer.lambda_1 * attended
    return hidden + layer.lambda_2 * layer.mlp(layer.layernorm_after(hidden))


def beit_reference(base_model, pixel_values, prompts, deep, num_prefix: int = 1, key_mask=None,
                   interpolate_pos_encoding: bool | None = None, **inputs) -> dict:
    """BEiT: embeddings, prompted layers written out with their relative position biases (the layer's own and the
    model's shared one) built by hand and zero-padded at the prompt positions, then the final norm, the pooler (CLS,
    or layernormed mean of the patches), the classifier and the backbone's feature maps. `key_mask` (batch, tokens):
    an optional bool padding mask, prompts always visible. With `interpolate_pos_encoding` set (another resolution),
    the unpadded biases come from the model's bias modules, which interpolate their tables to the new grid."""
    model = copy.deepcopy(base_model)
    backbone = model if hasattr(model, "embeddings") else model.beit
    config = model.config
    height, width = pixel_values.shape[2] // config.patch_size, pixel_values.shape[3] // config.patch_size
    hidden = backbone.embeddings(pixel_values)
    batch = hidden.shape[0]
    first = min(prompts)
    num_prompts = prompts[first].shape[0]
    shared = None

    def relative_bias(module):
        if interpolate_pos_encoding is None:
            return beit_relative_bias(module, height, width)[None]
        return module((height, width), interpolate_pos_encoding=interpolate_pos_encoding, dim_size=hidden.shape[1])

    if backbone.shared_position_bias is not None:
        shared = relative_bias(backbone.shared_position_bias)

    def padded(bias):
        """Zero rows and columns at the prompt positions of a (1, heads, n, n) position bias."""
        n = bias.shape[-1]
        out = bias.new_zeros(*bias.shape[:-2], n + num_prompts, n + num_prompts)
        keep = [i for i in range(n + num_prompts) if not num_prefix <= i < num_prefix + num_prompts]
        out[..., torch.tensor(keep)[:, None], torch.tensor(keep)[None, :]] = bias
        return out

    def position_bias(layer):
        bias = None
        if layer.relative_position_bias is not None:
            bias = relative_bias(layer.relative_position_bias)
        if shared is not None:
            bias = shared if bias is None else bias + shared
        return bias

    def mask_bias(prompted: bool):
        if key_mask is None:
            return None
        keys = key_mask
        if prompted:
            keys = torch.cat([key_mask[:, :num_prefix], torch.ones(batch, num_prompts, dtype=torch.bool),
                              key_mask[:, num_prefix:]], dim=1)
        return torch.zeros(batch, 1, 1, keys.shape[1]).masked_fill(~keys[:, None, None, :],
                                                                   torch.finfo(torch.float32).min)

    class Layer:
        def __init__(self, layer):
            self.layer = layer

        def __call__(self, tokens, _mask):
            prompted = tokens.shape[1] != hidden.shape[1]
            bias = position_bias(self.layer)
            if bias is not None and prompted:
                bias = padded(bias)
            user = mask_bias(prompted)
            total = user if bias is None else (bias if user is None else bias + user)
            return beit_layer(self.layer, tokens, total)

    states = prompted_encoder([Layer(layer) for layer in backbone.layers], hidden, prompts, deep, num_prefix)
    sequence = backbone.layernorm(states[-1])
    out = {"last_hidden_state": sequence, "hidden_states": states}
    pooler = backbone.pooler
    if pooler is not None:
        out["pooler_output"] = (pooler.layernorm(sequence[:, 1:].mean(dim=1)) if pooler.layernorm is not None
                                else sequence[:, 0])
    else:
        out["pooler_output"] = None
    if hasattr(model, "classifier"):
        out["logits"] = model.classifier(out["pooler_output"])
    if hasattr(model, "out_features"):
        maps = []
        for stage, tokens in zip(model.stage_names, states):
            if stage in model.out_features:
                if config.reshape_hidden_states:
                    tokens = tokens[:, 1:].transpose(1, 2).reshape(batch, -1, height, width)
                maps.append(tokens)
        out["feature_maps"] = tuple(maps)
    return out


# ------------------------------------------------------------------------------------------------- Data2Vec-Vision


def data2vec_vision_layer(layer, hidden, bias):
    """A `Data2VecVisionLayer` written out (eval mode): attention with the additive `bias`, layer scale, MLP."""
    attention = layer.attention.attention
    batch, length, width = hidden.shape
    head_dim = attention.attention_head_size
    heads = width // head_dim

    def split(t):
        return t.view(batch, length, heads, head_dim).transpose(1, 2)

    x = layer.layernorm_before(hidden)
    q, k, v = split(attention.query(x)), split(attention.key(x)), split(attention.value(x))
    scores = (q @ k.transpose(-1, -2)) / head_dim**0.5
    if bias is not None:
        scores = scores + bias
    attended = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, length, width)
    attended = layer.attention.output.dense(attended)
    if layer.lambda_1 is not None:
        attended = layer.lambda_1 * attended
    hidden = hidden + attended
    mlp = layer.output.dense(layer.intermediate.intermediate_act_fn(layer.intermediate.dense(
        layer.layernorm_after(hidden))))
    if layer.lambda_2 is not None:
        mlp = layer.lambda_2 * mlp
    return hidden + mlp


def data2vec_vision_reference(base_model, pixel_values, prompts, deep, num_prefix: int = 1,
                              interpolate_pos_encoding: bool | None = None, **inputs) -> dict:
    """Data2Vec-Vision: embeddings, prompted layers written out with the layer's own and the encoder's shared relative
    position biases built by hand from their tables and zero-padded at the prompt positions, final norm, pooler (CLS
    or layernormed mean of the patches), classifier. With `interpolate_pos_encoding` set (another resolution), the
    unpadded biases come from the model's bias modules, which interpolate their tables to the new grid."""
    model = copy.deepcopy(base_model)
    backbone = model if hasattr(model, "embeddings") else model.data2vec_vision
    config = model.config
    height, width = pixel_values.shape[2] // config.patch_size, pixel_values.shape[3] // config.patch_size
    hidden = backbone.embeddings(pixel_values)
    if isinstance(hidden, tuple):
        hidden = hidden[0]
    first = min(prompts)
    num_prompts = prompts[first].shape[0]
    encoder = backbone.encoder

    def relative_bias(module):
        if interpolate_pos_encoding is None:
            return beit_relative_bias(module, height, width)[None]
        return module((height, width), interpolate_pos_encoding=interpolate_pos_encoding, dim_size=hidden.shape[1])

    shared = None
    if getattr(encoder, "relative_position_bias", None) is not None:
        shared = relative_bias(encoder.relative_position_bias)

    def padded(bias):
        n = bias.shape[-1]
        keep = torch.tensor([i for i in range(n + num_prompts) if not num_prefix <= i < num_prefix + num_prompts])
        out = bias.new_zeros(*bias.shape[:-2], n + num_prompts, n + num_prompts)
        out[..., keep[:, None], keep[None, :]] = bias
        return out

    class Layer:
        def __init__(self, layer):
            self.layer = layer

        def __call__(self, tokens, _mask):
            own = getattr(self.layer.attention.attention, "relative_position_bias", None)
            bias = None if own is None else relative_bias(own)
            if shared is not None:
                bias = shared if bias is None else bias + shared
            if bias is not None and tokens.shape[1] != hidden.shape[1]:
                bias = padded(bias)
            return data2vec_vision_layer(self.layer, tokens, bias)

    states = prompted_encoder([Layer(layer) for layer in encoder.layer], hidden, prompts, deep, num_prefix)
    sequence = backbone.layernorm(states[-1])
    out = {"last_hidden_state": sequence, "hidden_states": states}
    pooler = backbone.pooler
    out["pooler_output"] = None
    if pooler is not None:
        out["pooler_output"] = (pooler.layernorm(sequence[:, 1:].mean(dim=1)) if pooler.layernorm is not None
                                else sequence[:, 0])
    if hasattr(model, "classifier"):
        out["logits"] = model.classifier(out["pooler_output"])
    return out
