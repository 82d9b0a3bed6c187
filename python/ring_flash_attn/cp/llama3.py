"""Llama3 context parallelism in the CONTIGUOUS layout (upstream ring-flash-attention's
``llama3_flash_attn_varlen_func``): forward and backward on the library's grouped op.

Layout: N ranks; the packed batch (total T_g tokens, padded to a multiple of N by
``llama3_shard``: the padding rows are a sequence of their own after the last one) is cut into N
contiguous pieces of T = T_g / N tokens and rank r holds tokens ``[r T, (r+1) T)``. The metadata is what
``llama3_flash_attn_prepare_cu_seqlens`` returns for the rank: ``cu_seqlens_q`` (the rank's pieces
of the sequences it touches, relative to its first token), ``cu_seqlens_k`` (the keys each piece
needs, relative to ``local_k_slice.start`` in the gathered K/V), the maxima, and ``local_k_slice``.

Forward, per slice of ``heads_k_stride`` KV heads: all-gather the slice's K/V (rank-major order is
the natural order here, so no reordering), then ONE G=1 call of the grouped op: the local queries
against ``gathered[local_k_slice]`` with bottom-right causal alignment. The next slice's all-gather
is in flight while the current slice is computed (``all_gather.gather_kv_slices``).

Backward, per slice: re-gather K/V, one G=1 backward call writing dQ (local) and dK/dV of the
gathered slice's ``local_k_slice`` rows into a zeroed buffer of the whole gathered slice, then an
asynchronous reduce-scatter of that buffer to the owning ranks (one slice behind;
``reduce_scatter.SliceReduceScatter``). The buffer and the reduce-scatter are in fp32 (fp64 for
fp64 data) unless ``grad_reduce_dtype`` says otherwise, so that dK/dV are rounded to the input
dtype once; where the backend can return a call's dK/dV unrounded (``precision.fp32_partials``),
the backward calls run on fp32 operands.

Local attention (``window_size``, global positions): the window goes to the kernel calls unchanged
(the keys of every piece end where its queries end, so the bottom-right alignment is the global
diagonal; without causal the last piece's keys run past the rank's last token and that piece gets a
diagonal shift), and the key range is trimmed to what the rank's queries can see
(``window.contiguous_key_range``): the first piece's keys start at most ``left`` tokens before the
rank's first token, the last piece's (without causal) end at most ``right`` tokens after its last.
``softcap`` and ``sinks`` go to the kernel calls: each row sees all of its keys in one call, so the
sink counts once per row; the sinks' gradient is the rank's rows' share.

No host synchronisation in forward or backward: ``max_seqlen_*`` and ``local_k_slice`` are Python
values from the caller; metadata VALUES are checked on the host only where that is free (CPU) or
when ``RING_FLASH_ATTN_CHECK_METADATA=1`` asks for it.

The K/V-packed and Q/K/V-packed forms of the public functions are in ``packed.py`` (generated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import ops
from .._checks import check_flash_attn_defaults
from ..grouped import _resolve_scale
from .all_gather import KVSlicePlan, gather_kv_slices, sliced_kv_attention
from .llama3_layout import llama3_flash_attn_prepare_cu_seqlens
from .precision import accumulation_dtype, fp32_partials, widen
from .process_group import resolve_group
from .rank_agreement import Fingerprint, RankAgreement, device_of, effective_scale
from .reduce_scatter import SliceReduceScatter
from .scheme import BatchMetadata
from .sinks import check_sinks, contiguous_sinks
from .validation import (check_collective_device, check_cu_seqlens_pair, check_heads, check_heads_k_stride,
                         check_int32_count, check_local_tokens, check_python_int, check_qkv, metadata_checks_enabled,
                         short_list, with_contiguous_head_dim)
from .window import contiguous_key_range, effective_window

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["HF_ATTN_LLAMA3", "hf_batch_metadata", "llama3_flash_attn_varlen_func"]

# The name of the scheme in transformers' AttentionInterface (ring_flash_attn.hf_adapter).
HF_ATTN_LLAMA3 = "ring_attn_llama3"


@dataclass
class _Plan(KVSlicePlan):
    """What the sliced all-gather / reduce-scatter and the kernels of one call need."""

    group: object
    world_size: int
    rank: int
    total_local: int  # T: local tokens of q, k, v
    num_heads_q: int
    num_heads_k: int
    heads_k_stride: int
    scale: float  # 0.0 = the library default
    causal: bool
    deterministic: bool
    max_seqlen_q: int
    max_seqlen_k: int
    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    k_slice: slice  # rows of the gathered K/V the local queries use
    reduce_dtype: torch.dtype = torch.float32  # of the dK/dV buffer and its reduce-scatter
    wide: bool = False  # backward calls on fp32 operands (precision.fp32_partials)
    src: Optional[Tensor] = None  # the contiguous layout needs no reordering
    inv_src: Optional[Tensor] = None
    cu_seqlens_k_used: Optional[Tensor] = None  # cu_seqlens_k of the trimmed key range (a window)
    features: dict = field(default_factory=dict)  # window_size / softcap / diagonal_shift_list
    sinks: Optional[Tensor] = None  # float32 [Hq], to the kernels (sliced per KV-head slice)

    def caller_tensors(self) -> Tuple[Tensor, ...]:
        return self.cu_seqlens_q, self.cu_seqlens_k  # the caller's, read again by the backward

    @property
    def kernel_cu_seqlens_k(self) -> Tensor:
        return self.cu_seqlens_k if self.cu_seqlens_k_used is None else self.cu_seqlens_k_used

    def kernel_features(self, heads: slice) -> dict:
        """The kernel calls' keyword arguments for the query heads ``heads`` of a slice."""
        if self.sinks is None:
            return self.features
        return dict(self.features, sinks=self.sinks[heads])


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
              local_k_slice, dropout_p, window_size, alibi_slopes, world_size, softcap=0.0, causal=None,
              sinks=None) -> Tuple[slice, Tuple[int, int], float]:
    """Host-side checks of what shapes and Python values tell; returns the normalised k slice,
    the window and the softcap."""
    window, softcap = check_flash_attn_defaults(dropout_p, window_size, alibi_slopes, softcap, causal)
    check_qkv(q, k, v, 3, "[local_tokens, heads, head_dim]")
    check_local_tokens(q, k, v, "the tokens of q: the contiguous layout shards q, k and v alike")
    check_heads(q, k)
    T, Hk = q.shape[0], k.shape[1]
    check_int32_count(world_size * T, "q", f"tokens in the gathered K/V (world_size {world_size} x {T} local tokens)")
    check_heads_k_stride(heads_k_stride, Hk)
    check_cu_seqlens_pair(cu_seqlens_q, cu_seqlens_k, q.device)
    check_python_int(max_seqlen_q, "max_seqlen_q", "the longest local query piece, a hint")
    check_python_int(max_seqlen_k, "max_seqlen_k", "the longest key range, a hint")
    if local_k_slice is None:
        local_k_slice = slice(None)
    if not isinstance(local_k_slice, slice):
        raise ValueError(f"local_k_slice: expected a slice (as llama3_flash_attn_prepare_cu_seqlens returns), "
                         f"got {type(local_k_slice).__name__}")
    start, stop, step = local_k_slice.indices(world_size * T)
    if step != 1:
        raise ValueError(f"local_k_slice: expected a step of 1, got {local_k_slice.step}")
    check_collective_device(q, world_size)
    check_sinks(sinks, q.shape[1], q.device)
    return slice(start, max(start, stop)), window, softcap


def _check_values(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, total_local: int, k_slice: slice, rank: int,
                  causal: bool) -> Tuple[List[int], List[int]]:
    """Metadata VALUES (host read: free on CPU, a sync on CUDA); returns them (host ints).

    Besides each tensor's own checks, the keys must be where the contiguous layout puts them
    (as ``llama3_flash_attn_prepare_cu_seqlens`` computes them): with the rank's first token at
    global row ``r T`` and ``local_k_slice.start`` at ``s``, a sequence starting among the rank's
    queries (``cu_seqlens_q[i]``, 0 < i < B) starts at the same global row among the keys
    (``s + cu_seqlens_k[i]``), the first piece's keys start at or before ``r T``, and the keys
    end at the rank's last token (causal) or at or after it (not causal)."""
    k_rows = k_slice.stop - k_slice.start
    checked = []
    for name, cu, last, what in (
            ("cu_seqlens_q", cu_seqlens_q, total_local, f"{total_local} local tokens of q"),
            ("cu_seqlens_k", cu_seqlens_k, k_rows, f"{k_rows} rows of local_k_slice in the gathered K/V")):
        values = cu.tolist()
        if values[0] != 0:
            raise ValueError(f"{name}: expected the first entry to be 0, got {values[0]}")
        if any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name}: expected non-decreasing entries, got {short_list(values)}")
        if name == "cu_seqlens_q" and values[-1] != last:
            raise ValueError(f"{name}: expected the last entry to be {last} (the {what}), got {values[-1]}")
        if name == "cu_seqlens_k" and values[-1] > last:
            raise ValueError(f"{name}: expected the last entry to be <= {last} (the {what}), got {values[-1]}")
        checked.append(values)
    q_values, k_values = checked
    first, end, s = rank * total_local, (rank + 1) * total_local, k_slice.start
    if s > first:
        raise ValueError(f"local_k_slice: expected a start <= {first} (the rank's first token: the keys of its first "
                         f"sequence piece start at or before it), got {s}")
    for i in range(1, len(q_values) - 1):
        if s + k_values[i] != first + q_values[i]:
            raise ValueError(
                f"cu_seqlens_k: expected entry {i} to be {first + q_values[i] - s} (where cu_seqlens_q[{i}] = "
                f"{q_values[i]} puts that sequence's start: the rank's first token {first} + {q_values[i]} - "
                f"local_k_slice.start {s}), got {k_values[i]}")
    key_end = s + k_values[-1]
    if causal and key_end != end:
        raise ValueError(f"cu_seqlens_k: expected the last entry to be {end - s} (causal: the keys end at the rank's "
                         f"last token, {end} - local_k_slice.start {s}), got {k_values[-1]}")
    if not causal and key_end < end:
        raise ValueError(f"cu_seqlens_k: expected the last entry to be >= {end - s} (the keys of the rank's last "
                         f"sequence piece end at or after its last token, {end} - local_k_slice.start {s}), got "
                         f"{k_values[-1]}")
    return q_values, k_values


def _boundary_facts(q_values: List[int], k_values: List[int], total_local: int, k_slice: slice,
                    rank: int) -> List[int]:
    """The rank's claims about the global sequence boundaries, for the cross-rank check:
    [start of the sequence holding its first token, end of the keys of its last piece, its first
    and last own boundary (a sequence start among its tokens, -1 if none)]."""
    first, s = rank * total_local, k_slice.start
    own = [first + x for x in q_values[1:-1]] + ([first] if s == first else [])
    return [s, s + k_values[-1], min(own) if own else -1, max(own) if own else -1]


def _boundaries_agree(causal: bool, total_local: int):
    """The cross-rank consistency check of the ranks' ``_boundary_facts``: every rank's first
    sequence starts at the last boundary at or before its first token and (not causal) its last
    sequence ends at the first boundary at or after its end, as the other ranks' own boundaries
    place them (global row 0 and the total are boundaries)."""

    def check(facts: List[Dict[str, List[int]]]) -> Optional[str]:
        N, T = len(facts), total_local
        key_start, key_end, own_min, own_max = zip(*(f["sequence boundaries"] for f in facts))
        advice = ("every rank must take its metadata from the same GLOBAL cu_seqlens "
                  "(llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world_size))")
        for r in range(N):
            before = [0] + [own_max[p] for p in range(r) if own_max[p] >= 0] + \
                ([r * T] if own_min[r] == r * T else [])
            if key_start[r] != max(before):
                return (f"ranks disagree on the sequence boundaries: rank {r} starts the sequence holding its first "
                        f"token {r * T} at token {key_start[r]} (local_k_slice.start), but the ranks' cu_seqlens_q "
                        f"put the last sequence start at or before token {r * T} at {max(before)}; {advice}")
            if causal:
                continue
            after = [N * T] + [own_min[p] for p in range(r + 1, N) if own_min[p] >= 0] + \
                ([(r + 1) * T] if own_max[r] == (r + 1) * T else [])
            if key_end[r] != min(after):
                return (f"ranks disagree on the sequence boundaries: rank {r} ends the sequence holding its last "
                        f"token {(r + 1) * T - 1} at token {key_end[r]} (local_k_slice.start + cu_seqlens_k[-1]), "
                        f"but the ranks' metadata put the first sequence boundary at or after token {(r + 1) * T} at "
                        f"{min(after)}; {advice}")
        return None

    return check


def _forward(plan: _Plan, q: Tensor, k: Tensor, v: Tensor):
    T, Hq, D = q.shape
    hq, ks = plan.heads_q_per_slice, plan.k_slice
    out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    lse_buf = torch.empty((plan.num_slices, hq, T), dtype=torch.float32, device=q.device)
    for s, (k_s, v_s) in enumerate(gather_kv_slices(plan, k, v)):
        qsl = slice(s * hq, (s + 1) * hq)
        ops.fwd_into([q[:, qsl]], k_s[ks], v_s[ks], [plan.cu_seqlens_q], plan.kernel_cu_seqlens_k, [None],
                     [plan.max_seqlen_q], plan.max_seqlen_k, plan.scale, plan.causal, [out[:, qsl]], [lse_buf[s]],
                     **plan.kernel_features(qsl))
        del k_s, v_s
    return out, lse_buf.reshape(Hq, T), lse_buf


def _backward(plan: _Plan, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse_buf: Tensor):
    if not dout.is_contiguous():
        dout = dout.contiguous()  # e.g. the expanded gradient of a .sum()
    hq, hs, ks, D = plan.heads_q_per_slice, plan.heads_k_stride, plan.k_slice, k.shape[2]
    q_in, out_in, dout_in = (widen(t, plan.wide) for t in (q, out, dout))
    call_dtype = q_in.dtype
    dq = torch.empty(q.shape, dtype=call_dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    rs = SliceReduceScatter(plan, dk, dv)
    for s, (k_s, v_s) in enumerate(gather_kv_slices(plan, k, v)):
        qsl = slice(s * hq, (s + 1) * hq)
        # rows outside local_k_slice get no gradient from this rank
        dkv = torch.zeros((plan.total_global, 2, hs, D), dtype=plan.reduce_dtype, device=k.device)
        # the call writes dK/dV in its own dtype: straight into the buffer, or through a copy
        out_kv = dkv[ks] if call_dtype == plan.reduce_dtype else torch.empty(
            (ks.stop - ks.start, 2, hs, D), dtype=call_dtype, device=k.device)
        ops.bwd_into([dout_in[:, qsl]], [q_in[:, qsl]], widen(k_s[ks], plan.wide), widen(v_s[ks], plan.wide),
                     [out_in[:, qsl]], [lse_buf[s]], [plan.cu_seqlens_q], plan.kernel_cu_seqlens_k, [None],
                     [plan.max_seqlen_q], plan.max_seqlen_k, plan.scale, plan.causal, plan.deterministic,
                     [dq[:, qsl]], out_kv[:, 0], out_kv[:, 1], **plan.kernel_features(qsl))
        if out_kv.dtype != dkv.dtype:
            dkv[ks] = out_kv
        del k_s, v_s, out_kv
        rs.submit(s, dkv)
        del dkv
    rs.finish()
    return dq.to(q.dtype), dk, dv


def llama3_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, heads_k_stride: int, local_k_slice: Optional[slice], dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[ProcessGroup] = None, grad_reduce_dtype: Optional[torch.dtype] = None,
    softcap: float = 0.0, sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """Llama3 context-parallel attention in the contiguous layout (upstream's signature).

    Args:
        q: ``[T, Hq, D]``, k, v: ``[T, Hk, D]``: rank r's contiguous piece ``[r T, (r+1) T)`` of the
            packed batch (Hq % Hk == 0; same dtype and device; any token/head strides).
        cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice: as
            ``llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, causal, rank, world_size)`` returns
            them (int32 tensors on q's device, Python ints, a slice of the gathered K/V rows;
            ``local_k_slice=None`` means all of them).
        heads_k_stride: KV heads per all-gather slice (divides Hk).
        dropout_p, alibi_slopes: only their defaults (NotImplementedError otherwise).
        softmax_scale: default ``1 / sqrt(D)``. causal: bottom-right aligned per sequence piece.
        window_size: ``(left, right)``, flash-attn's local attention over each sequence's GLOBAL
            positions (-1 = unbounded; with causal the right side is -1 or 0); the kernels then
            see only the keys the rank's queries can reach (the all-gather itself is unchanged).
        softcap: > 0: scores ``softcap * tanh(score / softcap)`` (0 = off).
        sinks: None or float32 ``[Hq]`` sink logits; their gradient is this rank's rows' share
            (the caller's gradient reduction over the ranks sums it).
        deterministic: bit-identical backward run to run.
        return_attn_probs: return ``(out, lse, None)`` (lse float32 ``[Hq, T]``, not differentiable).
        group: the process group (default: the default group; none initialised: single process).
        grad_reduce_dtype: dtype of the dK/dV reduce-scatter: None = fp32 (fp64 for fp64 data),
            so that the error of dK/dV does not grow with the number of ranks; the dtype of k
            halves its bytes at the cost of a rounding per addition.

    Returns ``out`` ``[T, Hq, D]`` or ``(out, lse, None)``. Collective: every rank of ``group``
    must call it with the same shapes and flags and its metadata of the same global batch;
    ``RING_FLASH_ATTN_CHECK_METADATA=1`` compares them across the ranks (RuntimeError
    on every rank naming what differs); without it, ranks that disagree get wrong results or an
    abort inside the collective. No host synchronisation in forward or backward (without
    that variable, on CUDA).
    """
    group, world_size, rank = resolve_group(group)
    values_checked = metadata_checks_enabled(device_of(q))
    agreement = RankAgreement("llama3_flash_attn_varlen_func", group, world_size, device_of(q), values_checked)
    with agreement.validating():
        k_slice, window, softcap = _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             heads_k_stride, local_k_slice, dropout_p, window_size, alibi_slopes,
                                             world_size, softcap, causal, sinks)
        scale = _resolve_scale(softmax_scale)
        if grad_reduce_dtype is not None and grad_reduce_dtype not in (torch.float32, torch.float64, q.dtype):
            raise ValueError(f"grad_reduce_dtype: expected None, torch.float32, torch.float64 or {q.dtype} "
                             f"(the dtype of q), got {grad_reduce_dtype}")
        reduce_dtype = grad_reduce_dtype if grad_reduce_dtype is not None else accumulation_dtype(q.dtype)
        if values_checked:
            q_values, k_values = _check_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k_slice, rank, bool(causal))
    agreement.check(lambda: Fingerprint()
                    .shape("the shape of q", q.shape).shape("the shape of k", k.shape)
                    .dtype("the dtype of q", q.dtype).integer("heads_k_stride", heads_k_stride)
                    .flag("causal", causal).real("softmax_scale", effective_scale(softmax_scale, q.shape[-1]))
                    .flag("deterministic", deterministic)
                    .dtype("the dtype of the dK/dV reduction (grad_reduce_dtype)", reduce_dtype)
                    .integer("window_size[0]", window[0]).integer("window_size[1]", window[1])
                    .real("softcap", softcap).flag("sinks", sinks is not None)
                    .local("sequence boundaries", _boundary_facts(q_values, k_values, q.shape[0], k_slice, rank)),
                    _boundaries_agree(bool(causal), q.shape[0]))
    # the kernels read q and the sinks as they are (K/V arrive in gathered copies)
    q, sinks = with_contiguous_head_dim(q), contiguous_sinks(sinks)
    plan = _Plan(
        group=group, world_size=world_size, rank=rank, total_local=q.shape[0], num_heads_q=q.shape[1],
        num_heads_k=k.shape[1], heads_k_stride=int(heads_k_stride), scale=scale,
        causal=bool(causal), deterministic=bool(deterministic), max_seqlen_q=int(max_seqlen_q),
        max_seqlen_k=int(max_seqlen_k), cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, k_slice=k_slice,
        reduce_dtype=reduce_dtype, wide=world_size > 1 and fp32_partials(q.device, q.dtype), sinks=sinks)
    _apply_window(plan, effective_window(window, bool(causal), None), softcap)
    return sliced_kv_attention(q, k, v, plan, _forward, _backward, return_attn_probs, sinks)


def _apply_window(plan: _Plan, window: Optional[Tuple[int, int]], softcap: float) -> None:
    """The kernel features of a call: softcap, and a window with the trimmed key range and the
    last piece's diagonal shift (``window.contiguous_key_range``); device ops only. The padding
    rows of a packed total that does not divide (``llama3_shard``) are a sequence of their own
    after the last one: the trim treats it as any sequence (its rows see only its own keys)."""
    plan.features = {"softcap": softcap} if softcap else {}
    if window is None:
        return
    plan.features["window_size"] = list(window)
    k_slice, last_shift = contiguous_key_range(window, plan.causal, plan.rank, plan.total_local, plan.k_slice)
    cu_q, cu_k = plan.cu_seqlens_q, plan.cu_seqlens_k
    if k_slice != plan.k_slice:
        cu_used = cu_k - (k_slice.start - plan.k_slice.start)  # a new tensor: the caller's is not changed
        cu_used[0] = 0
        cu_used[-1] = k_slice.stop - k_slice.start
        plan.cu_seqlens_k_used, plan.k_slice = cu_used, k_slice
    if last_shift:
        shift = torch.zeros(cu_q.shape[0] - 1, dtype=torch.int32, device=cu_q.device)
        shift[-1] = last_shift
        plan.features["diagonal_shift_list"] = [shift]


def hf_batch_metadata(cu_seqlens: List[int], rank: int, world_size: int) -> Dict[bool, BatchMetadata]:
    """The HF adapter's per-batch metadata: ``llama3_flash_attn_prepare_cu_seqlens`` of the GLOBAL
    ``cu_seqlens`` (host ints) for ``rank``, causal and not (CPU tensors)."""
    return {c: llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, c, rank, world_size) for c in (True, False)}
