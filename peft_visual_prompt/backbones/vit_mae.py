"""VPT for ViT-MAE used as an encoder: `ViTMAEModel` with `mask_ratio=0.0` (layers `layers.N`, ViT layers).

MAE's embeddings shuffle the patch tokens by random noise and drop `mask_ratio` of them. With `mask_ratio > 0` the
model sees a random subset of the image, which is pre-training, not fine-tuning: it is refused, naming the fix. With
`mask_ratio=0.0` nothing is dropped but the patches are still shuffled (by `noise`, random unless given); the CLS
token stays first, so prompts sit after it whatever the order, and since the layers are permutation-equivariant over
tokens (MAE adds positions in the embeddings, before the shuffle) the prompted forward is exact for any order.
`last_hidden_state` comes back in the shuffled order (`ids_restore` unshuffles it), as in the base model.

The recommended path for MAE weights is `ViTForImageClassification`/`ViTModel` (the checkpoint loads into them, with
no shuffling and a deterministic output); `ViTMAEModel(mask_ratio=0.0)` is supported for feature extraction.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import VisualPromptConfig
from .base import BackboneFamily
from .vit import ViTPromptLayer

TARGET_MODULES = {"vit_mae": r"(.*\.)?layers\.\d+"}


def masking_message(mask_ratio) -> str:
    return (
        f"Visual prompt tuning needs every patch token, but this ViT-MAE drops mask_ratio={mask_ratio} of them at random "
        "(MAE pre-training). Fine-tune the encoder without masking: build it with ViTMAEConfig(mask_ratio=0.0) (e.g. "
        "ViTMAEModel.from_pretrained(name, mask_ratio=0.0)), or, better, load the MAE weights into "
        "ViTForImageClassification / ViTModel (ViTForImageClassification.from_pretrained(name)), which never shuffles "
        "or drops patches."
    )


def num_prefix_tokens(model_config: dict) -> int:
    """The CLS token. Refuses masking configs: called when an adapter is put on the model."""
    mask_ratio = model_config.get("mask_ratio", 0.0) or 0.0
    if mask_ratio > 0:
        raise ValueError(masking_message(mask_ratio))
    return 1


class ViTMAEPromptLayer(ViTPromptLayer):
    """A ViT prompt layer that refuses to run while its model masks patches (`config.mask_ratio` changed after the
    adapter was added)."""

    def __init__(self, base_layer: nn.Module, num_prefix_tokens: int) -> None:
        super().__init__(base_layer, num_prefix_tokens)
        self.__dict__["_mae_config"] = None  # set by `attach_mae`; unregistered: it belongs to the base model

    def forward(self, hidden_states: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *args, **kwargs):
        config = self._mae_config
        if config is not None and (config.mask_ratio or 0) > 0 and self.active_prompt_adapter() is not None:
            raise ValueError(masking_message(config.mask_ratio))
        return super().forward(hidden_states, attention_mask, *args, **kwargs)


def validate_targets(model: nn.Module, config: VisualPromptConfig, targets: list[str]) -> None:
    for module in model.modules():
        mask_ratio = getattr(getattr(module, "config", None), "mask_ratio", 0) or 0
        if mask_ratio > 0:
            raise ValueError(masking_message(mask_ratio))


def attach_mae(model: nn.Module) -> None:
    """Gives each prompt layer its model's config, so that a mask_ratio set later is refused at forward."""
    for module in model.modules():
        if isinstance(module, ViTMAEPromptLayer):
            module.__dict__["_mae_config"] = getattr(model, "config", None)


FAMILY = BackboneFamily(ViTMAEPromptLayer, TARGET_MODULES, num_prefix_tokens, validate_targets=validate_targets,
                        attach=attach_mae)
