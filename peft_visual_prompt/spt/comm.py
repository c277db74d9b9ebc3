"""Rank communication for SPT: a thin layer over `accelerate`, and the identity without it.

The prototype pass and distributed k-means need four collective operations (sum, gather rows of unequal counts,
broadcast a tensor, broadcast a Python object). `Comm` offers them over an `accelerate.Accelerator` with several
processes, and as no-ops for one process (no accelerator, or an accelerator with one process), so that the rest of
the package is written once. See docs/spt.md, "Distribution".
"""

from __future__ import annotations

import torch


class Comm:
    """Collectives over the processes of `accelerator` (one process when it is None or not distributed)."""

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
