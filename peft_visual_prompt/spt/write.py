"""Writing SPT's prototypes into an adapter's prompts, exactly, with or without the prompt projection.

Prototypes are first broadcast from rank 0, so every rank writes bitwise identical prompts. Without a projection a
layer's prototypes are its prompts (`VisualPromptLayer.set_prompts`). With `projection_dim`, the layers of one width
share one Linear (`VisualPromptLayer.projection`); `exact_projection` finds prompts, weight and bias such that the
Linear maps the prompts exactly onto the prototypes. See docs/spt.md, "Projection".
"""

from __future__ import annotations

import torch

from .comm import Comm


def write_prompts(adapter: str, projection_dim, targets: list, prototypes: list[torch.Tensor], comm: Comm) -> None:
    """Writes `prototypes[i]` (num_prompts, width) as what `targets[i].layer` feeds for `adapter`. Everything is
    computed before anything is written, so an error (a projection too narrow) leaves the prompts as they were."""
    prototypes = [comm.broadcast(p.contiguous()) for p in prototypes]  # bitwise identical on every rank
    by_width: dict[int, list[int]] = {}
    for i, target in enumerate(targets):
        by_width.setdefault(target.layer.width, []).append(i)
    linears, prompts = {}, list(prototypes)
    for width, members in by_width.items():
        linear = targets[members[0]].layer.projection(adapter)
        if linear is None:
            continue
        coords, weight, bias = exact_projection(
            torch.cat([prototypes[i] for i in members]), projection_dim, width, len(members)
        )
        linears[width] = (linear, weight, bias)
        for i, values in zip(members, coords.split(prototypes[members[0]].shape[0])):
            prompts[i] = values
    with torch.no_grad():
        for linear, weight, bias in linears.values():
            linear.weight.copy_(weight.to(linear.weight))
            linear.bias.copy_(bias.to(linear.bias))
    for target, values in zip(targets, prompts):
        target.layer.set_prompts(adapter, values)


def exact_projection(stacked: torch.Tensor, projection_dim: int, width: int, num_layers: int):
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
    # A singular vector's sign is arbitrary, and float rounding in the prototypes (1e-7: k-means sums reduced in
    # another order on several ranks) can flip it. Fix it (sklearn's svd_flip): each column's largest entry positive.
    signs = torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)
    weight = torch.zeros(width, projection_dim, dtype=torch.float64)
    weight[:, :rank] = basis
    coords = torch.zeros(m.shape[0], projection_dim, dtype=torch.float64)
    coords[:, :rank] = centred @ basis
    return coords, weight, mean
