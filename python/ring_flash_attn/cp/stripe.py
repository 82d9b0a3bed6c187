"""Ring attention over the stripe layout (upstream ring-flash-attention's ``stripe_*`` functions).

Layout (batched forms only): of every sequence each of the N ranks holds the same number of
tokens, L; rank r holds tokens ``r, r + N, r + 2N, ...`` (local token i is global token i N + r).

Causal block pattern (src: the rank whose K/V block is held at a ring step): src <= r: causal on
the whole block (diagonal included); src > r: query i sees keys j < i (local queries 1.. against
keys ..L-2, causal). The ring itself is ``ring_engine``'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple, Union

from torch import Tensor

from .padding import SeqlensArg
from .ring_engine import RingLayout, Task, ring_attention, unpack_batched_kv, unpack_batched_qkv, with_batched_args_doc

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["STRIPE_LAYOUT", "stripe_flash_attn_func", "stripe_flash_attn_kvpacked_func",
           "stripe_flash_attn_qkvpacked_func"]


def _causal_tasks(step: int, src: int, rank: int) -> List[Task]:
    # query i (global i N + r) sees key j (global j N + src) iff j <= i (src <= r), j < i (src > r)
    if src <= rank:
        return [("all", "all", True)]
    return [("drop_first", "drop_last", True)]


STRIPE_LAYOUT = RingLayout(name="stripe", causal_tasks=_causal_tasks, row_sets=("drop_first", "drop_last"),
                           api_name="stripe_flash_attn")


@with_batched_args_doc
def stripe_flash_attn_func(
    q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[ProcessGroup] = None,
    seqlens: SeqlensArg = None,
    softcap: float = 0.0, sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """Ring attention over the stripe layout (upstream's ``stripe_flash_attn_func``).

    q ``[B, L, Hq, D]``, k and v ``[B, L, Hk, D]``: local token i of each of the B sequences is
    its global token i N + r.
    """
    return ring_attention(STRIPE_LAYOUT, q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                          deterministic, return_attn_probs, group, seqlens,
                          softcap=softcap, sinks=sinks)


@with_batched_args_doc
def stripe_flash_attn_kvpacked_func(
    q: Tensor, kv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[ProcessGroup] = None,
    seqlens: SeqlensArg = None,
    softcap: float = 0.0, sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """``stripe_flash_attn_func`` with K and V packed: q ``[B, L, Hq, D]``, kv ``[B, L, 2, Hk, D]``."""
    k, v = unpack_batched_kv(kv)
    return ring_attention(STRIPE_LAYOUT, q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                          deterministic, return_attn_probs, group, seqlens,
                          softcap=softcap, sinks=sinks)


@with_batched_args_doc
def stripe_flash_attn_qkvpacked_func(
    qkv: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
    causal: bool = False, window_size: Tuple[int, int] = (-1, -1), alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False, return_attn_probs: bool = False, group: Optional[ProcessGroup] = None,
    seqlens: SeqlensArg = None,
    softcap: float = 0.0, sinks: Optional[Tensor] = None,
) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """``stripe_flash_attn_func`` with Q, K and V packed (MHA): qkv ``[B, L, 3, H, D]``."""
    q, k, v = unpack_batched_qkv(qkv)
    return ring_attention(STRIPE_LAYOUT, q, k, v, dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                          deterministic, return_attn_probs, group, seqlens,
                          softcap=softcap, sinks=sinks)
