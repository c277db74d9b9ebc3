"""`VisualPromptModel`: the PEFT tuner that wraps a vision transformer's layers with `VisualPromptLayer`s."""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Optional

from peft.tuners.tuners_utils import BaseTuner, _get_submodules
from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers import PreTrainedModel

from .backbones import (
    FAMILIES,
    GENERIC_FAMILY,
    UNSUPPORTED_RELATIVES,
    config_patch_size,
    family_for,
    supported_model_types,
)
from .checks import check_bounds, check_loaded_prompts, check_targets_are_layers, check_widths, upgrade_legacy_keys
from .config import VisualPromptConfig
from .heads import find_heads, fit_heads_to_checkpoint
from .layer import CANNOT_MERGE, PromptSlot, VisualPromptLayer, layer_width
from .mixed import mixed_batch_hooks, plan_mixed_batch
from .registration import PREFIX


class VisualPromptModel(BaseTuner):
    """Visual Prompt Tuning (Jia et al., 2022) as a PEFT tuner.

    Each targeted transformer layer is wrapped by its family's `VisualPromptLayer`, which inserts (or, in deep mode,
    replaces) prompt tokens at the layer's input. Only prompts, the optional projection and `modules_to_save` train.
    """

    prefix: str = PREFIX
    tuner_layer_cls = VisualPromptLayer
    target_module_mapping = {t: regex for f in FAMILIES for t, regex in f.target_modules.items()}

    def _pre_injection_hook(self, model: nn.Module, config: VisualPromptConfig, adapter_name: str) -> None:
        if not isinstance(config, VisualPromptConfig):
            raise TypeError(
                f"VisualPromptModel needs a VisualPromptConfig, got {type(config).__name__} "
                f"(peft_type={getattr(config, 'peft_type', None)!r})."
            )

    def _prepare_adapter_config(self, peft_config: VisualPromptConfig, model_config: dict) -> VisualPromptConfig:
        if peft_config.modules_to_save is None:
            # Heads are new for the task, so they train and are saved with the prompts.
            peft_config.modules_to_save = find_heads(self.model)
        model_type = model_config.get("model_type")
        family = family_for(model_type)
        if model_type in UNSUPPORTED_RELATIVES:
            raise ValueError(_unsupported_message(model_type))
        if peft_config.target_modules is None:
            if family is None:
                raise ValueError(_unsupported_message(model_type))
            peft_config.target_modules = family.target_modules[model_type]
        if peft_config.num_prefix_tokens is None:
            peft_config.num_prefix_tokens = (family or GENERIC_FAMILY).num_prefix_tokens(model_config)
        return peft_config

    def _prepare_model(self, peft_config: VisualPromptConfig, model: nn.Module) -> None:
        """Finds this adapter's prompted layers in model order, before PEFT wraps them one at a time, so that each
        wrapper knows its place in the span (first inserts, last strips). Checks everything about the adapter that
        the model decides (targets, widths, bounds) before any weight is allocated or touched."""
        targets = [
            name for name, _ in model.named_modules() if name and self._check_target_module_exists(peft_config, name)
        ]
        targets = [t for t in targets if not any(t.startswith(o + ".") for o in targets)]  # outermost only
        model_config = self.get_model_config(model)
        family = family_for(model_config.get("model_type"))
        if family is not None and family.validate_targets is not None:
            family.validate_targets(model, peft_config, targets)  # its own, more specific messages first
        check_targets_are_layers(model, targets)
        widths = [layer_width(model.get_submodule(t)) for t in targets]
        check_widths(peft_config, widths)
        default_prefix = (family or GENERIC_FAMILY).num_prefix_tokens(model_config)
        check_bounds(peft_config, model, model_config, widths, default_prefix)
        if peft_config.prompted_layer_widths is None:
            peft_config.prompted_layer_widths = widths
        self._pending_targets = targets
        self._pending_projections: dict[int, nn.Linear] = {}  # width -> this adapter's projection

    def _create_and_replace(
        self,
        peft_config: VisualPromptConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        if current_key not in self._pending_targets:  # nested match inside a prompted layer
            return
        slot = PromptSlot(
            index=self._pending_targets.index(current_key),
            count=len(self._pending_targets),
            num_tokens=peft_config.num_prompt_tokens,
            deep=peft_config.deep,
        )
        model_config = self.get_model_config(self.model)
        family = family_for(model_config.get("model_type"))
        layer_cls = (family or GENERIC_FAMILY).layer_cls
        if isinstance(target, VisualPromptLayer):
            new_module = target
        else:
            new_module = layer_cls(target, num_prefix_tokens=peft_config.num_prefix_tokens)
        projection = self._pending_projections.get(new_module.width)
        new_module.update_layer(adapter_name, peft_config, slot, config_patch_size(model_config), projection)
        projection = new_module.projection(adapter_name)  # created by the first layer of its width
        if projection is not None:
            self._pending_projections[new_module.width] = projection
        if new_module is not target:
            self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # Not `_post_injection_hook`: PEFT runs that for the first adapter only, and add_adapter/load_adapter come here.
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        family = family_for(self.get_model_config(model).get("model_type"))
        if family is not None and family.attach is not None:
            family.attach(model)
        if isinstance(model, PreTrainedModel):
            # PeftModel calls this when gradient checkpointing is on; see `enable_input_require_grads` below.
            model.enable_input_require_grads = types.MethodType(enable_input_require_grads, model)
        self._record_trainable_parameters(model, self.peft_config[adapter_name], adapter_name)

    def _record_trainable_parameters(self, model: nn.Module, config: VisualPromptConfig, adapter_name: str) -> None:
        """For the model card: this adapter's prompts and projection plus its `modules_to_save`, which is what trains.
        Counted from the modules, since PEFT may not have wrapped the heads yet."""
        layers = [m for m in model.modules() if isinstance(m, VisualPromptLayer)]
        adapter_params = sum(
            layer.visual_prompt_embeddings[adapter_name].numel() for layer in layers
            if adapter_name in layer.visual_prompt_embeddings
        ) + sum(
            p.numel() for layer in layers if adapter_name in layer.visual_prompt_projection
            for p in layer.visual_prompt_projection[adapter_name].parameters()
        )
        heads = sum(
            p.numel() for name, module in model.named_modules()
            if any(name == m or name.endswith("." + m) for m in config.modules_to_save or [])
            # PEFT may already have wrapped the head (ModulesToSaveWrapper): count one copy
            for p in getattr(module, "original_module", module).parameters()
        )
        config.num_trainable_parameters = adapter_params + heads

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name: str, state_dict: dict) -> dict:
        """Reads adapters saved by 0.1.0 (unprefixed keys) too, and checks the adapter's tensors against the config
        and the model: any prompted layer without prompts, extra prompt keys or a shape that disagrees is an error
        naming the layers, instead of prompts silently left at their random initialisation. A head saved with another
        label count than the base model's gets a copy of its own size."""
        state_dict = upgrade_legacy_keys(model, adapter_name, state_dict)
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        check_loaded_prompts(model, config, adapter_name, remapped)
        fit_heads_to_checkpoint(model, adapter_name, remapped)
        return remapped

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """`adapter_names=` (PEFT's convention, one adapter name per row, "__base__" for the base model): every row
        runs with its own adapter's prompts and heads in one pass through the backbone (see `mixed.py`)."""
        names = kwargs.get("adapter_names")
        if names is None:
            yield
            return
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        if pixels is None:
            raise ValueError("adapter_names= needs the batch's pixel_values to know its rows.")
        batch = plan_mixed_batch(self, names, pixels.shape[0])
        with mixed_batch_hooks(self.model, batch, list(names), kwargs.get("labels") is not None):
            yield

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # PEFT's version copies `weight`/`bias` onto wrappers of single weight layers; ours wrap whole transformer
        # layers, and prompts are created on the base layer's device already.
        setattr(parent, child_name, new_module)

    def unload(self) -> nn.Module:
        """Returns the original model: prompt layers unwrapped and the original heads back.

        PEFT's default `unload` keeps the active adapter's trained copy of each `modules_to_save` module. A head
        trained together with prompts is meaningless without them, so the original module is restored instead: the
        result has the base model's state_dict keys and gives its outputs bit for bit.
        """
        for key, module in list(self.model.named_modules()):
            if isinstance(module, ModulesToSaveWrapper):
                parent, _, name = _get_submodules(self.model, key)
                setattr(parent, name, module.original_module)
        self.model.__dict__.pop("enable_input_require_grads", None)
        return super().unload()

    def merge_and_unload(self, *args, **kwargs):
        raise ValueError(CANNOT_MERGE)

    def merge_adapter(self, *args, **kwargs) -> None:
        self.merge_and_unload()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # Prompts are created in the base layer's dtype and cast to the activations' dtype in forward.
        return None


def enable_input_require_grads(self) -> None:
    """transformers' `PreTrainedModel.enable_input_require_grads`, for input embeddings that return a tuple.

    With gradient checkpointing on, `PeftModel` asks the model to make its input embeddings' output require grad.
    transformers' hook calls `output.requires_grad_()`, which fails on models whose patch embeddings return
    `(embeddings, dimensions)` (Swin, BEiT, Data2Vec-Vision). The tuner installs this version on the model instance
    (`unload` removes it); it marks the first element of a tuple, and keeps transformers' bookkeeping, so
    `disable_input_require_grads` still works.
    """

    def make_inputs_require_grads(module, args, output):
        (output[0] if isinstance(output, tuple) else output).requires_grad_(True)

    hooks, seen = [], set()
    for module in self.modules():  # as transformers does: every sub-model that exposes input embeddings
        if not isinstance(module, PreTrainedModel):
            continue
        try:
            embeddings = module.get_input_embeddings()
        except NotImplementedError:  # e.g. CLIPForImageClassification itself; its vision model has them
            continue
        if embeddings is not None and id(embeddings) not in seen:
            seen.add(id(embeddings))
            hooks.append(embeddings.register_forward_hook(make_inputs_require_grads))
    self._require_grads_hooks = hooks
    if hooks:
        self._require_grads_hook = hooks[0]


def _unsupported_message(model_type: Optional[str]) -> str:
    reason = UNSUPPORTED_RELATIVES.get(model_type)
    return (
        f"Visual prompt tuning does not support model_type={model_type!r}"
        + (f" ({reason})" if reason else "")
        + f". Supported model types: {', '.join(supported_model_types())}. "
        + (
            "Its layers differ from the supported ones, so `target_modules` cannot help either."
            if model_type in UNSUPPORTED_RELATIVES
            else "For another ViT-like model whose layers take (hidden_states, attention_mask), pass "
            r"VisualPromptConfig(target_modules=<regex of its layer names, e.g. r'.*encoder\.layer\.\d+'>, "
            "num_prefix_tokens=<number of CLS/register tokens>)."
        )
    )
