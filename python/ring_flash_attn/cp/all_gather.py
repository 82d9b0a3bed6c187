"""Sliced all-gather of K/V for the all-gather schemes (llama3, zigzag llama3), and their autograd.

The K/V heads are processed in slices of ``heads_k_stride`` KV heads. Each slice's local K and V
are all-gathered in one collective (K and V interleaved); the next slice's all-gather is issued
before the current slice is computed, so it runs on the communication stream (NCCL's own stream;
gloo's worker thread on CPU) while the attention kernels of the current slice run on the current
stream; ``Work.wait()`` only makes the current stream wait (no host block on NCCL). The gathered
memory is bounded by a few slices. The gradients go back with ``reduce_scatter.SliceReduceScatter``.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple, Union

import torch
from torch import Tensor

from .sinks import sink_gradient

__all__ = ["KVSlicePlan", "SlicedKVAttention", "gather_kv_slices", "sliced_kv_attention"]


class KVSlicePlan:
    """What the sliced all-gather and reduce-scatter read from a scheme's per-call plan (a
    dataclass deriving from this one declares the fields): the process group, the local token
    count, the head counts and ``heads_k_stride``, and the row maps between the rank-major
    gathered order and the natural order (None where they are the same)."""

    group: Optional[object]
    world_size: int
    total_local: int  # T: local tokens of q, k, v
    num_heads_q: int
    num_heads_k: int
    heads_k_stride: int
    src: Optional[Tensor]  # natural global row -> rank-major gathered row; None: the identity
    inv_src: Optional[Tensor]  # its inverse

    def caller_tensors(self) -> Tuple[Tensor, ...]:
        """The caller's tensors that the backward reads (e.g. its cu_seqlens). ``SlicedKVAttention``
        saves them through autograd, so that changing one in place between the forward and the
        backward makes the backward raise (autograd's version check) instead of computing the
        gradients of other metadata. Tensors the plan built itself are private and not listed."""
        return ()

    @property
    def num_slices(self) -> int:
        return self.num_heads_k // self.heads_k_stride

    @property
    def heads_q_per_slice(self) -> int:
        return self.heads_k_stride * (self.num_heads_q // self.num_heads_k)

    @property
    def total_global(self) -> int:
        return self.world_size * self.total_local


def gather_kv_slices(plan: KVSlicePlan, k: Tensor, v: Tensor) -> Iterator[Tuple[Tensor, Tensor]]:
    """Yields (k_s, v_s) per KV-head slice s: the GLOBAL K/V of the slice in natural order
    (``[total_global, heads_k_stride, D]``, strided views). The all-gather of slice s+1 is issued
    before slice s is yielded, so it is in flight while the caller computes slice s."""
    hs = plan.heads_k_stride
    if plan.world_size == 1:
        for s in range(plan.num_slices):
            sl = slice(s * hs, (s + 1) * hs)
            yield k[:, sl], v[:, sl]
        return

    import torch.distributed as dist

    T, N, D = plan.total_local, plan.world_size, k.shape[2]

    def start(s):
        sl = slice(s * hs, (s + 1) * hs)
        send = torch.stack((k[:, sl], v[:, sl]), dim=1)  # [T, 2, hs, D]: one collective for K and V
        recv = torch.empty((N * T, 2, hs, D), dtype=k.dtype, device=k.device)
        work = dist.all_gather_into_tensor(recv, send, group=plan.group, async_op=True)
        return recv, work

    pending = start(0)
    for s in range(plan.num_slices):
        recv, work = pending
        if s + 1 < plan.num_slices:
            pending = start(s + 1)  # in flight while slice s is computed
        work.wait()  # NCCL: the current stream waits; no host block
        # rank-major -> natural order (src None: the layout is already natural, e.g. llama3's)
        kv = recv if plan.src is None else recv.index_select(0, plan.src)
        del recv, work
        yield kv[:, 0], kv[:, 1]
        del kv  # (with the caller's del) at most three gathered slices are alive at once


class SlicedKVAttention(torch.autograd.Function):
    """Autograd of an attention over all-gathered K/V slices: forward_fn(plan, q, k, v) ->
    (out, lse, lse_buf) and backward_fn(plan, dout, q, k, v, out, lse_buf) -> (dq, dk, dv);
    lse_buf is whatever per-slice LSE layout the scheme's kernels want. The lse is not
    differentiable. ``SlicedKVAttention.apply(q, k, v, sinks, plan, forward_fn, backward_fn,
    *plan.caller_tensors())`` returns ``(out, lse)``; the caller's tensors are inputs so that
    autograd checks their versions when the backward reads them. ``sinks`` (None or float32
    ``[Hq]``): the sink logits the scheme's kernels added to every row (each row sees all of its
    keys in one call, so once per row); their gradient is the rank's rows' share
    (``sinks.sink_gradient`` of the final out and lse)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor], plan: KVSlicePlan,
                forward_fn: Callable, backward_fn: Callable, *caller_tensors: Tensor):
        out, lse, lse_buf = forward_fn(plan, q, k, v)
        ctx.has_sinks = sinks is not None
        extra = (sinks, lse) if sinks is not None else ()
        ctx.save_for_backward(q, k, v, out, lse_buf, *extra, *caller_tensors)
        ctx.plan, ctx.backward_fn = plan, backward_fn
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        # unpacking raises if a caller tensor the plan reads changed in place since the forward
        q, k, v, out, lse_buf, *rest = ctx.saved_tensors
        sinks = lse = None
        if ctx.has_sinks:
            sinks, lse, *rest = rest
        dq, dk, dv = ctx.backward_fn(ctx.plan, dout, q, k, v, out, lse_buf)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            dsinks = sink_gradient(sinks, out, dout, lse)
        return (dq, dk, dv, dsinks, None, None, None) + (None,) * len(rest)


def sliced_kv_attention(q: Tensor, k: Tensor, v: Tensor, plan: KVSlicePlan, forward_fn: Callable,
                        backward_fn: Callable, return_attn_probs: bool,
                        sinks: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor, None]]:
    """``SlicedKVAttention`` on q ``[T, Hq, D]``, k/v ``[T, Hk, D]``: ``out`` ``[T, Hq, D]``, or
    ``(out, lse [Hq, T], None)`` with ``return_attn_probs`` (upstream's return convention).
    sinks: None or the float32 ``[Hq]`` sink logits the scheme's kernels take."""
    out, lse = SlicedKVAttention.apply(q, k, v, sinks, plan, forward_fn, backward_fn, *plan.caller_tensors())
    if return_attn_probs:
        return out, lse, None
    return out
