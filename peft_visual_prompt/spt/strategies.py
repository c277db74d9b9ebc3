"""SPT's strategies: what rows a layer offers per image, and its prototypes from the rows the ranks kept.

"kmeans" and "random" offer every token; "mean" and "max" offer one pooled vector per window of each image's tokens
(`candidate_rows`). After the pass, `layer_prototypes` finds the rows kept over all ranks (the globally smallest
priority keys) and makes the layer's `num_prompt_tokens` prototypes: k-means centroids of them ("kmeans") or the
rows themselves in key order ("random", "mean", "max"). It also returns the layer's statistics. See docs/spt.md.
"""

from __future__ import annotations

import torch

from . import clustering
from .comm import Comm


def pool_windows(tokens: torch.Tensor, num_windows: int, strategy: str) -> torch.Tensor:
    """(B, N, C) -> (B, P, C): mean or max over P contiguous windows of each image's N tokens (torch.tensor_split
    sizes: the first N mod P windows have ceil(N/P) tokens, the others floor(N/P); e.g. N = 10, P = 4: [0, 3), [3, 6),
    [6, 8), [8, 10)).

    SPT's paper pools non-overlapping windows of floor(N_e·B / N_p) tokens over a random batch's tokens (dropping the
    remainder); its official code cuts each image into P-1 windows of N // (P-1) tokens plus one window of the
    N mod (P-1) remaining tokens (the whole sequence when that is 0). These windows keep the paper's equal,
    non-overlapping windows and the code's per-image cut, and drop no token (docs/spt.md, "Mean and max pooling
    windows")."""
    windows = torch.tensor_split(tokens, num_windows, dim=1)
    if strategy == "mean":
        return torch.stack([w.mean(1) for w in windows], dim=1)
    return torch.stack([w.amax(1) for w in windows], dim=1)


def candidate_rows(tokens: torch.Tensor, strategy: str, num_prompts: int, layer_name: str,
                   device: torch.device) -> torch.Tensor:
    """(B, N, C) tokens -> (B, positions, C) rows each image offers: the tokens, or P pooled windows."""
    if strategy not in ("mean", "max"):
        return tokens
    if tokens.shape[1] < num_prompts:
        raise ValueError(
            f"'{strategy}' pooling splits each image's tokens into num_prompt_tokens={num_prompts} "
            f"windows, but layer {layer_name} receives only {tokens.shape[1]} tokens per image. Use fewer "
            "prompt tokens, or strategy 'kmeans' or 'random'."
        )
    return pool_windows(tokens.to(device=device, dtype=torch.float32), num_prompts, strategy)


def layer_prototypes(target, strategy: str, num_prompts: int, capacity: int, comm: Comm, seed: int,
                     num_images: int) -> tuple[torch.Tensor, dict]:
    """(num_prompts, width) prototypes of one target layer from what the ranks kept, and the layer's statistics."""
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
        result = clustering.kmeans_on(res.rows[local], num_prompts, comm=comm, seed=seed, keys=res.keys[local])
        stats.update(
            inertia=result.inertia, iterations=result.n_iter, converged=result.converged,
            seeding_points=result.seeding_points, empty_clusters_reseeded=result.empty_clusters_reseeded,
        )
        return result.centroids, stats
    keys, rows = comm.gather_rows(res.keys[local]), comm.gather_rows(res.rows[local])
    return rows[torch.argsort(keys)][:num_prompts], stats
