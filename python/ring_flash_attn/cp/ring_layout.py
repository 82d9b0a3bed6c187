"""The contiguous layout of the ring scheme: shard, unshard and local cu_seqlens of a batch.

Contiguous layout over N ranks: every sequence (length L) is cut into N pieces of equal length
and rank r holds piece r; sequences follow each other in the rank's tensor. A length that is not
a multiple of N is padded at the END of its sequence to ``P = ceil(L / N) N`` (each piece
``P / N`` rows): the padding rows are the last rows of the last pieces (``padding``). The ring
functions mask them given the real lengths (their ``seqlens`` argument); they cost the padded
rows, at most N - 1 per sequence.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor

from .padding import checked_cu, local_cu_seqlens, shard, unshard, with_shard_args_doc
from .validation import CuSeqlens, as_cu_tensor, check_world

__all__ = ["ring_local_cu_seqlens", "ring_shard", "ring_unshard"]


@with_shard_args_doc
def ring_shard(x: Tensor, cu_seqlens: Optional[CuSeqlens], rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s shard of a packed global batch (or of a batch of equal-length sequences)
    in the ring scheme's contiguous layout.

    {shard_args}

    Returns a new tensor on x's device: ``[total_local, ...]`` (packed; its local cu_seqlens is
    ``ring_local_cu_seqlens(cu_seqlens, world_size)``) or ``[B, ceil(S / N), ...]`` (batched),
    every sequence padded at its end with zero rows to a multiple of N. Pass the real lengths
    to the ring functions (``seqlens``); undo with ``ring_unshard``. Reads the lengths on the host
    (one device-to-host copy for a CUDA tensor: a setup step).
    """
    return shard("ring", x, cu_seqlens, rank, world_size)


def ring_unshard(shards: Sequence[Tensor], cu_seqlens: Optional[CuSeqlens], seqlen: Optional[int] = None) -> Tensor:
    """The inverse of ``ring_shard``: N local shards (rank order) -> the global batch in natural
    order without the padding. ``cu_seqlens``: the GLOBAL one of the packed batch; for batched
    shards ``[B, L, ...]`` pass None and the real global length ``seqlen`` (default N L). Pure
    tensor ops (no communication)."""
    return unshard("ring", shards, cu_seqlens, seqlen)


def ring_local_cu_seqlens(cu_seqlens: CuSeqlens, world_size: int) -> Tensor:
    """The LOCAL cu_seqlens of every rank (the same on all ranks) for the GLOBAL ``cu_seqlens``:
    sequence b has ``ceil(L_b / N)`` local rows (``cu_seqlens // N`` when every length is a
    multiple of N). A device op on a tensor input (no host read; values are checked where that
    is free: CPU tensors, lists); a list gives a CPU tensor."""
    check_world(world_size)
    cu = as_cu_tensor(cu_seqlens, "cu_seqlens")
    if cu.device.type == "cpu":
        checked_cu(cu, cu.device)
    return local_cu_seqlens("ring", cu, world_size)
