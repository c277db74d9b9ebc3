"""VPT for the ViT family: ViT, DeiT, DINOv2 and DINOv2-with-registers.

Between prompted layers the token sequence is `[prefix tokens, prompts, patch tokens]`. The first prompted layer
inserts its prompts; in deep mode every later layer overwrites the prompt slice with its own; the last prompted layer
strips the prompts from its output. Everything outside the prompted span (embeddings, final norm, pooler, heads) sees
exactly the base model's layout. Prompts get no position embedding: positions are added by the embeddings, before
the first layer.
"""

from __future__ import annotations

import torch

from ..layer import MixedBatch, VisualPromptLayer
from .base import BackboneFamily, captured_outputs, strip_tokens


def num_prefix_tokens(model_config: dict) -> int:
    """CLS, plus DeiT's distillation token, plus DINOv2's register tokens."""
    model_type = model_config.get("model_type")
    if model_type == "deit":
        return 2
    return 1 + int(model_config.get("num_register_tokens", 0) or 0)


TARGET_MODULES = {
    "vit": r"(.*\.)?layers\.\d+",
    "deit": r"(.*\.)?layers\.\d+",
    "dinov2": r"(.*\.)?encoder\.layer\.\d+",
    "dinov2_with_registers": r"(.*\.)?encoder\.layer\.\d+",
}


def pad_attention_mask(mask: torch.Tensor, start: int, num_prompts: int) -> torch.Tensor:
    """Inserts `num_prompts` positions at `start` in a 4D (batch, heads, query, key) mask built for the unprompted
    sequence. Every query may attend to the prompts (True / 0.0). Prompt queries get the first prefix token's row, so
    they never see keys the mask hides from the CLS token. Broadcast dimensions of size 1 stay as they are."""
    if mask.shape[-1] > 1:
        key_pad = torch.ones if mask.dtype == torch.bool else torch.zeros
        pad = key_pad(*mask.shape[:-1], num_prompts, dtype=mask.dtype, device=mask.device)
        mask = torch.cat([mask[..., :start], pad, mask[..., start:]], dim=-1)
    if mask.shape[-2] > 1:
        rows = mask[..., :1, :].expand(*mask.shape[:-2], num_prompts, mask.shape[-1])
        mask = torch.cat([mask[..., :start, :], rows, mask[..., start:, :]], dim=-2)
    return mask


def mask_prompt_keys(mask: torch.Tensor | None, valid: torch.Tensor, start: int,
                     hidden_states: torch.Tensor) -> torch.Tensor:
    """Hides the prompt positions [start, start + valid.shape[1]) that `valid` (batch, prompts) marks False from every
    query. Combines with a 4D mask already padded for the prompts (bool: False hides; float: adds the dtype's min),
    or builds an additive (batch, 1, 1, keys) mask, which eager and sdpa attention both take."""
    batch, length = hidden_states.shape[0], hidden_states.shape[1]
    keys = torch.ones(batch, length, dtype=torch.bool, device=hidden_states.device)
    keys[:, start : start + valid.shape[1]] = valid
    keys = keys[:, None, None, :]
    if mask is not None and mask.dtype == torch.bool:
        return mask & keys
    dtype = mask.dtype if mask is not None else hidden_states.dtype
    hidden = torch.zeros(keys.shape, dtype=dtype, device=keys.device).masked_fill_(~keys, torch.finfo(dtype).min)
    return hidden if mask is None else mask + hidden


class ViTPromptLayer(VisualPromptLayer):
    """Wraps a `ViTLayer`/`DeiTLayer`/`Dinov2Layer`, whose forward is `(hidden_states, attention_mask=None, **kwargs)`."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args,
                visual_prompt_batch: MixedBatch | None = None, **kwargs):
        prompts = self.layer_prompts(hidden_states.shape[0], visual_prompt_batch)
        if prompts is None:
            return self.base_layer(hidden_states, attention_mask, *args, **kwargs)

        slot = prompts.slot
        start, end = self.num_prefix_tokens, self.num_prefix_tokens + prompts.num_tokens
        length = hidden_states.shape[1] - (0 if slot.is_first else prompts.num_tokens)  # tokens besides prompts
        if slot.owns_prompts:
            # One concatenation: insert (first layer) or replace the previous layer's prompt outputs (deep).
            patches = hidden_states[:, start:] if slot.is_first else hidden_states[:, end:]
            hidden_states = torch.cat([hidden_states[:, :start], prompts.make(hidden_states.dtype), patches], dim=1)
        if attention_mask is not None:
            attention_mask = self.pad_mask(attention_mask, length, start, prompts.num_tokens, args, kwargs)
        if prompts.valid is not None:  # a mixed batch with padded prompt positions: no query may attend to them
            attention_mask = mask_prompt_keys(attention_mask, prompts.valid, start, hidden_states)

        captured = _captured_hidden_states()
        num_captured = len(captured) if captured is not None else 0
        output = self.call_base(hidden_states, attention_mask, args, kwargs)
        if captured is not None:
            # `output_hidden_states` hooks sit on the wrapped layer and saw the prompted sequence. Strip what they
            # recorded during this call, so hidden states keep the base layout (dense heads reshape them to a grid).
            for i in range(num_captured, len(captured)):
                if captured[i] is not None:
                    captured[i] = strip_tokens(captured[i], start, end)
        if slot.is_last:
            output = strip_tokens(output, start, end)
        return output

    def pad_mask(self, mask: torch.Tensor, length: int, start: int, num_prompts: int, args: tuple,
                 kwargs: dict) -> torch.Tensor:
        """The layer's 4D attention mask, built for `length` tokens, padded for the prompt positions. Families whose
        mask carries more than visibility (BEiT's shared position bias) override this."""
        return pad_attention_mask(mask, start, num_prompts)

    def call_base(self, hidden_states: torch.Tensor, attention_mask, args: tuple, kwargs: dict):
        """Runs the wrapped layer on the prompted sequence (families that must change an argument override this)."""
        return self.base_layer(hidden_states, attention_mask, *args, **kwargs)

    def patch_tokens(self, hidden_states: torch.Tensor, slot) -> torch.Tensor:
        # Deep layers after the first receive the previous layer's prompt outputs, which they replace.
        start = self.num_prefix_tokens
        return hidden_states[:, start:] if slot.is_first else hidden_states[:, start + slot.num_tokens :]

    def carried_prompts(self, hidden_states: torch.Tensor, slot, kwargs: dict) -> torch.Tensor:
        start = self.num_prefix_tokens
        return hidden_states[:, start : start + slot.num_tokens]


def _captured_hidden_states() -> list | None:
    collected = captured_outputs()
    return collected.get("hidden_states") if collected else None


FAMILY = BackboneFamily(ViTPromptLayer, TARGET_MODULES, num_prefix_tokens)
