"""VPT for Swin: `SwinModel`, `SwinForImageClassification`, `SwinBackbone` (and anything else built on `SwinModel`).

Each Swin block (`SwinLayer`) is wrapped by a `SwinPromptLayer`. A block's prompts are shared by all of its windows and
join every window's attention as extra keys and values; shallow prompts travel between blocks in a per-forward side
channel, because Swin's stages view the token sequence as a grid. The design, re-derived from the official VPT code
(KMnP/vpt), its outputs and its limits are written up in `docs/swin.md`.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.swin.modeling_swin import (
    SwinLayer,
    SwinModel,
    SwinPatchMerging,
    window_partition,
    window_reverse,
)

from ..config import VisualPromptConfig
from ..layer import MixedBatch, PromptSlot, VisualPromptLayer
from .base import BackboneFamily, captured_outputs


TARGET_MODULES = {"swin": r"(.*\.)?encoder\.layers\.\d+\.blocks\.\d+"}

CARRY_KWARG = "visual_prompt_swin_carry"


def num_prefix_tokens(model_config: dict) -> int:
    """Swin has no CLS or register tokens."""
    return 0


class _PromptCarry:
    """One forward's shallow side channel: the prompts entering each prompted block, by slot index, and the final
    prompts for `include_prompts_in_pooling`. Created by `_swin_pre_hook`, passed down as a keyword argument."""

    __slots__ = ("prompts", "final")

    def __init__(self) -> None:
        self.prompts: dict[int, torch.Tensor] = {}
        self.final: Optional[torch.Tensor] = None


class SwinPromptLayer(VisualPromptLayer):
    """Wraps a `SwinLayer`, whose forward is `(hidden_states, input_dimensions, always_partition=False, **kwargs)` and
    returns `(hidden_states, attn_weights)`. See the module docstring for the design."""


    def __init__(self, base_layer: nn.Module, num_prefix_tokens: int = 0) -> None:
        if not isinstance(base_layer, SwinLayer):
            raise TypeError(
                f"Swin visual prompts wrap Swin blocks (SwinLayer, `encoder.layers.<stage>.blocks.<block>`), not "
                f"{type(base_layer).__name__}. Leave target_modules unset, or make it match only those blocks."
            )
        super().__init__(base_layer, num_prefix_tokens)
        # Set by `attach_swin` (unregistered: they belong to the base model): the stage's patch merging after this
        # block when it is its stage's last block, and the SwinModel whose hooks serve this layer.
        self.__dict__["_merge"] = None
        self.__dict__["_swin_model"] = None

    def update_layer(self, adapter_name: str, config: VisualPromptConfig, slot: PromptSlot, patch_size: int,
                     projection=None) -> None:
        self.pool_prompts[adapter_name] = bool(config.include_prompts_in_pooling)
        super().update_layer(adapter_name, config, slot, patch_size, projection)

    def needs_carry(self) -> bool:
        """Whether a forward may carry prompts between blocks: any adapter here (the active one, or any of a mixed
        batch's, which the SwinModel hook cannot see yet) is shallow or pooled. An unused carry costs nothing."""
        if self.disable_adapters:
            return False
        return any(not slot.deep or self.pool_prompts.get(a, False) for a, slot in self.prompt_slot.items())

    def carried_prompts(self, hidden_states: torch.Tensor, slot: PromptSlot, kwargs: dict) -> torch.Tensor:
        carry = kwargs.get(CARRY_KWARG)
        prompts = carry.prompts.get(slot.index) if carry is not None else None
        if prompts is None:
            raise RuntimeError(_NO_CARRY)
        return prompts

    def unload_and_optionally_merge_module(self, merge: bool = False, safe_merge: bool = False,
                                           adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Called by PEFT's `unload()`: takes the SwinModel hooks away too, so the base model comes back pristine."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)  # raises: prompts cannot be merged
        if self._swin_model is not None:
            _remove_hooks(self._swin_model)
        return self.get_base_layer()

    # ----------------------------------------------------------------------------------------------------- forward

    def forward(self, hidden_states: torch.Tensor, input_dimensions: tuple[int, int], always_partition: bool = False,
                visual_prompt_batch: Optional[MixedBatch] = None, **kwargs):
        carry: Optional[_PromptCarry] = kwargs.pop(CARRY_KWARG, None)
        layer_prompts = self.layer_prompts(hidden_states.shape[0], visual_prompt_batch)
        if layer_prompts is None:
            return self.base_layer(hidden_states, input_dimensions, always_partition=always_partition, **kwargs)

        slot = layer_prompts.slot
        pool = self.pool_prompts.get(layer_prompts.adapter, False)  # the same for every adapter of a mixed batch
        # Prompt outputs are needed when they are carried on (shallow) or pooled (last block).
        keep_prompts = (not slot.deep and not slot.is_last) or (pool and slot.is_last)

        if slot.owns_prompts:
            prompts = layer_prompts.make(hidden_states.dtype)
        else:
            prompts = carry.prompts.get(slot.index) if carry is not None else None
            if prompts is None:
                raise RuntimeError(_NO_CARRY)
        if keep_prompts and carry is None:
            raise RuntimeError(_NO_CARRY)

        base = self.base_layer
        if not always_partition:
            base.set_shift_and_window_size(input_dimensions)
        window, shift = int(base.window_size), int(base.shift_size)
        bias_area = base.attention.relative_position_bias.window_area
        if window * window != bias_area:
            raise ValueError(_shrunk_window_message(input_dimensions, window, bias_area))
        height, width = input_dimensions
        mask = base.get_attn_mask(
            height + (window - height % window) % window, width + (window - width % window) % window,
            dtype=hidden_states.dtype, device=hidden_states.device,
        )

        block = functools.partial(
            self._block, dims=(height, width), window=window, shift=shift, keep_prompts=keep_prompts,
            output_attentions=_wants_attentions(kwargs), prompt_valid=layer_prompts.valid, kwargs=kwargs,
        )
        checkpoint_func = self._checkpoint_func()
        if checkpoint_func is not None:
            hidden_states, prompt_out, weights = checkpoint_func(block, hidden_states, prompts, mask)
        else:
            hidden_states, prompt_out, weights = block(hidden_states, prompts, mask)

        if keep_prompts:
            if slot.is_last:
                carry.final = prompt_out
            else:
                if self._merge is not None:
                    prompt_out = merge_prompts(self._merge, prompt_out)
                carry.prompts[slot.index + 1] = prompt_out
        return hidden_states, weights

    def _checkpoint_func(self):
        """Honours the wrapped block's gradient checkpointing (a `GradientCheckpointingLayer`), non-reentrant only."""
        base = self.base_layer
        if not (getattr(base, "gradient_checkpointing", False) and base.training):
            return None
        func = getattr(base, "_gradient_checkpointing_func", None)
        if not isinstance(func, functools.partial):  # unset or custom: use the safe variant
            return functools.partial(checkpoint, use_reentrant=False)
        if func.keywords.get("use_reentrant") is False:
            return func  # transformers' own (keeps options such as offloading)
        raise ValueError(
            "Swin visual prompts need non-reentrant gradient checkpointing: with use_reentrant=True (also torch's "
            "default when use_reentrant is not given) the prompts' gradients would come back as None. Call "
            "model.activation_checkpointing_enable() (or gradient_checkpointing_enable()) with no kwargs, or with "
            "{'use_reentrant': False}."
        )

    def _block(self, hidden_states: torch.Tensor, prompts: torch.Tensor, mask: Optional[torch.Tensor], *,
               dims: tuple[int, int], window: int, shift: int, keep_prompts: bool, output_attentions: bool,
               prompt_valid: Optional[torch.Tensor], kwargs: dict):
        """`SwinLayer.forward` with prompts. Returns (tokens, prompt outputs or None, attention weights or None)."""
        base = self.base_layer
        height, width = dims
        batch, length, channels = hidden_states.shape

        tokens = base.layernorm_before(hidden_states).view(batch, height, width, channels)
        pad_right, pad_bottom = (window - width % window) % window, (window - height % window) % window
        tokens = F.pad(tokens, (0, 0, 0, pad_right, 0, pad_bottom))
        height_pad, width_pad = height + pad_bottom, width + pad_right
        if shift > 0:
            tokens = torch.roll(tokens, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(tokens, window).view(-1, window * window, channels)

        image_out, prompt_out, weights = window_attention(
            base.attention, windows, base.layernorm_before(prompts), mask, batch, keep_prompts, output_attentions,
            kwargs, prompt_valid,
        )
        image_out = base.dropout(image_out)
        tokens = window_reverse(image_out.view(-1, window, window, channels), window, height_pad, width_pad)
        if shift > 0:
            tokens = torch.roll(tokens, shifts=(shift, shift), dims=(1, 2))
        if pad_right > 0 or pad_bottom > 0:
            tokens = tokens[:, :height, :width, :].contiguous()
        tokens = tokens.view(batch, length, channels)

        if not keep_prompts:
            hidden_states = hidden_states + base.drop_path(tokens)
            hidden_states = base.dropout(base.mlp(base.layernorm_after(hidden_states))) + hidden_states
            return hidden_states, None, weights

        # Prompts go through the residual, drop-path and MLP like tokens: concatenated, [prompts, tokens].
        num_prompts = prompts.shape[1]
        hidden_states = torch.cat([prompts, hidden_states], dim=1)
        hidden_states = hidden_states + base.drop_path(torch.cat([base.dropout(prompt_out), tokens], dim=1))
        hidden_states = base.dropout(base.mlp(base.layernorm_after(hidden_states))) + hidden_states
        return hidden_states[:, num_prompts:], hidden_states[:, :num_prompts], weights


def window_attention(attention: nn.Module, windows: torch.Tensor, prompts: torch.Tensor, mask: Optional[torch.Tensor],
                     batch: int, prompt_queries: bool, output_attentions: bool, kwargs: dict,
                     prompt_valid: Optional[torch.Tensor] = None):
    """`SwinAttention.forward` with shared prompts.

    windows: (batch * num_windows, ws**2, C), the window tokens after `layernorm_before`; prompts: (batch, P, C), after
    `layernorm_before`; mask: the (num_windows, ws**2, ws**2) shift mask or None. Returns the window outputs
    (batch * num_windows, ws**2, C), the prompt outputs averaged over windows (batch, P, C) when `prompt_queries`, and
    the attention weights when asked and available. `prompt_valid` (batch, P) hides padded prompt positions of a
    mixed batch from every query.
    """
    num_windows = windows.shape[0] // batch
    area, channels = windows.shape[1], windows.shape[2]
    heads, head_dim = attention.num_attention_heads, attention.head_dim
    num_prompts = prompts.shape[1]
    dropout = attention.attention_dropout if attention.training else 0.0

    def per_window(proj):  # (batch, windows, heads, area, head_dim)
        return proj(windows).view(batch, num_windows, area, heads, head_dim).transpose(2, 3)

    def per_sample(proj):  # (batch, heads, P, head_dim): once per sample, shared by the windows
        return proj(prompts).view(batch, num_prompts, heads, head_dim).transpose(1, 2)

    query, key, value = per_window(attention.q_proj), per_window(attention.k_proj), per_window(attention.v_proj)
    prompt_key, prompt_value = per_sample(attention.k_proj), per_sample(attention.v_proj)
    prompt_query = per_sample(attention.q_proj) if prompt_queries else None
    bias = attention.relative_position_bias()  # (1, heads, area, area)
    key_bias = None if prompt_valid is None else _prompt_key_bias(prompt_valid, query.dtype)  # (batch, P)

    implementation = attention.config._attn_implementation
    if implementation in (None, "eager"):
        return _eager(attention, query, key, value, prompt_query, prompt_key, prompt_value, bias, mask, dropout,
                      output_attentions, key_bias)

    # Other attention functions take one key/value tensor per window: put the prompts' in front of each window's.
    def with_prompts(window_states, prompt_states):
        prompt_states = prompt_states.unsqueeze(1).expand(batch, num_windows, heads, num_prompts, head_dim)
        return torch.cat([prompt_states, window_states], dim=3).flatten(0, 1)

    key, value = with_prompts(key, prompt_key), with_prompts(value, prompt_value)
    query = with_prompts(query, prompt_query) if prompt_queries else query.flatten(0, 1)
    num_queries = query.shape[2]
    combined = bias if mask is None else bias + mask.unsqueeze(1)  # (1 or windows, heads, area, area)
    combined = F.pad(combined, (num_prompts, 0, num_queries - area, 0))  # zero bias/mask at the prompt positions
    if key_bias is not None:  # per sample: (batch, windows, heads, queries, keys)
        key_bias = F.pad(key_bias, (0, area))[:, None, None, None, :]
        combined = (combined.unsqueeze(0) + key_bias).expand(batch, num_windows, -1, -1, -1).flatten(0, 1)
    elif mask is not None:
        combined = combined.unsqueeze(0).expand(batch, -1, -1, -1, -1).flatten(0, 1)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, None)
    output, weights = interface(
        attention, query, key, value, combined, dropout=dropout, scaling=attention.scaling, **kwargs
    )
    output = output.reshape(batch * num_windows, num_queries, channels)
    image_out = attention.o_proj(output[:, num_queries - area:])
    prompt_out = None
    if prompt_queries:
        prompt_out = attention.o_proj(output[:, :num_prompts].reshape(batch, num_windows, num_prompts, channels)
                                      .mean(dim=1))
    if weights is not None:
        weights = weights[:, :, num_queries - area:]
    return image_out, prompt_out, weights


def _eager(attention, query, key, value, prompt_query, prompt_key, prompt_value, bias, mask, dropout,
           output_attentions, key_bias=None):
    """Eager attention (softmax in float32, as transformers' `eager_attention_forward`) with the windows folded into
    the rows of the matmuls against the prompts' keys/values, which are thus never copied per window.
    Layout: (batch, heads, windows, area, head_dim) for window states, (batch, heads, P, head_dim) for prompts."""
    batch, num_windows, heads, area, head_dim = query.shape
    num_prompts = prompt_key.shape[2]
    scaling = attention.scaling
    query = query.permute(0, 2, 1, 3, 4).contiguous()
    key = key.permute(0, 2, 1, 3, 4).contiguous()
    value = value.permute(0, 2, 1, 3, 4).contiguous()
    rows = num_windows * area

    combined = bias.unsqueeze(2)  # (1, heads, 1, area, area)
    if mask is not None:
        combined = combined + mask[None, None]  # (1, heads, windows, area, area)
    prompt_scores = torch.matmul(query.view(batch, heads, rows, head_dim), prompt_key.transpose(-1, -2))
    prompt_scores = prompt_scores.view(batch, heads, num_windows, area, num_prompts) * scaling
    if key_bias is not None:
        prompt_scores = prompt_scores + key_bias[:, None, None, None, :]
    scores = torch.cat([prompt_scores, torch.matmul(query, key.transpose(-1, -2)) * scaling + combined], dim=-1)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=attention.training)
    output = torch.matmul(probs[..., num_prompts:], value) + torch.matmul(
        probs[..., :num_prompts].reshape(batch, heads, rows, num_prompts), prompt_value
    ).view(batch, heads, num_windows, area, head_dim)
    output = output.permute(0, 2, 3, 1, 4).reshape(batch * num_windows, area, heads * head_dim)
    image_out = attention.o_proj(output)
    weights = probs.transpose(1, 2).flatten(0, 1) if output_attentions else None

    prompt_out = None
    if prompt_query is not None:
        # Per window, the prompt queries see the prompts (the same scores in every window) and that window's tokens
        # (bias and mask padded with zeros). Their outputs are averaged over the windows.
        prompt_scores = torch.matmul(prompt_query, prompt_key.transpose(-1, -2)) * scaling  # (B, h, P, P)
        if key_bias is not None:
            prompt_scores = prompt_scores + key_bias[:, None, None, :]
        window_scores = torch.matmul(prompt_query, key.view(batch, heads, rows, head_dim).transpose(-1, -2)) * scaling
        scores = torch.cat(
            [
                prompt_scores.unsqueeze(3).expand(batch, heads, num_prompts, num_windows, num_prompts),
                window_scores.view(batch, heads, num_prompts, num_windows, area),
            ],
            dim=-1,
        )
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        probs = F.dropout(probs, p=dropout, training=attention.training)
        output = torch.matmul(probs[..., :num_prompts].mean(dim=3), prompt_value) + torch.matmul(
            probs[..., num_prompts:].reshape(batch, heads, num_prompts, rows), value.view(batch, heads, rows, head_dim)
        ) / num_windows
        prompt_out = attention.o_proj(output.transpose(1, 2).reshape(batch, num_prompts, heads * head_dim))
    return image_out, prompt_out, weights


def _prompt_key_bias(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive scores: 0 for real prompts, the dtype's minimum for a mixed batch's padding."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, torch.finfo(dtype).min)


def merge_prompts(merging: SwinPatchMerging, prompts: torch.Tensor) -> torch.Tensor:
    """Patch merging for prompts: a prompt is its own 2x2 neighbourhood, so it is tiled 4x along channels, then goes
    through the merge's norm and reduction (C -> 2C)."""
    return merging.reduction(merging.norm(torch.cat([prompts] * 4, dim=-1)))


def _wants_attentions(kwargs: dict) -> bool:
    if kwargs.get("output_attentions"):
        return True
    collected = captured_outputs()
    return bool(collected) and "attentions" in collected


_NO_CARRY = (
    "This Swin block needs the prompts carried from the previous block (VPT-Shallow, or include_prompts_in_pooling), "
    "but got none. They are carried by a hook on SwinModel: call the model (or its SwinModel), not its encoder, a "
    "stage or a block directly."
)


def _shrunk_window_message(dims, window: int, bias_area: int) -> str:
    configured = int(round(bias_area**0.5))
    return (
        f"This Swin block runs with window size {window} (a feature map of {tuple(dims)} made "
        f"`set_shift_and_window_size` shrink it, possibly on an earlier call), but its relative position bias is "
        f"built for the configured window {configured}. The transformers Swin implementation cannot run such inputs "
        f"(the base model fails with a size mismatch), so neither can its prompts. Use inputs whose smallest feature "
        f"map, at every stage, is at least window_size={configured} (or equal to it), and a fresh model: the shrink "
        f"persists on the block."
    )


# ---------------------------------------------------------------------------------------------- model-level wiring


def _blocks(swin_model: SwinModel):
    """(stage, block) pairs in network order."""
    for stage in swin_model.encoder.layers:
        for block in stage.blocks:
            yield stage, block


def _swin_models(model: nn.Module) -> list[SwinModel]:
    return [m for m in model.modules() if isinstance(m, SwinModel)]


def validate_targets(model: nn.Module, config: VisualPromptConfig, targets: list[str]) -> None:
    """Before injection: the targets must be Swin blocks; shallow needs consecutive blocks of one SwinModel; pooling
    needs a pooler and a span that ends at the network's last block."""
    position = {}  # id(block) -> (SwinModel, network position)
    for swin_model in _swin_models(model):
        for i, (_, block) in enumerate(_blocks(swin_model)):
            position[id(block)] = (swin_model, i)
    found = []
    for name in targets:
        module = model.get_submodule(name)
        if id(module) not in position or not isinstance(module, (SwinLayer, SwinPromptLayer)):
            raise ValueError(
                f"Swin visual prompts wrap Swin blocks (`encoder.layers.<stage>.blocks.<block>` of a SwinModel), but "
                f"target_modules matched {name!r} ({type(module).__name__}). Leave target_modules unset to prompt "
                "every block, or match only blocks."
            )
        found.append(position[id(module)])
    if not found:
        return
    if config.deep and not config.include_prompts_in_pooling:
        return
    owners = {id(owner) for owner, _ in found}
    indices = [i for _, i in found]
    mode = "VPT-Shallow" if not config.deep else "include_prompts_in_pooling"
    if len(owners) > 1:
        raise ValueError(f"{mode} on Swin needs all prompted blocks in one SwinModel; target_modules spans several.")
    if not config.deep and indices != list(range(indices[0], indices[0] + len(indices))):
        raise ValueError(
            "VPT-Shallow on Swin carries the prompts from block to block, so the prompted blocks must be consecutive "
            f"(network positions {indices} have gaps). Prompt a contiguous run of blocks, or use deep=True."
        )
    if config.include_prompts_in_pooling:
        swin_model = found[0][0]
        if swin_model.pooler is None:
            raise ValueError(
                "include_prompts_in_pooling averages the prompts into the pooler, but this Swin model has no pooling "
                "layer (SwinBackbone, SwinForMaskedImageModeling, add_pooling_layer=False). Leave it False."
            )
        if indices[-1] != sum(1 for _ in _blocks(swin_model)) - 1:
            raise ValueError(
                "include_prompts_in_pooling pools the prompts of the network's last block, so the prompted blocks must "
                "include it."
            )


def attach_swin(model: nn.Module) -> None:
    """After injection: tells each prompt layer which patch merging follows it, and hooks each prompted SwinModel
    (idempotent)."""
    for swin_model in _swin_models(model):
        wrapped = False
        for stage, block in _blocks(swin_model):
            if isinstance(block, SwinPromptLayer):
                wrapped = True
                block.__dict__["_merge"] = stage.downsample if block is stage.blocks[-1] else None
                block.__dict__["_swin_model"] = swin_model
        if wrapped and not _has_hooks(swin_model):
            swin_model.register_forward_pre_hook(_swin_pre_hook, with_kwargs=True)
            swin_model.register_forward_hook(_swin_post_hook, with_kwargs=True)


def _swin_pre_hook(module: SwinModel, args, kwargs):
    if kwargs.get(CARRY_KWARG) is not None:
        return None
    if any(isinstance(block, SwinPromptLayer) and block.needs_carry() for _, block in _blocks(module)):
        kwargs[CARRY_KWARG] = _PromptCarry()
        return args, kwargs
    return None


def _swin_post_hook(module: SwinModel, args, kwargs, output):
    """`include_prompts_in_pooling`: the pool becomes the mean over the image tokens and the final prompts, both after
    the final layernorm."""
    carry = kwargs.get(CARRY_KWARG)
    if carry is None or carry.final is None or module.pooler is None:
        return None
    sequence = output[0]  # layernormed image tokens, in a ModelOutput or a tuple alike
    prompts = module.layernorm(carry.final).to(sequence.dtype)
    pooled = torch.cat([sequence, prompts], dim=1).mean(dim=1)
    if isinstance(output, tuple):
        return output[:1] + (pooled,) + output[2:]
    output.pooler_output = pooled
    return output


def _has_hooks(module: nn.Module) -> bool:
    return any(hook is _swin_pre_hook for hook in module._forward_pre_hooks.values())


def _remove_hooks(module: nn.Module) -> None:
    """Removes this module's hooks by identity (not through handles, which a deepcopy of the model would not follow)."""
    for hooks, extras in (
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
    ):
        for hook_id, hook in list(hooks.items()):
            if hook is _swin_pre_hook or hook is _swin_post_hook:
                del hooks[hook_id]
                for extra in extras:
                    extra.pop(hook_id, None)


FAMILY = BackboneFamily(
    SwinPromptLayer, TARGET_MODULES, num_prefix_tokens, validate_targets=validate_targets, attach=attach_swin
)
