"""Finding a model's task heads, which train and are saved with the prompts by default (`modules_to_save`)."""

from __future__ import annotations

from torch import nn
from transformers.backbone_utils import BackboneMixin


def find_heads(model: nn.Module) -> list[str]:
    """Names of the modules a task model puts on top of its backbone: every direct child of a transformers model
    other than its base model (`model.base_model`, the `base_model_prefix` child) that has parameters.

    `ViTForImageClassification` gives `["classifier"]`, `DeiTForImageClassificationWithTeacher`
    `["cls_classifier", "distillation_classifier"]`; a bare model (whose `base_model` is itself) gives `[]`, and so
    does a `*Backbone`: what it adds to its base model (e.g. `SwinBackbone.hidden_states_norms`) are pretrained parts
    of its feature maps, not a task head. Found from the model, not from a list of names per class, so new task classes are covered too.
    """
    base = getattr(model, "base_model", model)
    if base is model or isinstance(model, BackboneMixin):
        return []
    return [
        name for name, child in model.named_children()
        if child is not base and any(True for _ in child.parameters())
    ]
