"""Local (sliding-window) attention under context parallelism: which sub-blocks a ring step
computes, with which window and diagonal shift, and the key range the all-gather schemes need.

The window is flash-attn's ``window_size = (left, right)`` over GLOBAL positions of each
sequence: query p sees key j iff ``p - left <= j <= p + right`` (-1 = unbounded; ``causal`` is a
right side of 0). A kernel call sees a query block and a key block of one sequence at other
positions than the sequence's own, so it is told where its diagonal is: with the query block
starting at global position ``pq``, the key block at ``pk``, ``Lq`` queries and ``Lk`` keys, the
call's diagonal shift (``ops``' ``diagonal_shift_list``) is

    shift = (pq - pk) - (Lk - Lq),

which puts row i's diagonal key at block key ``i + pq - pk``, the key at the query's own global
position; the window is then passed unchanged.

Ring layouts (``ring_calls``): the local rows of a rank are runs of globally contiguous
positions (ring: one run, its piece; zigzag: two runs, its chunks r and 2N-1-r). With a window
every step computes one call per (query run, key run) pair, skipping the pairs whose block lies
wholly outside the window (or wholly in the causal future): no kernel call, no merge; the ring
still passes the K/V block on (the transfer of every step is needed by some rank). Whether a
block is visible depends on the sequence length, and only through a shorter chunk being closer,
so the test uses the shortest non-empty chunk of the batch (exact when the lengths are known on
the host: batched forms, CPU tensors, metadata checks on; otherwise one token, which skips only
steps that no sequence can need). The stripe layout (local token i is global i N + r) maps the
window to a band of local indices per step: key j of rank src is visible from query i iff
``i - floor((left + src - r) / N) <= j <= i + floor((right + r - src) / N)``, computed as one
call over all rows with its own window and a constant shift.

All-gather schemes: the keys of a rank's sequence pieces are a slice of the gathered K/V in which
every piece's keys end where its queries end (causal), so the window applies unchanged; the slice
is trimmed to the keys the rank's queries can see (``contiguous_key_range``; the collective still
gathers every rank's K/V).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from .._checks import NO_WINDOW

__all__ = ["NO_WINDOW", "WindowedCall", "contiguous_key_range", "effective_window", "ring_calls"]


@dataclass(frozen=True)
class WindowedCall:
    """One kernel call of a ring step under a window: the query row set ``q_rows`` of the rank
    against the key row set ``k_rows`` of the held block, ``causal`` and ``window`` as passed to
    the kernel, and the diagonal shift of each sequence b, ``shift_units * unit_b + shift_offset``
    (unit_b: the layout's chunk length of sequence b: the local length for the ring layout, half
    of it for zigzag; 0 and 0: no shift)."""

    q_rows: str
    k_rows: str
    causal: bool
    window: Tuple[int, int]
    shift_units: int = 0
    shift_offset: int = 0


def effective_window(window: Tuple[int, int], causal: bool, longest: Optional[int]) -> Optional[Tuple[int, int]]:
    """The window a scheme has to apply, or None when it bounds nothing: (-1, -1); causal with an
    unbounded left side; or, with ``longest`` (the longest GLOBAL sequence, known exactly on the
    host), sides at least ``longest - 1`` (every pair of positions is within them). Under
    ``causal`` the right side is returned as 0."""
    left, right = window
    if causal:
        right = 0
    if longest is not None:
        reach = max(longest - 1, 0)
        if left >= reach:
            left = -1
        if right >= reach and not causal:
            right = -1
    if left == -1 and (right == -1 or causal):
        return None
    return left, right


def _runs(layout: str, world_size: int, rank: int) -> List[Tuple[str, int]]:
    """The runs of contiguous global positions of a rank's local rows: (row set, chunk index), the
    run starting at global position chunk index * unit."""
    if layout == "zigzag":
        return [("front", rank), ("back", 2 * world_size - 1 - rank)]
    return [("all", rank)]


def _block_visible(cq: int, ck: int, causal: bool, left: int, right: int, unit: int) -> bool:
    """Whether some query of chunk cq sees some key of chunk ck (chunks of ``unit`` positions)."""
    if cq == ck:
        return True  # the diagonal is always visible
    gap = (abs(cq - ck) - 1) * unit + 1  # distance of the closest (query, key) pair
    if ck < cq:  # keys before the queries
        return left < 0 or left >= gap
    return not causal and (right < 0 or right >= gap)  # keys after the queries


def _floor_div(a: int, b: int) -> int:
    return a // b  # Python's // rounds toward -inf, as the band needs


def _stripe_call(world_size: int, rank: int, src: int, causal: bool, left: int, right: int,
                 local_len: int) -> Optional[WindowedCall]:
    """The stripe layout's call at the step holding rank src's block, or None when no (query,
    key) pair of the step is visible. Band of local indices: j in [i - a, i + b]."""
    N = world_size
    a = _floor_div(left + src - rank, N) if left >= 0 else None
    b = _floor_div(right + rank - src, N) if right >= 0 else None
    if causal:
        bc = _floor_div(rank - src, N)  # 0 (src <= rank) or -1 (src > rank: strictly before)
        b = bc if b is None else min(b, bc)
    if a is not None and b is not None and a + b < 0:
        return None
    if local_len >= 1 and ((b is not None and b < -(local_len - 1)) or (a is not None and a < -(local_len - 1))):
        return None
    # the band relative to the shifted diagonal i + s: left side a + s, right side b - s (both >= 0)
    if a is None:
        s, window = b, (-1, 0)
    elif b is None:
        s, window = -a, (0, -1)
    else:
        s = min(max(0, -a), b)
        window = (a + s, b - s)
    return WindowedCall("all", "all", False, window, 0, s)


def ring_calls(layout: str, world_size: int, rank: int, src: int, causal: bool, window: Tuple[int, int],
               min_unit: int, local_len: int = 0) -> List[WindowedCall]:
    """The kernel calls of the ring step that holds rank ``src``'s K/V block, under ``window``
    (as ``effective_window`` returns it, not None).

    layout: ``"ring"``, ``"zigzag"`` or ``"stripe"``. min_unit: the shortest non-empty chunk of
    the batch (local length; zigzag: half of it), at least 1 (a lower bound when unknown).
    local_len: the stripe layout's local length (its batched forms know it)."""
    left, right = window
    if world_size == 1:  # the local rows are the global sequence
        return [WindowedCall("all", "all", causal, window)]
    if layout == "stripe":
        call = _stripe_call(world_size, rank, src, causal, left, right, local_len)
        return [] if call is None else [call]
    unit = max(int(min_unit), 1)
    calls = []
    for qn, cq in _runs(layout, world_size, rank):
        for kn, ck in _runs(layout, world_size, src):
            if _block_visible(cq, ck, causal, left, right, unit):
                calls.append(WindowedCall(qn, kn, causal, window, cq - ck, 0))
    return calls


def contiguous_key_range(window: Tuple[int, int], causal: bool, rank: int, total_local: int,
                         k_slice: slice) -> Tuple[slice, int]:
    """The contiguous (llama3) layout's key range under a window: rank ``rank`` holds global tokens
    ``[rank T, (rank+1) T)`` (T = ``total_local``) and its sequence pieces' keys are the gathered
    rows ``k_slice`` (the first piece's keys start at its sequence's start, at or before the rank's
    first token; the last piece's end at the rank's last token (causal) or at its sequence's end).

    Returns ``(trimmed slice, last piece's diagonal shift)``: the first piece's keys start at most
    ``left`` tokens before the rank's first token, the last piece's (without causal) end at most
    ``right`` tokens after its last; the shift ``(rank+1) T - trimmed end`` (0 with causal) moves the
    last piece's diagonal from the end of its keys to the rank's last token. The other pieces are
    whole sequences of the rank (queries and keys alike: no shift)."""
    left, right = window
    first, end = rank * total_local, (rank + 1) * total_local
    start, stop = k_slice.start, k_slice.stop
    if left >= 0 and start < first:
        start += min(max(first - left - start, 0), first - start)
    if not causal and right >= 0 and stop > end:
        stop = max(min(stop, end + right), end)
    shift = 0 if causal else end - stop
    return slice(start, stop), shift
