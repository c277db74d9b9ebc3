"""`initialize_prompts`: SPT's prompt initialisation as a short sequence of named steps.

Validate the arguments, resolve the adapter and the layers that own prompts, collect the tokens those layers receive
in one frozen pass (`collect.py`), make each layer's prototypes (`strategies.py`), write them into the prompts
(`write.py`) and record the provenance in the adapter's config, which `save_pretrained` writes to
adapter_config.json. The design (sampling, sharding, memory, exactness) is documented in docs/spt.md.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Optional

import torch

from ..config import SPT_STRATEGIES
from .collect import FIRST_LAYER_TOKENS, Target, TokenCollector, collect_tokens, find_patch_embedding, plan_batches
from .comm import Comm
from .keys import Reservoir
from .resolve import resolve
from .strategies import layer_prototypes
from .write import write_prompts

# 65,536 tokens per layer: enough to cluster a VTAB-1k-sized sample exhaustively; docs/spt.md, "Memory", says why.
DEFAULT_MAX_TOKENS_PER_LAYER = 65536
# The first prompted layer's token source; docs/spt.md, "Tokens", gives the measurements behind the choice.
DEFAULT_FIRST_LAYER_TOKENS = "embeddings"
# Layer-parallel K-means after the pass (`_PrototypeScheduler`); False runs the layers one after the other.
PARALLEL_PROTOTYPES = True
# Start each layer's K-means during the last batch's forward, as soon as that batch has passed the layer. Off by
# default: on a busy 2-core machine the extra threads stalled the forward's OpenMP kernels more than the overlap saved
# (docs/spt_benchmark_results.md); worth trying where the forward leaves cores idle.
OVERLAP_WITH_FORWARD = False


def initialize_prompts(
    peft_model,
    dataloader,
    strategy: str = "kmeans",
    *,
    accelerator=None,
    max_tokens_per_layer: int = DEFAULT_MAX_TOKENS_PER_LAYER,
    num_batches: Optional[int] = None,
    seed: int = 0,
    adapter_name: Optional[str] = None,
    forward_kwargs: Optional[Mapping] = None,
    first_layer_tokens: str = DEFAULT_FIRST_LAYER_TOKENS,
) -> dict:
    """Initialises an adapter's prompts with prototypes of the tokens each prompted layer receives (SPT).

    Args:
        peft_model: A `PeftModel` with a visual-prompt adapter (DDP/accelerate wrappers are unwrapped).
        dataloader: Batches of dicts with `pixel_values`, `(pixel_values, labels)` tuples or bare pixel tensors.
            Pass the plain (not `accelerator.prepare`d) dataloader; a prepared one is unwrapped. docs/spt.md says
            how batches are sharded and identified.
        strategy: How `num_prompt_tokens` (P) prototypes are made from layer i's input tokens (prefix tokens left out):

            - `"kmeans"`: K-means centroids (k = P) of a uniform sample of at most `max_tokens_per_layer` tokens
              (see `kmeans`).
            - `"mean"` / `"max"`: SPT's pooling. Each image's N tokens (in sequence order) are split into P contiguous
              windows (`torch.tensor_split`: the first N mod P windows hold ceil(N/P) tokens, the rest floor(N/P)),
              each mean- or max-pooled feature by feature; the prompts are P of these pooled vectors drawn uniformly
              without replacement over all images (the P smallest priority keys), in key order. This follows the
              authors' code, which pools windows per image then samples P pooled vectors, but with P near-equal
              windows covering all tokens where it uses P-1 windows of N // (P-1) tokens plus a remainder window
              (the whole sequence when the remainder is 0) and the paper floor(N·B/P)-token windows over a batch
              (docs/spt.md, "Mean and max pooling windows").
            - `"random"`: P tokens drawn uniformly without replacement from all tokens the layer received.
        accelerator: An `accelerate.Accelerator` to shard the pass over processes and to run K-means on its device.
            None: one process, K-means on the model's device. Under `torchrun` pass it, or every rank computes
            prompts from the data it is given on its own.
        max_tokens_per_layer: Tokens kept per layer for K-means; the pass's peak memory is bounded by it, not by the
            dataset. Default 65,536 (`DEFAULT_MAX_TOKENS_PER_LAYER`).
        num_batches: Use only the first `num_batches` batches of the dataloader (counted globally, before sharding).
        seed: Seed of the priority keys and of K-means seeding.
        adapter_name: The adapter to initialise; default the active one.
        forward_kwargs: Keyword arguments passed to the model on every forward of the pass, e.g.
            `{"interpolate_pos_encoding": True}` to feed images at another resolution than the model's.
        first_layer_tokens: The tokens the first prompted layer's prototypes are made from (deep: layer 0's; shallow:
            the only set). `"embeddings"`: what that layer receives, i.e. the embeddings' output (patch embeddings
            + position embedding), prefix tokens left out. `"patch_embeddings"`: the patch-embedding module's output,
            *before* the position embedding (and without CLS), as SPT's official code does; needs the first prompted
            layer to be the backbone's first. Later layers always use their input tokens. docs/spt.md,
            "Tokens", gives the measurements behind the default.

    Returns:
        A dict: strategy, adapter, num_images, num_processes, and per layer that owns prompts ("layers"): module name,
        width, tokens_seen, tokens_used (rows the prototypes came from), reservoir_peak and reservoir_capacity and,
        for K-means, inertia, iterations, converged; "seconds": wall time of the pass ("collect") and of the
        prototypes and writing ("prototypes") on this rank. The adapter's config records `spt_init`.

    Raises:
        ValueError: among others, when a layer receives a NaN or infinite token; the error names the batch, the
            images (their dataset indices for map-style dataloaders) and the layer, and the prompts are unchanged.

    With `projection_dim` set, the prototypes are written exactly through the projection (docs/spt.md, "Projection");
    this needs the prototypes of each width to span an affine subspace of rank <= projection_dim.
    """
    forward_kwargs = _validate(strategy, max_tokens_per_layer, num_batches, forward_kwargs)
    if first_layer_tokens not in FIRST_LAYER_TOKENS:
        raise ValueError(
            f"first_layer_tokens must be one of {list(FIRST_LAYER_TOKENS)}, got {first_layer_tokens!r}."
        )
    model, adapter, config, layers = resolve(peft_model, adapter_name, accelerator)
    num_prompts = config.num_prompt_tokens
    capacity = _capacity(strategy, max_tokens_per_layer, num_prompts)
    _warn_if_undistributed(accelerator)
    comm = Comm(accelerator)
    device = comm.device if comm.device is not None else next(model.parameters()).device
    targets = _targets(layers, adapter, capacity, device)

    plan = plan_batches(dataloader, comm, num_batches)
    if plan.total == 0:
        raise ValueError(
            "The dataloader yielded no batches: SPT needs images from the target data. Pass a non-empty dataloader "
            "(and num_batches >= 1)."
        )
    started = time.perf_counter()
    patch_embedding = find_patch_embedding(model, targets[0]) if first_layer_tokens == "patch_embeddings" else None
    collector = TokenCollector(targets, strategy, num_prompts, seed, device, plan.by_dataset_index, patch_embedding)
    with _PrototypeScheduler(strategy, num_prompts, capacity, comm, seed, device) as scheduler:
        if scheduler.overlaps(plan):
            # This rank's (= all) images: those of the batches before, and the last batch's.
            collector.on_final = (plan.total - 1,
                                  lambda t: scheduler.submit(t, collector.images + len(collector.indices)))
        num_images = collect_tokens(model, collector, plan, comm, _pixel_dtype(model), forward_kwargs,
                                    desc=f"SPT {strategy} prototypes")
        if num_images == 0:
            raise ValueError(
                "The dataloader yielded no images: SPT needs images from the target data. Pass a non-empty "
                "dataloader."
            )
        collected = time.perf_counter()
        results = scheduler.results(targets, num_images)
    prototypes, layer_stats = [p for p, _ in results], [s for _, s in results]
    write_prompts(adapter, config.projection_dim, targets, prototypes, comm)
    config.spt_init = _provenance(strategy, seed, num_images, layer_stats, max_tokens_per_layer, plan.total, comm)
    config.spt_init["first_layer_tokens"] = first_layer_tokens
    return {
        "strategy": strategy,
        "adapter": adapter,
        "num_images": num_images,
        "num_processes": comm.world,
        "layers": layer_stats,
        "seconds": {"collect": collected - started, "prototypes": time.perf_counter() - collected},
    }


class _PrototypeScheduler:
    """Runs each layer's prototypes (`layer_prototypes`) as early and as parallel as exactness allows.

    One process on CPU with K-means: after the pass, a pool of worker threads, one per intra-op thread torch has
    (each K-means runs on one thread, see `clustering`), takes the layers. With `OVERLAP_WITH_FORWARD` and a
    map-style plan, the last batch is known and a layer's tokens are final as soon as that batch has passed it: its
    K-means then starts while the forward of the last batch goes on. Prototypes are the same as one after the other
    (each layer's computation is untouched; only its start time and thread differ). Distributed runs keep the
    sequential order: every K-means step is a collective, and ranks must issue collectives in the same order.
    docs/spt.md, "Cost: the schedule of the prototypes", has the measurements.
    """

    def __init__(self, strategy, num_prompts, capacity, comm: Comm, seed, device) -> None:
        self.args = (strategy, num_prompts, capacity, comm, seed)
        self.threads = torch.get_num_threads()
        parallel = (PARALLEL_PROTOTYPES and strategy == "kmeans" and comm.world == 1
                    and torch.device(device).type == "cpu")
        self.workers = max(1, self.threads) if parallel else 0
        self.pool = None
        self.futures: dict[int, object] = {}

    def __enter__(self):
        if self.workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="spt-kmeans")
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            for future in self.futures.values():
                future.cancel()
            self.pool.shutdown(wait=True)
            torch.set_num_threads(self.threads)  # workers set their own; keep the caller's setting

    def overlaps(self, plan) -> bool:
        return (OVERLAP_WITH_FORWARD and self.pool is not None and plan.by_dataset_index and plan.total is not None
                and plan.total > 0)

    def _run(self, target, num_images):
        return layer_prototypes(target, *self.args, num_images)

    def submit(self, target, num_images: int) -> None:
        """The target's tokens are final: start its prototypes."""
        self.futures[id(target)] = self.pool.submit(self._run, target, num_images)

    def results(self, targets, num_images: int) -> list:
        if self.pool is None:
            return [self._run(t, num_images) for t in targets]
        for t in targets:
            if id(t) not in self.futures:
                self.futures[id(t)] = self.pool.submit(self._run, t, num_images)
        return [self.futures[id(t)].result() for t in targets]


def _validate(strategy, max_tokens_per_layer, num_batches, forward_kwargs) -> dict:
    """Checks the arguments that do not need the model; returns the forward kwargs as a dict."""
    if strategy not in SPT_STRATEGIES:
        raise ValueError(f"Unknown SPT strategy {strategy!r}: use one of {list(SPT_STRATEGIES)}.")
    if not isinstance(max_tokens_per_layer, int) or max_tokens_per_layer < 1:
        raise ValueError(f"max_tokens_per_layer must be a positive integer, got {max_tokens_per_layer!r}.")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be None or a positive integer, got {num_batches!r}.")
    if forward_kwargs is None:
        return {}
    if not isinstance(forward_kwargs, Mapping) or "pixel_values" in forward_kwargs:
        raise ValueError(
            "forward_kwargs must be a dict of keyword arguments for the model's forward, without 'pixel_values' "
            f"(the pass feeds the dataloader's images), got {forward_kwargs!r}."
        )
    return dict(forward_kwargs)


def _capacity(strategy: str, max_tokens_per_layer: int, num_prompts: int) -> int:
    """Rows a layer keeps: the token sample for K-means, the prototypes themselves otherwise."""
    if strategy != "kmeans":
        return num_prompts
    if max_tokens_per_layer < num_prompts:
        raise ValueError(
            f"max_tokens_per_layer={max_tokens_per_layer} is smaller than num_prompt_tokens={num_prompts}: K-means "
            "needs at least one token per prototype. Raise max_tokens_per_layer."
        )
    return max_tokens_per_layer


def _warn_if_undistributed(accelerator) -> None:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if accelerator is None and distributed and torch.distributed.get_world_size() > 1:
        warnings.warn(
            "initialize_prompts runs as a single process (accelerator=None) inside a distributed job: each rank "
            "computes prompts from the batches it reads. Pass accelerator=Accelerator() to shard the pass and get "
            "identical prompts on every rank.",
            stacklevel=3,
        )


def _targets(layers, adapter: str, capacity: int, device: torch.device) -> list[Target]:
    """One target per layer that owns prompts (deep: every prompted layer; shallow: the first)."""
    return [
        Target(name, layer, layer.prompt_slot[adapter].index, Reservoir(capacity, layer.width, device))
        for name, layer in layers
        if layer.prompt_slot[adapter].owns_prompts
    ]


def _pixel_dtype(model) -> torch.dtype:
    param = next(model.parameters())
    return param.dtype if param.dtype.is_floating_point else torch.float32


def _provenance(strategy, seed, num_images, layer_stats, max_tokens_per_layer, num_batches, comm: Comm) -> dict:
    """What `spt_init` records in the adapter's config."""
    tokens_used = [s["tokens_used"] for s in layer_stats]
    return {
        "strategy": strategy,
        "seed": seed,
        "num_images": num_images,
        "num_tokens": int(sum(tokens_used)),
        "tokens_used_per_layer": tokens_used,
        "tokens_seen_per_layer": [s["tokens_seen"] for s in layer_stats],
        "max_tokens_per_layer": max_tokens_per_layer if strategy == "kmeans" else None,
        "num_batches": num_batches,
        "num_processes": comm.world,
    }
