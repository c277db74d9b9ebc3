"""VPT for BEiT: `BeitModel`, `BeitForImageClassification`, `BeitBackbone` (layers `layers.N`, `BeitLayer`).

BEiT keeps a CLS token (1 prefix token) and adds a relative position bias to every attention: each layer builds its
own ((N + 1) x (N + 1) per head, `use_relative_position_bias`) inside its forward, and the model may add a shared one
(`use_shared_relative_position_bias`) to the attention mask it passes to every layer. Prompts get no position, so both
biases are padded with zeros at the prompt positions (rows and columns), as Swin's is:

- the layer's own bias: a forward hook on the layer's `relative_position_bias` module zero-pads its output to the
  token count the layer asks for (`dim_size`, the prompted length). The hook is stateless, so it holds under gradient
  checkpointing's recomputation, and it is removed by `unload()`. `interpolate_pos_encoding` only resizes the bias to
  `dim_size` after building it for the input's patch grid (an identity resize without prompts), so prompted layers
  call the base layer with it off and let the hook pad instead.
- the mask: a user padding mask is padded as for ViT (prompts visible; prompt queries follow the CLS row); the shared
  bias inside it is taken out, zero-padded, and added back.

The prompts are stripped after the last prompted layer, so the pooler (CLS, or layernormed mean of the patches), the
classifier and the backbone's feature maps see the base model's layout.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from .base import BackboneFamily, square_side
from .vit import ViTPromptLayer, pad_attention_mask

TARGET_MODULES = {"beit": r"(.*\.)?layers\.\d+"}


def num_prefix_tokens(model_config: dict) -> int:
    """The CLS token."""
    return 1


def zero_pad(bias: torch.Tensor, start: int, num_prompts: int) -> torch.Tensor:
    """Inserts `num_prompts` zero rows and columns at `start` in the last two dimensions of a bias."""
    shape = list(bias.shape)
    shape[-1] = num_prompts
    bias = torch.cat([bias[..., :start], bias.new_zeros(shape), bias[..., start:]], dim=-1)
    shape = list(bias.shape)
    shape[-2] = num_prompts
    return torch.cat([bias[..., :start, :], bias.new_zeros(shape), bias[..., start:, :]], dim=-2)


def _pad_bias_hook(module, args, kwargs, output, *, start: int):
    """After a `BeitRelativePositionBias` call: pads its (1, heads, n, n) output with zeros to the `dim_size` tokens the
    layer holds (n + prompts). A no-op without prompts."""
    dim_size = kwargs.get("dim_size", args[2] if len(args) > 2 else None)
    if dim_size is None or dim_size <= output.shape[-1]:
        return None
    return zero_pad(output, start, int(dim_size) - output.shape[-1])


def _layer_options(args: tuple, kwargs: dict):
    """(interpolate_pos_encoding, resolution) of a `BeitLayer` call, given positionally or by keyword."""
    interpolate = kwargs.get("interpolate_pos_encoding", args[0] if args else False)
    resolution = kwargs.get("resolution", args[1] if len(args) > 1 else None)
    return interpolate, resolution


def _is_pad_hook(hook) -> bool:
    return isinstance(hook, functools.partial) and hook.func is _pad_bias_hook


class BeitPromptLayer(ViTPromptLayer):
    """Wraps a `BeitLayer`: `(hidden_states, attention_mask=None, interpolate_pos_encoding=False, resolution=None)`."""

    def __init__(self, base_layer: nn.Module, num_prefix_tokens: int) -> None:
        super().__init__(base_layer, num_prefix_tokens)
        self.__dict__["_shared_bias"] = None  # the model's shared bias module, set by `attach_beit` (unregistered)
        bias = getattr(base_layer, "relative_position_bias", None)
        if bias is not None and not any(_is_pad_hook(h) for h in bias._forward_hooks.values()):
            bias.register_forward_hook(functools.partial(_pad_bias_hook, start=num_prefix_tokens), with_kwargs=True)

    def pad_mask(self, mask: torch.Tensor, length: int, start: int, num_prompts: int, args: tuple,
                 kwargs: dict) -> torch.Tensor:
        """The model's mask (shared bias + user mask) for the prompted sequence: the shared bias zero-padded, the user
        mask padded as for ViT."""
        shared_module = self._shared_bias
        if shared_module is None or mask.dtype == torch.bool:
            return pad_attention_mask(mask, start, num_prompts)
        interpolate_pos_encoding, resolution = _layer_options(args, kwargs)
        patch = square_side(self.base_layer.patch_size)
        window = (resolution[0] // patch, resolution[1] // patch)
        # Recomputed exactly as the model computed it (without prompts in the sequence, so no hook is involved).
        shared = shared_module(window, interpolate_pos_encoding=interpolate_pos_encoding, dim_size=length)
        user = mask - shared
        return pad_attention_mask(user, start, num_prompts) + zero_pad(shared, start, num_prompts)

    def call_base(self, hidden_states: torch.Tensor, attention_mask, args: tuple, kwargs: dict):
        # The layer's own bias is padded by the hook; its final resize to the prompted length must stay off.
        _, resolution = _layer_options(args, kwargs)
        rest = {k: v for k, v in kwargs.items() if k not in ("interpolate_pos_encoding", "resolution")}
        return self.base_layer(hidden_states, attention_mask, interpolate_pos_encoding=False, resolution=resolution,
                               **rest)

    def unload_and_optionally_merge_module(self, merge: bool = False, safe_merge: bool = False,
                                           adapter_names: Optional[list[str]] = None) -> nn.Module:
        """Called by PEFT's `unload()`: removes the bias hook too, so the base model comes back pristine."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)  # raises: prompts cannot be merged
        bias = getattr(self.base_layer, "relative_position_bias", None)
        if bias is not None:
            for hook_id, hook in list(bias._forward_hooks.items()):
                if _is_pad_hook(hook):
                    del bias._forward_hooks[hook_id]
                    bias._forward_hooks_with_kwargs.pop(hook_id, None)
                    bias._forward_hooks_always_called.pop(hook_id, None)
        return self.get_base_layer()


def attach_beit(model: nn.Module) -> None:
    """Gives each prompt layer its model's shared relative position bias module (or None)."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if not hasattr(module, "shared_position_bias") or not isinstance(layers, nn.ModuleList):
            continue
        for layer in layers:
            if isinstance(layer, BeitPromptLayer):
                layer.__dict__["_shared_bias"] = module.shared_position_bias


FAMILY = BackboneFamily(BeitPromptLayer, TARGET_MODULES, num_prefix_tokens, attach=attach_beit)
