"""Llama3 context parallelism in the CONTIGUOUS layout (upstream ring-flash-attention's
``llama3_flash_attn_varlen_func``): forward and backward on the library's grouped op.

Layout: N ranks; the packed batch (total T_g tokens, divisible by N) is cut into N contiguous
pieces of T = T_g / N tokens and rank r holds tokens ``[r T, (r+1) T)``. The metadata is what
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
``reduce_scatter.SliceReduceScatter``).

No host synchronisation in forward or backward: ``max_seqlen_*`` and ``local_k_slice`` are Python
values from the caller; metadata VALUES are checked on the host only where that is free (CPU) or
when ``RING_FLASH_ATTN_CHECK_METADATA=1`` asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import ops
from .._checks import check_flash_attn_defaults
from ..grouped import _resolve_scale
from .all_gather import KVSlicePlan, gather_kv_slices, sliced_kv_attention
from .llama3_layout import llama3_flash_attn_prepare_cu_seqlens
from .process_group import resolve_group
from .reduce_scatter import SliceReduceScatter
from .scheme import BatchMetadata
from .validation import (check_collective_device, check_cu_seqlens_pair, check_heads, check_heads_k_stride,
                         check_int32_count, check_local_tokens, check_python_int, check_qkv, metadata_checks_enabled,
                         short_list, unpack)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["HF_ATTN_LLAMA3", "hf_batch_metadata", "llama3_flash_attn_varlen_func",
           "llama3_flash_attn_varlen_kvpacked_func", "llama3_flash_attn_varlen_qkvpacked_func"]

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
    src: Optional[Tensor] = None  # the contiguous layout needs no reordering
    inv_src: Optional[Tensor] = None

    def caller_tensors(self) -> Tuple[Tensor, ...]:
        return self.cu_seqlens_q, self.cu_seqlens_k  # the caller's, read again by the backward


def _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
              local_k_slice, dropout_p, window_size, alibi_slopes, world_size) -> slice:
    """Host-side checks of what shapes and Python values tell; returns the normalised k slice."""
    check_flash_attn_defaults(dropout_p, window_size, alibi_slopes)
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
    return slice(start, max(start, stop))


def _check_values(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, total_local: int, k_rows: int) -> None:
    """Metadata VALUES (host read: free on CPU, a sync on CUDA)."""
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


def _forward(plan: _Plan, q: Tensor, k: Tensor, v: Tensor):
    T, Hq, D = q.shape
    hq, ks = plan.heads_q_per_slice, plan.k_slice
    out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    lse_buf = torch.empty((plan.num_slices, hq, T), dtype=torch.float32, device=q.device)
    for s, (k_s, v_s) in enumerate(gather_kv_slices(plan, k, v)):
        qsl = slice(s * hq, (s + 1) * hq)
        ops.fwd_into([q[:, qsl]], k_s[ks], v_s[ks], [plan.cu_seqlens_q], plan.cu_seqlens_k, [None],
                     [plan.max_seqlen_q], plan.max_seqlen_k, plan.scale, plan.causal, [out[:, qsl]], [lse_buf[s]])
        del k_s, v_s
    return out, lse_buf.reshape(Hq, T), lse_buf


def _backward(plan: _Plan, dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse_buf: Tensor):
    if not dout.is_contiguous():
        dout = dout.contiguous()  # e.g. the expanded gradient of a .sum()
    hq, hs, ks, D = plan.heads_q_per_slice, plan.heads_k_stride, plan.k_slice, k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    rs = SliceReduceScatter(plan, dk, dv)
    for s, (k_s, v_s) in enumerate(gather_kv_slices(plan, k, v)):
        qsl = slice(s * hq, (s + 1) * hq)
        # rows outside local_k_slice get no gradient from this rank
        dkv = torch.zeros((plan.total_global, 2, hs, D), dtype=k.dtype, device=k.device)
        ops.bwd_into([dout[:, qsl]], [q[:, qsl]], k_s[ks], v_s[ks], [out[:, qsl]], [lse_buf[s]],
                     [plan.cu_seqlens_q], plan.cu_seqlens_k, [None], [plan.max_seqlen_q], plan.max_seqlen_k,
                     plan.scale, plan.causal, plan.deterministic, [dq[:, qsl]], dkv[ks, 0], dkv[ks, 1])
        del k_s, v_s
        rs.submit(s, dkv)
        del dkv
    rs.finish()
    return dq, dk, dv


def llama3_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, heads_k_stride: int, local_k_slice: Optional[slice], dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[ProcessGroup] = None,
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
        dropout_p, window_size, alibi_slopes: only their defaults (NotImplementedError otherwise).
        softmax_scale: default ``1 / sqrt(D)``. causal: bottom-right aligned per sequence piece.
        deterministic: bit-identical backward run to run.
        return_attn_probs: return ``(out, lse, None)`` (lse float32 ``[Hq, T]``, not differentiable).
        group: the process group (default: the default group; none initialised: single process).

    Returns ``out`` ``[T, Hq, D]`` or ``(out, lse, None)``. Collective: every rank of ``group``
    must call it with the same shapes. No host synchronisation in forward or backward.
    """
    group, world_size, rank = resolve_group(group)
    k_slice = _validate(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
                        local_k_slice, dropout_p, window_size, alibi_slopes, world_size)
    if metadata_checks_enabled(q.device):
        _check_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k_slice.stop - k_slice.start)
    plan = _Plan(
        group=group, world_size=world_size, rank=rank, total_local=q.shape[0], num_heads_q=q.shape[1],
        num_heads_k=k.shape[1], heads_k_stride=int(heads_k_stride), scale=_resolve_scale(softmax_scale),
        causal=bool(causal), deterministic=bool(deterministic), max_seqlen_q=int(max_seqlen_q),
        max_seqlen_k=int(max_seqlen_k), cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, k_slice=k_slice)
    return sliced_kv_attention(q, k, v, plan, _forward, _backward, return_attn_probs)


def llama3_flash_attn_varlen_kvpacked_func(
    q: Tensor, kv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
    heads_k_stride: int, local_k_slice: Optional[slice], dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[ProcessGroup] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """``llama3_flash_attn_varlen_func`` with K and V packed: q ``[T, Hq, D]``, ``kv``
    ``[T, 2, Hk, D]``. Returns ``out`` ``[T, Hq, D]`` or ``(out, lse, None)``."""
    k, v = unpack(kv, "kv", 2, "[local_tokens, 2, heads_k, head_dim]")
    return llama3_flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
        local_k_slice, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
        return_attn_probs, group)


def llama3_flash_attn_varlen_qkvpacked_func(
    qkv: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
    heads_k_stride: int, local_k_slice: Optional[slice], dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[ProcessGroup] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """``llama3_flash_attn_varlen_func`` with Q, K and V packed (MHA): ``qkv`` ``[T, 3, H, D]``.
    Returns ``out`` ``[T, H, D]`` or ``(out, lse, None)``."""
    q, k, v = unpack(qkv, "qkv", 3, "[local_tokens, 3, heads, head_dim]")
    return llama3_flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, heads_k_stride,
        local_k_slice, dropout_p, softmax_scale, causal, window_size, alibi_slopes, deterministic,
        return_attn_probs, group)


def hf_batch_metadata(cu_seqlens: List[int], rank: int, world_size: int) -> Dict[bool, BatchMetadata]:
    """The HF adapter's per-batch metadata: ``llama3_flash_attn_prepare_cu_seqlens`` of the GLOBAL
    ``cu_seqlens`` (host ints) for ``rank``, causal and not (CPU tensors)."""
    return {c: llama3_flash_attn_prepare_cu_seqlens(cu_seqlens, c, rank, world_size) for c in (True, False)}
