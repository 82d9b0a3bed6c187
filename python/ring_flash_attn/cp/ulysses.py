"""Ulysses context parallelism: all-to-all from sequence shards to head shards and back.

Layout (contiguous, as llama3's): N ranks; the packed batch (total T_g tokens, any sequence
lengths) is cut into N pieces of T = ceil(T_g / N) tokens and rank r holds tokens
``[r T, (r+1) T)``. When N does not divide T_g, the N T - T_g < N rows after the last sequence
are padding (``ulysses_shard`` fills them with zeros) and form a sequence of their own in the
metadata (``ulysses_prepare_cu_seqlens``), so no real token sees them; ``ulysses_unshard`` drops
them. The batched form ``[B, L, H, D]``: rank r holds tokens ``[r L, (r+1) L)`` of each of the B
sequences.

Per chunk of ``heads_k_stride`` KV heads (``all_to_all``): one all-to-all gives each rank every
token of its Hq/N query heads and their KV heads (KV heads replicated when Hk < N); the rank then
runs ordinary single-device attention over the WHOLE sequences (global ``cu_seqlens``; the
causal mask and windows need no change), and one all-to-all sends each token's output back to
the rank that owns it. The backward moves dO the same way and dQ, dK, dV back (replicated KV
heads' gradients summed in fp32). Per rank and step it moves its share of Q, K, V and O (and dO,
dQ, dK, dV), each about (N-1)/N of the rank's shard, independent of the sequence length it
computes over; see docs/scaling.md.

The attention features of the single-device function pass through: ``softmax_scale``,
``causal``, ``window_size`` and ``softcap`` unchanged, ``sinks`` per head (each rank hands the
kernel the sinks of the heads it computes; the sinks gradient of a rank is non-zero on those
heads only, and the data-parallel reduction over ranks sums it as it sums the weights').

The K/V-packed and Q/K/V-packed forms of the public functions are in ``packed.py`` (generated).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._checks import check_flash_attn_defaults, check_window_size
from ..grouped import _resolve_scale, flash_attn_varlen_func
from .all_to_all import HeadShards, check_head_split, head_sharded_attention
from .features import check_softcap, feature_kwargs
from .llama3_layout import _padded_total, llama3_shard, llama3_unshard
from .padding import padded_lengths
from .sinks import check_sinks
from .process_group import resolve_group
from .rank_agreement import Fingerprint, RankAgreement, device_of, effective_scale
from .scheme import BatchMetadata
from .validation import (CuSeqlens, as_cu_tensor, check_collective_device, check_cu_seqlens_pair,
                         check_cumulative_values, check_heads, check_int32_count, check_local_tokens,
                         check_python_int, check_qkv, check_world, metadata_checks_enabled, short_list)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["HF_ATTN_ULYSSES", "hf_batch_metadata", "ulysses_flash_attn_func", "ulysses_flash_attn_varlen_func",
           "ulysses_prepare_cu_seqlens", "ulysses_shard", "ulysses_unshard", "check_chunk_stride"]

# The name of the scheme in transformers' AttentionInterface (ring_flash_attn.hf_adapter).
HF_ATTN_ULYSSES = "ring_attn_ulysses"


# ---- the attention run on the head shards ---------------------------------------------------------


class KernelAttention:
    """The single-device attention of one chunk's head shards (``flash_attn_varlen_func``) over
    the whole sequences: global ``cu_seqlens``, the call's scale, mask and features."""

    def __init__(self, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                 softmax_scale: Optional[float], causal: bool, window_size: Tuple[int, int], deterministic: bool,
                 features: Dict[str, object]):
        self.cu_q, self.cu_k, self.max_q, self.max_k = cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k
        self.softmax_scale, self.causal, self.window_size = softmax_scale, causal, window_size
        self.deterministic, self.features = deterministic, features

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        kwargs = dict(self.features)
        if "sinks" in kwargs:
            kwargs["sinks"] = sinks
        out, lse, _ = flash_attn_varlen_func(
            q, k, v, self.cu_q, self.cu_k, self.max_q, self.max_k, softmax_scale=self.softmax_scale,
            causal=self.causal, window_size=self.window_size, deterministic=self.deterministic,
            return_attn_probs=True, **kwargs)
        return out, lse


# ---- validation --------------------------------------------------------------------------------------


def check_chunk_stride(heads_k_stride, heads_k_local: int, name: str = "heads_k_stride") -> int:
    """The KV heads per all-to-all chunk: None -> all of the rank's head-sharded KV heads (one
    chunk); else an int >= 1 dividing them."""
    if heads_k_stride is None:
        return heads_k_local
    if isinstance(heads_k_stride, bool) or not isinstance(heads_k_stride, int) or heads_k_stride < 1:
        raise ValueError(f"{name}: expected None or an int >= 1, got {heads_k_stride!r}")
    if heads_k_local % heads_k_stride:
        raise ValueError(f"{name}: expected a divisor of the {heads_k_local} KV heads each rank holds after the "
                         f"all-to-all, got {heads_k_stride}")
    return heads_k_stride


def _validate_common(q, k, v, dropout_p, window_size, alibi_slopes, softcap, sinks, world_size, layout,
                     causal) -> int:
    """Checks shared by the varlen and batched forms; returns the KV replication factor."""
    check_flash_attn_defaults(dropout_p, (-1, -1), alibi_slopes)
    check_window_size(window_size, bool(causal))
    check_softcap(softcap)
    ndim = 3 if layout.startswith("[local_tokens") else 4
    check_qkv(q, k, v, ndim, layout)
    if ndim == 4 and k.shape[:2] != q.shape[:2]:
        raise ValueError(f"k: expected batch and local length {tuple(q.shape[:2])} (those of q), got "
                         f"{tuple(k.shape[:2])}")
    check_local_tokens(q, k, v, "the tokens of q: the contiguous layout shards q, k and v alike")
    check_heads(q, k)
    replicas = check_head_split(q.shape[-2], k.shape[-2], world_size)
    check_sinks(sinks, q.shape[-2], q.device)
    check_collective_device(q, world_size)
    return replicas


def _check_values(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, total: int, world_size: int, local: int) -> None:
    """Metadata VALUES (host read: free on CPU, a sync on CUDA): cumulative from 0, non-decreasing,
    the last entry the group's total tokens."""
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        values = cu.tolist()
        check_cumulative_values(values, name)
        if values[-1] != total:
            raise ValueError(f"{name}: expected the last entry to be {total} (the GLOBAL cumulative lengths: world "
                             f"size {world_size} x {local} local tokens), got {values[-1]} ({short_list(values)})")


def _shards(group, world_size, rank, total_local, batch, q, k, replicas, heads_k_stride) -> HeadShards:
    heads_k_local = k.shape[-2] * replicas // world_size
    stride = check_chunk_stride(heads_k_stride, heads_k_local)
    return HeadShards(group=group, world_size=world_size, rank=rank, total_local=total_local, batch=batch,
                      num_heads_q=q.shape[-2], num_heads_k=k.shape[-2], kv_replicas=replicas, heads_k_stride=stride)


def _agree(agreement: RankAgreement, q, k, heads_k_stride, softmax_scale, causal, deterministic, window_size,
           softcap, sinks, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None) -> None:
    def build():
        f = (Fingerprint().shape("the shape of q", q.shape).shape("the shape of k", k.shape)
             .dtype("the dtype of q", q.dtype).integer("heads_k_stride", -1 if heads_k_stride is None else heads_k_stride)
             .flag("causal", causal).real("softmax_scale", effective_scale(softmax_scale, q.shape[-1]))
             .flag("deterministic", deterministic).integer("window_size[0]", window_size[0])
             .integer("window_size[1]", window_size[1]).real("softcap", softcap).flag("sinks", sinks is not None))
        if cu_seqlens_q is not None:
            f = (f.tensor_values("cu_seqlens_q", cu_seqlens_q).tensor_values("cu_seqlens_k", cu_seqlens_k)
                 .integer("max_seqlen_q", max_seqlen_q).integer("max_seqlen_k", max_seqlen_k))
        return f

    agreement.check(build)


# ---- public API: packed (varlen) ---------------------------------------------------------------------


def ulysses_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, heads_k_stride: Optional[int] = None, local_k_slice: Optional[slice] = None,
    dropout_p: float = 0.0, softmax_scale: Optional[float] = None, causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
    return_attn_probs: bool = False, group: Optional[ProcessGroup] = None, softcap: float = 0.0,
    sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """Ulysses context-parallel attention over packed sequences (llama3's signature).

    Args:
        q: ``[T, Hq, D]``, k, v: ``[T, Hk, D]``: rank r's contiguous piece ``[r T, (r+1) T)`` of
            the packed batch (``ulysses_shard``); Hq divisible by N; Hk a multiple or a divisor
            of N (fewer KV heads than ranks: each KV head is replicated to the ranks of its
            query heads and its gradient summed back); same dtype and device; any token/head
            strides.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B + 1]`` on q's device: the GLOBAL cumulative
            lengths of the layout (``cu_seqlens[-1] == N T``: the packed batch and, when N does
            not divide its total, the padding rows as a sequence of their own; sequences of any
            length), as ``ulysses_prepare_cu_seqlens`` returns them.
        max_seqlen_q, max_seqlen_k: Python ints, the longest GLOBAL sequence (hints).
        heads_k_stride: KV heads of a rank's head shard per all-to-all chunk (divides
            ``max(Hk, N) / N``); None: one chunk. With more than one chunk, a chunk's
            all-to-all overlaps the previous chunk's attention.
        local_k_slice: accepted for llama3's signature (None or a slice); not used.
        dropout_p, alibi_slopes: only their defaults (NotImplementedError otherwise).
        softmax_scale: default ``1 / sqrt(D)``. causal: bottom-right aligned per sequence.
        window_size, softcap: handed to the single-device kernel unchanged (each rank sees whole
            sequences), which refuses what this build does not implement.
        deterministic: bit-identical backward run to run.
        return_attn_probs: return ``(out, lse, None)`` (lse float32 ``[Hq, T]``, not differentiable;
            one more small all-to-all).
        group: the process group (default: the default group; none initialised: single process).
        sinks: None or float32 ``[Hq]`` learnable sink logits (each rank hands the kernel the
            sinks of the heads it computes).

    Returns ``out`` ``[T, Hq, D]`` or ``(out, lse, None)``. Collective: every rank of ``group``
    must call it with the same shapes, flags and cu_seqlens (``RING_FLASH_ATTN_CHECK_METADATA=1``
    compares them across the ranks). No host synchronisation in forward or backward (on CUDA,
    without that variable).
    """
    group, world_size, rank = resolve_group(group)
    values_checked = metadata_checks_enabled(device_of(q))
    agreement = RankAgreement("ulysses_flash_attn_varlen_func", group, world_size, device_of(q), values_checked)
    with agreement.validating():
        replicas = _validate_common(q, k, v, dropout_p, window_size, alibi_slopes, softcap, sinks, world_size,
                                    "[local_tokens, heads, head_dim]", causal)
        T = q.shape[0]
        check_int32_count(world_size * T, "q", f"tokens of the packed batch (world_size {world_size} x {T} local "
                                               f"tokens)")
        check_cu_seqlens_pair(cu_seqlens_q, cu_seqlens_k, q.device)
        check_python_int(max_seqlen_q, "max_seqlen_q", "the longest global sequence, a hint")
        check_python_int(max_seqlen_k, "max_seqlen_k", "the longest global sequence, a hint")
        if local_k_slice is not None and not isinstance(local_k_slice, slice):
            raise ValueError(f"local_k_slice: expected a slice or None, got {type(local_k_slice).__name__}")
        _resolve_scale(softmax_scale)
        shards = _shards(group, world_size, rank, T, 1, q, k, replicas, heads_k_stride)
        features = feature_kwargs(flash_attn_varlen_func, "flash_attn_varlen_func", float(softcap), sinks)
        if values_checked:
            _check_values(cu_seqlens_q, cu_seqlens_k, world_size * T, world_size, T)
    window = check_window_size(window_size)
    _agree(agreement, q, k, heads_k_stride, softmax_scale, causal, deterministic, window, float(softcap), sinks,
           cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k))
    inner = KernelAttention(cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), softmax_scale,
                            bool(causal), window, bool(deterministic), features)
    out, lse = head_sharded_attention(q, k, v, sinks, shards, inner, bool(return_attn_probs),
                                          cu_seqlens_q, cu_seqlens_k)
    if return_attn_probs:
        return out, lse, None
    return out


# ---- public API: batched [B, L, H, D] ---------------------------------------------------------------


def ulysses_flash_attn_func(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[ProcessGroup] = None,
    heads_k_stride: Optional[int] = None, softcap: float = 0.0, sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """Ulysses context-parallel attention, batched (the ring functions' signature).

    q ``[B, L, Hq, D]``, k and v ``[B, L, Hk, D]``: rank r's tokens ``[r L, (r+1) L)`` of each of
    the B sequences (global length N L). causal: over the GLOBAL token order. Returns ``out``
    ``[B, L, Hq, D]`` or, with ``return_attn_probs``, ``(out, lse [B, Hq, L] float32, None)``.
    The other arguments as ``ulysses_flash_attn_varlen_func``'s. Collective over ``group``.
    """
    group, world_size, rank = resolve_group(group)
    agreement = RankAgreement("ulysses_flash_attn_func", group, world_size, device_of(q),
                              metadata_checks_enabled(device_of(q)))
    with agreement.validating():
        replicas = _validate_common(q, k, v, dropout_p, window_size, alibi_slopes, softcap, sinks, world_size,
                                    "[batch, local_seqlen, heads, head_dim]", causal)
        B, L = q.shape[0], q.shape[1]
        check_int32_count(world_size * B * L, "q", f"tokens of the batch (world_size {world_size} x {B} x {L})")
        _resolve_scale(softmax_scale)
        shards = _shards(group, world_size, rank, B * L, B, q, k, replicas, heads_k_stride)
        features = feature_kwargs(flash_attn_varlen_func, "flash_attn_varlen_func", float(softcap), sinks)
    window = check_window_size(window_size)
    _agree(agreement, q, k, heads_k_stride, softmax_scale, causal, deterministic, window, float(softcap), sinks)
    L_global = world_size * L
    cu = torch.arange(0, (B + 1) * L_global, L_global, dtype=torch.int32, device=q.device)
    inner = KernelAttention(cu, cu, L_global, L_global, softmax_scale, bool(causal), window, bool(deterministic),
                            features)
    Hq, D = q.shape[2], q.shape[3]
    out, lse = head_sharded_attention(q.reshape(B * L, Hq, D), k.reshape(B * L, *k.shape[2:]),
                                          v.reshape(B * L, *v.shape[2:]), sinks, shards, inner,
                                          bool(return_attn_probs))
    out = out.view(B, L, Hq, D)
    if return_attn_probs:
        return out, lse.view(Hq, B, L).transpose(0, 1), None
    return out


# ---- layout helpers -----------------------------------------------------------------------------------


def ulysses_shard(x: Tensor, cu_seqlens: CuSeqlens, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s piece of a packed global batch ``x [total, ...]`` in the contiguous layout
    (``cu_seqlens``: the GLOBAL cumulative lengths, last entry ``total``; any total and sequence
    lengths): rows ``[r T, (r+1) T)`` of x padded with zero rows to ``N T``, ``T = ceil(total / N)``
    (the padding rows form a sequence of their own in ``ulysses_prepare_cu_seqlens``'s metadata).
    A new tensor ``[T, ...]``; undo with ``ulysses_unshard``. Reads the lengths on the host (a
    setup step). The same layout as ``llama3_shard``."""
    return llama3_shard(x, cu_seqlens, rank, world_size)


def ulysses_unshard(shards: Sequence[Tensor], cu_seqlens: CuSeqlens) -> Tensor:
    """The inverse of ``ulysses_shard``: N local pieces (rank order) -> the global batch without
    the padding rows. Pure tensor ops (no communication)."""
    return llama3_unshard(shards, cu_seqlens)


def ulysses_prepare_cu_seqlens(
    cu_seqlens: CuSeqlens, causal: bool = True, rank: Optional[int] = None, world_size: int = 1,
    max_seqlen: Optional[int] = None,
) -> Tuple[Tensor, Tensor, int, int, slice]:
    """What ``ulysses_flash_attn_varlen_func`` takes, from the GLOBAL cu_seqlens, in llama3's order:
    ``(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, local_k_slice)`` = the global
    cumulative lengths of the layout (int32, twice), the longest sequence (twice) and
    ``slice(None)``. The same on every rank (``rank`` and ``causal`` are accepted for the shared
    signature). Any total and sequence lengths: when ``world_size`` does not divide the total T,
    the metadata has one more sequence, the ``N ceil(T / N) - T`` padding rows of
    ``ulysses_shard``. Reads the values on the host (one device-to-host copy for a CUDA tensor)
    unless ``max_seqlen`` is given for a CUDA tensor; then the padding entry is computed on the
    device and always appended (an empty sequence when N divides T)."""
    check_world(world_size, rank)
    cu = as_cu_tensor(cu_seqlens, "cu_seqlens")
    if max_seqlen is None or not isinstance(cu_seqlens, Tensor) or metadata_checks_enabled(cu.device):
        values = cu.tolist()
        check_cumulative_values(values, "cu_seqlens")
        longest = max(b - a for a, b in zip(values, values[1:]))
        if max_seqlen is not None and int(max_seqlen) < longest:
            raise ValueError(f"max_seqlen: expected >= the longest sequence ({longest}), got {max_seqlen}")
        padded = _padded_total(values[-1], world_size)
        if padded != values[-1]:  # the padding rows: a sequence of their own
            cu = torch.tensor(values + [padded], dtype=torch.int32, device=cu.device)
        max_seqlen = max(longest if max_seqlen is None else int(max_seqlen), padded - values[-1])
    else:  # no host read: the padding entry from the last one, on the device
        cu = torch.cat([cu, padded_lengths(cu[-1:], world_size).to(torch.int32)])
        max_seqlen = max(int(max_seqlen), world_size - 1)
    max_seqlen = int(max_seqlen)
    return cu, cu, max_seqlen, max_seqlen, slice(None)


def hf_batch_metadata(cu_seqlens: List[int], rank: int, world_size: int) -> Dict[bool, BatchMetadata]:
    """The HF adapter's per-batch metadata: ``ulysses_prepare_cu_seqlens`` of the GLOBAL
    ``cu_seqlens`` (host ints), the same for causal and not (CPU tensors)."""
    metadata = ulysses_prepare_cu_seqlens(cu_seqlens, True, rank, world_size)
    return {True: metadata, False: metadata}
