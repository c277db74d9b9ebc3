"""`VisualPromptLayer`: the `BaseTunerLayer` that wraps one transformer layer and owns its prompts.

Backbone families (`backbones/`) subclass it and implement `forward`; everything about the prompts themselves
(parameters, initialisation, projection, dropout, which adapter is active) lives here, and so does what SPT reads from
a layer (`received_tokens`, `prompts_and_patches`), so that SPT never imports a backbone module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from torch.nn import functional as F

from .config import VisualPromptConfig


CANNOT_MERGE = (
    "Visual prompts are extra input tokens, not a change to any weight, so they cannot be merged into the "
    "base model. Use `model.unload()` to get the base model back, or keep the PeftModel for inference."
)


@dataclass(frozen=True)
class PromptSlot:
    """Where a layer sits in an adapter's prompted span of layers, and what it does there."""

    index: int  # position among the adapter's prompted layers
    count: int  # number of prompted layers
    num_tokens: int
    deep: bool

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1

    @property
    def owns_prompts(self) -> bool:
        """Deep: every layer inserts its own prompts. Shallow: only the first layer does."""
        return self.deep or self.is_first


BASE_ADAPTER = "__base__"  # PEFT's name for rows of a mixed batch that run the base model
MIXED_BATCH_KWARG = "visual_prompt_batch"  # how the tuner hands a `MixedBatch` to every prompt layer's forward


@dataclass(frozen=True)
class MixedBatch:
    """One forward's assignment of rows to adapters (`adapter_names=`), built once by the tuner and handed to every
    prompt layer. All its adapters prompt the same layers in the same mode (the tuner checks that)."""

    adapters: tuple[str, ...]  # the distinct adapters, "__base__" excluded
    row_adapter: torch.Tensor  # (batch,) index into `adapters`; len(adapters) for "__base__" rows
    row_counts: torch.Tensor  # (batch,) prompt tokens of each row's adapter (0 for "__base__")
    max_count: int
    uniform: bool  # every row holds `max_count` real prompts: no padding, no mask

    def key_valid(self) -> Optional[torch.Tensor]:
        """(batch, max_count) bool: which prompt positions hold a real prompt; None when all do."""
        if self.uniform:
            return None
        return torch.arange(self.max_count, device=self.row_counts.device)[None, :] < self.row_counts[:, None]


@dataclass(frozen=True)
class LayerPrompts:
    """What one forward of a prompt layer inserts: one adapter's prompts, or a mixed batch's."""

    adapter: str  # the adapter (a mixed batch: its first; they share slot and mode)
    slot: PromptSlot  # the layer's place in the prompted span (shared by a mixed batch's adapters)
    num_tokens: int  # prompt positions in the sequence (a mixed batch's widest count)
    valid: Optional[torch.Tensor]  # (batch, num_tokens) bool, or None when every position holds a prompt
    make: Callable[[torch.dtype], torch.Tensor]  # dtype -> (batch, num_tokens, width) prompts


def layer_width(module: nn.Module) -> int:
    """Width of the tokens a transformer layer reads: the size of its first LayerNorm (pre-norm layers)."""
    for sub in module.modules():
        if isinstance(sub, nn.LayerNorm):
            return int(sub.normalized_shape[0])
    raise ValueError(f"Cannot tell the token width of {type(module).__name__}: it has no LayerNorm.")


def init_prompts_(prompts: torch.Tensor, method: str, patch_size: int) -> None:
    width = prompts.shape[-1]
    with torch.no_grad():
        if method == "xavier_uniform":
            # VPT: xavier-uniform as if the prompt were a patch embedding of a 3-channel patch_size x patch_size patch.
            bound = math.sqrt(6.0 / float(3 * patch_size**2 + width))
            prompts.uniform_(-bound, bound)
        elif method == "normal":
            prompts.normal_(0.0, 0.02)
        elif method == "zeros":
            prompts.zero_()
        else:  # config validation makes this unreachable
            raise ValueError(f"Unknown prompt_init {method!r}.")


class VisualPromptLayer(nn.Module, BaseTunerLayer):
    """Wraps a transformer layer (`base_layer`) and holds, per adapter, the prompts this layer inserts.

    Parameter names carry the method's prefix (`visual_prompt_`), as every PEFT method's do, so that PEFT's and
    transformers' key renaming, missing-key reports and trainability marking apply to them unmodified.

    The projection (VPT's "project" option) is one Linear per adapter and token width, shared by all layers of that
    width. The first layer of each width registers it (`visual_prompt_projection`), so it is saved once and lives in
    the model itself (transformers' `load_adapter` keeps no tuner object); every layer reads it through
    `projection(adapter)`.
    """

    adapter_layer_names = ("visual_prompt_embeddings", "visual_prompt_projection")
    other_param_names = ("prompt_slot", "prompt_dropout", "shared_projection", "pool_prompts")
    # Whether the family can hide a mixed batch's padded prompt positions (different counts, "__base__" rows).
    masks_padded_prompts = True

    def __init__(self, base_layer: nn.Module, num_prefix_tokens: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.num_prefix_tokens = num_prefix_tokens
        self.width = layer_width(base_layer)
        self.visual_prompt_embeddings = nn.ParameterDict()
        self.visual_prompt_projection = nn.ModuleDict()
        self.prompt_dropout = nn.ModuleDict()
        self.prompt_slot: dict[str, PromptSlot] = {}
        self.pool_prompts: dict[str, bool] = {}  # families that can pool prompts into their output (Swin) set it
        # adapter -> the Linear of this width, registered on one layer only (see the class docstring)
        self.shared_projection: dict[str, nn.Linear] = {}
        self._active_adapter = []
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(
        self,
        adapter_name: str,
        config: VisualPromptConfig,
        slot: PromptSlot,
        patch_size: int,
        projection: Optional[nn.Linear] = None,
    ) -> None:
        """Adds `adapter_name`'s prompts. `projection`: the adapter's Linear for this width when `projection_dim` is
        set; None makes this layer create and register it (the first layer of its width)."""
        self.prompt_slot[adapter_name] = slot
        self.prompt_dropout[adapter_name] = nn.Dropout(config.prompt_dropout)
        if slot.owns_prompts:
            dim = config.projection_dim or self.width
            prompts = nn.Parameter(torch.empty(slot.num_tokens, dim, **self._adapter_dtype_device()))
            init_prompts_(prompts, config.prompt_init, patch_size)
            self.visual_prompt_embeddings[adapter_name] = prompts
            if config.projection_dim is not None:
                if projection is None:
                    projection = nn.Linear(config.projection_dim, self.width, **self._adapter_dtype_device())
                    self.visual_prompt_projection[adapter_name] = projection
                self.shared_projection[adapter_name] = projection
        if not self._active_adapter:
            self.set_adapter(adapter_name, inference_mode=config.inference_mode)
        else:
            # PEFT semantics: a newly added adapter is not active and not trainable until `set_adapter`.
            self.set_adapter(self.active_adapters)

    def _adapter_dtype_device(self) -> dict:
        """The base layer's device; float32 (float64 kept) like PEFT's adapters, cast to the activations' dtype in
        forward so that bf16/fp16 backbones train fp32 prompts."""
        param = next(self.base_layer.parameters(), None)
        if param is None:
            return {}
        return {"dtype": torch.float64 if param.dtype == torch.float64 else torch.float32, "device": param.device}

    def active_prompt_adapter(self) -> Optional[str]:
        """The adapter whose prompts this forward uses, or None to run the base layer untouched."""
        if self.disable_adapters:
            return None
        active = [a for a in self.active_adapters if a in self.prompt_slot]
        if not active:
            return None
        if len(active) > 1:
            raise ValueError(
                f"Visual prompts can run one adapter at a time, but {active} are active. "
                "Call `model.set_adapter(name)` with a single adapter name."
            )
        return active[0]

    def layer_prompts(self, batch_size: int, batch: Optional[MixedBatch] = None) -> Optional[LayerPrompts]:
        """What this forward inserts: the active adapter's prompts, a mixed batch's (`adapter_names=`), or None to
        run the base layer untouched."""
        if batch is None:
            adapter = self.active_prompt_adapter()
            if adapter is None:
                return None
            slot = self.prompt_slot[adapter]
            return LayerPrompts(adapter, slot, slot.num_tokens, None,
                                lambda dtype: self.prompts(adapter, batch_size, dtype))
        if self.disable_adapters or not batch.adapters:
            return None
        slot = self.prompt_slot[batch.adapters[0]]
        return LayerPrompts(batch.adapters[0], slot, batch.max_count, batch.key_valid(),
                            lambda dtype: self.mixed_prompts(batch, dtype))

    def mixed_prompts(self, batch: MixedBatch, dtype: torch.dtype) -> torch.Tensor:
        """(batch, max_count, width): each row's adapter's prompts, zero-padded to the widest count ("__base__"
        rows: all padding). One gather over a small per-adapter table, then each adapter's dropout on its rows."""
        rows = [
            F.pad(self.prompts(a, 1, dtype, dropout=False)[0], (0, 0, 0, batch.max_count - self.prompt_slot[a].num_tokens))
            for a in batch.adapters
        ]
        rows.append(rows[0].new_zeros(rows[0].shape))  # "__base__"
        prompts = torch.stack(rows)[batch.row_adapter]
        if self.training:
            for index, adapter in enumerate(batch.adapters):
                dropout = self.prompt_dropout[adapter]
                if dropout.p > 0:
                    selected = batch.row_adapter == index
                    prompts = torch.where(selected[:, None, None], dropout(prompts), prompts)
        return prompts

    def prompts(self, adapter_name: str, batch_size: int, dtype: torch.dtype, dropout: bool = True) -> torch.Tensor:
        """This layer's prompts for `adapter_name`, projected, batched and dropped out: (batch, tokens, width)."""
        prompts = self.visual_prompt_embeddings[adapter_name]
        projection = self.shared_projection.get(adapter_name)
        if projection is not None:
            prompts = projection(prompts)
        prompts = prompts.to(dtype).expand(batch_size, -1, -1)
        return self.prompt_dropout[adapter_name](prompts) if dropout else prompts

    # ------------------------------------------------------------------------------ what SPT reads from a layer

    def received_tokens(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The patch tokens of a call to this layer with its adapters disabled (a forward pre-hook's `args` and
        `kwargs`): the input sequence without the prefix tokens."""
        hidden_states = args[0] if args else kwargs["hidden_states"]
        return hidden_states[:, self.num_prefix_tokens :]

    def prompts_and_patches(self, adapter_name: str, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompts, patch tokens) that this layer reads when `adapter_name` runs, from the arguments of a call to
        this wrapper: its own prompts, or (shallow, after the first layer) those carried in from the layer before."""
        hidden_states = args[0] if args else kwargs["hidden_states"]
        slot = self.prompt_slot[adapter_name]
        patches = self.patch_tokens(hidden_states, slot)
        if slot.owns_prompts:
            return self.prompts(adapter_name, hidden_states.shape[0], torch.float32), patches
        return self.carried_prompts(hidden_states, slot, kwargs), patches

    def patch_tokens(self, hidden_states: torch.Tensor, slot: PromptSlot) -> torch.Tensor:
        """The patch tokens in this wrapper's input sequence (families that keep prompts in it override this)."""
        return hidden_states[:, self.num_prefix_tokens :]

    def carried_prompts(self, hidden_states: torch.Tensor, slot: PromptSlot, kwargs: dict) -> torch.Tensor:
        """VPT-Shallow: the prompts entering this layer from the layer before."""
        raise NotImplementedError(f"{type(self).__name__} does not say where its carried prompts are.")

    def projection(self, adapter_name: str) -> Optional[nn.Linear]:
        """The adapter's projection Linear for this layer's width (shared by those layers), or None."""
        return self.shared_projection.get(adapter_name)

    def set_prompts(self, adapter_name: str, values: torch.Tensor) -> None:
        """Overwrites this layer's stored prompts for `adapter_name` (before any projection)."""
        param = self.visual_prompt_embeddings[adapter_name]
        with torch.no_grad():
            param.copy_(values.to(device=param.device, dtype=param.dtype))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(CANNOT_MERGE)

    def unmerge(self) -> None:
        return None
