"""A model's task heads: which train and are saved with the prompts by default (`modules_to_save`), and loading an
adapter's head whose label count differs from the base model's."""

from __future__ import annotations

from peft.utils import ModulesToSaveWrapper
from torch import nn
from transformers.backbone_utils import BackboneMixin


def find_heads(model: nn.Module) -> list[str]:
    """Names of the modules a task model puts on top of its backbone, found from the model, not from a list of names
    per class, so new task classes are covered too.

    A task model is transformers' `<Model>For<Task>` (`ViTForImageClassification`, `...ForMaskedImageModeling`); its
    heads are its children with parameters other than its base model. The base model is `model.base_model` (the
    `base_model_prefix` child) or, for classes whose prefix names no child of theirs (`CLIPForImageClassification`
    holds `vision_model`), the child with the most parameters. `DeiTForImageClassificationWithTeacher` gives
    `["cls_classifier", "distillation_classifier"]`. Everything else has no new head: a bare model, a `*Backbone`
    (what it adds, e.g. `SwinBackbone.hidden_states_norms`, are pretrained parts of its feature maps), and
    `*WithProjection` models, whose projection is pretrained, not a task head.
    """
    if isinstance(model, BackboneMixin) or "For" not in type(model).__name__:
        return []
    children = [(name, child) for name, child in model.named_children() if any(True for _ in child.parameters())]
    base = getattr(model, "base_model", model)
    if base is model:
        base = max((child for _, child in children), key=lambda c: sum(p.numel() for p in c.parameters()),
                   default=None)
    return [name for name, child in children if child is not base]


def fit_heads_to_checkpoint(model: nn.Module, adapter_name: str, state_dict: dict) -> None:
    """Gives an adapter's copy of a Linear head the shape its checkpoint has, before the checkpoint is loaded.

    Adapters for different tasks share one backbone but not their label sets: a head saved with 3 labels must load
    onto a base model whose own head has 5. PEFT's `ModulesToSaveWrapper` copies the base head for each adapter; the
    copy of this adapter is replaced by a Linear of the saved size (its weights then come from the checkpoint).
    """
    for name, module in model.named_modules():
        if not isinstance(module, ModulesToSaveWrapper) or adapter_name not in module.modules_to_save:
            continue
        head = module.modules_to_save[adapter_name]
        weight = state_dict.get(f"{name}.modules_to_save.{adapter_name}.weight")
        if not isinstance(head, nn.Linear) or weight is None or tuple(weight.shape) == tuple(head.weight.shape):
            continue
        if weight.ndim != 2 or weight.shape[1] != head.in_features:
            continue  # not a label-count change: PEFT's own size check reports it
        resized = nn.Linear(head.in_features, weight.shape[0], bias=head.bias is not None,
                            device=head.weight.device, dtype=head.weight.dtype)
        resized.requires_grad_(head.weight.requires_grad)
        module.modules_to_save[adapter_name] = resized
