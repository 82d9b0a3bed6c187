"""The layouts of the ring schemes for ``ring_engine``: which sub-blocks each ring step computes
under a causal mask (``RingLayout.causal_tasks``), one ``RingLayout`` per scheme.

At step s rank r holds the K/V block of rank src = (r - s) mod N (step 0: its own). A task is
``(query row set, key row set, causal)`` (see ``ring_engine.Task``). The public functions over
these layouts are ``ring.py``, ``zigzag_ring.py`` and ``stripe.py``.
"""

from __future__ import annotations

from typing import List

from .ring_engine import RingLayout, Task

__all__ = ["RING_LAYOUT", "STRIPE_LAYOUT", "ZIGZAG_LAYOUT"]


def _ring_causal_tasks(step: int, src: int, rank: int) -> List[Task]:
    """Contiguous layout (rank r holds tokens ``[r L, (r + 1) L)`` of every sequence): step 0
    (src = r) causal on the local block; src < r: all local queries see the whole block; src > r:
    nothing (the step only forwards the block)."""
    if step == 0:
        return [("all", "all", True)]
    return [("all", "all", False)] if src < rank else []


def _zigzag_causal_tasks(step: int, src: int, rank: int) -> List[Task]:
    """Zigzag layout (rank r holds chunk r then chunk 2N-1-r of the 2N chunks of every sequence):
    step 0 causal on the local pair of chunks; src < r: all local queries see the block's first
    chunk (chunk src) fully; src > r: only the second local chunk (2N-1-r) sees the whole block."""
    if step == 0:
        return [("all", "all", True)]
    if src < rank:
        return [("all", "front", False)]
    return [("back", "all", False)]


def _stripe_causal_tasks(step: int, src: int, rank: int) -> List[Task]:
    """Stripe layout (local token i of rank r is global token i N + r): src <= r: causal on the
    whole block (diagonal included); src > r: query i sees keys j < i (local queries 1.. against
    keys ..L-2, causal)."""
    # query i (global i N + r) sees key j (global j N + src) iff j <= i (src <= r), j < i (src > r)
    if src <= rank:
        return [("all", "all", True)]
    return [("drop_first", "drop_last", True)]


RING_LAYOUT = RingLayout(name="ring", causal_tasks=_ring_causal_tasks, api_name="ring_flash_attn")

ZIGZAG_LAYOUT = RingLayout(name="zigzag", causal_tasks=_zigzag_causal_tasks, row_sets=("front", "back"),
                           even_halves=True, api_name="zigzag_ring_flash_attn")

STRIPE_LAYOUT = RingLayout(name="stripe", causal_tasks=_stripe_causal_tasks, row_sets=("drop_first", "drop_last"),
                           api_name="stripe_flash_attn")
