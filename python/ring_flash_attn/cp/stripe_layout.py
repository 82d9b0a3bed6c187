"""The stripe layout: shard and unshard of a batch.

Stripe layout over N ranks: rank r holds tokens ``r, r + N, r + 2N, ...`` of every sequence
(local token i is global token ``i N + r``). A length L that is not a multiple of N is padded at
the END of its sequence to ``P = ceil(L / N) N``: the padding is the last local row of the last
ranks (``padding``). The stripe functions mask it given the real lengths (their ``seqlens``
argument); it costs the padded rows, at most N - 1 per sequence.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from .padding import shard, unshard
from .validation import CuSeqlens

__all__ = ["stripe_shard", "stripe_unshard"]


def stripe_shard(x: Tensor, cu_seqlens: Optional[CuSeqlens], rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s stripe shard: batched ``x [B, S, ...]`` with ``cu_seqlens=None`` ->
    ``[B, ceil(S / N), ...]`` (what the stripe functions take), or packed ``x [total, ...]`` with
    GLOBAL ``cu_seqlens`` -> ``[total_local, ...]`` (each sequence ``ceil(L_b / N)`` rows).
    Every sequence is padded at its end with zero rows to a multiple of N; pass the real length
    to the stripe functions (``seqlens``) and undo with ``stripe_unshard``. A new tensor; reads
    the lengths on the host (a setup step)."""
    return shard("stripe", x, cu_seqlens, rank, world_size)


def stripe_unshard(shards: Sequence[Tensor], cu_seqlens: Optional[CuSeqlens], seqlen: Optional[int] = None) -> Tensor:
    """The inverse of ``stripe_shard``: N local shards (rank order) -> the global batch in natural
    order without the padding (batched: ``cu_seqlens=None`` and the real global length
    ``seqlen``, default N L). Pure tensor ops (no communication)."""
    return unshard("stripe", shards, cu_seqlens, seqlen)
