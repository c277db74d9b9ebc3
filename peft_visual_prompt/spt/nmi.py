"""SPT's diagnostic: normalised mutual information (NMI) between a layer's prompts and its patch tokens.

SPT (Wang et al., ICML 2024, Sec. 3 and Fig. 2) motivates its initialisation by the NMI between the prompts and the
patch tokens of a layer: the joint distribution of (prompt i, patch j) is approximated by the sigmoid-normalised cross
attention of the prompts over the patch tokens, the marginals are its sums over patches and over prompts, and NMI
follows Estevez et al. (2009). The official repository releases no NMI code. `nmi_from_tokens`, the estimator
`prompt_patch_nmi` uses by default, reads the paper's words as follows (docs/nmi.md derives each choice, gives the
measurements that decided between readings, and says what is uncertain):

1. Cross attention between the tokens themselves: logits q_i . k_j / sqrt(d) with q_i the prompt and k_j the patch
   token, after removing what carries no prompt-patch information: the image's mean patch token (the residual
   stream's shared direction, which otherwise saturates every sigmoid) and each token's scale (a LayerNorm without
   affine). `attention_nmi` offers the other reading, through the layer's own LayerNorm and query/key projections,
   per head; on DINOv2-S it does not separate SPT's prompts from VPT's (docs/nmi.md), so it is not the default.
2. Each prompt's logits are centred over the patches: softmax attention ignores a constant added to one query's
   logits, a sigmoid does not; centring removes exactly that freedom.
3. Joint J[i, j] proportional to sigmoid(centred logit), normalised to sum 1 per image (and head); marginals are its
   row and column sums.
4. NMI = I(P; E) / min(H(P), H(E)) (Estevez et al., 2009, "normalized mutual information"), in [0, 1]; the mean over
   images (and heads).

`prompt_patch_nmi` measures it at the input of every prompted layer of a model (through
`VisualPromptLayer.prompts_and_patches`), and `PromptPatchNMICallback` logs it during `Trainer` training.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn
from transformers import TrainerCallback

from .hooks import hooked_eval
from .resolve import resolve

_TINY = 1e-300
NMI_ESTIMATORS = ("tokens", "attention")


def nmi_from_joint(joint: torch.Tensor) -> torch.Tensor:
    """Estevez et al.'s NMI, I / min(H(rows), H(columns)), of non-negative tables (..., P, N), each normalised to
    sum 1 first; float64, one value per table. 0 where an entropy is 0 (a degenerate marginal carries no
    information)."""
    joint = joint.double()
    joint = joint / joint.sum((-2, -1), keepdim=True).clamp_min(_TINY)
    rows, cols = joint.sum(-1), joint.sum(-2)
    log_joint = joint.clamp_min(_TINY).log()
    mutual = (joint * (log_joint - rows.clamp_min(_TINY).log()[..., :, None]
                       - cols.clamp_min(_TINY).log()[..., None, :])).sum((-2, -1))
    h_rows = -(rows * rows.clamp_min(_TINY).log()).sum(-1)
    h_cols = -(cols * cols.clamp_min(_TINY).log()).sum(-1)
    denom = torch.minimum(h_rows, h_cols)
    nmi = torch.where(denom > 1e-12, mutual.clamp_min(0) / denom.clamp_min(1e-12), torch.zeros_like(denom))
    return nmi.clamp(0, 1)


def nmi_from_logits(logits: torch.Tensor, center: bool = True) -> float:
    """NMI from cross-attention logits (..., P, N) (prompts over patches): each row centred over the patches (see the
    module doc, step 2), sigmoid, one joint table per leading index, Estevez NMI, mean over the tables."""
    logits = logits.double()
    if center:
        logits = logits - logits.mean(-1, keepdim=True)
    return float(nmi_from_joint(torch.sigmoid(logits)).mean().item())


@dataclass
class AttentionParts:
    """What the cross attention of a layer needs: its pre-attention norm, query/key projections and head layout."""

    norm: Optional[nn.Module]
    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    head_dim: int
    scaling: float


_NORM_NAMES = ("layernorm_before", "norm1", "layer_norm1", "ln_1", "input_layernorm")


def attention_parts(layer: nn.Module) -> AttentionParts:
    """The pre-attention LayerNorm and the query/key projections of a transformer layer (a `VisualPromptLayer`'s
    base layer, or the layer itself), found generically: the norm by its usual names (`layernorm_before` for ViT,
    DeiT and Swin, `norm1` for DINOv2, `layer_norm1` for CLIP/SigLIP), else the layer's first LayerNorm; the attention
    as the first submodule with Linear `q_proj` and `k_proj`; heads from its `num_attention_heads`/`num_heads`."""
    base = getattr(layer, "base_layer", layer)
    norm = next((getattr(base, n) for n in _NORM_NAMES if isinstance(getattr(base, n, None), nn.Module)), None)
    if norm is None:
        norm = next((m for m in base.modules() if isinstance(m, nn.LayerNorm)), None)
    attention = next(
        (m for m in base.modules()
         if isinstance(getattr(m, "q_proj", None), nn.Linear) and isinstance(getattr(m, "k_proj", None), nn.Linear)),
        None,
    )
    if attention is None:
        raise ValueError(
            f"Cannot find the query/key projections of {type(base).__name__}: the prompt-patch NMI needs an attention "
            "module with Linear `q_proj` and `k_proj` (transformers 5 names)."
        )
    heads = getattr(attention, "num_attention_heads", None) or getattr(attention, "num_heads", None)
    if heads is None:
        config = getattr(attention, "config", None)
        heads = getattr(config, "num_attention_heads", None)
    if not heads:
        raise ValueError(f"Cannot tell the number of heads of {type(attention).__name__}.")
    head_dim = int(getattr(attention, "head_dim", 0) or attention.q_proj.out_features // heads)
    scaling = float(getattr(attention, "scaling", 0) or head_dim**-0.5)
    return AttentionParts(norm, attention.q_proj, attention.k_proj, int(heads), head_dim, scaling)


def cross_attention_logits(prompts: torch.Tensor, patches: torch.Tensor, parts: AttentionParts) -> torch.Tensor:
    """(B, P, C) prompts and (B, N, C) patch tokens at a layer's input -> (B, heads, P, N) attention logits of the
    prompts (queries) over the patches (keys): the layer's norm, q/k projections, q . k x scaling (1 / sqrt(d_head)).
    """
    if prompts.ndim == 2:
        prompts = prompts.expand(patches.shape[0], -1, -1)
    dtype = parts.q_proj.weight.dtype
    norm = parts.norm if parts.norm is not None else nn.Identity()
    q = parts.q_proj(norm(prompts.to(dtype))).float()
    k = parts.k_proj(norm(patches.to(dtype))).float()
    b = prompts.shape[0]
    q = q.view(b, q.shape[1], parts.num_heads, parts.head_dim).transpose(1, 2)
    k = k.view(b, k.shape[1], parts.num_heads, parts.head_dim).transpose(1, 2)
    return (q @ k.transpose(-1, -2)) * parts.scaling


def attention_nmi(prompts: torch.Tensor, patches: torch.Tensor, layer: nn.Module) -> float:
    """The prompt-patch NMI at a layer's input through that layer's own attention: its LayerNorm and query/key
    projections, per head, logits x 1/sqrt(d_head), centred per query, sigmoid, Estevez NMI, mean over heads and
    images. The alternative reading of the paper's "cross attention" (module doc, step 1; docs/nmi.md)."""
    with torch.no_grad():
        return nmi_from_logits(cross_attention_logits(prompts, patches, attention_parts(layer)))


def nmi_from_tokens(prompts: torch.Tensor, patches: torch.Tensor) -> float:
    """SPT's prompt-patch NMI (the module doc, steps 1-4): the sigmoid-normalised cross attention of the prompts over
    the patch tokens as the joint distribution, Estevez et al.'s NMI of it, the mean over images.

    Tokens are centred on the mean patch token of their image and standardised per token (a LayerNorm without
    affine); logits are p_i . e_j / sqrt(d), centred per prompt over the patches. The value does not change when
    every token is scaled or shifted by a shared vector. Prompts (B, P, d) or (P, d), patches (B, N, d); in [0, 1].
    """
    p, e = prompts.double(), patches.double()
    if p.ndim == 2:
        p = p.expand(e.shape[0], -1, -1)
    center = e.mean(1, keepdim=True)
    d = p.shape[-1]

    def standardise(x):
        x = x - center
        x = x - x.mean(-1, keepdim=True)
        return x / x.std(-1, unbiased=False, keepdim=True).clamp_min(1e-12)

    logits = standardise(p) @ standardise(e).transpose(1, 2) / math.sqrt(d)
    return nmi_from_logits(logits)


class _PromptPatchCapture:
    """Records (prompts, patch tokens) at the input of each prompted layer during one forward."""

    def __init__(self, adapter: str, layers: list, estimator: str = "tokens") -> None:
        self.adapter, self.layers = adapter, [layer for _, layer in layers]
        self.estimator = estimator
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hooks(self) -> list:
        return [(layer, functools.partial(self._record, position)) for position, layer in enumerate(self.layers)]

    def _record(self, position: int, module, args: tuple, kwargs: dict) -> None:
        prompts, patches = module.prompts_and_patches(self.adapter, args, kwargs)
        self.captured[position] = (prompts.detach().float(), patches.detach().float())

    def estimate(self, prompts: torch.Tensor, patches: torch.Tensor, layer: nn.Module) -> float:
        if self.estimator == "attention":
            return attention_nmi(prompts, patches, layer)
        return nmi_from_tokens(prompts, patches)

    def nmi(self) -> list[float]:
        return [self.estimate(*self.captured[i], self.layers[i]) for i in range(len(self.layers))]


def prompt_patch_nmi(peft_model, pixel_values: torch.Tensor, *, adapter_name: Optional[str] = None,
                     forward_kwargs: Optional[dict] = None, estimator: str = "tokens") -> list[float]:
    """SPT's prompt-patch NMI (see the module doc and docs/nmi.md) at the input of every prompted layer, in layer
    order. `estimator`: "tokens" (default, `nmi_from_tokens`: the cross attention of the tokens themselves, the
    reading that reproduces the paper's Fig. 2 on DINOv2-S) or "attention" (`attention_nmi`: through each layer's
    own LayerNorm and query/key projections, per head).

    Runs the model with the adapter enabled (eval mode, no grad; modes are restored). Prompts are those each layer
    actually reads: deep, that layer's own (projected) prompts; shallow, the prompt tokens carried from the layer
    before. Patch tokens are that layer's input tokens without prefix and prompt tokens. `forward_kwargs` (e.g.
    `{"interpolate_pos_encoding": True}`) are passed to the model's forward.
    """
    if estimator not in NMI_ESTIMATORS:
        raise ValueError(f"estimator must be one of {list(NMI_ESTIMATORS)}, got {estimator!r}.")
    model, adapter, _config, layers = resolve(peft_model, adapter_name)
    if model.active_adapter != adapter:
        raise ValueError(
            f"prompt_patch_nmi measures the active adapter; {adapter!r} is not active ({model.active_adapter!r} is). "
            "Call model.set_adapter(name) first."
        )
    param = next(model.parameters())
    pixels = pixel_values.to(device=param.device, dtype=param.dtype if param.dtype.is_floating_point else None)
    capture = _PromptPatchCapture(adapter, layers, estimator)
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
