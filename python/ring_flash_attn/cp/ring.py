"""Ring attention over the contiguous layout (upstream ring-flash-attention's ``ring_*`` functions).

Layout: of every sequence each of the N ranks holds the same number of tokens, L; rank r holds
tokens ``[r L, (r + 1) L)`` (the sequence cut into N contiguous pieces, piece r on rank r).

Causal block pattern (src: the rank whose K/V block is held at a ring step): step 0 (src = r)
causal on the local block; src < r: all local queries see the whole block; src > r: nothing (the
step only forwards the block). The ring itself is ``ring_engine``'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple, Union

from torch import Tensor

from .padding import SeqlensArg
from .ring_engine import (RingLayout, Task, ring_attention, ring_attention_varlen, unpack_batched_kv,
                          unpack_batched_qkv, unpack_varlen_kv, unpack_varlen_qkv, with_batched_args_doc,
                          with_varlen_args_doc)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["RING_LAYOUT", "ring_flash_attn_func", "ring_flash_attn_kvpacked_func",
           "ring_flash_attn_qkvpacked_func", "ring_flash_attn_varlen_func",
           "ring_flash_attn_varlen_kvpacked_func", "ring_flash_attn_varlen_qkvpacked_func"]


def _causal_tasks(step: int, src: int, rank: int) -> List[Task]:
    if step == 0:
        return [("all", "all", True)]
    return [("all", "all", False)] if src < rank else []


RING_LAYOUT = RingLayout(name="ring", causal_tasks=_causal_tasks, api_name="ring_flash_attn")


@with_batched_args_doc
def ring_flash_attn_func(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[ProcessGroup] = None,
    seqlens: SeqlensArg = None,
    softcap: float = 0.0, sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """Ring attention over the contiguous layout (upstream's ``ring_flash_attn_func``).

    q ``[B, L, Hq, D]``, k and v ``[B, L, Hk, D]``: rank r's tokens ``[r L, (r+1) L)`` of each
    of the B sequences.
    """
    return ring_attention(RING_LAYOUT, q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                          deterministic, return_attn_probs, group, seqlens,
                          softcap=softcap, sinks=sinks)


@with_batched_args_doc
def ring_flash_attn_kvpacked_func(
    q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[ProcessGroup] = None,
    seqlens: SeqlensArg = None,
    softcap: float = 0.0, sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """``ring_flash_attn_func`` with K and V packed: q ``[B, L, Hq, D]``, kv ``[B, L, 2, Hk, D]``."""
    k, v = unpack_batched_kv(kv)
    return ring_attention(RING_LAYOUT, q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                          deterministic, return_attn_probs, group, seqlens,
                          softcap=softcap, sinks=sinks)


@with_batched_args_doc
def ring_flash_attn_qkvpacked_func(
    qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[ProcessGroup] = None,
    seqlens: SeqlensArg = None,
    softcap: float = 0.0, sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """``ring_flash_attn_func`` with Q, K and V packed (MHA): qkv ``[B, L, 3, H, D]``."""
    q, k, v = unpack_batched_qkv(qkv)
    return ring_attention(RING_LAYOUT, q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                          deterministic, return_attn_probs, group, seqlens,
                          softcap=softcap, sinks=sinks)


@with_varlen_args_doc
def ring_flash_attn_varlen_func(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[ProcessGroup] = None, seqlens: SeqlensArg = None,
    softcap: float = 0.0, sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """Ring attention over packed sequences, contiguous layout (upstream's ``ring_flash_attn_varlen_func``).

    q ``[T, Hq, D]``, k and v ``[T, Hk, D]``: of every sequence, split into N pieces, rank r
    holds piece r.
    """
    return ring_attention_varlen(RING_LAYOUT, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                                 window_size, alibi_slopes, deterministic, return_attn_probs, group, seqlens,
                                 softcap=softcap, sinks=sinks)


@with_varlen_args_doc
def ring_flash_attn_varlen_kvpacked_func(
    q: Tensor, kv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[ProcessGroup] = None, seqlens: SeqlensArg = None,
    softcap: float = 0.0, sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """``ring_flash_attn_varlen_func`` with K and V packed: q ``[T, Hq, D]``, kv ``[T, 2, Hk, D]``."""
    k, v = unpack_varlen_kv(kv)
    return ring_attention_varlen(RING_LAYOUT, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                                 window_size, alibi_slopes, deterministic, return_attn_probs, group, seqlens,
                                 softcap=softcap, sinks=sinks)


@with_varlen_args_doc
def ring_flash_attn_varlen_qkvpacked_func(
    qkv: Tensor, cu_seqlens: Tensor, max_seqlen: int, dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None, causal: bool = False, window_size: Tuple[int, int] = (-1, -1),
    alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, return_attn_probs: bool = False,
    group: Optional[ProcessGroup] = None, seqlens: SeqlensArg = None,
    softcap: float = 0.0, sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """``ring_flash_attn_varlen_func`` with Q, K and V packed (MHA): qkv ``[T, 3, H, D]``."""
    q, k, v = unpack_varlen_qkv(qkv)
    return ring_attention_varlen(RING_LAYOUT, q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                                 window_size, alibi_slopes, deterministic, return_attn_probs, group, seqlens,
                                 softcap=softcap, sinks=sinks)
