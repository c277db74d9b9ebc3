"""The collection pass: one frozen forward over the data, feeding each prompted layer's input tokens to a reservoir.

`plan_batches` decides which batches this rank runs and how each image is identified (dataset index for map-style
dataloaders, arrival order otherwise). `TokenCollector` holds one `Target` per layer that owns prompts; its forward
pre-hooks take the tokens the layer receives (`VisualPromptLayer.received_tokens`), refuse non-finite ones, turn
them into candidate rows (tokens, or pooled windows) and offer them to the layer's reservoir under their priority
keys; the last hook stops the forward, since nothing after the last prompted layer is needed. `collect_tokens` runs
the pass (adapter disabled, eval mode, no grad) and makes every rank agree on a failure. See docs/spt.md.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ..layer import VisualPromptLayer
from .comm import Comm
from .hooks import hooked_eval
from .keys import Reservoir, priority_keys
from .strategies import candidate_rows


class NonFiniteTokens(ValueError):
    """A layer received NaN or infinite tokens during the collection pass."""


class _StopForward(Exception):
    """Raised by the last hook of a forward: nothing after the last prompted layer is needed."""


@dataclass
class Target:
    """A layer that owns prompts, and what the pass collected for it."""

    name: str
    layer: VisualPromptLayer
    index: int  # the prompted layer's slot index (the `layer` input of the priority keys)
    reservoir: Reservoir
    tokens_seen: int = 0
    tokens_per_image: Optional[int] = None


@dataclass
class BatchPlan:
    """This rank's batches as (global batch index, batch, global sample indices), and the batch counts (this rank's,
    all ranks'; None when unknown). `by_dataset_index`: sample indices are dataset indices (map-style dataloader)."""

    batches: Iterator
    local: Optional[int]
    total: Optional[int]
    by_dataset_index: bool


def pixel_values(batch) -> torch.Tensor:
    """The (B, C, H, W) pixels of a batch: a dict's 'pixel_values', a tuple's first item, or a bare tensor."""
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch:
            raise ValueError(
                f"SPT batches need a 'pixel_values' entry, but this batch has keys {sorted(map(str, batch))}. "
                "Make the dataloader yield dicts with 'pixel_values' (e.g. an image processor's output), "
                "(pixel_values, labels) tuples, or bare pixel tensors."
            )
        pixels = batch["pixel_values"]
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        pixels = batch[0]  # torchvision-style (images, labels)
    elif isinstance(batch, torch.Tensor):
        pixels = batch
    else:
        raise ValueError(
            f"SPT cannot find pixel values in a batch of type {type(batch).__name__}. Yield dicts with "
            "'pixel_values', (pixel_values, labels) tuples, or bare pixel tensors."
        )
    if not isinstance(pixels, torch.Tensor) or pixels.ndim != 4:
        raise ValueError(
            f"'pixel_values' must be a (batch, channels, height, width) tensor, got "
            f"{type(pixels).__name__} {tuple(getattr(pixels, 'shape', ()))}."
        )
    return pixels


def plan_batches(dataloader, comm: Comm, num_batches: Optional[int]) -> BatchPlan:
    """This rank's share of the first `num_batches` batches; docs/spt.md, "Global sample index and sharding"."""
    from torch.utils.data import DataLoader, IterableDataset

    dataset = getattr(dataloader, "dataset", None)
    sampler = getattr(dataloader, "batch_sampler", None)
    if (
        isinstance(dataloader, DataLoader) and sampler is not None and dataset is not None
        and not isinstance(dataset, IterableDataset)
    ):
        while hasattr(sampler, "batch_sampler") and type(sampler).__name__ == "BatchSamplerShard":
            sampler = sampler.batch_sampler  # accelerate-prepared: shard it ourselves, by dataset index
        plan = None
        if comm.rank == 0:
            try:
                plan = [[int(i) for i in b] for b in islice(iter(sampler), num_batches)]
            except (TypeError, ValueError):
                plan = None  # indices that are not integers: read it as a plain iterable
        plan = comm.broadcast_object(plan)
        if plan is not None:
            return _plan_by_dataset_index(dataloader, plan, comm)
    return _plan_in_arrival_order(dataloader, comm, num_batches)


def _plan_by_dataset_index(dataloader, plan: list[list[int]], comm: Comm) -> BatchPlan:
    """Rank r loads batches r, r + W, ... of the plan with the dataloader's own collation and workers."""
    from torch.utils.data import DataLoader

    mine = plan[comm.rank :: comm.world]
    kwargs = dict(
        batch_sampler=mine, collate_fn=dataloader.collate_fn, num_workers=dataloader.num_workers,
        pin_memory=dataloader.pin_memory, timeout=dataloader.timeout, worker_init_fn=dataloader.worker_init_fn,
    )
    if dataloader.num_workers > 0:
        kwargs.update(
            multiprocessing_context=dataloader.multiprocessing_context, prefetch_factor=dataloader.prefetch_factor
        )
    loader = DataLoader(dataloader.dataset, **kwargs)
    numbers = range(comm.rank, len(plan), comm.world)
    indices = (np.asarray(b, dtype=np.int64) for b in mine)
    return BatchPlan(zip(numbers, loader, indices), len(mine), len(plan), by_dataset_index=True)


def _plan_in_arrival_order(dataloader, comm: Comm, num_batches: Optional[int]) -> BatchPlan:
    """Every rank reads every batch (to count images); rank r runs batches r, r + W, ..."""

    def every_batch() -> Iterator:
        offset = 0
        for j, batch in enumerate(islice(iter(dataloader), num_batches)):
            size = pixel_values(batch).shape[0]
            if j % comm.world == comm.rank:
                yield j, batch, np.arange(offset, offset + size, dtype=np.int64)
            offset += size

    total = None
    try:
        total = len(dataloader)
        total = total if num_batches is None else min(total, num_batches)
    except TypeError:
        pass
    mine = None if total is None else len(range(comm.rank, total, comm.world))
    return BatchPlan(every_batch(), mine, total, by_dataset_index=False)


FIRST_LAYER_TOKENS = ("embeddings", "patch_embeddings")


def find_patch_embedding(model: nn.Module, first: Target) -> nn.Module:
    """The backbone's patch-embedding module (`...embeddings.patch_embeddings`, or CLIP-style `patch_embedding`): what
    `first_layer_tokens="patch_embeddings"` reads. The first prompted layer must be the backbone's first layer (every
    index in its module path 0), since the patch embeddings are what that layer receives, before the position
    embedding (and before CLS/registers are prepended)."""
    if any(part.isdigit() and part != "0" for part in first.name.split(".")):
        raise ValueError(
            f"first_layer_tokens='patch_embeddings' reads the patch embeddings, which only the backbone's first layer "
            f"receives, but this adapter's first prompted layer is {first.name}. Use first_layer_tokens='embeddings'."
        )
    found = [
        m for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in ("patch_embeddings", "patch_embedding") and not isinstance(m, VisualPromptLayer)
    ]
    if len(found) != 1:
        raise ValueError(
            f"first_layer_tokens='patch_embeddings' needs exactly one patch-embedding module (named "
            f"'patch_embeddings' or 'patch_embedding') in the model; found {len(found)}. Use "
            "first_layer_tokens='embeddings'."
        )
    return found[0]


def patch_embedding_tokens(output) -> torch.Tensor:
    """(B, N, C) tokens from a patch-embedding module's output: a (B, N, C) tensor, a tuple starting with one (Swin),
    or a (B, C, H, W) feature map (a bare Conv2d, CLIP), flattened in row-major patch order."""
    tokens = output[0] if isinstance(output, (tuple, list)) else output
    if tokens.ndim == 4:
        tokens = tokens.flatten(2).transpose(1, 2)
    return tokens


class TokenCollector:
    """Offers the tokens each target layer receives to its reservoir, one batch at a time (see the module doc).

    With `patch_embedding` set (`first_layer_tokens="patch_embeddings"`), the first target takes the patch embeddings
    that module outputs in the same forward (before the position embedding; no CLS) instead of its input tokens."""

    def __init__(self, targets: list[Target], strategy: str, num_prompts: int, seed: int, device: torch.device,
                 by_dataset_index: bool, patch_embedding: Optional[nn.Module] = None) -> None:
        self.targets, self.strategy, self.num_prompts, self.seed = targets, strategy, num_prompts, seed
        self.device, self.by_dataset_index = device, by_dataset_index
        self.batch_index, self.indices, self.seen, self.images = -1, None, 0, 0
        self.patch_embedding, self.patch_tokens = patch_embedding, None
        # (batch index, callback): after that batch, a target's reservoir is final; the callback gets the target as
        # soon as its tokens are offered, so its prototypes can start while the forward goes on (`initialize.py`).
        self.on_final: Optional[tuple[int, Callable[[Target], None]]] = None

    def hooks(self) -> list:
        return [(t.layer, functools.partial(self._record, t)) for t in self.targets]

    def output_hooks(self) -> list:
        if self.patch_embedding is None:
            return []
        return [(self.patch_embedding, self._record_patch_embeddings)]

    def _record_patch_embeddings(self, module, args, output) -> None:
        self.patch_tokens = patch_embedding_tokens(output)

    def run(self, model, pixels: torch.Tensor, batch_index: int, indices: np.ndarray, forward_kwargs: dict) -> None:
        """One forward of `model` on a batch, stopped after the last target layer has recorded its tokens."""
        self.batch_index, self.indices, self.seen, self.patch_tokens = batch_index, indices, 0, None
        try:
            model(pixel_values=pixels, **forward_kwargs)
        except _StopForward:
            pass
        if self.seen != len(self.targets):
            raise RuntimeError(
                f"Only {self.seen} of the {len(self.targets)} prompted layers ran during a forward pass; "
                "SPT needs every prompted layer to see the images."
            )
        self.images += pixels.shape[0]

    def _record(self, target: Target, module, args: tuple, kwargs: dict) -> None:
        tokens = module.received_tokens(args, kwargs).detach()
        if self.patch_embedding is not None and target is self.targets[0]:
            tokens = self._first_layer_patch_tokens(target, tokens)
        bsz, n_tokens = tokens.shape[0], tokens.shape[1]
        if bsz != len(self.indices):
            raise ValueError(
                f"A batch holds {bsz} images but its sampler listed {len(self.indices)} indices; SPT needs a "
                "collate_fn that keeps every sample, in order."
            )
        self._check_finite(target, tokens)
        target.tokens_per_image = n_tokens
        target.tokens_seen += bsz * n_tokens
        rows = candidate_rows(tokens, self.strategy, self.num_prompts, target.name, self.device)
        n_pos = rows.shape[1]
        keys = torch.from_numpy(priority_keys(self.seed, target.index, self.indices, n_pos)).to(self.device)

        def take(idx: torch.Tensor) -> torch.Tensor:
            idx = idx.to(rows.device)
            return rows[idx // n_pos, idx % n_pos].to(device=self.device, dtype=torch.float32)

        target.reservoir.offer(keys.flatten(), take)
        if self.on_final is not None and self.batch_index == self.on_final[0]:
            self.on_final[1](target)
        self.seen += 1
        if self.seen == len(self.targets):
            raise _StopForward

    def _first_layer_patch_tokens(self, target: Target, received: torch.Tensor) -> torch.Tensor:
        patches = self.patch_tokens
        if patches is None or patches.shape != received.shape:
            raise ValueError(
                f"first_layer_tokens='patch_embeddings': layer {target.name} received tokens of shape "
                f"{tuple(received.shape)} (prefix tokens excluded), but the patch-embedding module gave "
                f"{None if patches is None else tuple(patches.shape)} in this forward; the first prompted layer must "
                "receive the patch embeddings (plus position embedding and prefix tokens) directly. Use "
                "first_layer_tokens='embeddings'."
            )
        return patches.detach()

    def _check_finite(self, target: Target, tokens: torch.Tensor) -> None:
        finite = torch.isfinite(tokens).flatten(1).all(1)
        if bool(finite.all()):
            return
        bad = (~finite).nonzero().squeeze(1).cpu().numpy()
        where = f"batch {self.batch_index} (images {bad.tolist()} of that batch"
        if self.by_dataset_index:
            where += f"; dataset indices {self.indices[bad].tolist()}"
        raise NonFiniteTokens(
            f"SPT found non-finite tokens (NaN or inf) in {where}) at the input of layer {target.name}. Prototypes "
            "of such tokens are NaN, so nothing was written: the prompts are unchanged. Check those images and "
            "their preprocessing (e.g. a normalisation dividing by zero), or leave them out."
        )


def collect_tokens(model, collector: TokenCollector, plan: BatchPlan, comm: Comm, pixel_dtype: torch.dtype,
                   forward_kwargs: dict, desc: str) -> int:
    """Runs the pass over this rank's batches with the adapter disabled; returns the number of images over all ranks.
    A rank that finds non-finite tokens stops; all ranks then raise (one all-reduce), so none waits forever."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    problem: Optional[NonFiniteTokens] = None
    with tqdm(total=plan.local, disable=not comm.is_main, desc=desc) as progress:
        with hooked_eval(model, collector.hooks(), collector.output_hooks()), model.disable_adapter():
            for batch_index, batch, indices in plan.batches:
                pixels = pixel_values(batch).to(device=device, dtype=pixel_dtype)
                try:
                    collector.run(model, pixels, batch_index, indices, forward_kwargs)
                except NonFiniteTokens as error:
                    problem = error
                    break
                progress.update(1)
    failed = int(comm.sum(torch.tensor([problem is not None], dtype=torch.int64, device=collector.device)).item())
    if problem is not None:
        raise problem
    if failed:
        raise NonFiniteTokens(
            f"SPT found non-finite tokens (NaN or inf) on {failed} other rank(s); see their error for the batch and "
            "layer. Nothing was written: the prompts are unchanged."
        )
    return int(comm.sum(torch.tensor([collector.images], dtype=torch.int64, device=collector.device)).item())
