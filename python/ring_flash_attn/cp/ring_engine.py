"""The ring attention engine shared by the ring, zigzag ring and stripe schemes.

A scheme is a ``RingLayout``: how the tokens of every sequence are spread over the N ranks of the
group, given by which sub-blocks each ring step computes under a causal mask (``causal_tasks``)
and which row sets those sub-blocks use. Of every sequence each rank holds the same number of
tokens, L, the global length being N L.

Internally every form is varlen (a batch is B sequences of L tokens); sub-blocks are row sets
(all rows, the first / second half of each sequence, all but the first / last row of each),
gathered with index maps built on the device from cu_seqlens (no host read).

Forward: the K/V block of every rank travels around the ring (rank r sends to r+1 and receives
from r-1 with ``batch_isend_irecv``; K and V in one buffer; ``ring_comm.RingComm``); at step s
rank r holds the block of rank src = (r - s) mod N. The next block's send/receive is posted
before the current block is computed, so the transfer overlaps the kernels. Each step runs one
or no library forward call (G = 1, with LSE) on a sub-block (a row set of the local queries
against a row set of the held K/V, causal or not) chosen by the layout; the partial outputs are
merged through their LSE in fp32 (fp64 for fp64 inputs; ``lse_merge.merge_partial``).

Backward: the same ring. At every step the library backward runs on the same sub-block with the
FINAL (merged) out and lse, giving the block's exact share of dQ, dK and dV. dQ is accumulated
locally in fp32 (fp64) and returned in the dtype of q; the dK/dV of a block are accumulated in
fp32 (fp64) into a buffer that travels around the ring with the block (one step behind the K/V,
its transfer overlapping the next step's kernels) and arrives back at the block's owner after N
transfers. (The CPU backend's fp64 backward recomputes the LSE of its own call instead of using
the given one; ``_rescale_dout`` compensates exactly, see there.)

Sequences of any length (``seqlens``): a sequence whose global length S is not a multiple of the
layout's unit (N; zigzag 2N) is laid out as one of P >= S tokens whose last P - S are padding
(``padding``). The real rows of every piece are a prefix of it, so every sub-block call splits
each sequence into its real prefix and its padding suffix (``padding.split_padding``): real
queries see only real keys (``seqused_k``; a causal sub-block is square and top-left aligned, and
a real query never sees a later position, so its keys are the first as many rows as it has real
queries), padding queries see no key (O = 0, LSE = -inf, no gradient), padding keys are never
read.

Precision (``precision``): the partial outputs, dQ and the dK/dV buffers are summed in fp32 (fp64
for fp64 data), the dK/dV travel in it, and each result is rounded to the input dtype once; where
the backend can return a call's outputs unrounded (``precision.fp32_partials``), the calls run on
fp32 operands so that no partial is rounded either.

Without ``causal`` every query sees every key block fully (upstream's zigzag asserts causal).

Local attention (``window_size``, global positions of each sequence): every kernel call gets the
window unchanged and the diagonal shift that puts each query's diagonal at its own global position
among the block's keys; a step's sub-blocks are then each (query run, key run) pair of the layout,
and those wholly outside the window are skipped (``window.ring_calls``; the K/V block still passes
on around the ring). ``softcap`` goes to every call. Sinks (``sinks.fold_sinks``): the steps run
without them and the merged result takes each row's sink once; the backward runs on that result.

Differences from upstream: dQ keeps the input dtype (upstream returns bf16); the merge is done in
fp64 for fp64 inputs; the varlen LSE is flash-attn's ``[H, T]`` layout; no host sync (upstream's
zigzag varlen reads cu_seqlens on the host).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from .. import ops
from .._checks import check_flash_attn_defaults
from ..grouped import _resolve_scale
from .index_maps import sequence_of
from .lse_merge import merge_partial
from .padding import SeqlensArg, real_rows, split_keys, split_queries, split_used
from .precision import accumulation_dtype, fp32_partials, widen
from .process_group import resolve_group
from .rank_agreement import Fingerprint, RankAgreement, device_of, effective_scale
from .ring_comm import RingComm
from .sinks import check_sinks, fold_sinks, sink_gradient
from .validation import (check_cu_seqlens, check_heads, check_int32_count, check_local_tokens, check_qkv,
                         metadata_checks_enabled, short_list, with_contiguous_head_dim)
from .window import effective_window, ring_calls

__all__ = [
    "RingLayout",
    "Task",
    "ring_attention",
    "ring_attention_varlen",
    "with_batched_args_doc",
    "with_varlen_args_doc",
]

_TAG_KV = 11
_TAG_DKV = 12

# A sub-block computed at one ring step: (query row set, key row set, causal). Row sets: "all",
# "front" / "back" (first / second half of each sequence), "drop_first" / "drop_last" (each
# sequence but its first / last row).
Task = Tuple[str, str, bool]


@dataclass(frozen=True)
class RingLayout:
    """A ring scheme's layout.

    name: the layout's name (``"ring"``, ``"zigzag"``, ``"stripe"``; ``padding`` knows where each
        puts a sequence's positions).
    causal_tasks: ``(step, src, rank) -> [Task]``, the sub-blocks computed under a causal mask
        at ``step`` while the K/V block of rank ``src`` is held (step 0: ``src == rank``). The
        first task of step 0 must cover all rows. Every causal task is a square sub-block (row sets
        of equal length per sequence) aligned top-left. Without a causal mask every step computes
        ``("all", "all", False)``.
    row_sets: the row sets other than "all" that ``causal_tasks`` uses.
    even_halves: every local sequence is two chunks of equal length (its length must be even).
    api_name: the prefix of the scheme's public functions (e.g. ``"zigzag_ring_flash_attn"``),
        naming the function in the cross-rank check's errors (default: ``name``).
    """

    name: str
    causal_tasks: Callable[[int, int, int], List[Task]]
    row_sets: Tuple[str, ...] = ()
    even_halves: bool = False
    api_name: str = ""

    def function_name(self, varlen: bool) -> str:
        """The public function of this layout's batched or varlen form."""
        return f"{self.api_name or self.name}{'_varlen' if varlen else ''}_func"


# ---- validation ------------------------------------------------------------------------------------


def _validate(q, k, v, dropout_p, window_size, alibi_slopes, layout: RingLayout, softcap=0.0, causal=None,
              sinks=None) -> Tuple[Tuple[int, int], float]:
    check_qkv(q, k, v, 4, "[batch, local_seqlen, heads, head_dim]")
    B, L = q.shape[:2]
    if k.shape[0] != B or k.shape[1] != L:
        raise ValueError(f"k: expected batch {B} and local_seqlen {L} (those of q: the layout shards q, k and v "
                         f"alike), got {tuple(k.shape[:2])}")
    check_heads(q, k)
    check_int32_count(B * L, "q", "local tokens (batch * local_seqlen)")
    if layout.even_halves and L % 2:
        raise ValueError(f"q: expected an even local_seqlen for the {layout.name} layout (two chunks of equal "
                         f"length per rank), got {L}")
    features = check_flash_attn_defaults(dropout_p, window_size, alibi_slopes, softcap, causal)
    check_sinks(sinks, q.shape[2], q.device)
    return features


def _validate_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p, window_size, alibi_slopes,
                     layout: RingLayout, softcap=0.0, causal=None, sinks=None) -> Tuple[Tuple[int, int], float]:
    check_qkv(q, k, v, 3, "[local_tokens, heads, head_dim]")
    check_local_tokens(q, k, v, "those of q: the layout shards q, k and v alike")
    check_heads(q, k)
    features = check_flash_attn_defaults(dropout_p, window_size, alibi_slopes, softcap, causal)
    check_sinks(sinks, q.shape[1], q.device)
    check_cu_seqlens(cu_seqlens, "cu_seqlens", q.device)
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise ValueError(f"max_seqlen: expected a Python int >= 0 (the longest local sequence, a hint; a tensor "
                         f"would need a host sync), got {max_seqlen!r}")
    if metadata_checks_enabled(q.device):  # values: free on CPU, a sync (on request) on CUDA
        cu = cu_seqlens.tolist()
        T = q.shape[0]
        if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens: expected non-decreasing cumulative lengths from 0, got {cu[:12]}")
        if cu[-1] != T:
            raise ValueError(f"cu_seqlens: expected the last entry to be {T} (the local tokens of q: cu_seqlens "
                             f"is the rank's LOCAL cumulative lengths), got {cu[-1]}")
        if layout.even_halves:
            for b, (x, y) in enumerate(zip(cu, cu[1:])):
                if (y - x) % 2:
                    raise ValueError(f"cu_seqlens: local sequence {b} has length {y - x}, expected an even length "
                                     f"(two {layout.name} chunks of equal length)")
    return features


def _resolve_seqlens(seqlens: SeqlensArg, local_lengths: Tensor, world_size: int, device: torch.device,
                     batched_local: Optional[int]) -> Optional[Tensor]:
    """The caller's ``seqlens`` (the real GLOBAL length of each sequence) as an int64 ``[B]``
    tensor on ``device``, or None when every sequence is all real (no padding). local_lengths:
    int64 ``[B]``, the local rows of each sequence (a sequence's real length is at most N times
    that); batched_local: the batched forms' local_seqlen L (an int ``seqlens`` is accepted only
    there), None for the varlen forms. Values are checked on the host where that is free (CPU)
    or on request."""
    batched = batched_local is not None
    B = local_lengths.shape[0]
    N = world_size
    if seqlens is None:
        return None
    if isinstance(seqlens, bool):
        raise ValueError(f"seqlens: expected an int, a sequence of {B} ints or an int tensor [{B}], got {seqlens!r}")
    if isinstance(seqlens, numbers.Integral):
        if not batched:
            raise ValueError(f"seqlens: expected a sequence of {B} ints or an int32 tensor [{B}] (one real global "
                             f"length per sequence), got the int {seqlens}")
        full = N * batched_local
        if not 0 <= int(seqlens) <= full:
            raise ValueError(f"seqlens: expected a real global length in [0, {full}] (world_size {N} x local_seqlen "
                             f"{batched_local}), got {int(seqlens)}")
        if int(seqlens) == full:
            return None
        return torch.full((B,), int(seqlens), dtype=torch.int64, device=device)
    if isinstance(seqlens, Tensor):
        if seqlens.dtype not in (torch.int32, torch.int64) or seqlens.dim() != 1 or seqlens.shape[0] != B:
            raise ValueError(f"seqlens: expected an int32 or int64 tensor [{B}] (one real global length per "
                             f"sequence), got dtype {seqlens.dtype} shape {tuple(seqlens.shape)}")
        if seqlens.device != device:
            raise ValueError(f"seqlens: expected a tensor on {device} (the device of q), got {seqlens.device}")
        lengths = seqlens.to(torch.int64)
    else:
        try:
            values = [int(x) for x in seqlens]
        except TypeError:
            raise ValueError(f"seqlens: expected an int, a sequence of {B} ints or an int tensor [{B}], got "
                             f"{type(seqlens).__name__}") from None
        if len(values) != B:
            raise ValueError(f"seqlens: expected {B} entries (one real global length per sequence), got {len(values)}")
        lengths = torch.tensor(values, dtype=torch.int64, device=device)
    if metadata_checks_enabled(device):
        got, local = lengths.tolist(), local_lengths.tolist()
        for b, (x, n) in enumerate(zip(got, local)):
            if not 0 <= x <= N * n:
                raise ValueError(f"seqlens: expected entry {b} in [0, {N * n}] (world_size {N} x its {n} local rows), "
                                 f"got {x} ({short_list(got)})")
    return lengths


# ---- row sets ----------------------------------------------------------------------------------------
#
# Internally every layout is varlen: q [T, Hq, D], k/v [T, Hk, D] with the rank's LOCAL cumulative
# lengths (the batched [B, L, ...] forms are B sequences of L tokens). A row set is a subset of the
# local rows, the same for every sequence, given by an index (None: all rows), its own cumulative
# lengths and max length.


@dataclass
class _Rows:
    index: Optional[Tensor]  # int64 local rows, None = all
    cu: Tensor  # int32 [B + 1]
    max_seqlen: int

    def take(self, t: Tensor, dim: int = 0) -> Tensor:
        return t if self.index is None else t.index_select(dim, self.index)


def _rows_of(cu_local: Tensor, select: str, max_local: int, n: int, T: int) -> _Rows:
    """A row set of the sequences with LOCAL cumulative lengths cu_local (T rows in all), built on
    its device without a host read. select: "front" / "back" (first / second half of each sequence;
    lengths even; n = T / 2 rows), "drop_first" / "drop_last" (each sequence but its first / last
    row; n = T - B rows when no sequence is empty)."""
    cu = cu_local.to(torch.int64)
    B = cu.shape[0] - 1
    lengths = cu[1:] - cu[:-1]
    if select in ("front", "back"):
        sub_len = torch.div(lengths, 2, rounding_mode="floor")
        max_sub = max_local // 2
    else:
        sub_len = (lengths - 1).clamp_(min=0)
        max_sub = max(max_local - 1, 0)
    sub_cu = torch.zeros(B + 1, dtype=torch.int64, device=cu.device)
    torch.cumsum(sub_len, 0, out=sub_cu[1:])
    j = torch.arange(n, device=cu.device, dtype=torch.int64)
    b = sequence_of(j, sub_cu)
    offset = j - sub_cu[b]
    if select == "back":
        offset = offset + lengths[b] - sub_len[b]
    elif select == "drop_first":
        offset = offset + 1
    index = (cu[b] + offset).clamp_(0, max(T, 1) - 1)
    return _Rows(index, sub_cu.to(torch.int32), max_sub)


def _row_sets(layout: RingLayout, causal: bool, cu_local: Tensor, max_local: int, T: int):
    """The row sets the layout's tasks use (name -> _Rows); ``causal``: the causal tasks' (or the
    windowed calls') row sets are needed."""
    B = cu_local.shape[0] - 1
    sets = {"all": _Rows(None, cu_local, max_local)}
    if not causal:
        return sets
    for select in layout.row_sets:
        n = T // 2 if select in ("front", "back") else T - B
        sets[select] = _rows_of(cu_local, select, max_local, max(n, 0), T)
    return sets


def _tasks(layout: RingLayout, causal: bool, step: int, src: int, rank: int) -> List[Task]:
    """The sub-blocks computed at `step` (K/V block of rank `src` held)."""
    if not causal:
        return [("all", "all", False)]
    return layout.causal_tasks(step, src, rank)


# ---- per-call plan -----------------------------------------------------------------------------


@dataclass
class _Plan:
    layout: RingLayout
    group: object
    world_size: int
    rank: int
    scale: float
    causal: bool
    deterministic: bool
    acc_dtype: torch.dtype
    rows: dict  # name -> _Rows
    lse_recomputed: bool = False  # the backend's backward ignores the given LSE (see _rescale_dout)
    seqlens: Optional[Tensor] = None  # int64 [B], real GLOBAL lengths; None: no padding
    local_lengths: Optional[Tensor] = None  # int64 [B], local rows per sequence (with seqlens)
    wide: bool = False  # kernel calls on fp32 operands: partials not rounded (precision.fp32_partials)
    metadata: dict = field(default_factory=dict)  # (what, row set) -> split metadata, built once
    window: Optional[Tuple[int, int]] = None  # window.effective_window's; None: no window
    softcap: float = 0.0
    has_sinks: bool = False  # the result is folded with sink logits (sinks.fold_sinks)
    min_unit: int = 1  # shortest non-empty chunk of the batch (window.ring_calls), a lower bound
    local_len: int = 0  # the batched forms' local length (the stripe layout's windowed calls)
    unit: Optional[Tensor] = None  # int64 [B]: each sequence's chunk length (the shifts' unit)
    shifts: dict = field(default_factory=dict)  # (units, offset[, qn, kn, src]) -> int32 diagonal shifts

    def task_metadata(self, qn: str, kn: str, causal: bool, src: int) -> tuple:
        """The kernel metadata of a sub-block (query row set qn of this rank against key row set
        kn of rank src): ``([cu_seqlens_q], cu_seqlens_k, [seqused_k], [max_seqlen_q],
        max_seqlen_k)``. With padding, each sequence is split into its real prefix and its
        padding suffix (``padding.split_padding``); a causal sub-block of the layout's tasks is
        square and top-left aligned and a real query sees no later position, so its keys are the
        first as many rows as it has real queries (all real); a non-causal one, and every
        windowed call (whose key block may sit anywhere relative to its queries: the diagonal
        shift places it), sees the real rows of src's block."""
        qr, kr = self.rows[qn], self.rows[kn]
        if self.seqlens is None:
            return [qr.cu], kr.cu, [None], [qr.max_seqlen], kr.max_seqlen
        keys_of_src = not causal or self.window is not None
        used = self._split("used_k", kn)[src] if keys_of_src else self._split("used_q", qn)
        return [self._split("cu_q", qn)], self._split("cu_k", kn), [used], [qr.max_seqlen], kr.max_seqlen

    def _split(self, what: str, name: str) -> Tensor:
        """The split metadata (built once per call, on the device) of row set ``name``: "cu_q" /
        "cu_k" its split cu_seqlens as queries / keys, "used_q" the seqused_k of its real rows on
        this rank, "used_k" ``[N, 2B]`` that of its real rows on every rank."""
        key = (what, name)
        if key not in self.metadata:
            layout, N, rows = self.layout.name, self.world_size, self.rows[name]
            if what == "cu_q":
                real = real_rows(layout, name, self.seqlens, self.local_lengths, self.rank, N)
                value = split_queries(rows.cu, real)
            elif what == "cu_k":
                value = split_keys(rows.cu)
            elif what == "used_q":
                value = split_used(real_rows(layout, name, self.seqlens, self.local_lengths, self.rank, N))
            else:
                holders = torch.arange(N, device=rows.cu.device, dtype=torch.int64)[:, None]
                value = split_used(real_rows(layout, name, self.seqlens, self.local_lengths, holders, N))
            self.metadata[key] = value
        return self.metadata[key]

    def kernel_features(self, qn: str = "all", kn: str = "all", src: int = 0,
                        window: Optional[Tuple[int, int]] = None, shift_units: int = 0,
                        shift_offset: int = 0) -> dict:
        """The keyword arguments of a kernel call (query row set qn of this rank against key row
        set kn of rank src): softcap, and a window with its diagonal shift. The key block is
        placed so that row i's diagonal key is block key ``i + shift_units * unit_b +
        shift_offset`` (sequence b). Without padding every call's query and key blocks are
        equally long, so that is the kernel's shift. With padding (``task_metadata``'s split
        layout) the kernel aligns the diagonal bottom-right on the lengths it sees, the real
        query rows Lq and the used keys Lk of each sequence's real part, so the shift passed is
        that minus ``(Lk - Lq)``; each padding part sees no key (its shift, 0, is never used)."""
        features = {"softcap": self.softcap} if self.softcap else {}
        if window is None:
            return features
        features["window_size"] = list(window)
        padded = self.seqlens is not None
        if not (shift_units or shift_offset or padded):
            return features
        key = (shift_units, shift_offset) + ((qn, kn, src) if padded else ())
        if key not in self.shifts:  # device ops, no host read
            shift = self.unit * shift_units + shift_offset  # int64 [B]
            if padded:
                layout, N = self.layout.name, self.world_size
                q_real = real_rows(layout, qn, self.seqlens, self.local_lengths, self.rank, N)
                k_used = real_rows(layout, kn, self.seqlens, self.local_lengths, src, N)
                shift = shift - (k_used - q_real)
                shift = torch.stack([shift, torch.zeros_like(shift)], dim=-1).flatten()  # [2B]: real, padding
            self.shifts[key] = shift.to(torch.int32)
        features["diagonal_shift_list"] = [self.shifts[key]]
        return features


def _step_calls(plan: _Plan, step: int, src: int) -> List[Tuple[str, str, bool, dict]]:
    """The kernel calls at ``step`` (K/V block of rank ``src`` held): (query row set, key row set,
    causal, the call's keyword arguments). Without a window: the layout's tasks; with one: the
    (query run, key run) pairs that some query sees (``window.ring_calls``; with padding the
    positions of the real rows are those of the padded layout, so the test stays exact: a pair
    is skipped only when no pair of positions of it is within the window)."""
    if plan.window is None:
        features = plan.kernel_features()
        return [(qn, kn, causal, features) for qn, kn, causal in _tasks(plan.layout, plan.causal, step, src, plan.rank)]
    return [(c.q_rows, c.k_rows, c.causal,
             plan.kernel_features(c.q_rows, c.k_rows, src, c.window, c.shift_units, c.shift_offset))
            for c in ring_calls(plan.layout.name, plan.world_size, plan.rank, src, plan.causal, plan.window,
                                plan.min_unit, plan.local_len)]


# ---- forward ---------------------------------------------------------------------------------------


def _block_fwd(plan: _Plan, q: Tensor, kv: Tensor, qn: str, kn: str, causal: bool, src: int, features: dict):
    qr, kr = plan.rows[qn], plan.rows[kn]
    cu_q, cu_k, used, max_q, max_k = plan.task_metadata(qn, kn, causal, src)
    (o,), (lse,) = ops.grouped_fwd(
        [qr.take(q)], kr.take(kv[0]), kr.take(kv[1]), cu_q, cu_k, used, max_q, max_k,
        plan.scale, causal, plan.deterministic, **features)
    return o, lse


def _forward(plan: _Plan, q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor] = None):
    T, Hq, D = q.shape
    N, rank = plan.world_size, plan.rank
    # The first block of every layout covers all rows: it becomes the accumulator as it is (no
    # merge with zeros, which at N = 1 would be the whole cost of the ring code around the kernel).
    out_acc: Optional[Tensor] = None
    lse_acc: Optional[Tensor] = None
    kv = torch.stack([k, v])  # one send buffer [2, T, Hk, D], in the input dtype
    q_in = widen(q, plan.wide)
    ring = RingComm(plan.group, N, rank) if N > 1 else None
    for step in range(N):
        pending = None
        if step + 1 < N:
            kv_next, pending = ring.post(kv, _TAG_KV)  # in flight while this block is computed
        src = (rank - step) % N
        kv_in = widen(kv, plan.wide)
        for qn, kn, causal, features in _step_calls(plan, step, src):
            o, lse = _block_fwd(plan, q_in, kv_in, qn, kn, causal, src, features)
            if out_acc is None and plan.rows[qn].index is None:
                out_acc, lse_acc = o, lse
                continue
            if out_acc is None:
                out_acc = torch.zeros((T, Hq, D), dtype=plan.acc_dtype, device=q.device)
                lse_acc = torch.full((Hq, T), float("-inf"), dtype=plan.acc_dtype, device=q.device)
            out_acc, lse_acc = out_acc.to(plan.acc_dtype), lse_acc.to(plan.acc_dtype)
            merge_partial(out_acc, lse_acc, plan.rows[qn].index, o, lse)
        if pending is not None:
            RingComm.wait(pending)
            kv = kv_next
    assert out_acc is not None and lse_acc is not None, "step 0 of every layout computes all rows"
    if sinks is not None:  # once per row, after the merge
        out_acc, lse_acc = fold_sinks(out_acc, lse_acc.to(plan.acc_dtype), sinks)
    return out_acc.to(q.dtype), lse_acc.to(torch.float32)


# ---- backward ----------------------------------------------------------------------------------


def _rescale_dout(plan: _Plan, dout_b: Tensor, q: Tensor, kv: Tensor, lse_b: Tensor, qn: str, kn: str,
                  causal: bool, src: int, features: dict) -> Tensor:
    """For a backend whose backward recomputes the LSE over the keys of its call (the CPU
    backend with fp64 data does, for fp64 accuracy) instead of using the given one: its
    probabilities are the block's own, P_blk = P * exp(lse - lse_blk) per row. The backward is
    linear in dout given P (dS = P (dO V^T - rowsum(dO O)), dV = P^T dO), so scaling dout by
    w = exp(lse_blk - lse) per row gives exactly the gradients of the global softmax. lse_blk
    comes from one more forward call on the block (fp32 LSE: fp32-accurate weights). With sinks,
    lse is the sink-including one and lse_blk the block's without them: w then also takes the
    sink's share of each row's softmax out."""
    _, lse_blk = _block_fwd(plan, q, kv, qn, kn, causal, src, features)
    lse_all = lse_b.to(torch.float64)
    w = torch.exp(lse_blk.to(torch.float64) - torch.where(torch.isneginf(lse_all), 0.0, lse_all))
    w = torch.where(torch.isneginf(lse_all), 0.0, w)
    return dout_b * w.t().unsqueeze(-1).to(dout_b.dtype)


def _backward(plan: _Plan, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor):
    T, Hq, D = q.shape
    Hk = k.shape[1]
    N, rank = plan.world_size, plan.rank
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    # As in the forward, the first contribution over all rows becomes the accumulator as it is.
    dq_acc: Optional[Tensor] = None
    if N == 1:  # one step, no transfer: nothing to stack, merge or send
        return _backward_single_step(plan, dout, q, k, v, out, lse)
    kv = torch.stack([k, v])
    q_in, out_in, dout_in = (widen(t, plan.wide) for t in (q, out, dout))
    ring = RingComm(plan.group, N, rank)
    dkv_pending = None
    dkv = None
    for step in range(N):
        kv_pending = None
        if step + 1 < N:
            kv_next, kv_pending = ring.post(kv, _TAG_KV)
        src = (rank - step) % N
        kv_in = widen(kv, plan.wide)
        dkv_step = None
        for qn, kn, causal, features in _step_calls(plan, step, src):
            qr, kr = plan.rows[qn], plan.rows[kn]
            lse_b = qr.take(lse, 1).contiguous()
            dout_b = qr.take(dout_in)
            if plan.lse_recomputed:
                dout_b = _rescale_dout(plan, dout_b, q_in, kv_in, lse_b, qn, kn, causal, src, features)
            cu_q, cu_k, used, max_q, max_k = plan.task_metadata(qn, kn, causal, src)
            (dq_b,), dk_b, dv_b = ops.grouped_bwd(
                [dout_b], [qr.take(q_in)], kr.take(kv_in[0]), kr.take(kv_in[1]), [qr.take(out_in)], [lse_b],
                cu_q, cu_k, used, max_q, max_k, plan.scale, causal, plan.deterministic, **features)
            if dkv_step is None:
                dkv_step = torch.zeros((2, T, Hk, D), dtype=plan.acc_dtype, device=q.device)
            if dq_acc is None and qr.index is None:
                dq_acc = dq_b
            else:
                if dq_acc is None:
                    dq_acc = torch.zeros((T, Hq, D), dtype=plan.acc_dtype, device=q.device)
                dq_acc = dq_acc.to(plan.acc_dtype)
                if qr.index is None:
                    dq_acc += dq_b
                else:
                    dq_acc.index_add_(0, qr.index, dq_b.to(dq_acc.dtype))
            if kr.index is None:
                dkv_step[0] += dk_b
                dkv_step[1] += dv_b
            else:
                dkv_step[0].index_add_(0, kr.index, dk_b.to(dkv_step.dtype))
                dkv_step[1].index_add_(0, kr.index, dv_b.to(dkv_step.dtype))
        # the dK/dV travelling with this block: received from the previous rank (one step behind)
        if dkv_pending is not None:
            RingComm.wait(dkv_pending)
            dkv = dkv_recv if dkv_step is None else dkv_recv.add_(dkv_step)
        else:
            dkv = dkv_step if dkv_step is not None else torch.zeros(
                (2, T, Hk, D), dtype=plan.acc_dtype, device=q.device)
        dkv_recv, dkv_pending = ring.post(dkv, _TAG_DKV)
        if kv_pending is not None:
            RingComm.wait(kv_pending)
            kv = kv_next
    if dkv_pending is not None:  # the N-th transfer brings every block's dK/dV home
        RingComm.wait(dkv_pending)
        dkv = dkv_recv
    assert dq_acc is not None, "step 0 of every layout computes all rows"
    return dq_acc.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def _backward_single_step(plan: _Plan, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor):
    """The backward at world size 1: step 0 of every layout is one block over all rows, so the
    kernel's gradients are the result (no accumulators, no stacking of K and V)."""
    ((qn, kn, causal, features),) = _step_calls(plan, 0, plan.rank)
    assert qn == kn == "all", "step 0 of every layout computes all rows"
    # The forward ran on a fresh K/V buffer (torch.stack); so does this call, so that any K/V
    # layout the forward accepted is accepted here too.
    kv = torch.stack([k, v])
    lse = lse.contiguous()
    if plan.lse_recomputed and plan.has_sinks:  # the backend's own LSE would leave the sinks out
        dout = _rescale_dout(plan, dout, q, kv, lse, qn, kn, causal, plan.rank, features)
    k, v = kv
    cu_q, cu_k, used, max_q, max_k = plan.task_metadata(qn, kn, causal, plan.rank)
    (dq,), dk, dv = ops.grouped_bwd(
        [dout], [q], k, v, [out], [lse], cu_q, cu_k, used, max_q, max_k, plan.scale, causal,
        plan.deterministic, **features)
    return dq, dk, dv


class _RingAttention(torch.autograd.Function):
    """``_RingAttention.apply(q, k, v, cu_local, plan, sinks) -> (out, lse)``. ``cu_local`` (the
    caller's cu_seqlens in the varlen forms, read again by the backward through the plan's "all"
    row set) is an input saved for the backward, so that changing it in place between the
    forward and the backward makes the backward raise (autograd's version check) instead of
    computing the gradients of other sequences. The plan's other index tensors were built from it
    in the forward and are private. ``sinks`` (None or float32 ``[Hq]``): folded into out and
    lse once per row; its gradient is the rank's rows' share (``sinks.sink_gradient``)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_local, plan, sinks=None):
        out, lse = _forward(plan, q, k, v, sinks)
        ctx.save_for_backward(q, k, v, out, lse, cu_local, sinks)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, _cu_local, sinks = ctx.saved_tensors  # raises if cu_local changed in place
        dq, dk, dv = _backward(ctx.plan, dout, q, k, v, out, lse)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[5]:
            dsinks = sink_gradient(sinks, out, dout, lse)
        return dq, dk, dv, None, None, dsinks


def _make_plan(layout: RingLayout, q3, cu_local, max_local, softmax_scale, causal, deterministic, group,
               world_size: int, rank: int, seqlens: Optional[Tensor] = None,
               window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, has_sinks: bool = False,
               host_lengths: Optional[List[int]] = None, local_len: int = 0) -> _Plan:
    """seqlens: the real GLOBAL lengths (int64 [B]) or None (no padding). host_lengths: the LOCAL
    (padded) length of every sequence when known on the host for free (batched forms, CPU
    tensors, metadata checks on), else None; used only with a window (which steps to skip,
    whether the window bounds anything at all; padded lengths are upper bounds of the real
    ones, so both stay exact for the real rows)."""
    local_lengths = None
    if seqlens is not None:
        cu = cu_local.to(torch.int64)
        local_lengths = cu[1:] - cu[:-1]
    longest = world_size * max(host_lengths) if host_lengths else None
    eff = effective_window(window, bool(causal), longest)
    min_unit, unit = 1, None
    if eff is not None:
        halves = layout.name == "zigzag"
        chunks = [n // 2 if halves else n for n in (host_lengths or []) if n > 0]
        min_unit = min(chunks) if chunks else 1
        cu = cu_local.to(torch.int64)
        unit = cu[1:] - cu[:-1]
        if halves:
            unit = torch.div(unit, 2, rounding_mode="floor")
    return _Plan(layout=layout, group=group, world_size=world_size, rank=rank,
                 scale=_resolve_scale(softmax_scale), causal=bool(causal),
                 deterministic=bool(deterministic), acc_dtype=accumulation_dtype(q3.dtype),
                 rows=_row_sets(layout, bool(causal) or eff is not None, cu_local, max_local, q3.shape[0]),
                 lse_recomputed=q3.dtype == torch.float64 and q3.device.type == "cpu",
                 seqlens=seqlens, local_lengths=local_lengths,
                 wide=world_size > 1 and fp32_partials(q3.device, q3.dtype),
                 window=eff, softcap=float(softcap), has_sinks=has_sinks, min_unit=min_unit, local_len=local_len,
                 unit=unit)


# ---- the entry points of the scheme modules ------------------------------------------------------------


def _agree(agreement: RankAgreement, q: Tensor, k: Tensor, softmax_scale: Optional[float], causal: bool,
           deterministic: bool, cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None,
           seqlens: Optional[Tensor] = None, window: Tuple[int, int] = (-1, -1), softcap: float = 0.0,
           sinks: Optional[Tensor] = None) -> None:
    """The cross-rank check (``rank_agreement``, opt-in) of a ring call's validated arguments."""

    def fingerprint() -> Fingerprint:
        fp = (Fingerprint().shape("the shape of q", q.shape).shape("the shape of k", k.shape)
              .dtype("the dtype of q", q.dtype).flag("causal", causal)
              .real("softmax_scale", effective_scale(softmax_scale, q.shape[-1]))
              .flag("deterministic", deterministic))
        fp.integer("window_size[0]", window[0]).integer("window_size[1]", window[1]).real("softcap", softcap)
        fp.flag("sinks", sinks is not None)
        if cu_seqlens is not None:
            fp.tensor_values("cu_seqlens", cu_seqlens).integer("max_seqlen", max_seqlen)
        fp.flag("padding (seqlens given)", seqlens is not None)
        if seqlens is not None:
            fp.tensor_values("seqlens", seqlens)
        return fp

    agreement.check(fingerprint)


def ring_attention(layout: RingLayout, q: Tensor, k: Tensor, v: Tensor, dropout_p: float,
                   softmax_scale: Optional[float], causal: bool, window_size: Tuple[int, int],
                   alibi_slopes: Optional[Tensor], deterministic: bool, return_attn_probs: bool,
                   group: Optional[object], seqlens: SeqlensArg = None, softcap: float = 0.0,
                   sinks: Optional[Tensor] = None):
    """The batched forms: q ``[B, L, Hq, D]``, k/v ``[B, L, Hk, D]`` (B sequences of L local
    tokens) -> out ``[B, L, Hq, D]``, or ``(out, lse [B, Hq, L], None)``. seqlens: the real
    GLOBAL length of each sequence (see the shared argument docs)."""
    group, world_size, rank = resolve_group(group)
    agreement = RankAgreement(layout.function_name(varlen=False), group, world_size, device_of(q),
                              metadata_checks_enabled(device_of(q)))
    with agreement.validating():
        window, softcap = _validate(q, k, v, dropout_p, window_size, alibi_slopes, layout, softcap, causal, sinks)
        _resolve_scale(softmax_scale)
        B, L = q.shape[:2]
        lengths = None if seqlens is None else _resolve_seqlens(
            seqlens, torch.full((B,), L, dtype=torch.int64), world_size, q.device, L)
    _agree(agreement, q, k, softmax_scale, causal, deterministic, seqlens=lengths, window=window, softcap=softcap,
           sinks=sinks)
    B, L, Hq, D = q.shape
    Hk = k.shape[2]
    cu = torch.arange(0, (B + 1) * L, max(L, 1), dtype=torch.int32, device=q.device)[: B + 1] if L > 0 \
        else torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    q3, k3, v3 = q.reshape(B * L, Hq, D), k.reshape(B * L, Hk, D), v.reshape(B * L, Hk, D)
    q3 = with_contiguous_head_dim(q3)  # the kernels read q as it is (K/V travel in a stacked copy)
    plan = _make_plan(layout, q3, cu, L, softmax_scale, causal, deterministic, group, world_size, rank, lengths,
                      window, softcap, sinks is not None, [L], L)
    out, lse = _RingAttention.apply(q3, k3, v3, cu, plan, sinks)
    out = out.view(B, L, Hq, D)
    if return_attn_probs:
        return out, lse.view(Hq, B, L).permute(1, 0, 2), None
    return out


def ring_attention_varlen(layout: RingLayout, q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor,
                          max_seqlen: int, dropout_p: float, softmax_scale: Optional[float], causal: bool,
                          window_size: Tuple[int, int], alibi_slopes: Optional[Tensor], deterministic: bool,
                          return_attn_probs: bool, group: Optional[object], seqlens: SeqlensArg = None,
                          softcap: float = 0.0, sinks: Optional[Tensor] = None):
    """The varlen forms: q ``[T, Hq, D]``, k/v ``[T, Hk, D]``, cu_seqlens the rank's LOCAL
    cumulative lengths -> out ``[T, Hq, D]``, or ``(out, lse [Hq, T], None)``. seqlens: the real
    GLOBAL length of each sequence (see the shared argument docs)."""
    group, world_size, rank = resolve_group(group)
    agreement = RankAgreement(layout.function_name(varlen=True), group, world_size, device_of(q),
                              metadata_checks_enabled(device_of(q)))
    with agreement.validating():
        window, softcap = _validate_varlen(q, k, v, cu_seqlens, max_seqlen, dropout_p, window_size, alibi_slopes,
                                           layout, softcap, causal, sinks)
        _resolve_scale(softmax_scale)
        lengths = None
        if seqlens is not None:
            cu = cu_seqlens.to(torch.int64)
            lengths = _resolve_seqlens(seqlens, cu[1:] - cu[:-1], world_size, q.device, None)
    _agree(agreement, q, k, softmax_scale, causal, deterministic, cu_seqlens, int(max_seqlen), lengths, window,
           softcap, sinks)
    host_lengths = None
    if window != (-1, -1) and metadata_checks_enabled(device_of(q)):  # free on CPU: exact step skipping
        cu = cu_seqlens.tolist()
        host_lengths = [b - a for a, b in zip(cu, cu[1:])]
    q = with_contiguous_head_dim(q)  # the kernels read q as it is (K/V travel in a stacked copy)
    plan = _make_plan(layout, q, cu_seqlens, int(max_seqlen), softmax_scale, causal, deterministic, group,
                      world_size, rank, lengths, window, softcap, sinks is not None, host_lengths)
    out, lse = _RingAttention.apply(q, k, v, cu_seqlens, plan, sinks)
    if return_attn_probs:
        return out, lse, None
    return out


# ---- the argument docs the public functions share ---------------------------------------------------

_BATCHED_ARGS_DOC = """
    Args (upstream ring-flash-attention's):
        q, k, v (or kv, qkv): the rank's local shard as above (Hq % Hk == 0; same dtype and
            device; strided views such as slices of a packed qkv are fine).
        dropout_p, alibi_slopes: only their defaults (NotImplementedError naming the argument
            otherwise).
        softmax_scale: default ``1 / sqrt(D)``.
        causal: causal attention over the GLOBAL token order (default False, as upstream).
        window_size: ``(left, right)``, flash-attn's local attention over GLOBAL positions: query
            p sees key j iff ``p - left <= j <= p + right`` (-1 = unbounded; with causal the
            right side is -1 or 0). Steps whose block no query sees are skipped.
        softcap: > 0: scores ``softcap * tanh(score / softcap)`` (0 = off).
        sinks: None or float32 ``[Hq]`` sink logits (counted once per row); their gradient is
            this rank's rows' share: the caller's gradient reduction over the ranks sums it,
            as for any parameter replicated across the ranks.
        deterministic: bit-identical backward kernels run to run.
        return_attn_probs: return ``(out, lse, None)``; lse: float32 ``[B, Hq, L]``, natural log,
            not differentiable.
        group: the ``torch.distributed`` process group (default: the default group; without an
            initialised one the call is single-process attention).
        seqlens: the real GLOBAL length of each sequence when it is shorter than N L (a length
            the layout cannot split evenly, or a padded batch): an int (every sequence), a
            sequence of B ints, or an int32/int64 tensor ``[B]`` on q's device; each at most
            N L. The global positions from it on are padding (the scheme's ``*_shard`` helper
            pads a sequence there with zeros): they never act as keys, and their rows get
            out = 0, lse = -inf and zero gradients, whatever they hold. Default: N L (no padding).

    Returns:
        ``out`` ``[B, L, Hq, D]`` (dtype of q), or ``(out, lse, None)``.

    Collective: every rank of ``group`` must call it with the same shapes and flags;
    ``RING_FLASH_ATTN_CHECK_METADATA=1`` compares them across the ranks (RuntimeError
    on every rank naming what differs); without it, ranks that disagree get wrong results or an
    abort inside the collective.
    """

_VARLEN_ARGS_DOC = """
    Args (upstream ring-flash-attention's):
        q, k, v (or kv, qkv): the rank's local tokens as above, packed sequences (Hq % Hk == 0;
            same dtype and device).
        cu_seqlens: int32 ``[B + 1]``, the rank's LOCAL cumulative lengths (every rank holds the
            same number of tokens of each sequence: its padded global length / N);
            ``cu_seqlens[-1] == T``.
        max_seqlen: Python int, the longest LOCAL sequence (a hint; never read from a tensor).
        dropout_p, alibi_slopes: only their defaults (NotImplementedError naming the argument
            otherwise).
        softmax_scale: default ``1 / sqrt(D)``.
        causal: causal attention over each sequence's GLOBAL token order (default False, as upstream).
        window_size: ``(left, right)``, flash-attn's local attention over each sequence's GLOBAL
            positions: query p sees key j iff ``p - left <= j <= p + right`` (-1 = unbounded;
            with causal the right side is -1 or 0). Steps whose block no query sees are skipped
            (exactly when the lengths are known on the host: CPU tensors or
            ``RING_FLASH_ATTN_CHECK_METADATA=1``; else the steps no sequence of one token per
            chunk could need).
        softcap: > 0: scores ``softcap * tanh(score / softcap)`` (0 = off).
        sinks: None or float32 ``[Hq]`` sink logits (counted once per row); their gradient is
            this rank's rows' share: the caller's gradient reduction over the ranks sums it,
            as for any parameter replicated across the ranks.
        deterministic: bit-identical backward kernels run to run.
        return_attn_probs: return ``(out, lse, None)``; lse: float32 ``[Hq, T]`` (flash-attn's
            varlen layout), natural log, not differentiable.
        group: the ``torch.distributed`` process group (default: the default group; without an
            initialised one the call is single-process attention).
        seqlens: the real GLOBAL length of each sequence when it is shorter than N times its
            local length (a length the layout cannot split evenly): a sequence of B ints or an
            int32/int64 tensor ``[B]`` on q's device (``global_cu_seqlens.diff()``). The layout's
            ``*_shard`` helper pads every sequence to the layout's unit and its
            ``*_local_cu_seqlens`` gives the matching local cu_seqlens. The positions from
            ``seqlens[b]`` on are padding: they never act as keys, and their rows get out = 0,
            lse = -inf and zero gradients, whatever they hold. Default: N times the local
            lengths (no padding).

    Returns:
        ``out`` ``[T, Hq, D]`` (dtype of q), or ``(out, lse, None)``.

    Metadata values are checked on the host where that is free (CPU tensors) or with
    ``RING_FLASH_ATTN_CHECK_METADATA=1``. Collective: every rank of ``group`` must call it with
    the same shapes, flags and cu_seqlens; ``RING_FLASH_ATTN_CHECK_METADATA=1`` compares them across the ranks (RuntimeError
    on every rank naming what differs); without it, ranks that disagree get wrong results or an
    abort inside the collective.
    """


def with_batched_args_doc(fn: Callable) -> Callable:
    """Appends the argument documentation of the batched ``[B, L, H, D]`` forms to fn's docstring."""
    fn.__doc__ = fn.__doc__.rstrip() + "\n" + _BATCHED_ARGS_DOC
    return fn


def with_varlen_args_doc(fn: Callable) -> Callable:
    """Appends the argument documentation of the varlen ``[T, H, D]`` forms to fn's docstring."""
    fn.__doc__ = fn.__doc__.rstrip() + "\n" + _VARLEN_ARGS_DOC
    return fn
