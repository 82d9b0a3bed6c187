"""Row index maps built on the device from cumulative lengths (no host read)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["inverse_permutation", "sequence_of"]


def sequence_of(rows: Tensor, cu: Tensor) -> Tensor:
    """For each row index, the sequence b with cu[b] <= row < cu[b+1] (int64, clamped to [0, B-1])."""
    b = torch.searchsorted(cu, rows, right=True) - 1
    return b.clamp_(0, cu.shape[0] - 2)


def inverse_permutation(perm: Tensor) -> Tensor:
    """inv with inv[perm[i]] = i, by a scatter (no host sync)."""
    inv = torch.empty_like(perm)
    inv.scatter_(0, perm, torch.arange(perm.shape[0], device=perm.device, dtype=perm.dtype))
    return inv
