"""The contiguous layout of llama3 context parallelism: the per-rank metadata helper.

Contiguous layout over N ranks: the packed batch (``T`` tokens, ``T % N == 0``, any sequence
lengths) is cut into N pieces of ``T / N`` tokens and rank r holds tokens ``[r T/N, (r+1) T/N)``
(its pieces of the sequences it touches). Its K/V need is a contiguous slice of the all-gathered
K/V, ``local_k_slice``.
"""

from __future__ import annotations

import bisect
from typing import Tuple

import torch
from torch import Tensor

from .validation import CuSeqlens, as_cu_tensor, check_cumulative_values, check_world

__all__ = ["llama3_flash_attn_prepare_cu_seqlens"]


def llama3_flash_attn_prepare_cu_seqlens(
    cu_seqlens: CuSeqlens, causal: bool, rank: int, world_size: int
) -> Tuple[Tensor, Tensor, int, int, slice]:
    """Upstream ring-flash-attention's helper for the CONTIGUOUS (non-zigzag) llama3 layout.

    Rank r holds global tokens ``[r T/N, (r+1) T/N)`` of the packed batch (T = cu_seqlens[-1],
    divisible by N). Returns ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
    local_k_slice)``: the rank's pieces of the sequences it touches (relative to its first token),
    the matching key lengths in the gathered K/V from ``local_k_slice.start`` (causal: keys up to
    the rank's last token; non-causal: up to the end of the last sequence it touches), their
    maxima, and the slice of the gathered K/V (natural order) that the rank needs.

    Kept so that scripts written for upstream run unchanged; the zigzag function
    takes ``zigzag_llama3_prepare_cu_seqlens``'s metadata instead (passing this helper's
    ``local_k_slice`` to it is harmless: it always uses the whole gathered K/V).

    A setup step: it reads cu_seqlens on the host (one device-to-host copy for a CUDA tensor) and
    checks the values it reads: ValueError naming ``cu_seqlens`` for a first entry other than 0,
    a decreasing entry, a total not divisible by ``world_size``, or (a list) an entry outside
    int32. Under ``torch.compile`` it runs outside the graph (one graph break): its outputs
    include a slice whose bounds are read from cu_seqlens, which a graph cannot return.
    """
    check_world(world_size, rank)
    cu = as_cu_tensor(cu_seqlens, "cu_seqlens")
    return _prepare_on_host(cu, bool(causal), rank, world_size)


@torch.compiler.disable
def _prepare_on_host(cu: Tensor, causal: bool, rank: int, world_size: int) -> Tuple[Tensor, Tensor, int, int, slice]:
    """llama3_flash_attn_prepare_cu_seqlens on the values of ``cu`` (int32 ``[B + 1]``, checked here)."""
    values = cu.tolist()
    check_cumulative_values(values, "cu_seqlens")
    total = values[-1]
    if total % world_size:
        raise ValueError(f"cu_seqlens: expected a total length divisible by world_size {world_size}, got {total}")
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
