"""What the tuner knows about a family of backbones (`BackboneFamily`), and helpers the family files share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from transformers.utils.output_capturing import _active_collector

from ..config import VisualPromptConfig
from ..layer import VisualPromptLayer


@dataclass(frozen=True)
class BackboneFamily:
    """One row of the family table (`backbones/__init__.py`): the model types a family serves, how to find and wrap
    their transformer layers, and how many prefix tokens (CLS, distillation, registers) stay in front of the prompts.
    """

    layer_cls: type[VisualPromptLayer]
    target_modules: dict[str, str]  # model_type -> regex over module names
    num_prefix_tokens: Callable[[dict], int]
    # Optional, for families whose layers need the whole model: checks an adapter's targets (names, model order)
    # before anything is wrapped, and wires the wrapped layers together after injection.
    validate_targets: Optional[Callable[[nn.Module, VisualPromptConfig, list[str]], None]] = None
    attach: Optional[Callable[[nn.Module], None]] = None


def captured_outputs() -> Optional[dict]:
    """What transformers' `output_hidden_states`/`output_attentions` hooks are recording in this forward, if
    anything: transformers 5 collects those outputs through forward hooks on the layers we wrap, so the families
    adjust or consult what they recorded."""
    collected = _active_collector.get()
    return collected or None


def square_side(value) -> int:
    """An int, or the first of an (height, width) pair: transformers configs store image and patch sizes either way."""
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def config_patch_size(model_config) -> int:
    """The patch side of a model config (a dict or a PretrainedConfig)."""
    patch = model_config.get("patch_size", 16) if isinstance(model_config, dict) else model_config.patch_size
    return square_side(patch)


def strip_tokens(tokens: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Removes positions [start, end) of a (batch, tokens, width) sequence."""
    return torch.cat([tokens[:, :start], tokens[:, end:]], dim=1)
