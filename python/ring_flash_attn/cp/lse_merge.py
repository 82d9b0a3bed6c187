"""Merging partial attention results through their log-sum-exp.

Two partial results over disjoint key sets, ``(out_a, lse_a)`` and ``(out_b, lse_b)``, combine
into the result over both: ``lse = logaddexp(lse_a, lse_b)``,
``out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b`` (per row and head). The accumulators
are kept in fp32 (fp64 for fp64 inputs) by the caller.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["merge_partial"]


def merge_partial(out_acc: Tensor, lse_acc: Tensor, index: Optional[Tensor], out_blk: Tensor,
                  lse_blk: Tensor) -> None:
    """Merges a partial result (out_blk ``[n, H, D]``, lse_blk ``[H, n]``) into the rows ``index``
    (int64 ``[n]``; None: all rows) of the accumulators (out_acc ``[T, H, D]``, lse_acc
    ``[H, T]``; in place, in their dtype). A row whose merged lse is -inf (no key yet) gets
    weights 0."""
    la = lse_acc if index is None else lse_acc.index_select(1, index)
    oa = out_acc if index is None else out_acc.index_select(0, index)
    lb = lse_blk.to(la.dtype)
    new = torch.logaddexp(la, lb)
    safe = torch.where(torch.isneginf(new), torch.zeros_like(new), new)  # rows with no key yet
    wa = torch.exp(la - safe).t().unsqueeze(-1)
    wb = torch.exp(lb - safe).t().unsqueeze(-1)
    merged = oa * wa + out_blk.to(oa.dtype) * wb
    if index is None:
        out_acc.copy_(merged)
        lse_acc.copy_(new)
    else:
        out_acc.index_copy_(0, index, merged)
        lse_acc.index_copy_(1, index, new)
