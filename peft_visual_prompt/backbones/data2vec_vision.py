"""VPT for Data2Vec-Vision: `Data2VecVisionModel`, `Data2VecVisionForImageClassification` (layers `encoder.layer.N`,
`Data2VecVisionLayer`).

A BEiT copy with the older layer interface: a layer takes `(hidden_states, output_attentions, relative_position_bias,
interpolate_pos_encoding, resolution)` and returns a tuple; the encoder computes the shared relative position bias for
each layer from the length of the sequence it hands over, passes it as `relative_position_bias`, and collects the
hidden states itself. As for BEiT (see `beit.py`), prompts get no position: every relative position bias (the layer's
own, `attention.attention.relative_position_bias`, and the encoder's shared one) is zero-padded at the prompt
positions by stateless hooks on the bias modules: before a call for a prompted length they turn off the final resize
to that length (an identity resize without prompts), after it they pad. A shared bias computed before the prompts
were inserted (the first prompted layer) is padded by the layer wrapper. A hook on the encoder strips the prompts from
the hidden states it collected. All hooks go with `unload()`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import BackboneFamily, strip_tokens
from .beit import zero_pad
from ..layer import MixedBatch, VisualPromptLayer

TARGET_MODULES = {"data2vec-vision": r"(.*\.)?encoder\.layer\.\d+"}
PREFIX = 1  # the CLS token


def num_prefix_tokens(model_config: dict) -> int:
    """The CLS token."""
    return PREFIX


def _bias_pre_hook(module, args, kwargs):
    """Before a bias call for a prompted sequence (dim_size larger than the patch grid + CLS): no final resize."""
    window = args[0] if args else kwargs["window_size"]
    dim_size = kwargs.get("dim_size", args[2] if len(args) > 2 else None)
    if dim_size is None or dim_size <= window[0] * window[1] + PREFIX:
        return None
    if len(args) > 1:
        args = (args[0], False) + tuple(args[2:])
    else:
        kwargs = {**kwargs, "interpolate_pos_encoding": False}
    return args, kwargs


def _bias_post_hook(module, args, kwargs, output):
    """After it: zero rows and columns at the prompt positions, up to dim_size."""
    dim_size = kwargs.get("dim_size", args[2] if len(args) > 2 else None)
    if dim_size is None or dim_size <= output.shape[-1]:
        return None
    return zero_pad(output, PREFIX, int(dim_size) - output.shape[-1])


def _encoder_hook(module, args, kwargs, output):
    """Strips prompts from the hidden states the encoder collected (the first is the unprompted input)."""
    states = output.hidden_states if hasattr(output, "hidden_states") else None
    if not states:
        return None
    length = states[0].shape[1]
    stripped = tuple(s if s.shape[1] == length else strip_tokens(s, PREFIX, PREFIX + s.shape[1] - length)
                     for s in states)
    output.hidden_states = stripped
    return output


_HOOKS = (_bias_pre_hook, _bias_post_hook, _encoder_hook)


def _add_hooks(bias: Optional[nn.Module]) -> None:
    if bias is not None and not any(h is _bias_post_hook for h in bias._forward_hooks.values()):
        bias.register_forward_pre_hook(_bias_pre_hook, with_kwargs=True)
        bias.register_forward_hook(_bias_post_hook, with_kwargs=True)


def _remove_hooks(module: nn.Module) -> None:
    for hooks, extras in (
        (module._forward_pre_hooks, (module._forward_pre_hooks_with_kwargs,)),
        (module._forward_hooks, (module._forward_hooks_with_kwargs, module._forward_hooks_always_called)),
    ):
        for hook_id, hook in list(hooks.items()):
            if hook in _HOOKS:
                del hooks[hook_id]
                for extra in extras:
                    extra.pop(hook_id, None)


class Data2VecVisionPromptLayer(VisualPromptLayer):
    """Wraps a `Data2VecVisionLayer`; see the module docstring."""

    def __init__(self, base_layer: nn.Module, num_prefix_tokens: int) -> None:
        super().__init__(base_layer, num_prefix_tokens)
        self.__dict__["_encoder"] = None  # set by `attach_data2vec` (unregistered: it belongs to the base model)
        _add_hooks(getattr(base_layer.attention.attention, "relative_position_bias", None))

    # Its layers take no attention mask, so a mixed batch's padded prompt positions could not be hidden.
    masks_padded_prompts = False

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False,
                relative_position_bias: Optional[torch.Tensor] = None, interpolate_pos_encoding: bool = False,
                resolution=None, visual_prompt_batch: Optional[MixedBatch] = None):
        prompts = self.layer_prompts(hidden_states.shape[0], visual_prompt_batch)
        if prompts is None:
            return self.base_layer(hidden_states, output_attentions=output_attentions,
                                   relative_position_bias=relative_position_bias,
                                   interpolate_pos_encoding=interpolate_pos_encoding, resolution=resolution)
        slot = prompts.slot
        start, end = self.num_prefix_tokens, self.num_prefix_tokens + prompts.num_tokens
        if slot.owns_prompts:
            patches = hidden_states[:, start:] if slot.is_first else hidden_states[:, end:]
            hidden_states = torch.cat([hidden_states[:, :start], prompts.make(hidden_states.dtype), patches], dim=1)
        if relative_position_bias is not None and relative_position_bias.shape[-1] < hidden_states.shape[1]:
            relative_position_bias = zero_pad(relative_position_bias, start,
                                              hidden_states.shape[1] - relative_position_bias.shape[-1])
        output = self.base_layer(hidden_states, output_attentions=output_attentions,
                                 relative_position_bias=relative_position_bias,
                                 interpolate_pos_encoding=interpolate_pos_encoding, resolution=resolution)
        if slot.is_last:
            output = (strip_tokens(output[0], start, end),) + tuple(output[1:])
        return output

    def patch_tokens(self, hidden_states: torch.Tensor, slot) -> torch.Tensor:
        start = self.num_prefix_tokens
        return hidden_states[:, start:] if slot.is_first else hidden_states[:, start + slot.num_tokens:]

    def carried_prompts(self, hidden_states: torch.Tensor, slot, kwargs: dict) -> torch.Tensor:
        start = self.num_prefix_tokens
        return hidden_states[:, start:start + slot.num_tokens]

    def unload_and_optionally_merge_module(self, merge: bool = False, safe_merge: bool = False,
                                           adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Called by PEFT's `unload()`: removes this layer's bias hooks and the encoder's."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)  # raises: prompts cannot be merged
        bias = getattr(self.base_layer.attention.attention, "relative_position_bias", None)
        if bias is not None:
            _remove_hooks(bias)
        encoder = self._encoder
        if encoder is not None:
            _remove_hooks(encoder)
            if getattr(encoder, "relative_position_bias", None) is not None:
                _remove_hooks(encoder.relative_position_bias)
        return self.get_base_layer()


def attach_data2vec(model: nn.Module) -> None:
    """Hooks each encoder that holds prompt layers (hidden-state stripping, the shared bias), idempotently."""
    for module in model.modules():
        layers = getattr(module, "layer", None)
        if not isinstance(layers, nn.ModuleList) or not any(isinstance(m, Data2VecVisionPromptLayer) for m in layers):
            continue
        for layer in layers:
            if isinstance(layer, Data2VecVisionPromptLayer):
                layer.__dict__["_encoder"] = module
        if not any(h is _encoder_hook for h in module._forward_hooks.values()):
            module.register_forward_hook(_encoder_hook, with_kwargs=True)
        _add_hooks(getattr(module, "relative_position_bias", None))


FAMILY = BackboneFamily(Data2VecVisionPromptLayer, TARGET_MODULES, num_prefix_tokens, attach=attach_data2vec)
