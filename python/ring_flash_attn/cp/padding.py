"""Sequences whose length does not divide: how the per-sequence layouts pad them.

The ring, zigzag and stripe layouts cut EVERY sequence into pieces of equal length, one per rank
(zigzag: two per rank). A sequence of S tokens whose length is not a multiple of the layout's unit
(``layout_unit``: N for ring and stripe, 2N for zigzag, N ranks) is laid out as if it had
``P >= S`` tokens (the shard helpers use the smallest such P, ``padded_lengths``): positions
``[S, P)`` are padding, at the END of the sequence. Each rank then holds P / N rows of it, and
because the padding comes last in the sequence's global order, the real rows of every rank's
piece form a PREFIX of that piece (zigzag: the piece is chunk r then chunk 2N-1-r, and a chunk
holds padding only when every later chunk is all padding). ``real_rows`` counts them.

The schemes mask the padding through lengths, never by letting padding rows act as keys: a
scheme splits each local sequence into its real prefix and its padding suffix (two sequences
for the kernels), gives the real prefix only real keys (``seqused_k``) and the padding suffix no
key at all, so padding rows get O = 0, LSE = -inf and no gradient, whatever values they hold.

Everything here is tensor arithmetic on the device of its inputs (no host read).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .index_maps import sequence_of
from .validation import CuSeqlens, as_cu_tensor, check_cumulative_values, check_world

__all__ = ["LAYOUTS", "SeqlensArg", "checked_cu", "layout_unit", "local_cu_seqlens", "local_positions",
           "padded_lengths", "real_rows", "shard", "shard_rows", "shard_sequences", "split_keys", "split_padding",
           "split_queries", "split_used", "unshard", "unshard_index", "unshard_sequences", "with_shard_args_doc"]

# The per-sequence layouts: "ring" (contiguous pieces), "zigzag" (chunks r and 2N-1-r), "stripe"
# (tokens r, r + N, ...).
LAYOUTS = ("ring", "zigzag", "stripe")


def layout_unit(layout: str, world_size: int) -> int:
    """The multiple every padded sequence length is a multiple of: 2N for zigzag, N otherwise."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    return 2 * world_size if layout == "zigzag" else world_size


def padded_lengths(lengths: Tensor, unit: int) -> Tensor:
    """Each length rounded up to a multiple of ``unit`` (the smallest padding), int64."""
    lengths = lengths.to(torch.int64)
    return torch.div(lengths + (unit - 1), unit, rounding_mode="floor") * unit


def local_positions(layout: str, pos_in_piece: Tensor, local_len: Tensor, holder: int, world_size: int) -> Tensor:
    """The position in its (padded) sequence of row ``pos_in_piece`` of rank ``holder``'s piece of
    that sequence, the piece being ``local_len`` rows (int64 tensors of one shape)."""
    N = world_size
    if layout == "ring":
        return holder * local_len + pos_in_piece
    if layout == "stripe":
        return pos_in_piece * N + holder
    if layout == "zigzag":
        c = torch.div(local_len, 2, rounding_mode="floor")
        second = pos_in_piece >= c
        chunk = torch.where(second, 2 * N - 1 - holder, holder)
        return chunk * c + pos_in_piece - second.to(torch.int64) * c
    raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def real_rows(layout: str, select: str, seqlens: Tensor, local_len: Tensor, holder: Union[int, Tensor],
              world_size: int) -> Tensor:
    """int64 ``[B]``: how many rows of a row set of rank ``holder``'s pieces are real (a prefix of
    the row set), for sequences of ``seqlens`` real tokens laid out with ``local_len`` rows per
    rank (both int64 ``[B]``, ``seqlens <= N * local_len``). ``holder`` may be an int64 tensor
    ``[H, 1]`` of ranks: the counts of every one of them, ``[H, B]``.

    select: "all" (the whole piece), "front" / "back" (zigzag: chunk ``holder`` / chunk
    ``2N-1-holder``), "drop_first" / "drop_last" (the piece but its first / last row)."""
    N, S, n = world_size, seqlens, local_len
    if layout == "ring":
        count = (S - holder * n).clamp(min=0)
        count = torch.minimum(count, n)
    elif layout == "stripe":
        # local row i is position i N + holder: real iff i N + holder < S
        count = torch.div(S - holder + (N - 1), N, rounding_mode="floor").clamp(min=0)
        count = torch.minimum(count, n)
    elif layout == "zigzag":
        c = torch.div(n, 2, rounding_mode="floor")
        front = torch.minimum((S - holder * c).clamp(min=0), c)
        back = torch.minimum((S - (2 * N - 1 - holder) * c).clamp(min=0), c)
        if select == "front":
            return front
        if select == "back":
            return back
        count = front + back
    else:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if select == "all":
        return count
    if select == "drop_first":
        return (count - 1).clamp(min=0)
    if select == "drop_last":
        return torch.minimum(count, (n - 1).clamp(min=0))
    raise ValueError(f"select: expected a row set of the {layout} layout, got {select!r}")


def split_queries(cu_q: Tensor, q_real: Tensor) -> Tensor:
    """int32 ``[..., 2B+1]``: the query side of ``split_padding`` (``q_real`` int64 ``[..., B]``)."""
    cq = cu_q.to(torch.int64)
    starts = cq[:-1].expand_as(q_real)
    pairs = torch.stack([starts, starts + q_real], dim=-1).flatten(-2)
    return torch.cat([pairs, cq[-1:].expand(q_real.shape[:-1] + (1,))], dim=-1).to(torch.int32)


def split_keys(cu_k: Tensor) -> Tensor:
    """int32 ``[2B+1]``: the key side of ``split_padding``: each sequence's keys, then an empty range."""
    ends = cu_k[1:]
    return torch.cat([cu_k[:1], torch.stack([ends, ends], dim=-1).flatten()]).to(torch.int32)


def split_used(k_used: Tensor) -> Tensor:
    """int32 ``[..., 2B]``: the seqused_k of ``split_padding`` (``k_used`` ``[..., B]``), 0 for
    every padding sequence."""
    return torch.stack([k_used, torch.zeros_like(k_used)], dim=-1).flatten(-2).to(torch.int32)


def split_padding(cu_q: Tensor, cu_k: Tensor, q_real: Tensor, k_used: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Kernel metadata that separates each sequence's padding: sequence b (query rows
    ``[cu_q[b], cu_q[b+1])``, keys ``[cu_k[b], cu_k[b+1])``) becomes two sequences, its first
    ``q_real[b]`` query rows against its first ``k_used[b]`` keys, then its other query rows
    against no key (O = 0, LSE = -inf, no gradient). Returns int32 ``(cu_seqlens_q [..., 2B+1],
    cu_seqlens_k [2B+1], seqused_k [..., 2B])`` (``q_real``, ``k_used``: int64 ``[..., B]``, for
    several query groups at once); the padding keys are never read."""
    return split_queries(cu_q, q_real), split_keys(cu_k), split_used(k_used)


# ---- sharding ------------------------------------------------------------------------------------


def shard_rows(layout: str, cu_seqlens: Tensor, rank: int, world_size: int) -> Tuple[Tensor, Tensor, int]:
    """The rows of rank ``rank``'s shard of a packed batch with GLOBAL cumulative lengths
    ``cu_seqlens`` (int32/int64 ``[B+1]``, any lengths), each sequence padded to the layout's
    unit. Returns ``(source, local_cu, total_local)``: int64 ``[total_local]``, for each local
    row its global row, or ``cu_seqlens[-1]`` (one past the last) for a padding row; the local
    cumulative lengths (int32 ``[B+1]``); and the number of local rows (a host int: one
    device-to-host read for a CUDA tensor)."""
    N = world_size
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    local_cu = local_cu_seqlens(layout, cu, N).to(torch.int64)
    local_len = local_cu[1:] - local_cu[:-1]
    total_local = int(local_cu[-1])
    rows = torch.arange(total_local, device=cu.device, dtype=torch.int64)
    b = sequence_of(rows, local_cu)
    pos = local_positions(layout, rows - local_cu[b], local_len[b], rank, N)
    source = torch.where(pos < lengths[b], cu[b] + pos, cu[-1])
    return source, local_cu.to(torch.int32), total_local


def local_cu_seqlens(layout: str, cu_seqlens: Tensor, world_size: int) -> Tensor:
    """int32 ``[B+1]``: the LOCAL cumulative lengths of every rank's shard (the same on all
    ranks): sequence b has ``ceil(L_b / unit) * unit / N`` local rows. A device op (no host read)."""
    cu = cu_seqlens.to(torch.int64)
    local_len = torch.div(padded_lengths(cu[1:] - cu[:-1], layout_unit(layout, world_size)), world_size,
                          rounding_mode="floor")
    local_cu = torch.zeros_like(cu)
    torch.cumsum(local_len, 0, out=local_cu[1:])
    return local_cu.to(torch.int32)


def unshard_index(layout: str, cu_seqlens: Tensor, world_size: int, total_local: int, name: str = "shards") -> Tensor:
    """int64 ``[total]``: for each global row (natural order) of the packed batch, its row in the
    rank-major concatenation of the N shards of ``total_local`` rows each (ValueError naming
    ``name`` when the shards do not have the layout's number of rows)."""
    cu = cu_seqlens.to(torch.int64)
    total = int(cu[-1])
    where = torch.zeros(total + 1, dtype=torch.int64, device=cu.device)
    for r in range(world_size):
        source, _, n = shard_rows(layout, cu, r, world_size)
        if n != total_local:
            raise ValueError(f"{name}: expected {n} rows per rank (the {layout} layout of cu_seqlens over "
                             f"{world_size} ranks, every sequence padded to a multiple of "
                             f"{layout_unit(layout, world_size)}), got {total_local}")
        # the padding rows all land on the extra last entry, dropped below
        where.index_copy_(0, source, torch.arange(r * n, (r + 1) * n, device=cu.device, dtype=torch.int64))
    return where[:total]


def _batch_cu(batch: int, seqlen: int, device) -> Tensor:
    return torch.arange(batch + 1, dtype=torch.int64, device=device) * seqlen


def shard_sequences(layout: str, x: Tensor, cu_seqlens: Optional[Tensor], rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s shard of ``x`` in the layout, every sequence padded with zero rows to a
    multiple of the layout's unit: packed ``x [total, ...]`` with GLOBAL ``cu_seqlens`` ->
    ``[total_local, ...]``; batched ``x [B, S, ...]`` (``cu_seqlens`` None) -> ``[B, P / N, ...]``
    with ``P = ceil(S / unit) * unit``. A new tensor; one host read of the local size."""
    if cu_seqlens is None:
        B, S = x.shape[0], x.shape[1]
        flat = shard_sequences(layout, x.reshape((B * S,) + tuple(x.shape[2:])), _batch_cu(B, S, x.device),
                               rank, world_size)
        return flat.reshape((B, -1) + tuple(x.shape[2:]))
    source, _, _ = shard_rows(layout, cu_seqlens.to(x.device), rank, world_size)
    padded = torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))])
    return padded.index_select(0, source)


def unshard_sequences(layout: str, gathered: Tensor, cu_seqlens: Optional[Tensor], world_size: int,
                      seqlen: Optional[int], name: str) -> Tensor:
    """The inverse of ``shard_sequences`` on the rank-major concatenation ``gathered`` of the N
    shards (packed: ``[N total_local, ...]``; batched, ``cu_seqlens`` None: ``[N B, L, ...]``,
    ``seqlen`` the real global length <= N L, default N L; the positions from it on are
    dropped): the global tensor without its padding."""
    N = world_size
    if cu_seqlens is None:
        B, L = gathered.shape[0] // N, gathered.shape[1]
        S = N * L if seqlen is None else seqlen
        if isinstance(S, bool) or not isinstance(S, int) or not 0 <= S <= N * L:
            raise ValueError(f"seqlen: expected an int in [0, {N * L}] (world_size {N} x local length {L}), got {S!r}")
        # [N, B, L, ...] -> [B, N, L, ...]: each sequence's shards rank-major, then the inverse of the
        # layout of N L positions, of which the first S are kept
        trailing = tuple(gathered.shape[2:])
        flat = gathered.reshape((N, B, L) + trailing).transpose(0, 1).reshape((B * N * L,) + trailing)
        idx = unshard_index(layout, _batch_cu(1, N * L, gathered.device), N, L, name)[:S]
        rows = torch.arange(B, device=gathered.device, dtype=torch.int64)[:, None] * (N * L) + idx[None, :]
        return flat.index_select(0, rows.reshape(-1)).reshape((B, S) + trailing)
    idx = unshard_index(layout, cu_seqlens.to(gathered.device), N, gathered.shape[0] // N, name)
    return gathered.index_select(0, idx)


SeqlensArg = Optional[Union[int, Sequence[int], Tensor]]


# ---- the public helpers of the layouts (ring_layout, zigzag_layout, stripe_layout) ----------------


def checked_cu(cu_seqlens: CuSeqlens, device: torch.device, total: Optional[int] = None, what: str = "") -> Tensor:
    """GLOBAL cu_seqlens (int32 tensor or list of ints) checked on the host (first entry 0, none
    decreasing, last entry ``total`` when given; ValueError naming ``cu_seqlens``), as an int32
    tensor on ``device``."""
    cu = as_cu_tensor(cu_seqlens, "cu_seqlens", device=device).to(device)
    values = cu.tolist()
    check_cumulative_values(values, "cu_seqlens")
    if total is not None and values[-1] != total:
        raise ValueError(f"cu_seqlens: expected the last entry to be {total}{what}, got {values[-1]}")
    return cu


# The arguments of the <layout>_shard helpers, documented once: ``with_shard_args_doc`` puts them
# in place of the line ``{shard_args}`` of a helper's docstring.
_SHARD_ARGS_DOC = """Args:
        x: ``[total, ...]`` tokens of all sequences in natural order (any trailing dims); or,
            with ``cu_seqlens=None``, ``[B, S, ...]``: B sequences of S tokens (dim 1 is sharded).
        cu_seqlens: GLOBAL cumulative lengths (int32 tensor or list of ints, last entry
            ``total``; any lengths), or None for a batched ``x``.
        rank, world_size: which shard, of how many."""


def with_shard_args_doc(fn: Callable) -> Callable:
    """Puts the shared argument documentation of the ``<layout>_shard`` helpers in place of
    ``{shard_args}`` in fn's docstring."""
    fn.__doc__ = fn.__doc__.replace("{shard_args}", _SHARD_ARGS_DOC)
    return fn


def shard(layout: str, x: Tensor, cu_seqlens: Optional[CuSeqlens], rank: int, world_size: int) -> Tensor:
    """``shard_sequences`` with checked arguments (the ``<layout>_shard`` helpers)."""
    check_world(world_size, rank)
    if not isinstance(x, Tensor) or x.dim() < (1 if cu_seqlens is not None else 2):
        what = "a token dim 0" if cu_seqlens is not None else "dims [batch, seqlen, ...] (cu_seqlens None)"
        raise ValueError(f"x: expected a tensor with {what}, got {getattr(x, 'shape', type(x).__name__)}")
    cu = None if cu_seqlens is None else checked_cu(cu_seqlens, x.device, x.shape[0], " (the rows of x)")
    return shard_sequences(layout, x, cu, rank, world_size)


def unshard(layout: str, shards: Sequence[Tensor], cu_seqlens: Optional[CuSeqlens],
            seqlen: Optional[int] = None) -> Tensor:
    """``unshard_sequences`` of the concatenated ``shards`` (rank order) with checked arguments
    (the ``<layout>_unshard`` helpers)."""
    shards = list(shards)
    if not shards:
        raise ValueError("shards: expected one tensor per rank, got an empty list")
    for i, t in enumerate(shards):
        if not isinstance(t, Tensor) or t.shape != shards[0].shape or t.dim() < (1 if cu_seqlens is not None else 2):
            raise ValueError(f"shards[{i}]: expected a tensor of the shape of shards[0] {tuple(shards[0].shape)}, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    gathered = torch.cat(shards, dim=0)
    cu = None if cu_seqlens is None else checked_cu(cu_seqlens, gathered.device)
    return unshard_sequences(layout, gathered, cu, len(shards), seqlen, "shards")
