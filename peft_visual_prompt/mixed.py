"""Mixed-task batches: `peft_model(pixel_values=x, adapter_names=[...])` runs each row with its own adapter.

PEFT's convention (LoRA has it): one adapter name per row, `"__base__"` for the base model. Prompts are extra tokens
per sample, so one pass through the frozen backbone serves every task: each prompt layer gathers each row's prompts
from a small per-adapter table (zero-padded to the widest count, padding hidden from attention), and each head
(`modules_to_save`) runs each row through that row's adapter's copy. Heads with different numbers of labels give
logits padded to the widest head with -inf, so softmax and argmax stay right per row.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from functools import partial

import torch
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .layer import BASE_ADAPTER, MIXED_BATCH_KWARG, MixedBatch, VisualPromptLayer


def plan_mixed_batch(tuner, adapter_names, batch_size: int) -> MixedBatch:
    """Checks `adapter_names` against the batch and the model, before any compute, and builds the batch's plan."""
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise ValueError(f"adapter_names must be a list of adapter names, one per row; got {adapter_names!r}.")
    names = list(adapter_names)
    if len(names) != batch_size:
        raise ValueError(f"adapter_names has {len(names)} names but the batch has {batch_size} rows: give one per row.")
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in tuner.peft_config})
    if unknown:
        raise ValueError(
            f"adapter_names holds unknown adapter(s) {unknown}; this model has {sorted(tuner.peft_config)} "
            f"(and {BASE_ADAPTER!r} for the base model)."
        )
    adapters = tuple(dict.fromkeys(n for n in names if n != BASE_ADAPTER))
    _check_same_layout(tuner.model, adapters)
    index = {a: i for i, a in enumerate(adapters)}
    counts = [tuner.peft_config[a].num_prompt_tokens for a in adapters]
    row_adapter = [index.get(n, len(adapters)) for n in names]
    row_counts = [counts[i] if i < len(adapters) else 0 for i in row_adapter]
    device = next(tuner.model.parameters()).device
    max_count = max(counts, default=0)
    uniform = all(c == max_count for c in row_counts)
    if not uniform and any(
        isinstance(m, VisualPromptLayer) and not m.masks_padded_prompts for m in tuner.model.modules()
    ):
        layer = next(m for m in tuner.model.modules() if isinstance(m, VisualPromptLayer))
        raise ValueError(
            f"{type(layer.base_layer).__name__} takes no attention mask, so its mixed batches cannot pad prompts: "
            "use adapters with one prompt count and no '__base__' rows in a batch, or run them in separate batches."
        )
    if not uniform and any(tuner.peft_config[a].include_prompts_in_pooling for a in adapters):
        raise ValueError(
            "include_prompts_in_pooling averages every prompt into the pool, so its rows cannot share a batch with "
            "rows of other prompt counts or '__base__' rows. Run them in separate batches."
        )
    return MixedBatch(
        adapters=adapters,
        row_adapter=torch.tensor(row_adapter, device=device),
        row_counts=torch.tensor(row_counts, device=device),
        max_count=max_count,
        uniform=uniform,
    )


def _check_same_layout(model: nn.Module, adapters: tuple[str, ...]) -> None:
    """One pass serves adapters that prompt the same layers in the same mode (deep or shallow, pooled or not)."""
    for layer in model.modules():
        if not isinstance(layer, VisualPromptLayer):
            continue
        modes = [
            (layer.prompt_slot[a].deep, layer.pool_prompts.get(a, False)) if a in layer.prompt_slot else None
            for a in adapters
        ]
        for adapter, mode in zip(adapters[1:], modes[1:]):
            if mode != modes[0]:
                raise ValueError(
                    f"Adapters {adapters[0]!r} and {adapter!r} cannot share a mixed batch: they prompt different "
                    "layers or in different modes (deep/shallow, include_prompts_in_pooling). Run them in separate "
                    "batches."
                )


@contextmanager
def mixed_batch_hooks(model: nn.Module, batch: MixedBatch, names: list[str], has_labels: bool):
    """Hands `batch` to every prompt layer's forward and routes each head's rows through their adapter's copy."""
    with ExitStack() as stack:
        for module in model.modules():
            if isinstance(module, VisualPromptLayer):
                handle = module.register_forward_pre_hook(partial(_give_batch, batch=batch), with_kwargs=True)
                stack.callback(handle.remove)
            elif isinstance(module, ModulesToSaveWrapper):
                _route_head(module, names, has_labels, stack)
        yield


def _give_batch(module, args, kwargs, batch: MixedBatch):
    return args, {**kwargs, MIXED_BATCH_KWARG: batch}


def _route_head(head: ModulesToSaveWrapper, names: list[str], has_labels: bool, stack: ExitStack) -> None:
    # An adapter that does not train this head runs the original module, as it does alone.
    names = [n if n in head.modules_to_save else BASE_ADAPTER for n in names]
    widths = {_out_features(head, n) for n in set(names)}
    if len(widths) == 1:  # PEFT's own mixed-batch forward of ModulesToSaveWrapper
        hook = partial(_give_adapter_names, names=names)
        handle = head.register_forward_pre_hook(hook, with_kwargs=True)
    else:
        if has_labels:
            raise ValueError(
                f"The adapters in this batch have heads of different sizes {sorted(widths)}, so the model cannot "
                "compute one loss over their padded logits. Drop labels= and compute the loss per row (cross-entropy "
                "over the padded logits is exact: padding is -inf)."
            )
        handle = head.register_forward_hook(partial(_padded_heads, names=names, width=max(widths)))
    stack.callback(handle.remove)


def _out_features(head: ModulesToSaveWrapper, name: str) -> int:
    module = head.original_module if name == BASE_ADAPTER else head.modules_to_save[name]
    if not isinstance(module, nn.Linear):
        raise ValueError(f"Heads of different adapters in one batch must be Linear layers, got {type(module).__name__}.")
    return module.out_features


def _give_adapter_names(module, args, kwargs, names: list[str]):
    return args, {**kwargs, "adapter_names": names}


def _padded_heads(head: ModulesToSaveWrapper, args, output, names: list[str], width: int):
    """Heads of different widths: each row's logits from its adapter's head, padded to `width` with -inf."""
    features = args[0]
    padded = features.new_full((features.shape[0], width), float("-inf"))
    for name in dict.fromkeys(names):
        rows = [i for i, n in enumerate(names) if n == name]
        module = head.original_module if name == BASE_ADAPTER else head.modules_to_save[name]
        logits = module(features[rows])
        padded[rows, : logits.shape[-1]] = logits
    return padded
