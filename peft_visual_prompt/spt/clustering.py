"""K-means for SPT's "kmeans" strategy: Lloyd's algorithm in torch, on one process or over the ranks of a run.

SPT's prototypes for the "kmeans" strategy are k-means centroids of a layer's tokens (k = num_prompt_tokens). This
module provides `kmeans` (greedy k-means++ seeding on a sample, then Lloyd's algorithm on all points, block-wise
float32 distances, sklearn's stopping rule) and its result type `KMeansResult`. In a distributed run every rank holds
its own points; seeding runs identically on every rank on a gathered sample and each Lloyd step all-reduces
per-cluster sums and counts. Module is named `clustering`, not `kmeans`, so that the exported function `kmeans` does
not shadow it. See docs/spt.md, "K-means" and "Distribution".
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from .comm import Comm

# K-means defaults: sklearn's `KMeans` defaults for the stopping rule, so inertias compare like for like.
KMEANS_MAX_ITER = 300
KMEANS_TOL = 1e-4
KMEANS_N_INIT = 3  # k-means++ seedings of the sample, the best (lowest potential) refined; the full data once
KMEANS_SEEDING_SAMPLE: Optional[int] = None  # points seeding uses; None: max(4096, 256 k), capped by the data
# Rows per block: blocks of about 1M values (4 MiB of float32, cache-friendly) bound the temporaries, and keep the
# number of torch calls per Lloyd step small for narrow tokens.
_CHUNK_ELEMENTS = 1 << 20


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
    `sample_size` points (default `KMEANS_SEEDING_SAMPLE`, or max(4096, 256 k) when that is None; the whole set when
    smaller), `n_init` times; the seeding with the lowest potential (sample inertia of its seeds) is refined by Lloyd
    on that sample, and the result starts Lloyd on the full data. On CPU it runs on one intra-op thread (`torch.set_num_threads(1)`, restored after): the steps
    are memory-bound, and short multi-threaded kernels stall badly on a machine other processes keep busy. Stopping:
    sklearn's rule, i.e. labels unchanged, or squared centre shift <= tol x mean per-feature variance, or `max_iter`.
    An empty cluster is re-seeded with the point farthest from its centroid (ties broken by smaller key), which
    leaves its old cluster.

    Distributed (`accelerator` with several processes): `x` holds this rank's points and `keys` (required, unique
    int64 over all ranks) their identities; the seeding sample is the `sample_size` smallest keys, gathered in key
    order, so every rank seeds identically, and Lloyd steps all-reduce float64 sums and counts. Single process:
    `keys` defaults to the row index.
    """
    return kmeans_on(
        x, k, comm=Comm(accelerator), seed=seed, max_iter=max_iter, tol=tol, n_init=n_init,
        sample_size=sample_size, chunk_size=chunk_size, keys=keys,
    )


def kmeans_on(x, k, *, comm: Comm, seed=0, max_iter=KMEANS_MAX_ITER, tol=KMEANS_TOL, n_init=KMEANS_N_INIT,
              sample_size=None, chunk_size=None, keys=None) -> KMeansResult:
    """`kmeans` over an existing `Comm` (what the prototype pass calls)."""
    if x.ndim != 2:
        raise ValueError(f"kmeans expects a 2-D (points, features) tensor, got shape {tuple(x.shape)}.")
    with _one_cpu_thread(x.device), torch.no_grad():  # centroids are data, not a function to differentiate
        x = x.float() if x.dtype != torch.float32 else x
        chunk_size = chunk_size or max(1024, _CHUNK_ELEMENTS // max(x.shape[1], k))
        if keys is None:
            if comm.world > 1:
                raise ValueError(
                    "Distributed kmeans needs `keys`: unique int64 identities of the points over all ranks."
                )
            keys = torch.arange(x.shape[0], device=x.device)
        keys = keys.to(x.device)
        n_total = int(comm.sum(torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device)).item())
        if n_total < k:
            raise ValueError(f"K-means needs at least k={k} points, got {n_total}.")
        if sample_size is None:
            sample_size = KMEANS_SEEDING_SAMPLE
        sample = _seeding_sample(x, keys, comm, min(n_total, sample_size or max(4096, 256 * k)), n_total)
        return _cluster(x, k, sample, keys, comm, n_total, seed=seed, max_iter=max_iter, tol=tol, n_init=n_init,
                        chunk_size=chunk_size)


def _seeding_sample(x, keys, comm: Comm, size: int, n_total: int) -> torch.Tensor:
    """The points with the `size` smallest keys over all ranks, in key order (identical on every rank)."""
    if size < n_total:
        cut = torch.kthvalue(comm.gather_rows(keys).cpu(), size).values.item()
        local = keys <= cut
        sample_keys, sample = comm.gather_rows(keys[local]), comm.gather_rows(x[local])
    else:
        sample_keys, sample = comm.gather_rows(keys), comm.gather_rows(x)
    return sample[torch.argsort(sample_keys)]


def _cluster(x, k, sample, keys, comm: Comm, n_total, *, seed, max_iter, tol, n_init, chunk_size) -> KMeansResult:
    """Seeds on `sample` (best of `n_init` k-means++ + Lloyd runs), then runs Lloyd on all points."""
    device, d = x.device, x.shape[1]
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

    # The best of `n_init` k-means++ seedings (lowest potential, i.e. sample inertia of the seeds), then Lloyd on the
    # sample, then on all points. Choosing among seedings by their potential instead of running Lloyd from each
    # costs one Lloyd run on the sample instead of n_init (docs/spt.md, "K-means").
    gen = torch.Generator().manual_seed(int(seed))
    init, _ = _kmeans_plusplus(sample, k, gen, max(1, n_init))
    centers, inertia, iters, _, _ = _lloyd(
        sample, sample_x2, init, mu=zero, comm=Comm(None), max_iter=max_iter, tol_abs=tol_abs,
        chunk_size=chunk_size, keys=torch.arange(sample.shape[0], device=device),
    )
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
    """Runs the block on one intra-op thread when on CPU (restored after); docs/spt.md, "K-means", says why."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _kmeans_plusplus(x: torch.Tensor, k: int, gen: torch.Generator, n_init: int = 1):
    """Greedy k-means++ (Arthur & Vassilvitskii; sklearn's `_kmeans_plusplus`) on centred float32 points, `n_init`
    seedings at once. Returns the centres (float64) of the seeding with the lowest potential (the sum of squared
    distances of the points to their nearest centre; ties: the first) and that potential (a float).

    The seedings run in lockstep so that each step reads the points once for all of them (one matmul of all their
    candidates: the step is bound by reading the points, not by the candidates' count). Random numbers come from a
    CPU generator, so the result does not depend on the device, and are drawn seeding after seeding, so the seeds
    are those of running the seedings one after the other."""
    n, device = x.shape[0], x.device
    trials = 2 + int(math.log(k))
    firsts, draws = [], []
    for _ in range(n_init):
        firsts.append(int(torch.randint(n, (1,), generator=gen).item()))
        draws.append(torch.rand(k - 1, trials, generator=gen, dtype=torch.float64))
    draws = torch.stack(draws, 1).to(device)  # (k - 1, n_init, trials)
    seedings = torch.arange(n_init, device=device)
    chosen = torch.empty(n_init, k, dtype=torch.int64, device=device)
    chosen[:, 0] = torch.tensor(firsts, device=device)
    x2 = (x * x).sum(1)
    closest = _distances_to(x, x2, chosen[:, 0])  # (n_init, n)
    potential = closest.double().sum(1)
    for c in range(1, k):
        cumulative = torch.cumsum(closest.double(), 1)
        candidates = torch.searchsorted(cumulative, draws[c - 1] * potential[:, None]).clamp_(max=n - 1)
        dist = _distances_to(x, x2, candidates.flatten()).view(n_init, trials, n)
        torch.minimum(dist, closest[:, None, :], out=dist)
        potentials = dist.double().sum(2)  # (n_init, trials)
        best = torch.argmin(potentials, 1)
        closest, potential = dist[seedings, best], potentials[seedings, best]
        chosen[:, c] = candidates[seedings, best]
    winner = int(torch.argmin(potential).item())
    return x[chosen[winner]].double(), float(potential[winner])


def _distances_to(x: torch.Tensor, x2: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Squared distances (float32, clamped at 0) of every point to the points `rows`: shape (len(rows), n)."""
    return (x2[None, :] - 2 * (x[rows] @ x.T) + x2[rows, None]).clamp_min_(0)


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


def _lloyd(x, x2, centers, *, mu, comm: Comm, max_iter, tol_abs, chunk_size, keys):
    """Lloyd iterations. `centers` (float64) are relative to `mu`; points `x` are absolute, `x2` = |x - mu|^2.
    Returns (centers relative to mu, final inertia, iterations, converged, empty clusters re-seeded).

    The per-cluster float64 sums are counted from every point once, then updated by the points that changed cluster
    (the same sums to float64 rounding), which leaves the distances as the only full pass over the points per step.
    A re-seeded cluster makes the next step recount."""
    n, d = x.shape
    k = centers.shape[0]
    mu32 = mu.float()
    labels = torch.full((n,), -1, dtype=torch.int64, device=x.device)
    dmin = torch.empty(n, dtype=torch.float32, device=x.device)
    sums = counts = None
    converged, reseeded, it = False, 0, 0
    for it in range(1, max_iter + 1):
        recount = sums is None
        packed = _assign(x, x2, centers, mu32, labels, dmin, chunk_size, update=True, recount=recount)
        packed = comm.sum(packed)
        new_sums, new_counts = packed[: k * d].view(k, d), packed[k * d : k * d + k]
        sums, counts = (new_sums, new_counts) if recount else (sums + new_sums, counts + new_counts)
        inertia, changed = float(packed[-2].item()), int(packed[-1].item())
        empty = (counts == 0).nonzero().squeeze(1)
        if empty.numel():
            reseeded += empty.numel()
            _reseed_empty(x, labels, keys, dmin, empty, sums, counts, comm)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None] - mu, centers)
        if empty.numel():
            sums = None  # the re-seeded points keep their old labels: recount next step
        if changed == 0 and not empty.numel():
            # Labels as in the step before, so `new` equals the centres this pass used (the same sums of the same
            # points): its inertia is the final one.
            return new, inertia, it, True, reseeded
        shift = float(((new - centers) ** 2).sum().item())
        centers = new
        if shift <= tol_abs:
            converged = True
            break
    packed = _assign(x, x2, centers, mu32, labels, dmin, chunk_size, update=False)
    inertia = float(comm.sum(packed)[0].item())
    return centers, inertia, it, converged, reseeded


def _assign(x, x2, centers, mu32, labels, dmin, chunk_size, *, update: bool, recount: bool = True):
    """One assignment pass: labels and squared distances (in `labels`, `dmin`). With `update`: packed = [sums
    (k*d), counts (k), inertia, changed] (float64); sums and counts are of every point with `recount`, else the
    changes from the points that changed cluster. Without `update`: packed = [inertia]."""
    n, d = x.shape
    k = centers.shape[0]
    c32 = centers.float()
    # scores = |c|^2 + 2 mu.c - 2 x.c = |x - c|^2 - |x - mu|^2, without materialising x - mu
    scores = _scorer(c32, (c32 * c32).sum(1) + 2.0 * (c32 @ mu32))
    previous = labels.clone() if update else None
    sums = torch.zeros(k, d, dtype=torch.float64, device=x.device)
    for i in range(0, n, chunk_size):
        block = x[i : i + chunk_size]
        lab = labels[i : i + chunk_size]
        scores(block, dmin[i : i + chunk_size], lab)
        if update and recount:
            sums.index_add_(0, lab, block.double())
    dmin.add_(x2).clamp_min_(0)
    inertia = dmin.sum(dtype=torch.float64)
    if not update:
        return inertia[None]
    moved = (labels != previous).nonzero().squeeze(1)
    if recount:
        counts = torch.bincount(labels, minlength=k).double()
    else:  # previous labels are all >= 0 after a recount; blocks of moved points bound the float64 copies
        for i in range(0, moved.numel(), chunk_size):
            rows = moved[i : i + chunk_size]
            points = x[rows].double()
            sums.index_add_(0, labels[rows], points).index_add_(0, previous[rows], points, alpha=-1)
        counts = (torch.bincount(labels[moved], minlength=k) - torch.bincount(previous[moved], minlength=k)).double()
    changed = torch.tensor([float(moved.numel())], dtype=torch.float64, device=x.device)
    return torch.cat([sums.flatten(), counts, inertia[None], changed])


def _scorer(c32: torch.Tensor, bias: torch.Tensor):
    """A function (block, best_out, label_out) writing each row's lowest score `bias - 2 row.c` and its centre.

    On CPU the scores come from oneDNN's linear kernel (`torch.ops.mkldnn._linear_pointwise`, what torch's own
    compiler emits for CPU linears): its code is generated for the running CPU, while MKL's sgemm handles these
    skinny shapes poorly and prefers another layout on each CPU (on an AMD EPYC, K-means with it took 1.2x or 1.7x
    as long, by layout; benchmarks/prototypes.py --section kernel, docs/spt.md "K-means").
    Elsewhere, or in a torch build without it: one addmm in the (k, rows) layout."""
    linear = _onednn_linear() if c32.device.type == "cpu" and torch.backends.mkldnn.enabled else None
    if linear is not None:
        weight = c32 * -2.0  # times a power of two: exact

        def scores(block, best_out, label_out):
            torch.min(linear(block, weight, bias, "none", [], ""), 1, out=(best_out, label_out))
    else:
        def scores(block, best_out, label_out):
            torch.min(torch.addmm(bias[:, None], c32, block.T, alpha=-2.0), 0, out=(best_out, label_out))
    return scores


@functools.cache
def _onednn_linear():
    """torch's oneDNN linear op if this build has it and it computes a linear (checked once); else None."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.rand(shape, generator=gen) for shape in ((37, 24), (5, 24), (5,)))
        ok = torch.allclose(op(x, w, b, "none", [], ""), torch.addmm(b, x, w.T), rtol=1e-5, atol=1e-5)
    except (AttributeError, RuntimeError, TypeError):
        return None
    return op if ok else None


def _reseed_empty(x, labels, keys, dmin, empty, sums, counts, comm: Comm) -> None:
    """Moves the points farthest from their centroids (over all ranks; ties: smaller key first) into the empty
    clusters, updating sums and counts in place, identically on every rank."""
    dist, idx = torch.topk(dmin, min(sums.shape[0], dmin.shape[0]))
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
