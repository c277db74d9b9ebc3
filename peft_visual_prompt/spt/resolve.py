"""Finding what SPT works on: the PEFT model (unwrapped from DDP/accelerate), the adapter, its prompted layers.

Both `initialize_prompts` and `prompt_patch_nmi` start from whatever the user passes (a `PeftModel`, possibly wrapped
by DDP or `accelerator.prepare`) and an optional adapter name. `resolve` checks it is a visual-prompt PEFT model,
picks the adapter and lists its prompted `VisualPromptLayer`s in prompted-layer order, with errors that name the fix.
See docs/spt.md, "Modules".
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..config import VisualPromptConfig
from ..layer import VisualPromptLayer


def unwrap(model, accelerator=None):
    """The model inside `accelerator.prepare`, DDP or DataParallel wrappers."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) and not hasattr(
        model, "peft_config"
    ):
        model = model.module  # DDP / DataParallel
    return model


def resolve(peft_model, adapter_name: Optional[str], accelerator=None):
    """Returns (PeftModel, adapter name, config, [(module name, layer)] in prompted-layer order)."""
    from peft import PeftModel

    from ..model import VisualPromptModel

    model = unwrap(peft_model, accelerator)
    if not isinstance(model, PeftModel) or not isinstance(model.base_model, VisualPromptModel):
        raise TypeError(
            f"SPT needs a visual-prompt PEFT model, got {type(model).__name__}. Build one with "
            "`peft.get_peft_model(model, peft_visual_prompt.VisualPromptConfig(...))` (or load one with "
            "`PeftModel.from_pretrained`) and pass that."
        )
    adapter = adapter_name or model.active_adapter
    config = model.peft_config.get(adapter)
    if not isinstance(config, VisualPromptConfig):
        raise ValueError(
            f"Adapter {adapter!r} is not a visual-prompt adapter of this model; its adapters are "
            f"{sorted(model.peft_config)}. Pass adapter_name=<one of those with a VisualPromptConfig>."
        )
    layers = [
        (name, m) for name, m in model.named_modules() if isinstance(m, VisualPromptLayer) and adapter in m.prompt_slot
    ]
    layers.sort(key=lambda item: item[1].prompt_slot[adapter].index)
    if not layers:
        raise ValueError(f"Adapter {adapter!r} prompts no layer of this model.")
    return model, adapter, config, layers
