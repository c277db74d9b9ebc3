"""`VisualPromptModel`: the PEFT tuner that wraps a vision transformer's layers with `VisualPromptLayer`s."""

from __future__ import annotations

from typing import Optional

from peft.tuners.tuners_utils import BaseTuner, _get_submodules
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .backbones import (
    FAMILIES,
    GENERIC_FAMILY,
    UNSUPPORTED_RELATIVES,
    config_patch_size,
    family_for,
    supported_model_types,
)
from .config import VisualPromptConfig
from .layer import CANNOT_MERGE, PromptSlot, VisualPromptLayer, layer_width
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
        if "prompt_projection" not in self._modules:
            # Tuner-level container: PEFT saves a BaseTuner's own parameters with the adapter (as it does for VeRA).
            self.prompt_projection = nn.ModuleDict()

    def _prepare_adapter_config(self, peft_config: VisualPromptConfig, model_config: dict) -> VisualPromptConfig:
        if peft_config.modules_to_save is None:
            # A classification head is new for the task, so it trains and is saved with the prompts.
            head = getattr(self.model, "classifier", None)
            peft_config.modules_to_save = ["classifier"] if isinstance(head, nn.Module) else []
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
        wrapper knows its place in the span (first inserts, last strips). Also checks a loaded adapter's layer widths
        against this backbone, before any weight is touched."""
        targets = [
            name for name, _ in model.named_modules() if name and self._check_target_module_exists(peft_config, name)
        ]
        targets = [t for t in targets if not any(t.startswith(o + ".") for o in targets)]  # outermost only
        family = family_for(self.get_model_config(model).get("model_type"))
        if family is not None and family.validate_targets is not None:
            family.validate_targets(model, peft_config, targets)
        widths = [layer_width(model.get_submodule(t)) for t in targets]
        if peft_config.prompted_layer_widths is None:
            peft_config.prompted_layer_widths = widths
        elif list(peft_config.prompted_layer_widths) != widths:
            raise ValueError(
                "This visual-prompt adapter does not fit this backbone: it was made for "
                f"{len(peft_config.prompted_layer_widths)} prompted layers of widths "
                f"{_summarise(peft_config.prompted_layer_widths)}, but this model has {len(widths)} matching layers "
                f"of widths {_summarise(widths)}. Load it onto the base model it was trained with"
                + (f" ({peft_config.base_model_name_or_path})." if peft_config.base_model_name_or_path else ".")
            )
        self._pending_targets = targets

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
        projections = self._projections_for(adapter_name, peft_config, new_module.width)
        new_module.update_layer(adapter_name, peft_config, slot, config_patch_size(model_config), projections)
        if new_module is not target:
            self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        # Not `_post_injection_hook`: PEFT runs that for the first adapter only, and add_adapter/load_adapter come here.
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        family = family_for(self.get_model_config(model).get("model_type"))
        if family is not None and family.attach is not None:
            family.attach(model)
        self._record_trainable_parameters(model, self.peft_config[adapter_name], adapter_name)

    def _record_trainable_parameters(self, model: nn.Module, config: VisualPromptConfig, adapter_name: str) -> None:
        """For the model card: this adapter's prompts and projection plus its `modules_to_save`, which is what trains.
        Counted from the modules, since PEFT may not have wrapped the heads yet."""
        prompts = sum(
            m.prompt_embeddings[adapter_name].numel() for m in model.modules()
            if isinstance(m, VisualPromptLayer) and adapter_name in m.prompt_embeddings
        )
        projection = self.prompt_projection[adapter_name] if adapter_name in self.prompt_projection else nn.Module()
        heads = sum(
            p.numel() for name, module in model.named_modules()
            if any(name == m or name.endswith("." + m) for m in config.modules_to_save or [])
            # PEFT may already have wrapped the head (ModulesToSaveWrapper): count one copy
            for p in getattr(module, "original_module", module).parameters()
        )
        config.num_trainable_parameters = prompts + sum(p.numel() for p in projection.parameters()) + heads

    def _projections_for(self, adapter_name: str, config: VisualPromptConfig, width: int) -> nn.ModuleDict:
        if config.projection_dim is None:
            return self.prompt_projection
        if adapter_name not in self.prompt_projection:
            self.prompt_projection[adapter_name] = nn.ModuleDict()
        per_width = self.prompt_projection[adapter_name]
        if str(width) not in per_width:
            per_width[str(width)] = nn.Linear(config.projection_dim, width)
            if adapter_name not in self.active_adapters or config.inference_mode:
                per_width.requires_grad_(False)
        return self.prompt_projection

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # The projection is keyed [adapter][width], so the adapter name is not second to last as PEFT's default
        # expects: drop it here, so a projection saved under one adapter name loads under another.
        marker = f"prompt_projection.{adapter_name}."
        if key.startswith(marker) or f".{marker}" in key:
            return key.replace(marker, "prompt_projection.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # PEFT's version copies `weight`/`bias` onto wrappers of single weight layers; ours wrap whole transformer
        # layers, and prompts are created on the base layer's device already.
        setattr(parent, child_name, new_module)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        self._set_projection_grad()

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._set_projection_grad(inference_mode)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)
        self._set_projection_grad(force_off=not enabled)

    def _set_projection_grad(self, inference_mode: bool = False, force_off: bool = False) -> None:
        for name, per_width in self.prompt_projection.items():
            trainable = name in self.active_adapters and not inference_mode and not force_off
            if self.peft_config.get(name) is not None and self.peft_config[name].inference_mode:
                trainable = False
            per_width.requires_grad_(trainable)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if adapter_name in self.prompt_projection:
            del self.prompt_projection[adapter_name]

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
        return super().unload()

    def merge_and_unload(self, *args, **kwargs):
        raise ValueError(CANNOT_MERGE)

    def merge_adapter(self, *args, **kwargs) -> None:
        self.merge_and_unload()

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # Prompts are created in the base layer's dtype and cast to the activations' dtype in forward.
        return None


def _summarise(widths: list[int]) -> str:
    return str(widths) if len(set(widths)) > 1 else f"{widths[0] if widths else '-'} each"


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
