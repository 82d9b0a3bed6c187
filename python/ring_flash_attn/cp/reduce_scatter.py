"""Reduce-scatter of the all-gather schemes' dK/dV slices back to the ranks that own the tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from .all_gather import KVSlicePlan
from .deferred import DeferredCollective

__all__ = ["SliceReduceScatter"]


class SliceReduceScatter(DeferredCollective):
    """Asynchronous reduce-scatter of each KV-head slice's dK/dV to the owning ranks, one slice
    behind: slice s's reduce-scatter runs while slice s+1 is computed; the current stream waits
    for it (and its result is copied into dk/dv) when slice s+1's is submitted, or at ``finish``.
    dk, dv: the local ``[T, Hk, D]`` gradients to fill."""

    def __init__(self, plan: KVSlicePlan, dk: Tensor, dv: Tensor):
        super().__init__()
        self.plan, self.dk, self.dv = plan, dk, dv

    def submit(self, s: int, dkv: Tensor) -> None:
        """dkv: ``[total_global, 2, heads_k_stride, D]`` of slice s in natural order, in the dtype
        the reduction runs in."""
        plan = self.plan
        sl = slice(s * plan.heads_k_stride, (s + 1) * plan.heads_k_stride)
        if plan.world_size == 1:
            self.complete(sl, dkv)
            return
        import torch.distributed as dist

        # natural -> rank-major order (inv_src None: already rank-major, e.g. llama3's layout)
        send = dkv if plan.inv_src is None else dkv.index_select(0, plan.inv_src)
        recv = torch.empty((plan.total_local,) + tuple(dkv.shape[1:]), dtype=dkv.dtype, device=dkv.device)
        work = dist.reduce_scatter_tensor(recv, send, group=plan.group, async_op=True)
        self.defer(sl, recv, send, work)

    def complete(self, sl: slice, recv: Tensor) -> None:
        """Copies a slice's reduced dK/dV into dk/dv."""
        self.dk[:, sl] = recv[:, 0]
        self.dv[:, sl] = recv[:, 1]
