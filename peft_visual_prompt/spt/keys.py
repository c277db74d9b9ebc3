"""Priority keys and the bounded reservoir: how SPT samples tokens uniformly with memory that does not grow.

Every candidate row (a token, or a pooled window) gets a 63-bit key, a hash of (seed, prompted layer, global sample
index, position). A layer keeps the rows with the smallest keys (a bottom-k sample, the hashed form of reservoir
sampling), so what is kept depends neither on the order of arrival nor on how the data is split over processes.
`Reservoir` holds those rows with storage that never exceeds its capacity. See docs/spt.md, "Priority keys".
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

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


class Reservoir:
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
        if self.size + keys.numel() <= self.capacity:
            self._append(keys, take(idx))
        else:
            self._merge(keys, idx, take)
        self._max_key = self.keys.max()
        self.peak = max(self.peak, self.size)

    def _append(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        n_old, m = self.size, keys.numel()
        self._reserve(n_old + m)
        self._rows[n_old : n_old + m] = rows
        self._keys[n_old : n_old + m] = keys
        self.size = n_old + m

    def _merge(self, keys: torch.Tensor, idx: torch.Tensor, take: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Keeps the `capacity` smallest of the stored and the offered keys; new rows fill the evicted slots."""
        n_old = self.size
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
