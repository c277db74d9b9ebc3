"""SPT's diagnostic: normalised mutual information between a layer's prompts and its patch tokens.

SPT is motivated by the observation that prompts which share information with the patch tokens (high NMI) train
better. `nmi_from_tokens` computes the paper's NMI from prompts and patch tokens; `prompt_patch_nmi` measures it at
the input of every prompted layer of a model (through `VisualPromptLayer.prompts_and_patches`), and
`PromptPatchNMICallback` logs it during `Trainer` training. See docs/spt.md, "NMI".
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np
import torch
from transformers import TrainerCallback

from .hooks import hooked_eval
from .resolve import resolve


def nmi_from_tokens(prompts: torch.Tensor, patches: torch.Tensor) -> float:
    """NMI between prompts (B, P, d) and patch tokens (B, N, d), as SPT defines it.

    Per image, the joint distribution of (prompt i, patch j) is taken proportional to
    sigmoid(p_i . e_j / sqrt(d)) and normalised to sum 1; NMI = I(p; e) / sqrt(H(p) H(e)) with the marginals of that
    table (0 when an entropy is 0). The result is the mean over the batch's images. In [0, 1].
    """
    p, e = prompts.double(), patches.double()
    if p.ndim == 2:
        p = p.expand(e.shape[0], -1, -1)
    joint = torch.sigmoid(p @ e.transpose(1, 2) / math.sqrt(p.shape[-1]))
    joint = joint / joint.sum((1, 2), keepdim=True)
    pp, pe = joint.sum(2), joint.sum(1)
    mutual = (joint * (joint.clamp_min(1e-300).log() - pp.clamp_min(1e-300).log()[:, :, None]
                       - pe.clamp_min(1e-300).log()[:, None, :])).sum((1, 2))
    hp = -(pp * pp.clamp_min(1e-300).log()).sum(1)
    he = -(pe * pe.clamp_min(1e-300).log()).sum(1)
    denom = (hp * he).sqrt()
    nmi = torch.where(denom > 0, mutual.clamp_min(0) / denom.clamp_min(1e-300), torch.zeros_like(denom))
    return float(nmi.clamp(0, 1).mean().item())


class _PromptPatchCapture:
    """Records (prompts, patch tokens) at the input of each prompted layer during one forward."""

    def __init__(self, adapter: str, layers: list) -> None:
        self.adapter, self.layers = adapter, [layer for _, layer in layers]
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hooks(self) -> list:
        return [(layer, functools.partial(self._record, position)) for position, layer in enumerate(self.layers)]

    def _record(self, position: int, module, args: tuple, kwargs: dict) -> None:
        prompts, patches = module.prompts_and_patches(self.adapter, args, kwargs)
        self.captured[position] = (prompts.detach().float(), patches.detach().float())

    def nmi(self) -> list[float]:
        return [nmi_from_tokens(*self.captured[i]) for i in range(len(self.layers))]


def prompt_patch_nmi(peft_model, pixel_values: torch.Tensor, *, adapter_name: Optional[str] = None,
                     forward_kwargs: Optional[dict] = None) -> list[float]:
    """SPT's prompt-patch NMI (see `nmi_from_tokens`) at the input of every prompted layer, in layer order.

    Runs the model with the adapter enabled (eval mode, no grad; modes are restored). Prompts are those each layer
    actually reads: deep, that layer's own (projected) prompts; shallow, the prompt tokens carried from the layer
    before. Patch tokens are that layer's input tokens without prefix and prompt tokens. `forward_kwargs` (e.g.
    `{"interpolate_pos_encoding": True}`) are passed to the model's forward.
    """
    model, adapter, _config, layers = resolve(peft_model, adapter_name)
    if model.active_adapter != adapter:
        raise ValueError(
            f"prompt_patch_nmi measures the active adapter; {adapter!r} is not active ({model.active_adapter!r} is). "
            "Call model.set_adapter(name) first."
        )
    param = next(model.parameters())
    pixels = pixel_values.to(device=param.device, dtype=param.dtype if param.dtype.is_floating_point else None)
    capture = _PromptPatchCapture(adapter, layers)
    with hooked_eval(model, capture.hooks()):
        model(pixel_values=pixels, **(forward_kwargs or {}))
    return capture.nmi()


class PromptPatchNMICallback(TrainerCallback):
    """Logs SPT's prompt-patch NMI per prompted layer (`nmi/layer_<i>`, and `nmi/mean`) on a fixed batch.

    Args:
        pixel_values: The fixed batch, (B, C, H, W).
        every_n_steps: Also log every N optimiser steps (None: only on evaluate).
        on_evaluate: Log after each evaluation; the values are also added to the metrics `evaluate` returns.
        trainer: The `Trainer`; set it (here or as `callback.trainer = trainer`) to log through `Trainer.log`, so the
            values reach the reporting integrations as well. Without it they are appended to `state.log_history` in
            the same form (with `step`, and `epoch` when known).
        prefix: Key prefix.
        forward_kwargs: Keyword arguments for the model's forward, e.g. `{"interpolate_pos_encoding": True}`.
    """

    def __init__(self, pixel_values: torch.Tensor, *, every_n_steps: Optional[int] = None, on_evaluate: bool = True,
                 trainer=None, prefix: str = "nmi", forward_kwargs: Optional[dict] = None) -> None:
        self.pixel_values = pixel_values
        self.every_n_steps = every_n_steps
        self.log_on_evaluate = on_evaluate
        self.trainer = trainer
        self.prefix = prefix
        self.forward_kwargs = forward_kwargs
        self.history: list[tuple[int, list[float]]] = []

    def _log(self, state, model) -> dict[str, float]:
        values = prompt_patch_nmi(model, self.pixel_values, forward_kwargs=self.forward_kwargs)
        self.history.append((state.global_step, values))
        logs = {f"{self.prefix}/layer_{i}": v for i, v in enumerate(values)}
        logs[f"{self.prefix}/mean"] = float(np.mean(values))
        if self.trainer is not None:
            self.trainer.log(dict(logs))
        else:
            entry = dict(logs)
            if state.epoch is not None:
                entry["epoch"] = state.epoch
            entry["step"] = state.global_step
            state.log_history.append(entry)
        return logs

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_n_steps and model is not None and state.global_step % self.every_n_steps == 0:
            self._log(state, model)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if self.log_on_evaluate and model is not None:
            logs = self._log(state, model)
            if metrics is not None:
                metrics.update(logs)
