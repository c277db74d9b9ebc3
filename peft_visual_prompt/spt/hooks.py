"""One context manager for running a model with forward pre-hooks on some of its layers, for measurement only.

Both SPT passes (collecting the tokens layers receive, and measuring the prompt-patch NMI) run the model the same
way: forward pre-hooks (with kwargs) on chosen layers, every module in eval mode, no gradients; and afterwards every
module's training flag as it was and every hook removed, whether the forward finished, was stopped early or failed.
`hooked_eval` does exactly that, once. See docs/spt.md.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

PreHook = Callable[[nn.Module, tuple, dict], None]


@contextmanager
def hooked_eval(model: nn.Module, hooks: Iterable[tuple[nn.Module, PreHook]],
                output_hooks: Iterable[tuple[nn.Module, Callable]] = ()) -> Iterator[nn.Module]:
    """Registers each `(module, hook)` as a forward pre-hook with kwargs (and each of `output_hooks` as a plain forward
    hook, `hook(module, args, output)`), puts `model` in eval mode and disables gradients for the block; on exit
    restores every module's training flag and removes the hooks."""
    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        for module, hook in output_hooks:
            handles.append(module.register_forward_hook(hook))
        model.eval()
        with torch.no_grad():
            yield model
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
