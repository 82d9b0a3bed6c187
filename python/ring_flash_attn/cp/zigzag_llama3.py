"""Zigzag llama3 context parallelism on ``torch.distributed``: forward and backward.

Layout (see ``zigzag_layout``): N ranks; every sequence b of the packed batch (global length L_b,
any length) is cut into 2N chunks of c_b = ceil(L_b / 2N) tokens, the last 2N c_b - L_b of them
padding, and rank r holds chunks r and 2N-1-r, so its LOCAL cu_seqlens has 2 c_b rows per
sequence (the GLOBAL one divided by N when every length is a multiple of 2N).

Forward, per slice of ``heads_k_stride`` KV heads (and the Hq/Hk query heads of each):

1. all-gather the slice's local K and V (one collective, K and V interleaved) - asynchronously:
   the NEXT slice's all-gather is in flight while the current slice is computed
   (``all_gather.gather_kv_slices``);
2. reorder the gathered rows from rank-major zigzag order to natural order with one
   ``index_select`` (the index map is built once per call on the device);
3. attention of two query groups over that one K/V: the "early" group (chunk r of every
   sequence) sees the first (r+1) c_b keys of sequence b, the "late" group (chunk 2N-1-r) the
   first (2N-r) c_b keys, both causal with bottom-right alignment; both groups use the padded
   GLOBAL cu_seqlens (2N c_b per sequence) for the keys and ``seqused_k`` = (r+1) c_b resp.
   (2N-r) c_b (int32 tensors computed on the device). Each group's chunk of sequence b is two
   sequences for the kernels (``padding.split_padding``): its real rows against its real keys
   (seqused_k capped at L_b; not causal: all L_b real keys), then its padding rows against no
   key (O = 0, LSE = -inf, no gradient); padding keys are never read.

Backward, per slice: re-gather K/V (next slice in flight, as in the forward), compute dQ (local)
and the slice's dK/dV over the whole gathered K/V with the grouped backward (summed over both
groups), put dK/dV back in rank-major zigzag order and reduce-scatter them to the owning ranks
(in fp32 unless ``grad_reduce_dtype`` says otherwise: a reduction in bf16 rounds at every
addition, so its error grows with the number of ranks) asynchronously: slice s's reduce-scatter
runs while slice s+1 is computed (``reduce_scatter.SliceReduceScatter``). Where the backend can
return a call's dK/dV unrounded (``precision.fp32_partials``), the backward calls run on fp32
operands and write fp32 dK/dV.

Three implementations of step 3: ``baseline`` (one library call per group),
``grouped_python`` (``grouped_python._flash_attn_varlen_forward_grouped``: one G=1 call over both
groups with K/V duplicated; its backward is the same rewrite through one G=1 backward call) and
``fused`` (one call of the fused grouped kernel, G=2, forward and backward).

Local attention (``window_size``, global positions), ``softcap`` and ``sinks`` go to the kernel
calls of every implementation. Causal: each group's keys end where its queries end, so the window
applies unchanged. Without causal a group sees the keys up to ``right`` tokens past its chunk
(``seqused_k``, the whole sequence without a right bound) and gets the diagonal shift that moves
its diagonal from the end of those keys to its own positions. Every row sees all of its keys in
one call, so a sink counts once per row; the sinks' gradient is the rank's rows' share.

No host synchronisation anywhere in forward or backward (no ``.item()``, no device-to-host copy,
no value-dependent Python control flow): every index map and per-group length is a device tensor
built from cu_seqlens and host-known sizes, and ``max_seqlen_*`` are Python ints from the caller.
Metadata VALUES are validated on the host where that is free (CPU tensors) or when
``RING_FLASH_ATTN_CHECK_METADATA=1`` asks for it (then it synchronises).

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
from .._grouped_rewrite import combined_call
from .all_gather import KVSlicePlan, gather_kv_slices, sliced_kv_attention
from .index_maps import inverse_permutation, sequence_of
from .llama3 import HF_ATTN_LLAMA3
from .padding import local_cu_seqlens, split_padding
from .precision import accumulation_dtype, fp32_partials, widen
from .process_group import resolve_group
from .rank_agreement import Fingerprint, RankAgreement, device_of, effective_scale
from .reduce_scatter import SliceReduceScatter
from .scheme import BatchMetadata, BatchNotSupported
from .sinks import check_sinks, contiguous_sinks
from .validation import (check_collective_device, check_cu_seqlens_pair, check_heads, check_heads_k_stride,
                         check_int32_count, check_local_tokens, check_python_int, check_qkv, metadata_checks_enabled,
                         short_list)
from .window import effective_window
from .zigzag_layout import zigzag_check_cu_seqlens, zigzag_gathered_to_global_index, zigzag_llama3_prepare_cu_seqlens

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["HF_ATTN_ZIGZAG_LLAMA3", "hf_batch_metadata", "resolve_impl",
           "zigzag_llama3_flash_attn_varlen_func", "IMPL_BASELINE", "IMPL_GROUPED_PYTHON", "IMPL_FUSED"]

IMPL_BASELINE = "baseline"
IMPL_GROUPED_PYTHON = "grouped_python"
IMPL_FUSED = "fused"

# The name of the scheme in transformers' AttentionInterface (ring_flash_attn.hf_adapter).
HF_ATTN_ZIGZAG_LLAMA3 = "ring_attn_zigzag_llama3"


def resolve_impl(use_grouped_attention: bool = False, use_triton_grouped: bool = False,
                 use_fused_kernel: bool = False) -> str:
    """The implementation the flags select: the fused kernel if ``use_fused_kernel`` or its alias
    ``use_triton_grouped`` is set (it takes precedence), else the Python-wrapper grouping if
    ``use_grouped_attention``, else the baseline."""
    if use_fused_kernel or use_triton_grouped:
        return IMPL_FUSED
    if use_grouped_attention:
        return IMPL_GROUPED_PYTHON
    return IMPL_BASELINE


# ---- validation --------------------------------------------------------------------------------


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
              local_k_slice, dropout_p, window_size, alibi_slopes, grad_reduce_dtype, world_size, impl,
              softcap=0.0, causal=None, sinks=None) -> Tuple[Tuple[int, int], float]:
    """Host-side checks of everything the shapes tell (no tensor values are read here); returns
    the window and the softcap."""
    check_qkv(q, k, v, 3, "[local_tokens, heads, head_dim]")
    check_local_tokens(q, k, v, "the tokens of q: the zigzag layout shards q, k and v alike")
    check_heads(q, k)
    T, Hk = q.shape[0], k.shape[1]
    if T % 2:
        raise ValueError(f"q: expected an even number of local tokens (every sequence contributes two chunks of "
                         f"equal length), got {T}")
    check_int32_count(world_size * T, "q", f"tokens in the gathered K/V (world_size {world_size} x {T} local tokens)")
    if impl == IMPL_GROUPED_PYTHON:  # its K/V is duplicated: cu_seqlens_k + N T must fit int32
        check_int32_count(2 * world_size * T, "q", f"rows of the K/V duplicated by use_grouped_attention (2 x "
                                                   f"world_size {world_size} x {T} local tokens)")
    check_heads_k_stride(heads_k_stride, Hk)
    check_cu_seqlens_pair(cu_seqlens_q, cu_seqlens_k, q.device)
    check_python_int(max_seqlen_q, "max_seqlen_q", "the longest local sequence, a hint")
    check_python_int(max_seqlen_k, "max_seqlen_k", "the longest global sequence, a hint")
    if local_k_slice is not None and not isinstance(local_k_slice, slice):
        raise ValueError(f"local_k_slice: expected a slice or None, got {type(local_k_slice).__name__}")
    features = check_flash_attn_defaults(dropout_p, window_size, alibi_slopes, softcap, causal)
    check_sinks(sinks, q.shape[1], q.device)
    if grad_reduce_dtype is not None and grad_reduce_dtype not in (torch.float32, torch.float64, q.dtype):
        raise ValueError(f"grad_reduce_dtype: expected None, torch.float32, torch.float64 or {q.dtype} "
                         f"(the dtype of q), got {grad_reduce_dtype}")
    check_collective_device(q, world_size)
    return features


def _check_values(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, world_size: int, total_local: int) -> None:
    """Metadata VALUES (host read: free on CPU, a sync on CUDA; see metadata_checks_enabled)."""
    zigzag_check_cu_seqlens(cu_seqlens_k, world_size, "cu_seqlens_k")
    expected = local_cu_seqlens("zigzag", cu_seqlens_k, world_size).tolist()
    if expected[-1] != total_local:
        raise ValueError(
            f"cu_seqlens_k: expected the GLOBAL cumulative lengths of a batch whose zigzag shard has the "
            f"{total_local} local tokens of q (2 ceil(L_b / 2N) per sequence, world_size {world_size}), got "
            f"{short_list(cu_seqlens_k.tolist())} ({expected[-1]} local tokens)")
    local = cu_seqlens_q.tolist()
    if local != expected:
        raise ValueError(
            f"cu_seqlens_q: expected the rank's LOCAL cumulative lengths, zigzag_local_cu_seqlens(cu_seqlens_k, "
            f"world_size) = {short_list(expected)}, got {short_list(local)}")


# ---- the per-call plan: device-side index maps and per-group metadata --------------------------


@dataclass
class _Plan(KVSlicePlan):
    group: object
    world_size: int
    rank: int
    impl: str
    total_local: int  # T: local tokens of q, k, v
    num_heads_q: int
    num_heads_k: int
    heads_k_stride: int
    softmax_scale: Optional[float]  # as given (None = default), for the public API calls
    scale: float  # for the op-level calls (0.0 = library default)
    causal: bool
    deterministic: bool
    reduce_dtype: torch.dtype
    max_seqlen_q: int  # per group (c_max), a hint
    max_seqlen_k: int  # padded global (2N c_max), a hint
    cu_seqlens_k: Tensor  # the caller's GLOBAL cumulative lengths (real), int32 [B+1]
    cu_q_groups: List[Tensor]  # int32 [2B+1] per group: real rows, padding rows of each chunk
    cu_k_split: Tensor  # int32 [2B+1]: the padded GLOBAL sequences, each followed by an empty one
    seqused: List[Tensor]  # int32 [2B] per group: the real keys of each chunk's real rows, then 0
    wide: bool  # backward calls on fp32 operands (precision.fp32_partials)
    perm: Optional[Tensor]  # grouped row -> local row (int64 [T]); None when the identity (B = 1)
    inv_perm: Optional[Tensor]
    src: Optional[Tensor]  # natural global row -> rank-major gathered row; None when N = 1
    inv_src: Optional[Tensor]
    combined: Optional[Tuple[Tensor, Tensor, Tensor]] = field(default=None)  # grouped_python bwd metadata
    features: dict = field(default_factory=dict)  # window_size / softcap of every kernel call
    shifts: Optional[List[Tensor]] = None  # int32 [B] per group: diagonal shift (non-causal window)
    sinks: Optional[Tensor] = None  # float32 [Hq], to the kernels (sliced per KV-head slice)

    @property
    def half(self) -> int:
        return self.total_local // 2

    def caller_tensors(self) -> Tuple[Tensor, ...]:
        # the caller's GLOBAL cu_seqlens, read again by the backward (everything else the plan
        # holds was built from it in the forward)
        return (self.cu_seqlens_k,)

    def kernel_features(self, heads: slice, groups: Tuple[int, ...] = (0, 1)) -> dict:
        """The keyword arguments of a kernel call over the query heads ``heads`` of a slice and
        the query groups ``groups`` (one problem group each)."""
        features = dict(self.features)
        if self.shifts is not None:
            features["diagonal_shift_list"] = [self.shifts[g] for g in groups]
        if self.sinks is not None:
            features["sinks"] = self.sinks[heads]
        return features


def _make_plan(q, k, cu_seqlens_k, max_seqlen_k, heads_k_stride, softmax_scale, causal,
               deterministic, grad_reduce_dtype, impl, group, world_size, rank,
               window: Optional[Tuple[int, int]] = None, softcap: float = 0.0,
               sinks: Optional[Tensor] = None) -> _Plan:
    T = q.shape[0]
    N, two_n = world_size, 2 * world_size
    B = cu_seqlens_k.shape[0] - 1
    cu = cu_seqlens_k.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    chunk = torch.div(lengths + (two_n - 1), two_n, rounding_mode="floor")  # c_b, padding included
    cu_half64 = torch.zeros_like(cu)
    torch.cumsum(chunk, 0, out=cu_half64[1:])
    cu_padded = (cu_half64 * two_n).to(torch.int32)  # the padded GLOBAL batch: 2N c_b per sequence
    # [2, B], one row per group: the real rows of its chunk of each sequence (a prefix of the
    # chunk), and the keys they see (causal: up to the chunk's end; not causal: all L_b, or with a
    # window up to `right` tokens past the last real row)
    first = torch.stack([rank * chunk, (two_n - 1 - rank) * chunk])  # the chunks' first positions
    q_real = torch.minimum((lengths - first).clamp(min=0), chunk)
    shifts = None
    if causal:
        # the real rows' keys end where they end: the kernel's bottom-right diagonal (row i's key
        # i + Lk - Lq, Lk - Lq = first) is each row's own position, with or without a window
        used = torch.minimum(first + chunk, lengths)
    elif window is not None:
        # the real rows end at q_end (a global position); their keys run up to `right` tokens past
        # it. The diagonal shift moves the kernel's diagonal (row i's key i + Lk - Lq, Lk = used,
        # Lq = q_real) to row i's own position first + i: shift = first - (used - q_real). The
        # padding part of each chunk sees no key (its shift, 0, is never read).
        q_end = first + q_real
        used = lengths.expand(2, B) if window[1] < 0 else torch.minimum(lengths, q_end + window[1])
        shift = q_end - used
        shifts = list(torch.stack([shift, torch.zeros_like(shift)], dim=-1).flatten(-2).to(torch.int32).unbind(0))
    else:
        used = lengths.expand(2, B)
    cu_q_split, cu_k_split, used_split = split_padding(cu_half64, cu_padded, q_real, used)

    perm = inv_perm = None
    if B > 1:
        # Grouped order: [early chunks of all sequences ; late chunks of all sequences]; both
        # halves are described by cu_half64 (c_b rows per sequence). Row j of half g comes from
        # local row 2 cu_half64[b] + g c_b + (j - cu_half64[b]).
        half = T // 2
        rows = torch.arange(T, device=q.device, dtype=torch.int64)
        late = rows >= half
        j = rows - late.to(torch.int64) * half
        b = sequence_of(j, cu_half64)
        perm = (cu_half64[b] + j + late.to(torch.int64) * chunk[b]).clamp_(0, max(T, 1) - 1)
        inv_perm = inverse_permutation(perm)

    src = inv_src = None
    if N > 1:
        src = zigzag_gathered_to_global_index(cu_padded, N, T)
        inv_src = inverse_permutation(src)

    plan = _Plan(
        group=group, world_size=N, rank=rank, impl=impl, total_local=T,
        num_heads_q=q.shape[1], num_heads_k=k.shape[1], heads_k_stride=int(heads_k_stride),
        softmax_scale=softmax_scale, scale=_resolve_scale(softmax_scale), causal=bool(causal),
        deterministic=bool(deterministic),
        reduce_dtype=grad_reduce_dtype if grad_reduce_dtype is not None else accumulation_dtype(k.dtype),
        max_seqlen_q=-(-int(max_seqlen_k) // two_n), max_seqlen_k=-(-int(max_seqlen_k) // two_n) * two_n,
        cu_seqlens_k=cu_seqlens_k, cu_q_groups=list(cu_q_split.unbind(0)), cu_k_split=cu_k_split,
        seqused=list(used_split.unbind(0)), wide=fp32_partials(q.device, q.dtype),
        perm=perm, inv_perm=inv_perm, src=src, inv_src=inv_src,
        features=({"softcap": softcap} if softcap else {}), shifts=shifts, sinks=sinks,
    )
    if window is not None:
        plan.features["window_size"] = list(window)
    if impl == IMPL_GROUPED_PYTHON:
        # One G=1 problem over both groups: sequences (g, b) for g in {early, late}; group g's
        # query rows start at g * T/2 and its K/V copy at g * total_global.
        Tg = plan.total_global
        cu_q_all = torch.cat([cu_q_split[0], cu_q_split[1][1:] + plan.half]).to(torch.int32)
        cu_k_all = torch.cat([cu_k_split, cu_k_split[1:] + Tg]).to(torch.int32)
        used_all = used_split.reshape(-1)
        plan.combined = (cu_q_all, cu_k_all, used_all)
    return plan


# ---- attention of one slice ----------------------------------------------------------------------


def _fwd_slice(plan: _Plan, q_pair, k_s, v_s, out_pair, lse_pair, qsl: slice = slice(None)) -> None:
    """Both groups' forward over one K/V slice (query heads qsl), into out_pair / lse_pair (views
    of the buffers)."""
    cu_q, cu_k, used = plan.cu_q_groups, plan.cu_k_split, plan.seqused
    mq, mk = plan.max_seqlen_q, plan.max_seqlen_k
    if plan.impl == IMPL_FUSED:
        ops.fwd_into(list(q_pair), k_s, v_s, cu_q, cu_k, used, [mq, mq], mk,
                     plan.scale, plan.causal, list(out_pair), list(lse_pair), **plan.kernel_features(qsl))
    elif plan.impl == IMPL_BASELINE:
        for g in range(2):
            ops.fwd_into([q_pair[g]], k_s, v_s, [cu_q[g]], cu_k, [used[g]], [mq], mk,
                         plan.scale, plan.causal, [out_pair[g]], [lse_pair[g]], **plan.kernel_features(qsl, (g,)))
    elif plan.shifts is not None:
        # the wrapper takes no diagonal shifts: the same rewrite (one G=1 call over both groups, K/V
        # duplicated) on the combined metadata, as the backward runs it
        cu_q_all, cu_k_all, used_all = plan.combined
        half, hq = plan.half, q_pair[0].shape[1]
        out_all = torch.empty((2 * half,) + tuple(q_pair[0].shape[1:]), dtype=q_pair[0].dtype,
                              device=q_pair[0].device)
        lse_all = torch.empty((hq, 2 * half), dtype=torch.float32, device=q_pair[0].device)
        features = plan.kernel_features(qsl, ())
        features["diagonal_shift_list"] = [torch.cat(plan.shifts)]
        ops.fwd_into([torch.cat(list(q_pair))], torch.cat([k_s, k_s]), torch.cat([v_s, v_s]), [cu_q_all], cu_k_all,
                     [used_all], [mq], mk, plan.scale, plan.causal, [out_all], [lse_all], **features)
        for g in range(2):
            out_pair[g].copy_(out_all[g * half:(g + 1) * half])
            lse_pair[g].copy_(lse_all[:, g * half:(g + 1) * half])
    else:
        # the rewrite of grouped_python._flash_attn_varlen_forward_grouped, without its argument
        # checks (this metadata is the plan's own; on CPU they would read values on the host)
        features = plan.kernel_features(qsl, ())
        outs, lses = combined_call(list(q_pair), k_s, v_s, cu_q, cu_k, [mq, mq], mk, used, plan.softmax_scale,
                                   plan.causal, features.get("window_size", (-1, -1)), features.get("softcap", 0.0),
                                   features.get("sinks"))
        for g in range(2):
            out_pair[g].copy_(outs[g])
            lse_pair[g].copy_(lses[g])


def _bwd_slice(plan: _Plan, s: int, dout_g, q_g, out_g, lse_slice, dq_g, k_s, v_s) -> Tensor:
    """Both groups' backward over one K/V slice: writes dQ into dq_g's slice and returns
    dK/dV of the whole gathered slice, [total_global, 2, hs, D] in plan.reduce_dtype (summed over
    the two groups)."""
    half, Tg, hs, D = plan.half, plan.total_global, plan.heads_k_stride, k_s.shape[2]
    hq = plan.heads_q_per_slice
    qsl = slice(s * hq, (s + 1) * hq)
    cu_q, cu_k, used = plan.cu_q_groups, plan.cu_k_split, plan.seqused
    mq, mk = plan.max_seqlen_q, plan.max_seqlen_k
    dtype, device = k_s.dtype, k_s.device

    def pair(t):
        return [t[:half, qsl], t[half:, qsl]]

    q_p, out_p, dout_p, dq_p = pair(q_g), pair(out_g), pair(dout_g), pair(dq_g)
    lse_p = [lse_slice[0], lse_slice[1]]
    dkv = torch.empty((Tg, 2, hs, D), dtype=dtype, device=device)
    if plan.impl == IMPL_FUSED:
        ops.bwd_into(dout_p, q_p, k_s, v_s, out_p, lse_p, cu_q, cu_k, used, [mq, mq], mk,
                     plan.scale, plan.causal, plan.deterministic, dq_p, dkv[:, 0], dkv[:, 1],
                     **plan.kernel_features(qsl))
        return dkv.to(plan.reduce_dtype)
    if plan.impl == IMPL_BASELINE:
        extra = torch.empty_like(dkv)
        for g, (dk_t, dv_t) in enumerate(((dkv[:, 0], dkv[:, 1]), (extra[:, 0], extra[:, 1]))):
            ops.bwd_into([dout_p[g]], [q_p[g]], k_s, v_s, [out_p[g]], [lse_p[g]], [cu_q[g]], cu_k, [used[g]],
                         [mq], mk, plan.scale, plan.causal, plan.deterministic, [dq_p[g]], dk_t, dv_t,
                         **plan.kernel_features(qsl, (g,)))
        return _sum_pair(dkv, extra, plan.reduce_dtype)
    # grouped_python: the forward's rewrite, one G=1 backward call over both groups with K/V
    # duplicated (group g's copy at rows g * Tg), then the two copies' gradients summed.
    cu_q_all, cu_k_all, used_all = plan.combined
    k2 = torch.cat([k_s, k_s])
    v2 = torch.cat([v_s, v_s])
    # a copy: with one row per group (half == 1) reshape returns a transposed view, and the
    # kernel takes a contiguous LSE
    lse_all = lse_slice.permute(1, 0, 2).reshape(hq, 2 * half).contiguous()
    dkv2 = torch.empty((2 * Tg, 2, hs, D), dtype=dtype, device=device)
    features = plan.kernel_features(qsl, ())
    if plan.shifts is not None:
        features["diagonal_shift_list"] = [torch.cat(plan.shifts)]
    ops.bwd_into([dout_g[:, qsl]], [q_g[:, qsl]], k2, v2, [out_g[:, qsl]], [lse_all], [cu_q_all], cu_k_all,
                 [used_all], [mq], mk, plan.scale, plan.causal, plan.deterministic, [dq_g[:, qsl]],
                 dkv2[:, 0], dkv2[:, 1], **features)
    return _sum_pair(dkv2[:Tg], dkv2[Tg:], plan.reduce_dtype)


def _sum_pair(a: Tensor, b: Tensor, reduce_dtype: torch.dtype) -> Tensor:
    """a + b, added in fp32 (fp64 for fp64 inputs) and rounded once to reduce_dtype: the two
    groups' dK/dV of the baseline (two calls) are summed as accurately as the fused kernel sums
    them internally."""
    acc_dtype = torch.float64 if torch.float64 in (a.dtype, reduce_dtype) else torch.float32
    acc = a.to(acc_dtype)
    acc += b
    return acc.to(reduce_dtype)


# ---- forward and backward --------------------------------------------------------------------------


def _to_grouped(plan: _Plan, t: Tensor) -> Tensor:
    """Local order -> grouped order [early chunks ; late chunks] (a copy unless the identity)."""
    if plan.perm is None:
        return t if t.stride(-1) == 1 else t.contiguous()
    return t.index_select(0, plan.perm)


def _from_grouped(plan: _Plan, t: Tensor, dim: int = 0) -> Tensor:
    return t if plan.inv_perm is None else t.index_select(dim, plan.inv_perm)


def _forward(plan: _Plan, q: Tensor, k: Tensor, v: Tensor):
    T, Hq, D = q.shape
    half, hq = plan.half, plan.heads_q_per_slice
    q_g = _to_grouped(plan, q)
    out_g = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    # lse per (slice, group): contiguous [hq, T/2] blocks, as the kernels want them.
    lse_buf = torch.empty((plan.num_slices, 2, hq, half), dtype=torch.float32, device=q.device)
    for s, (k_s, v_s) in enumerate(gather_kv_slices(plan, k, v)):
        qsl = slice(s * hq, (s + 1) * hq)
        _fwd_slice(plan, (q_g[:half, qsl], q_g[half:, qsl]), k_s, v_s,
                   (out_g[:half, qsl], out_g[half:, qsl]), (lse_buf[s, 0], lse_buf[s, 1]), qsl)
        del k_s, v_s
    out = _from_grouped(plan, out_g)
    lse = _from_grouped(plan, lse_buf.permute(0, 2, 1, 3).reshape(Hq, T), dim=1)
    return out, lse, lse_buf


def _backward(plan: _Plan, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse_buf: Tensor):
    q_g, out_g, dout_g = (widen(_to_grouped(plan, t), plan.wide) for t in (q, out, dout))
    if dout_g.stride(-1) != 1 or not dout_g.is_contiguous():
        dout_g = dout_g.contiguous()  # e.g. the expanded gradient of a .sum()
    dq_g = torch.empty(q.shape, dtype=q_g.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    rs = SliceReduceScatter(plan, dk, dv)
    for s, (k_s, v_s) in enumerate(gather_kv_slices(plan, k, v)):
        dkv = _bwd_slice(plan, s, dout_g, q_g, out_g, lse_buf[s], dq_g, widen(k_s, plan.wide), widen(v_s, plan.wide))
        del k_s, v_s
        rs.submit(s, dkv)
        del dkv
    rs.finish()
    return _from_grouped(plan, dq_g).to(q.dtype), dk, dv


# ---- public API --------------------------------------------------------------------------------------


def zigzag_llama3_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, heads_k_stride: int, local_k_slice: Optional[slice] = None, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = True, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[ProcessGroup] = None, use_grouped_attention: bool = False, use_triton_grouped: bool = False,
    use_fused_kernel: bool = False, grad_reduce_dtype: Optional[torch.dtype] = None, softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """Zigzag llama3 context-parallel attention (forward and backward) over ``group``.

    Each rank passes its zigzag shard (``zigzag_shard``): of every sequence b, chunk r then chunk
    2N-1-r (c_b = L_b / 2N tokens each, N = world size of ``group``, r = rank).

    Args:
        q: ``[T, Hq, D]`` local queries; k, v: ``[T, Hk, D]`` local keys/values (Hq % Hk == 0;
            the same dtype and device; any token/head strides).
        cu_seqlens_q: int32 ``[B + 1]``, the rank's LOCAL cumulative lengths
            (``zigzag_local_cu_seqlens(cu_seqlens_k, N)``: ``2 ceil(L_b / 2N)`` rows per
            sequence; ``cu_seqlens_k // N`` when every length is a multiple of 2N;
            ``cu_seqlens_q[-1] == T``).
        cu_seqlens_k: int32 ``[B + 1]``, the GLOBAL cumulative lengths of the unsharded batch
            (any lengths: a sequence whose length is not a multiple of 2N is padded at its end,
            as ``zigzag_shard`` lays it out; the padding rows get out = 0, lse = -inf and zero
            gradients and never act as keys).
        max_seqlen_q, max_seqlen_k: Python ints, hints (the longest local and global sequence);
            never read from tensors, so no host sync.
        heads_k_stride: KV heads per all-gather slice (divides Hk): memory for the gathered K/V
            is bounded by two slices, and the next slice's all-gather overlaps this slice's
            compute. ``heads_k_stride == Hk`` gathers everything at once (no overlap).
        local_k_slice: accepted for upstream's signature (a slice or None); the zigzag layout
            always needs the whole gathered K/V, so it is not used.
        dropout_p, alibi_slopes: only their defaults (NotImplementedError otherwise).
        softmax_scale: default ``1 / sqrt(D)``.
        causal: bottom-right aligned causal mask per (group, sequence) (default True, the case
            the zigzag layout is for); False lets every query see its whole global sequence.
        window_size: ``(left, right)``, flash-attn's local attention over each sequence's GLOBAL
            positions (-1 = unbounded; with causal the right side is -1 or 0).
        softcap: > 0: scores ``softcap * tanh(score / softcap)`` (0 = off).
        sinks: None or float32 ``[Hq]`` sink logits; their gradient is this rank's rows' share
            (the caller's gradient reduction over the ranks sums it).
        deterministic: bit-identical backward kernels run to run.
        return_attn_probs: return ``(out, lse, None)`` like upstream (lse: float32 ``[Hq, T]``,
            natural log, local order; not differentiable).
        group: the ``torch.distributed`` process group (default: the default group; without an
            initialised one the call is single-process, N = 1).
        use_fused_kernel: one fused grouped-kernel call for both query groups (forward and
            backward). ``use_triton_grouped`` is an older name for it (an alias).
        use_grouped_attention: both groups in one plain varlen call through
            ``grouped_python._flash_attn_varlen_forward_grouped`` (K/V duplicated per group).
            Neither flag: the baseline, one library call per group. The fused flags take
            precedence over ``use_grouped_attention``.
        grad_reduce_dtype: dtype of the dK/dV reduce-scatter (and of summing the two groups'
            dK/dV in the baseline); None = fp32 (fp64 for fp64 data), so that the error of dK/dV
            does not grow with the number of ranks; the dtype of k halves the reduce-scatter's
            bytes at the cost of a rounding per addition.

    Returns:
        ``out`` ``[T, Hq, D]`` (local order, dtype of q), or ``(out, lse, None)``.

    Raises:
        ValueError: a bad argument, naming it with the expected and actual value: mixed devices
            or dtypes, Hq % Hk != 0, heads_k_stride not dividing Hk, cu_seqlens of different
            sizes, not int32, or (when values are checked: always for CPU tensors, with
            ``RING_FLASH_ATTN_CHECK_METADATA=1`` on CUDA) cu_seqlens_k whose zigzag shard does
            not have T rows, or cu_seqlens_q != zigzag_local_cu_seqlens(cu_seqlens_k, N).
        NotImplementedError: dropout, ALiBi; or a backend without the kernel (or without a
            feature asked for: window, softcap, sinks).

    No host synchronisation: the forward can be captured in a CUDA graph for fixed shapes.
    Collective: every rank of ``group`` must call it with the same shapes, flags and
    cu_seqlens; ``RING_FLASH_ATTN_CHECK_METADATA=1`` compares them across the ranks (RuntimeError
    on every rank naming what differs); without it, ranks that disagree get wrong results or an
    abort inside the collective.
    """
    group, world_size, rank = resolve_group(group)
    values_checked = metadata_checks_enabled(device_of(q))
    agreement = RankAgreement("zigzag_llama3_flash_attn_varlen_func", group, world_size, device_of(q), values_checked)
    impl = resolve_impl(use_grouped_attention, use_triton_grouped, use_fused_kernel)
    with agreement.validating():
        window, softcap = _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
                                    local_k_slice, dropout_p, window_size, alibi_slopes, grad_reduce_dtype,
                                    world_size, impl, softcap, causal, sinks)
        _resolve_scale(softmax_scale)
        if values_checked:
            _check_values(cu_seqlens_q, cu_seqlens_k, world_size, q.shape[0])
    agreement.check(lambda: Fingerprint()
                    .shape("the shape of q", q.shape).shape("the shape of k", k.shape)
                    .dtype("the dtype of q", q.dtype).integer("heads_k_stride", heads_k_stride)
                    .flag("causal", causal).real("softmax_scale", effective_scale(softmax_scale, q.shape[-1]))
                    .flag("deterministic", deterministic).integer("window_size[0]", window[0])
                    .integer("window_size[1]", window[1]).real("softcap", softcap).flag("sinks", sinks is not None)
                    .dtype("the dtype of the dK/dV reduction (grad_reduce_dtype)",
                           grad_reduce_dtype if grad_reduce_dtype is not None else accumulation_dtype(k.dtype))
                    .tensor_values("cu_seqlens_q", cu_seqlens_q).tensor_values("cu_seqlens_k", cu_seqlens_k)
                    .integer("max_seqlen_q", max_seqlen_q).integer("max_seqlen_k", max_seqlen_k))
    sinks = contiguous_sinks(sinks)  # the kernels read the sinks as they are (q: in grouped order)
    plan = _make_plan(q, k, cu_seqlens_k, max_seqlen_k, heads_k_stride, softmax_scale, causal,
                      deterministic, grad_reduce_dtype, impl, group, world_size, rank,
                      effective_window(window, bool(causal), None), softcap, sinks)
    return sliced_kv_attention(q, k, v, plan, _forward, _backward, return_attn_probs, sinks)


def hf_batch_metadata(cu_seqlens: List[int], rank: int, world_size: int) -> Dict[bool, BatchMetadata]:
    """The HF adapter's per-batch metadata: ``zigzag_llama3_prepare_cu_seqlens`` of the GLOBAL
    ``cu_seqlens`` (host ints), the same for causal and not (CPU tensors). Raises
    ``BatchNotSupported`` when a sequence length is not a multiple of 2 * world_size."""
    two_n = 2 * world_size
    lengths = [b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])]
    bad = [(b, n) for b, n in enumerate(lengths) if n % two_n]
    if bad:
        b, n = bad[0]
        raise BatchNotSupported(f"sequence {b} has length {n}, expected a multiple of 2 * world_size = {two_n}; "
                                f"use the contiguous layout ({HF_ATTN_LLAMA3!r}) for such batches")
    metadata = zigzag_llama3_prepare_cu_seqlens(cu_seqlens, True, rank, world_size, max_seqlen=max(lengths))
    return {True: metadata, False: metadata}
