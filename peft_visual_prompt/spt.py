"""Self-Prompt Tuning (SPT): data-driven prompt initialisation (Wang et al., ICML 2024, arXiv 2402.02382).

SPT initialises the prompts of layer i with prototypes of the tokens layer i receives on the target data.
`initialize_prompts` computes them in one pass of the frozen backbone over a dataloader, with bounded memory,
on one process or sharded over the ranks of an `accelerate` run, and writes them into an adapter's prompts.
`prompt_patch_nmi` and `PromptPatchNMICallback` measure the normalised mutual information between prompts and patch
tokens that motivates the method.

How the pass works
------------------
* Tokens: the backbone runs with the adapter disabled, in eval mode, without gradients. A forward pre-hook on every
  `VisualPromptLayer` that owns prompts for the adapter (deep: every prompted layer; shallow: the first) records the
  tokens that layer receives, minus its prefix tokens (CLS, distillation, registers; none for Swin). The forward stops
  as soon as the last such layer's input is recorded: that layer and everything after it are skipped (for
  VPT-Shallow the pass costs only the embeddings).
* Priority keys: every candidate row (a token, or a pooled window for "mean"/"max") gets the 63-bit key
  `priority_keys(seed, layer, sample_index, position)`, a splitmix64 hash of (seed, prompted-layer index, global sample
  index, token or window index). A layer keeps the rows with the smallest keys: a uniform random sample without
  replacement (a bottom-k sample, the hashed form of reservoir sampling), whatever the order of arrival.
* Global sample index: for a map-style `DataLoader` (the usual case) it is the dataset index, read from the
  dataloader's batch sampler. The batch plan (the list of index batches, cut to `num_batches`) is drawn once on rank
  0, broadcast, and rank r runs batches r, r + W, ...; an accelerate-prepared dataloader is unwrapped to the batch
  sampler it shards. Pass the plain dataloader: there is no need to `accelerator.prepare` it. Because keys depend on
  dataset indices only, the kept set does not depend on the number of ranks, the batch size or the shuffling; and
  because ranks run the same batches as a single process would, the tokens themselves are bitwise the same.
  Any other iterable of batches (an `IterableDataset` loader, a list, a generator) is read in full by every rank:
  sample indices count images in arrival order, and rank r runs the forward of batches r, r + W, ... only. Such an
  iterable must yield the same batches in the same order on every rank.
* Memory: a layer stores at most `max_tokens_per_layer` tokens for "kmeans" and `num_prompt_tokens` rows for the
  other strategies, whatever the dataset size.
* Distribution: after the pass, ranks gather their kept keys (8 bytes a row) and keep the rows under the global
  cut-off, so the union of what ranks keep is exactly what one process would keep. "random"/"mean"/"max" gather
  their few winning rows. K-means runs as distributed Lloyd steps on the rows each rank keeps: ranks assign their own
  rows; per-cluster sums (float64), counts, inertia and label changes are all-reduced in one call per iteration.
  Seeding (greedy k-means++, then Lloyd on the sample) runs on a gathered sample (the rows with the smallest keys,
  in key order), identically on every rank. At the end the prompts are broadcast from rank 0, so every rank holds
  bitwise identical prompts. A one-process run on the same data and seed gives the same prompts: bitwise for
  "random"/"mean"/"max", to float rounding (~1e-7) for "kmeans", whose sums are reduced in another order.
* K-means runs on the accelerator's device (the model's without one); on CPU on one intra-op thread (see `kmeans`).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from .config import SPT_STRATEGIES, VisualPromptConfig
from .layer import VisualPromptLayer

from transformers import TrainerCallback

__all__ = [
    "DEFAULT_MAX_TOKENS_PER_LAYER",
    "KMeansResult",
    "PromptPatchNMICallback",
    "initialize_prompts",
    "kmeans",
    "nmi_from_tokens",
    "priority_keys",
    "prompt_patch_nmi",
]

# 65,536 tokens per layer. SPT computed its K-means prototypes on 30% of a VTAB-1k training set: 300 images x 196
# ViT-B/16 tokens = 58,800 tokens a layer, so this cap clusters datasets of that size exhaustively and subsamples
# larger ones. It leaves ~3,300 tokens per centroid for deep SPT (p=20) and ~650 for shallow SPT (p=100), where
# centroid noise is already far below the spread between clusters, while one Lloyd step stays cheap
# (65,536 x 768 x p multiply-adds). The cost is memory: cap x width x 4 bytes per layer that owns prompts
# (192 MiB at width 768: 2.25 GiB for deep ViT-B, 192 MiB for shallow). Lower it for deep models on small machines.
DEFAULT_MAX_TOKENS_PER_LAYER = 65536

# K-means defaults: sklearn's `KMeans` defaults for the stopping rule, so inertias compare like for like.
KMEANS_MAX_ITER = 300
KMEANS_TOL = 1e-4
KMEANS_N_INIT = 3  # restarts of seeding + Lloyd on the (small) seeding sample; the full data is clustered once
KMEANS_SEEDING_SAMPLE: Optional[int] = None  # points seeding uses; None: max(4096, 256 k), capped by the data
# Rows per block: blocks of about 1M values (4 MiB of float32, cache-friendly) bound the temporaries, and keep the
# number of torch calls per Lloyd step small for narrow tokens.
_CHUNK_ELEMENTS = 1 << 20


# ---------------------------------------------------------------------------------------------------------------------
# Priority keys
# ---------------------------------------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, a bijection of uint64 (numpy uint64 arithmetic wraps modulo 2**64)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MUL1
    x = (x ^ (x >> np.uint64(27))) * _MUL2
    return x ^ (x >> np.uint64(31))


def priority_keys(seed: int, layer: int, sample_indices, num_positions: int) -> np.ndarray:
    """Reservoir priorities, shape (len(sample_indices), num_positions), int64 in [0, 2**63).

    key(s, t) = splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ layer) ^ s) ^ t) >> 1, for global sample index s
    and token (or pooled-window) index t. A layer keeps the rows with the smallest keys.
    """
    with np.errstate(over="ignore"):
        base = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
        base = _splitmix64(base ^ np.uint64(layer))
        per_sample = _splitmix64(base ^ np.asarray(sample_indices, dtype=np.int64).astype(np.uint64))
        keys = _splitmix64(per_sample[:, None] ^ np.arange(num_positions, dtype=np.uint64)[None, :])
    return (keys >> np.uint64(1)).astype(np.int64)


class _Reservoir:
    """The `capacity` rows with the smallest keys among all rows offered (a bottom-k sample). Storage grows by
    doubling up to `capacity` rows and never beyond; `peak` records the most rows ever stored."""

    def __init__(self, capacity: int, dim: int, device: torch.device) -> None:
        self.capacity, self.dim, self.device = int(capacity), int(dim), device
        self._keys = torch.empty(0, dtype=torch.int64, device=device)
        self._rows = torch.empty(0, dim, dtype=torch.float32, device=device)
        self.size = 0
        self.peak = 0
        self.offered = 0
        self._max_key: Optional[torch.Tensor] = None

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[: self.size]

    @property
    def rows(self) -> torch.Tensor:
        return self._rows[: self.size]

    def _reserve(self, n: int) -> None:
        if n <= self._rows.shape[0]:
            return
        alloc = min(self.capacity, max(n, 2 * self._rows.shape[0]))
        rows = torch.empty(alloc, self.dim, dtype=torch.float32, device=self.device)
        keys = torch.empty(alloc, dtype=torch.int64, device=self.device)
        rows[: self.size] = self.rows
        keys[: self.size] = self.keys
        self._rows, self._keys = rows, keys

    def offer(self, keys: torch.Tensor, take: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Offers rows `take(i)` with keys `keys[i]` (1-D). `take` is called only for rows that may be kept."""
        self.offered += keys.numel()
        idx = torch.arange(keys.numel(), device=keys.device)
        if self.size == self.capacity:
            mask = keys < self._max_key
            if not bool(mask.any()):
                return
            idx, keys = idx[mask], keys[mask]
        n_old, m = self.size, keys.numel()
        if n_old + m <= self.capacity:
            self._reserve(n_old + m)
            self._rows[n_old : n_old + m] = take(idx)
            self._keys[n_old : n_old + m] = keys
            self.size = n_old + m
        else:
            merged = torch.cat([self.keys, keys])
            keep = torch.topk(merged, self.capacity, largest=False, sorted=False).indices
            new = keep[keep >= n_old] - n_old
            kept_old = torch.zeros(self.capacity, dtype=torch.bool, device=keys.device)
            kept_old[keep[keep < n_old]] = True
            slots = (~kept_old).nonzero().squeeze(1)  # evicted rows, then never-filled rows
            self._reserve(self.capacity)
            self._rows[slots] = take(idx[new])
            self._keys[slots] = keys[new]
            self.size = self.capacity
        self._max_key = self.keys.max()
        self.peak = max(self.peak, self.size)


# ---------------------------------------------------------------------------------------------------------------------
# Communication: a thin layer over accelerate, trivial without it
# ---------------------------------------------------------------------------------------------------------------------


class _Comm:
    def __init__(self, accelerator=None) -> None:
        distributed = accelerator is not None and accelerator.num_processes > 1
        self.acc = accelerator if distributed else None
        self.world = accelerator.num_processes if distributed else 1
        self.rank = accelerator.process_index if distributed else 0
        self.is_main = accelerator.is_main_process if accelerator is not None else True
        self.device = accelerator.device if accelerator is not None else None

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device) if self.acc is not None else t

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.acc is None:
            return t
        return self.acc.reduce(self._dev(t), reduction="sum").to(t.device)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenates every rank's rows, in rank order; row counts may differ between ranks."""
        if self.acc is None:
            return t
        counts = self.acc.gather(self._dev(torch.tensor([t.shape[0]], dtype=torch.int64))).tolist()
        most = max(counts)
        if most == 0:
            return t[:0]
        padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[: t.shape[0]] = t
        gathered = self.acc.gather(padded).to(t.device)
        return torch.cat([gathered[r * most : r * most + c] for r, c in enumerate(counts)])

    def broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.acc is None:
            return t
        from accelerate.utils import broadcast

        return broadcast(self._dev(t.contiguous()), from_process=0).to(t.device)

    def broadcast_object(self, obj):
        if self.acc is None:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]


# ---------------------------------------------------------------------------------------------------------------------
# K-means
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (k, d) float32
    inertia: float  # sum of squared distances of the points to their nearest centroid
    n_iter: int  # Lloyd iterations on the full data
    converged: bool
    num_points: int
    seeding_points: int
    seeding_iterations: int = 0
    empty_clusters_reseeded: int = 0
    extra: dict = field(default_factory=dict)


def kmeans(
    x: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    max_iter: int = KMEANS_MAX_ITER,
    tol: float = KMEANS_TOL,
    n_init: int = KMEANS_N_INIT,
    sample_size: Optional[int] = None,
    chunk_size: Optional[int] = None,
    keys: Optional[torch.Tensor] = None,
    accelerator=None,
) -> KMeansResult:
    """K-means (Lloyd's algorithm) in torch, float32 distances computed block-wise by matmul, on `x`'s device.

    Seeding: greedy k-means++ (sklearn's variant, 2 + ln k candidates per step) on a seeding sample of
    `sample_size` points (default max(4096, 256 k), the whole set when smaller), followed by Lloyd on that sample;
    the best of `n_init` such runs (lowest sample inertia) starts Lloyd on the full data. On CPU it runs on one
    intra-op thread (`torch.set_num_threads(1)`, restored after): the steps are memory-bound, and short multi-threaded
    kernels stall badly on a machine other processes keep busy. Stopping: sklearn's rule, i.e. labels unchanged, or
    squared centre shift <= tol x mean per-feature variance, or `max_iter`. An empty cluster is re-seeded with the
    point farthest from its centroid (ties broken by smaller key), which leaves its old cluster.

    Distributed (`accelerator` with several processes): `x` holds this rank's points and `keys` (required, unique
    int64 over all ranks) their identities; the seeding sample is the `sample_size` smallest keys, gathered in key
    order, so every rank seeds identically, and Lloyd steps all-reduce float64 sums and counts. Single process:
    `keys` defaults to the row index.
    """
    return _kmeans(
        x, k, comm=_Comm(accelerator), seed=seed, max_iter=max_iter, tol=tol, n_init=n_init,
        sample_size=sample_size, chunk_size=chunk_size, keys=keys,
    )


def _kmeans(x, k, **kwargs) -> KMeansResult:
    # On CPU, one intra-op thread. With small k the steps are memory-bound, so threads gain little even on an idle
    # machine, while every short kernel's OpenMP barrier stalls when another process holds a core: on a loaded
    # 2-core machine 2 threads ran this 4-7x slower than 1. K-means is cheap next to the forward pass either way.
    with _one_cpu_thread(x.device):
        return _kmeans_impl(x, k, **kwargs)


def _kmeans_impl(x, k, *, comm: _Comm, seed, max_iter, tol, n_init, sample_size, chunk_size, keys) -> KMeansResult:
    if x.ndim != 2:
        raise ValueError(f"kmeans expects a 2-D (points, features) tensor, got shape {tuple(x.shape)}.")
    x = x.float() if x.dtype != torch.float32 else x
    device, (n_local, d) = x.device, x.shape
    chunk_size = chunk_size or max(1024, _CHUNK_ELEMENTS // max(d, k))
    if keys is None:
        if comm.world > 1:
            raise ValueError("Distributed kmeans needs `keys`: unique int64 identities of the points over all ranks.")
        keys = torch.arange(n_local, device=device)
    keys = keys.to(device)

    count = comm.sum(torch.tensor([n_local], dtype=torch.float64, device=device))
    n_total = int(count.item())
    if n_total < k:
        raise ValueError(f"K-means needs at least k={k} points, got {n_total}.")

    # Seeding sample: the smallest keys, in key order, identical on every rank.
    size = min(n_total, sample_size or max(4096, 256 * k))
    if size < n_total:
        cut = torch.kthvalue(comm.gather_rows(keys).cpu(), size).values.item()
        local = keys <= cut
        sample_keys, sample = comm.gather_rows(keys[local]), comm.gather_rows(x[local])
    else:
        sample_keys, sample = comm.gather_rows(keys), comm.gather_rows(x)
    sample = sample[torch.argsort(sample_keys)]

    # Distances are computed around the sample mean m (tokens share a large offset: precision), identical on every
    # rank. One pass gives |x - m|^2 and the data mean; sklearn's tolerance scale, the mean per-feature variance, is
    # (sum |x - m|^2 / n - |mean - m|^2) / d.
    mu = sample.double().mean(0)
    x2, total = _squared_norms(x, mu.float(), chunk_size)
    total = comm.sum(total)
    mean = total[:d] / n_total
    variance = (total[d] / n_total - ((mean - mu) ** 2).sum()) / d
    tol_abs = float(tol * variance.item())
    sample = sample - mu.float()
    sample_x2, _ = _squared_norms(sample, torch.zeros(d, device=device), chunk_size)
    zero = torch.zeros(d, dtype=torch.float64, device=device)

    best = None
    gen = torch.Generator().manual_seed(int(seed))
    for _ in range(max(1, n_init)):
        init = _kmeans_plusplus(sample, k, gen)
        centers, inertia, iters, _, _ = _lloyd(
            sample, sample_x2, init, mu=zero, comm=_Comm(None), max_iter=max_iter, tol_abs=tol_abs,
            chunk_size=chunk_size, keys=torch.arange(sample.shape[0], device=device),
        )
        if best is None or inertia < best[1]:
            best = (centers, inertia, iters)
    centers, inertia, iters, converged, reseeded = _lloyd(
        x, x2, best[0], mu=mu, comm=comm, max_iter=max_iter, tol_abs=tol_abs, chunk_size=chunk_size, keys=keys,
    )
    return KMeansResult(
        centroids=(centers + mu).float(), inertia=inertia, n_iter=iters, converged=converged, num_points=n_total,
        seeding_points=int(sample.shape[0]), seeding_iterations=best[2], empty_clusters_reseeded=reseeded,
    )


@contextmanager
def _one_cpu_thread(device: torch.device):
    """Runs the block on one intra-op thread when on CPU (restored after)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _kmeans_plusplus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ (Arthur & Vassilvitskii; sklearn's `_kmeans_plusplus`) on centred float32 points.
    Random numbers come from a CPU generator, so the result does not depend on the device. Returns float64."""
    n, device = x.shape[0], x.device
    trials = 2 + int(math.log(k))
    x2 = (x * x).sum(1)
    centers = torch.empty(k, x.shape[1], dtype=torch.float64, device=device)
    first = int(torch.randint(n, (1,), generator=gen).item())
    centers[0] = x[first].double()
    closest = (x2 - 2 * (x @ x[first]) + x2[first]).clamp_min_(0)
    potential = closest.double().sum()
    for c in range(1, k):
        draws = torch.rand(trials, generator=gen, dtype=torch.float64).to(device) * potential
        candidates = torch.searchsorted(torch.cumsum(closest.double(), 0), draws).clamp_(max=n - 1)
        dist = (x2[None, :] - 2 * (x[candidates] @ x.T) + x2[candidates, None]).clamp_min_(0)
        torch.minimum(dist, closest[None, :], out=dist)
        potentials = dist.double().sum(1)
        best = int(torch.argmin(potentials).item())
        closest, potential = dist[best], potentials[best]
        centers[c] = x[candidates[best]].double()
    return centers


def _squared_norms(x: torch.Tensor, origin: torch.Tensor, chunk_size: int):
    """|x - origin|^2 per row (float32), and [sum of the rows, sum of those squared norms] (float64), block by block."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    total = torch.zeros(x.shape[1] + 1, dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], chunk_size):
        block = x[i : i + chunk_size]
        total[:-1] += block.sum(0)
        out[i : i + chunk_size] = torch.linalg.vector_norm(block - origin, dim=1).square_()
    total[-1] = out.sum(dtype=torch.float64)
    return out, total


def _lloyd(x, x2, centers, *, mu, comm: _Comm, max_iter, tol_abs, chunk_size, keys):
    """Lloyd iterations. `centers` (float64) are relative to `mu`; points `x` are absolute, `x2` = |x - mu|^2.
    Returns (centers relative to mu, final inertia, iterations, converged, empty clusters re-seeded)."""
    n, d = x.shape
    k = centers.shape[0]
    device = x.device
    mu32 = mu.float()
    labels = torch.full((n,), -1, dtype=torch.int64, device=device)
    dmin = torch.empty(n, dtype=torch.float32, device=device)
    converged, reseeded, it = False, 0, 0
    for it in range(1, max_iter + 1):
        packed, far = _assign(x, x2, centers, mu32, labels, dmin, chunk_size, update=True)
        packed = comm.sum(packed)
        sums, counts = packed[: k * d].view(k, d), packed[k * d : k * d + k]
        inertia, changed = float(packed[-2].item()), int(packed[-1].item())
        empty = (counts == 0).nonzero().squeeze(1)
        if empty.numel():
            reseeded += empty.numel()
            _reseed_empty(x, labels, keys, far, empty, sums, counts, comm)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None] - mu, centers)
        if changed == 0 and not empty.numel():
            # Labels as in the step before, so `new` equals the centres this pass used (the same sums of the same
            # points): its inertia is the final one.
            return new, inertia, it, True, reseeded
        shift = float(((new - centers) ** 2).sum().item())
        centers = new
        if shift <= tol_abs:
            converged = True
            break
    packed, _ = _assign(x, x2, centers, mu32, labels, dmin, chunk_size, update=False)
    inertia = float(comm.sum(packed)[0].item())
    return centers, inertia, it, converged, reseeded


def _assign(x, x2, centers, mu32, labels, dmin, chunk_size, *, update: bool):
    """One assignment pass: labels and squared distances (in `labels`, `dmin`). With `update`: packed = [sums
    (k*d), counts (k), inertia, changed] (float64) and the local farthest points (distance, index); without:
    packed = [inertia]."""
    n, d = x.shape
    k = centers.shape[0]
    c32 = centers.float()
    # scores = |c|^2 + 2 mu.c - 2 c.x = |c|^2 - 2 c.(x - mu), without materialising x - mu; (k, rows) is the
    # faster matmul layout for small k.
    bias = ((c32 * c32).sum(1) + 2.0 * (c32 @ mu32))[:, None]
    previous = labels.clone() if update else None
    sums = torch.zeros(k, d, dtype=torch.float64, device=x.device)
    part = torch.empty(k, d, dtype=torch.float32, device=x.device)
    for i in range(0, n, chunk_size):
        block = x[i : i + chunk_size]
        best, lab = torch.addmm(bias, c32, block.T, alpha=-2.0).min(0)
        torch.add(x2[i : i + chunk_size], best, out=dmin[i : i + chunk_size])
        labels[i : i + chunk_size] = lab
        if update:
            part.zero_().index_add_(0, lab, block)
            sums += part
    dmin.clamp_min_(0)
    inertia = dmin.sum(dtype=torch.float64)
    if not update:
        return inertia[None], None
    counts = torch.bincount(labels, minlength=k).double()
    changed = (labels != previous).sum().double()
    packed = torch.cat([sums.flatten(), counts, inertia[None], changed[None]])
    top = torch.topk(dmin, min(k, n))
    return packed, (top.values, top.indices)


def _reseed_empty(x, labels, keys, far, empty, sums, counts, comm: _Comm) -> None:
    """Moves the points farthest from their centroids (over all ranks; ties: smaller key first) into the empty
    clusters, updating sums and counts in place, identically on every rank."""
    dist, idx = far
    cand_d = comm.gather_rows(dist.double())
    cand_k = comm.gather_rows(keys[idx])
    cand_l = comm.gather_rows(labels[idx])
    cand_x = comm.gather_rows(x[idx])
    order = torch.argsort(cand_k, stable=True)
    order = order[torch.argsort(-cand_d[order], stable=True)]
    for j, p in zip(empty.tolist(), order[: empty.numel()].tolist()):
        point, old = cand_x[p].double(), int(cand_l[p])
        sums[old] -= point
        counts[old] -= 1
        sums[j] = point
        counts[j] = 1


# ---------------------------------------------------------------------------------------------------------------------
# The prototype pass
# ---------------------------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the last hook of a forward: nothing after the last prompted layer is needed."""


@dataclass
class _Target:
    name: str
    layer: VisualPromptLayer
    index: int  # the prompted layer's slot index (the `layer` input of the priority keys)
    reservoir: _Reservoir
    tokens_seen: int = 0
    tokens_per_image: Optional[int] = None


def _unwrap(model, accelerator=None):
    if accelerator is not None:
        try:
            model = accelerator.unwrap_model(model)
        except Exception:  # pragma: no cover - unwrap_model only unwraps what it knows
            pass
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) and not hasattr(
        model, "peft_config"
    ):
        model = model.module  # DDP / DataParallel
    return model


def _resolve(peft_model, adapter_name: Optional[str], accelerator=None):
    """Returns (PeftModel, adapter name, config, [(module name, layer)] in prompted-layer order)."""
    from peft import PeftModel

    from .model import VisualPromptModel

    model = _unwrap(peft_model, accelerator)
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


def _pixel_values(batch) -> torch.Tensor:
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


def _batch_plan(dataloader, comm: _Comm, num_batches: Optional[int]):
    """Yields (batch, global sample indices) for this rank; returns also this rank's and the global batch counts
    (None when unknown). See the module docstring for how indices are defined."""
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
            mine = plan[comm.rank :: comm.world]
            kwargs = dict(
                batch_sampler=mine, collate_fn=dataloader.collate_fn, num_workers=dataloader.num_workers,
                pin_memory=dataloader.pin_memory, timeout=dataloader.timeout,
                worker_init_fn=dataloader.worker_init_fn,
            )
            if dataloader.num_workers > 0:
                kwargs.update(
                    multiprocessing_context=dataloader.multiprocessing_context,
                    prefetch_factor=dataloader.prefetch_factor,
                )
            loader = DataLoader(dataset, **kwargs)
            return zip(loader, (np.asarray(b, dtype=np.int64) for b in mine)), len(mine), len(plan)

    def every_batch() -> Iterator:
        offset = 0
        for j, batch in enumerate(islice(iter(dataloader), num_batches)):
            size = _pixel_values(batch).shape[0]
            if j % comm.world == comm.rank:
                yield batch, np.arange(offset, offset + size, dtype=np.int64)
            offset += size

    total = None
    try:
        total = len(dataloader)
        total = total if num_batches is None else min(total, num_batches)
    except TypeError:
        pass
    mine = None if total is None else len(range(comm.rank, total, comm.world))
    return every_batch(), mine, total


def _pool_windows(tokens: torch.Tensor, num_windows: int, strategy: str) -> torch.Tensor:
    """(B, N, C) -> (B, P, C): mean or max over P contiguous windows of the N tokens (torch.tensor_split sizes:
    the first N mod P windows have ceil(N/P) tokens, the others floor(N/P))."""
    windows = torch.tensor_split(tokens, num_windows, dim=1)
    if strategy == "mean":
        return torch.stack([w.mean(1) for w in windows], dim=1)
    return torch.stack([w.amax(1) for w in windows], dim=1)


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
) -> dict:
    """Initialises an adapter's prompts with prototypes of the tokens each prompted layer receives (SPT).

    Args:
        peft_model: A `PeftModel` with a visual-prompt adapter (DDP/accelerate wrappers are unwrapped).
        dataloader: Batches of dicts with `pixel_values`, `(pixel_values, labels)` tuples or bare pixel tensors.
            Pass the plain (not `accelerator.prepare`d) dataloader; a prepared one is unwrapped. See the module
            docstring for how batches are sharded and identified.
        strategy: How `num_prompt_tokens` prototypes are made from layer i's input tokens X_i (prefix tokens left out):

            - `"kmeans"`: K-means centroids (k = num_prompt_tokens) of a uniform sample of at most
              `max_tokens_per_layer` tokens, see `kmeans`.
            - `"mean"` / `"max"`: SPT's pooling. Each image's N tokens (in sequence order) are split into P =
              num_prompt_tokens contiguous windows (`torch.tensor_split`: the first N mod P windows hold ceil(N/P)
              tokens, the rest floor(N/P)); each window is mean- or max-pooled over its tokens, feature by feature,
              giving P candidate vectors per image. The prompts are P candidates drawn uniformly without replacement
              from all images' candidates (the P smallest priority keys over (image, window)), in key order.
              This follows the authors' code (SinAxCosB/Self-Prompt-Tuning, `prompt_generator`), which pools windows
              per image and then samples P pooled vectors; we split into P near-equal windows where it uses P-1
              windows of N // (P-1) tokens plus a remainder window. Averaging each window over the dataset instead
              would collapse per-image variation into P nearly collinear vectors.
            - `"random"`: P tokens drawn uniformly without replacement from all tokens the layer received.
        accelerator: An `accelerate.Accelerator` to shard the pass over processes and to run K-means on its device.
            None: one process, plain torch, K-means on the model's device. Under `torchrun` pass it, or every rank
            computes prompts from the data it is given on its own.
        max_tokens_per_layer: Tokens kept per layer for K-means (a bottom-k sample by priority key). The peak memory of
            the pass is bounded by this, not by the dataset. Default 65,536 (see `DEFAULT_MAX_TOKENS_PER_LAYER`).
        num_batches: Use only the first `num_batches` batches of the dataloader (counted globally, before sharding).
        seed: Seed of the priority keys and of K-means seeding.
        adapter_name: The adapter to initialise; default the active one.

    Returns:
        A dict: strategy, adapter, num_images, num_processes, and per prompted layer that owns prompts ("layers"):
        module name, width, tokens_seen, tokens_used (rows the prototypes were computed from), reservoir_peak
        (the most rows this rank ever stored for the layer), reservoir_capacity and, for K-means, inertia, iterations,
        converged; and "seconds": wall time of the pass over the data ("collect") and of the prototypes and the
        writing of the prompts ("prototypes"), on this rank. The adapter's config records `spt_init` (strategy,
        seed, images and tokens used), which `save_pretrained` writes to adapter_config.json.

    With `projection_dim` set, prompts live in projection_dim and one Linear per width maps them to the width. The
    prototypes P_w (all prompts of width w, stacked) are written exactly: the Linear's bias is their mean m, its
    weight an orthonormal basis Q of the span of P_w - m (padded with zero columns), and the prompts are the
    coordinates (P_w - m) Q (padded with zeros), so Linear(prompts) = P_w. This needs rank(P_w - m) <= projection_dim.
    """
    if strategy not in SPT_STRATEGIES:
        raise ValueError(f"Unknown SPT strategy {strategy!r}: use one of {list(SPT_STRATEGIES)}.")
    if not isinstance(max_tokens_per_layer, int) or max_tokens_per_layer < 1:
        raise ValueError(f"max_tokens_per_layer must be a positive integer, got {max_tokens_per_layer!r}.")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches < 1):
        raise ValueError(f"num_batches must be None or a positive integer, got {num_batches!r}.")
    model, adapter, config, layers = _resolve(peft_model, adapter_name, accelerator)
    comm = _Comm(accelerator)
    num_prompts = config.num_prompt_tokens
    owners = [(name, layer) for name, layer in layers if layer.prompt_slot[adapter].owns_prompts]
    param = next(model.parameters())
    model_device = param.device
    pixel_dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    device = comm.device if comm.device is not None else model_device
    capacity = max_tokens_per_layer if strategy == "kmeans" else num_prompts
    if strategy == "kmeans" and max_tokens_per_layer < num_prompts:
        raise ValueError(
            f"max_tokens_per_layer={max_tokens_per_layer} is smaller than num_prompt_tokens={num_prompts}: K-means "
            "needs at least one token per prototype. Raise max_tokens_per_layer."
        )
    if accelerator is None and torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1
    ):
        warnings.warn(
            "initialize_prompts runs as a single process (accelerator=None) inside a distributed job: each rank "
            "computes prompts from the batches it reads. Pass accelerator=Accelerator() to shard the pass and get "
            "identical prompts on every rank.",
            stacklevel=2,
        )

    targets = [
        _Target(name, layer, layer.prompt_slot[adapter].index, _Reservoir(capacity, layer.width, device))
        for name, layer in owners
    ]
    batches, local_batches, global_batches = _batch_plan(dataloader, comm, num_batches)
    if global_batches == 0:
        raise ValueError(
            "The dataloader yielded no batches: SPT needs images from the target data. Pass a non-empty dataloader "
            "(and num_batches >= 1)."
        )

    current = {"indices": None, "seen": 0}

    def make_hook(target: _Target):
        def hook(module, args, kwargs):
            tokens = module.received_tokens(args, kwargs).detach()
            samples = current["indices"]
            bsz, n_tokens = tokens.shape[0], tokens.shape[1]
            if bsz != len(samples):
                raise ValueError(
                    f"A batch holds {bsz} images but its sampler listed {len(samples)} indices; SPT needs a "
                    "collate_fn that keeps every sample, in order."
                )
            target.tokens_per_image = n_tokens
            target.tokens_seen += bsz * n_tokens
            if strategy in ("mean", "max"):
                if n_tokens < num_prompts:
                    raise ValueError(
                        f"'{strategy}' pooling splits each image's tokens into num_prompt_tokens={num_prompts} "
                        f"windows, but layer {target.name} receives only {n_tokens} tokens per image. Use fewer "
                        "prompt tokens, or strategy 'kmeans' or 'random'."
                    )
                rows = _pool_windows(tokens.to(device=device, dtype=torch.float32), num_prompts, strategy)
                n_pos = num_prompts
            else:
                rows, n_pos = tokens, n_tokens
            keys = torch.from_numpy(priority_keys(seed, target.index, samples, n_pos)).to(device).flatten()

            def take(idx: torch.Tensor) -> torch.Tensor:
                idx = idx.to(rows.device)
                return rows[idx // n_pos, idx % n_pos].to(device=device, dtype=torch.float32)

            target.reservoir.offer(keys, take)
            current["seen"] += 1
            if current["seen"] == len(targets):
                raise _StopForward

        return hook

    from tqdm.auto import tqdm

    modes = {m: m.training for m in model.modules()}
    handles = []
    images = 0
    progress = None
    started = time.perf_counter()
    try:
        for target in targets:
            handles.append(target.layer.register_forward_pre_hook(make_hook(target), with_kwargs=True))
        model.eval()
        progress = tqdm(total=local_batches, disable=not comm.is_main, desc=f"SPT {strategy} prototypes")
        with torch.no_grad(), model.disable_adapter():
            for batch, indices in batches:
                pixels = _pixel_values(batch).to(device=model_device, dtype=pixel_dtype)
                current["indices"], current["seen"] = indices, 0
                try:
                    model(pixel_values=pixels)
                except _StopForward:
                    pass
                if current["seen"] != len(targets):
                    raise RuntimeError(
                        f"Only {current['seen']} of the {len(targets)} prompted layers ran during a forward pass; "
                        "SPT needs every prompted layer to see the images."
                    )
                images += pixels.shape[0]
                progress.update(1)
    finally:
        if progress is not None:
            progress.close()
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training

    num_images = int(comm.sum(torch.tensor([images], dtype=torch.int64, device=device)).item())
    if num_images == 0:
        raise ValueError(
            "The dataloader yielded no images: SPT needs images from the target data. Pass a non-empty dataloader."
        )

    collected = time.perf_counter()
    prototypes, layer_stats = [], []
    for target in targets:
        proto, stats = _finish_layer(target, strategy, num_prompts, capacity, comm, seed, num_images)
        prototypes.append(proto)
        layer_stats.append(stats)

    _write_prompts(model, adapter, config, targets, prototypes, comm)

    tokens_used = [s["tokens_used"] for s in layer_stats]
    config.spt_init = {
        "strategy": strategy,
        "seed": seed,
        "num_images": num_images,
        "num_tokens": int(sum(tokens_used)),
        "tokens_used_per_layer": tokens_used,
        "tokens_seen_per_layer": [s["tokens_seen"] for s in layer_stats],
        "max_tokens_per_layer": max_tokens_per_layer if strategy == "kmeans" else None,
        "num_batches": global_batches,
        "num_processes": comm.world,
    }
    return {
        "strategy": strategy,
        "adapter": adapter,
        "num_images": num_images,
        "num_processes": comm.world,
        "layers": layer_stats,
        "seconds": {"collect": collected - started, "prototypes": time.perf_counter() - collected},
    }


def _finish_layer(target: _Target, strategy, num_prompts, capacity, comm: _Comm, seed, num_images):
    res = target.reservoir
    all_keys = comm.gather_rows(res.keys)
    tokens_seen = int(comm.sum(torch.tensor([target.tokens_seen], dtype=torch.int64, device=res.device)).item())
    kept = min(all_keys.numel(), capacity)
    if kept < num_prompts:
        what = "tokens" if strategy in ("kmeans", "random") else "pooled windows"
        raise ValueError(
            f"Layer {target.name} kept {kept} {what} from {num_images} images, fewer than num_prompt_tokens="
            f"{num_prompts}. Feed more images (or more batches: num_batches), or use fewer prompt tokens."
        )
    local = torch.ones(res.size, dtype=torch.bool, device=res.device)
    if all_keys.numel() > capacity:
        cut = torch.kthvalue(all_keys.cpu(), capacity).values.item()
        local = res.keys <= cut
    stats = {
        "name": target.name,
        "index": target.index,
        "width": target.layer.width,
        "tokens_per_image": target.tokens_per_image,
        "tokens_seen": tokens_seen,
        "tokens_used": kept,
        "reservoir_capacity": capacity,
        "reservoir_peak": res.peak,
    }
    if strategy == "kmeans":
        result = _kmeans(
            res.rows[local], num_prompts, comm=comm, seed=seed, max_iter=KMEANS_MAX_ITER, tol=KMEANS_TOL,
            n_init=KMEANS_N_INIT, sample_size=KMEANS_SEEDING_SAMPLE, chunk_size=None, keys=res.keys[local],
        )
        stats.update(
            inertia=result.inertia, iterations=result.n_iter, converged=result.converged,
            seeding_points=result.seeding_points, empty_clusters_reseeded=result.empty_clusters_reseeded,
        )
        return result.centroids, stats
    keys, rows = comm.gather_rows(res.keys[local]), comm.gather_rows(res.rows[local])
    return rows[torch.argsort(keys)][:num_prompts], stats


def _write_prompts(model, adapter, config: VisualPromptConfig, targets, prototypes, comm: _Comm) -> None:
    prototypes = [comm.broadcast(p.contiguous()) for p in prototypes]  # bitwise identical on every rank
    projections = getattr(model.base_model, "prompt_projection", None)
    projected = config.projection_dim is not None and projections is not None and adapter in projections
    with torch.no_grad():
        if not projected:
            for target, proto in zip(targets, prototypes):
                param = target.layer.prompt_embeddings[adapter]
                param.copy_(proto.to(device=param.device, dtype=param.dtype))
            return
        by_width: dict[int, list[int]] = {}
        for i, target in enumerate(targets):
            by_width.setdefault(target.layer.width, []).append(i)
        for width, members in by_width.items():
            linear = projections[adapter][str(width)]
            coords, weight, bias = _exact_projection(
                torch.cat([prototypes[i] for i in members]), config.projection_dim, width, len(members)
            )
            linear.weight.copy_(weight.to(linear.weight))
            linear.bias.copy_(bias.to(linear.bias))
            for j, i in enumerate(coords.split(config.num_prompt_tokens)):
                param = targets[members[j]].layer.prompt_embeddings[adapter]
                param.copy_(i.to(device=param.device, dtype=param.dtype))


def _exact_projection(stacked: torch.Tensor, projection_dim: int, width: int, num_layers: int):
    """Prompts, weight and bias such that prompts @ weight.T + bias == stacked (rows: prototypes of one width)."""
    m = stacked.double().cpu()
    mean = m.mean(0)
    centred = m - mean
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    tol = (s[0] * max(centred.shape) * torch.finfo(torch.float64).eps) if s.numel() else 0.0
    rank = int((s > tol).sum().item())
    if rank > projection_dim:
        raise ValueError(
            f"projection_dim={projection_dim} cannot hold the SPT prototypes exactly: the {m.shape[0]} prototypes "
            f"of width {width} ({num_layers} layer(s) x {m.shape[0] // max(num_layers, 1)} prompts) span an affine "
            f"subspace of rank {rank}. Use VisualPromptConfig(projection_dim>={rank}), fewer prompt tokens or "
            "prompted layers, or projection_dim=None."
        )
    basis = vh[:rank].T  # (width, rank), orthonormal columns
    weight = torch.zeros(width, projection_dim, dtype=torch.float64)
    weight[:, :rank] = basis
    coords = torch.zeros(m.shape[0], projection_dim, dtype=torch.float64)
    coords[:, :rank] = centred @ basis
    return coords, weight, mean


# ---------------------------------------------------------------------------------------------------------------------
# Prompt-patch mutual information
# ---------------------------------------------------------------------------------------------------------------------


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


def prompt_patch_nmi(peft_model, pixel_values: torch.Tensor, *, adapter_name: Optional[str] = None) -> list[float]:
    """SPT's prompt-patch NMI (see `nmi_from_tokens`) at the input of every prompted layer, in layer order.

    Runs the model with the adapter enabled (eval mode, no grad; modes are restored). Prompts are those each layer
    actually reads: deep, that layer's own (projected) prompts; shallow, the prompt tokens carried from the layer
    before. Patch tokens are that layer's input tokens without prefix and prompt tokens.
    """
    model, adapter, _config, layers = _resolve(peft_model, adapter_name)
    if model.active_adapter != adapter:
        raise ValueError(
            f"prompt_patch_nmi measures the active adapter; {adapter!r} is not active ({model.active_adapter!r} is). "
            "Call model.set_adapter(name) first."
        )
    param = next(model.parameters())
    pixels = pixel_values.to(device=param.device, dtype=param.dtype if param.dtype.is_floating_point else None)
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(position: int, layer: VisualPromptLayer):
        def hook(module, args, kwargs):
            prompts, patches = layer.prompts_and_patches(adapter, args, kwargs)
            captured[position] = (prompts.detach().float(), patches.detach().float())

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = []
    try:
        for position, (_, layer) in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(make_hook(position, layer), with_kwargs=True))
        model.eval()
        with torch.no_grad():
            model(pixel_values=pixels)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return [nmi_from_tokens(*captured[i]) for i in range(len(layers))]


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
    """

    def __init__(self, pixel_values: torch.Tensor, *, every_n_steps: Optional[int] = None, on_evaluate: bool = True,
                 trainer=None, prefix: str = "nmi") -> None:
        self.pixel_values = pixel_values
        self.every_n_steps = every_n_steps
        self.log_on_evaluate = on_evaluate
        self.trainer = trainer
        self.prefix = prefix
        self.history: list[tuple[int, list[float]]] = []

    def _log(self, state, model) -> dict[str, float]:
        values = prompt_patch_nmi(model, self.pixel_values)
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
