"""The contiguous layout of llama3 context parallelism: the per-rank metadata, shard and unshard helpers.

Contiguous layout over N ranks: the packed batch (``T`` tokens, any sequence lengths) is cut into
N pieces of ``T_p / N`` tokens, ``T_p = ceil(T / N) N``, and rank r holds tokens
``[r T_p/N, (r+1) T_p/N)`` (its pieces of the sequences it touches). When T is not a multiple of
N, the ``T_p - T < N`` rows after the last sequence are padding (``llama3_shard`` fills them with
zeros) and form a sequence of their own, so no real token ever sees them (and they see no real
token); ``llama3_unshard`` drops them. Its K/V need is a contiguous slice of the all-gathered
K/V, ``local_k_slice``.
"""

from __future__ import annotations

import bisect
from typing import Sequence, Tuple

import torch
from torch import Tensor

from .padding import checked_cu
from .validation import CuSeqlens, as_cu_tensor, check_cumulative_values, check_world

__all__ = ["llama3_flash_attn_prepare_cu_seqlens", "llama3_shard", "llama3_unshard"]


def llama3_flash_attn_prepare_cu_seqlens(
    cu_seqlens: CuSeqlens, causal: bool, rank: int, world_size: int
) -> Tuple[Tensor, Tensor, int, int, slice]:
    """Upstream ring-flash-attention's helper for the CONTIGUOUS (non-zigzag) llama3 layout.

    Rank r holds global tokens ``[r T_p/N, (r+1) T_p/N)`` of the packed batch (T = cu_seqlens[-1]
    padded to a multiple of N, ``T_p``: the padding is a sequence of its own after the last one,
    see the module docstring; ``llama3_shard`` lays the tensors out so). Returns
    ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice)``: the rank's
    pieces of the sequences it touches (relative to its first token), the matching key lengths
    in the gathered K/V from ``local_k_slice.start`` (causal: keys up to the rank's last token;
    non-causal: up to the end of the last sequence it touches), their maxima, and the slice of
    the gathered K/V (natural order) that the rank needs.

    Kept so that scripts written for upstream run unchanged; the zigzag function
    takes ``zigzag_llama3_prepare_cu_seqlens``'s metadata instead (passing this helper's
    ``local_k_slice`` to it is harmless: it always uses the whole gathered K/V).

    A setup step: it reads cu_seqlens on the host (one device-to-host copy for a CUDA tensor) and
    checks the values it reads: ValueError naming ``cu_seqlens`` for a first entry other than 0,
    a decreasing entry, or (a list) an entry outside int32. Under ``torch.compile`` it runs
    outside the graph (one graph break): its outputs include a slice whose bounds are read from
    cu_seqlens, which a graph cannot return.
    """
    check_world(world_size, rank)
    cu = as_cu_tensor(cu_seqlens, "cu_seqlens")
    return _prepare_on_host(cu, bool(causal), rank, world_size)


@torch.compiler.disable
def _prepare_on_host(cu: Tensor, causal: bool, rank: int, world_size: int) -> Tuple[Tensor, Tensor, int, int, slice]:
    """llama3_flash_attn_prepare_cu_seqlens on the values of ``cu`` (int32 ``[B + 1]``, checked here)."""
    values = cu.tolist()
    check_cumulative_values(values, "cu_seqlens")
    total = _padded_total(values[-1], world_size)
    if total != values[-1]:
        values = values + [total]  # the padding: a sequence of its own
    per_rank = total // world_size
    start, end = rank * per_rank, (rank + 1) * per_rank
    first = bisect.bisect_left(values, start)  # sequence holding the rank's first token
    if first == len(values) or values[first] != start:
        first -= 1
    # boundary at or after the rank's last token (at least one piece, also for an empty batch)
    last = max(bisect.bisect_left(values, end), first + 1)
    bounds = values[first:last + 1]
    q_bounds = [min(max(x - start, 0), per_rank) for x in bounds]
    slice_left = bounds[0]
    slice_right = end if causal else bounds[-1]
    k_bounds = [x - slice_left for x in bounds]
    k_bounds[-1] = slice_right - slice_left
    max_q = max(q_bounds[i + 1] - q_bounds[i] for i in range(len(q_bounds) - 1))
    max_k = max(k_bounds[i + 1] - k_bounds[i] for i in range(len(k_bounds) - 1))
    cu_q = torch.tensor(q_bounds, dtype=torch.int32, device=cu.device)
    cu_k = torch.tensor(k_bounds, dtype=torch.int32, device=cu.device)
    return cu_q, cu_k, max_q, max_k, slice(slice_left, slice_right)


def _padded_total(total: int, world_size: int) -> int:
    """The packed total rounded up to a multiple of world_size."""
    return -(-total // world_size) * world_size


def llama3_shard(x: Tensor, cu_seqlens: CuSeqlens, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s contiguous piece of a packed global batch ``x [total, ...]`` (GLOBAL
    ``cu_seqlens``, last entry ``total``, any total): rows ``[r T_p/N, (r+1) T_p/N)`` of x padded
    with zero rows to ``T_p = ceil(total / N) N`` (the padding rows of the last ranks form a
    sequence of their own in ``llama3_flash_attn_prepare_cu_seqlens``'s metadata). A new tensor
    ``[T_p / N, ...]``; undo with ``llama3_unshard``. Reads the lengths on the host (a setup step)."""
    check_world(world_size, rank)
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError(f"x: expected a tensor with a token dim 0, got {getattr(x, 'shape', type(x).__name__)}")
    checked_cu(cu_seqlens, x.device, x.shape[0], " (the rows of x)")
    per_rank = _padded_total(x.shape[0], world_size) // world_size
    start, stop = rank * per_rank, (rank + 1) * per_rank
    piece = x[min(start, x.shape[0]):min(stop, x.shape[0])]
    pad = per_rank - piece.shape[0]
    if pad == 0:
        return piece.clone()
    return torch.cat([piece, x.new_zeros((pad,) + tuple(x.shape[1:]))])


def llama3_unshard(shards: Sequence[Tensor], cu_seqlens: CuSeqlens) -> Tensor:
    """The inverse of ``llama3_shard``: N local pieces (rank order) -> the global batch without
    the padding rows. Pure tensor ops (no communication)."""
    shards = list(shards)
    if not shards:
        raise ValueError("shards: expected one tensor per rank, got an empty list")
    for i, t in enumerate(shards):
        if not isinstance(t, Tensor) or t.dim() < 1 or t.shape != shards[0].shape:
            raise ValueError(f"shards[{i}]: expected a tensor of the shape of shards[0] {tuple(shards[0].shape)}, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    cu = checked_cu(cu_seqlens, shards[0].device)
    total = int(cu[-1])
    per_rank = _padded_total(total, len(shards)) // len(shards)
    if shards[0].shape[0] != per_rank:
        raise ValueError(f"shards: expected {per_rank} rows per rank (ceil of the total {total} over {len(shards)} "
                         f"ranks), got {shards[0].shape[0]}")
    return torch.cat(shards)[:total]
