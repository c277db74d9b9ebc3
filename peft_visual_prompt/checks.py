"""Checks of an adapter against the model it is put on or loaded into, made before anything is allocated or loaded.

Every failure names what disagrees and the fix, so that a wrong adapter never runs silently: targets that are not
transformer layers, widths of another backbone, prompt counts that cannot fit, prefix counts longer than the sequence,
and saved tensors that do not match the config (missing layers, extra keys, other shapes).
"""

from __future__ import annotations

import inspect
import os
import re

import torch
from torch import nn

from .config import VisualPromptConfig
from .layer import VisualPromptLayer

PROMPT_KEY = "visual_prompt_embeddings"
PROJECTION_KEY = "visual_prompt_projection"
# 0.1.0 named the parameters without PEFT's method prefix, and kept the projection on the tuner.
_LEGACY_PROMPT = re.compile(r"\.prompt_embeddings$")
_LEGACY_PROJECTION = re.compile(r"^base_model\.prompt_projection\.(\d+)\.(weight|bias)$")


def check_targets_are_layers(model: nn.Module, targets: list[str]) -> None:
    """Each target must be a transformer layer: an item of a layer list whose forward reads `hidden_states`."""
    lists = {id(child) for m in model.modules() if isinstance(m, nn.ModuleList) for child in m}
    for name in targets:
        module = model.get_submodule(name)
        parameters = list(inspect.signature(module.forward).parameters)
        if id(module) not in lists or not parameters or parameters[0] != "hidden_states":
            raise ValueError(
                f"target_modules matched {name!r} ({type(module).__name__}), which is not a transformer layer (an "
                "item of a layer list such as `encoder.layer.N`, whose forward takes hidden_states). Leave "
                "target_modules unset for a supported model, or give a regex that matches only its layers."
            )
    if not targets:
        raise ValueError(
            "target_modules matched no layer of this model, so there is nothing to prompt. Leave target_modules "
            "unset for a supported model, or give a regex of its transformer layers' names."
        )


def check_widths(config: VisualPromptConfig, widths: list[int]) -> None:
    """A loaded (or reused) adapter must have been made for layers of these widths."""
    if config.prompted_layer_widths is None or list(config.prompted_layer_widths) == widths:
        return
    raise ValueError(
        "This visual-prompt adapter does not fit this backbone: it was made for "
        f"{len(config.prompted_layer_widths)} prompted layers of widths {_summarise(config.prompted_layer_widths)}, "
        f"but this model has {len(widths)} matching layers of widths {_summarise(widths)}. Load it onto the base "
        "model it was trained with"
        + (f" ({config.base_model_name_or_path})." if config.base_model_name_or_path else ".")
    )


def check_bounds(config: VisualPromptConfig, model: nn.Module, model_config: dict, widths: list[int],
                 default_prefix: int) -> None:
    """Prompt and prefix counts the model can hold, checked before the prompts are allocated."""
    owning = widths if config.deep else widths[:1]
    dim_per_layer = [config.projection_dim or w for w in owning]
    num_bytes = 4 * config.num_prompt_tokens * sum(dim_per_layer)
    available = _memory_bytes(model)
    if num_bytes > available:
        raise ValueError(
            f"num_prompt_tokens={config.num_prompt_tokens} needs {num_bytes / 2**30:.1f} GiB of prompts "
            f"({len(owning)} prompted layer(s) x {config.num_prompt_tokens} tokens x width), more than the "
            f"{available / 2**30:.1f} GiB of memory where the model lives. VPT uses 1 to 200 prompts per layer: "
            "use a smaller num_prompt_tokens."
        )
    sequence = _num_patches(model_config)
    if sequence is not None and config.num_prefix_tokens > default_prefix + sequence:
        raise ValueError(
            f"num_prefix_tokens={config.num_prefix_tokens} is longer than the token sequence this model's layers "
            f"receive ({default_prefix} prefix + {sequence} patch tokens). It counts the CLS/distillation/register "
            f"tokens before the patches: leave it unset (this model has {default_prefix})."
        )


def _memory_bytes(model: nn.Module) -> int:
    param = next(model.parameters(), None)
    if param is not None and param.device.type == "cuda":
        return torch.cuda.get_device_properties(param.device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _num_patches(model_config: dict):
    image, patch = model_config.get("image_size"), model_config.get("patch_size")
    if not image or not patch:
        return None
    image = image if isinstance(image, (list, tuple)) else (image, image)
    patch = patch if isinstance(patch, (list, tuple)) else (patch, patch)
    return (image[0] // patch[0]) * (image[1] // patch[1])


def _summarise(widths: list[int]) -> str:
    return str(widths) if len(set(widths)) > 1 else f"{widths[0] if widths else '-'} each"


def _layers(model: nn.Module, adapter_name: str) -> dict[str, VisualPromptLayer]:
    return {
        name: module for name, module in model.named_modules()
        if isinstance(module, VisualPromptLayer) and adapter_name in module.prompt_slot
    }


def upgrade_legacy_keys(model: nn.Module, adapter_name: str, state_dict: dict) -> dict:
    """Renames keys of adapters saved by 0.1.0 to today's: `...prompt_embeddings` becomes
    `...visual_prompt_embeddings`, and the tuner-level `base_model.prompt_projection.<width>.*` moves to the layer
    that holds that width's projection."""
    owner_of_width = {}
    for name, layer in _layers(model, adapter_name).items():
        if adapter_name in layer.visual_prompt_projection:
            owner_of_width.setdefault(str(layer.width), name)
    upgraded = {}
    for key, value in state_dict.items():
        projection = _LEGACY_PROJECTION.match(key)
        if projection and projection.group(1) in owner_of_width:
            key = f"{owner_of_width[projection.group(1)]}.{PROJECTION_KEY}.{projection.group(2)}"
        else:
            key = _LEGACY_PROMPT.sub("." + PROMPT_KEY, key)
        upgraded[key] = value
    return upgraded


def check_loaded_prompts(model: nn.Module, config: VisualPromptConfig, adapter_name: str, state_dict: dict) -> None:
    """Every prompt tensor the model expects for this adapter is in `state_dict` with its shape, and nothing else
    under the method's prefix is."""
    expected = {
        key: value.shape for key, value in model.state_dict().items()
        if (PROMPT_KEY in key or PROJECTION_KEY in key) and f".{adapter_name}" in key
    }
    given = {key: value.shape for key, value in state_dict.items() if PROMPT_KEY in key or PROJECTION_KEY in key}
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    wrong = sorted(k for k in set(expected) & set(given) if tuple(expected[k]) != tuple(given[k]))
    if not (missing or extra or wrong):
        return
    problems = []
    if missing:
        problems.append(f"no prompts for {len(missing)} prompted layer(s): {_names(missing)}")
    if extra:
        problems.append(f"{len(extra)} prompt tensor(s) this config does not prompt: {_names(extra)}")
    if wrong:
        problems.append("shapes that disagree: " + ", ".join(
            f"{k} is {tuple(given[k])}, expected {tuple(expected[k])}" for k in wrong[:4]))
    raise ValueError(
        f"The saved visual-prompt adapter {adapter_name!r} does not match its config (num_prompt_tokens="
        f"{config.num_prompt_tokens}, deep={config.deep}, projection_dim={config.projection_dim}): "
        + "; ".join(problems)
        + ". The adapter files were changed or mixed up: save the adapter again from the model it was trained with."
    )


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:4])
    return shown + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
