"""All-to-all between sequence shards and head shards (Ulysses), and its autograd function.

Over a group of U ranks, rank r holds a SEQUENCE shard (its T tokens, every head) and, after the
all-to-all, a HEAD shard (the T_g = U T tokens of the whole group, in natural order, for its
1/U of the heads). Query heads: rank j gets heads ``[j Hq/U, (j+1) Hq/U)``. KV heads: with Hk a
multiple of U, rank j gets ``[j Hk/U, (j+1) Hk/U)``; with fewer KV heads than ranks (U a multiple
of Hk) every KV head is replicated U/Hk times, so that each rank gets the one KV head its query
heads use, and the replicas' gradients are summed (in fp32) on the way back.

The local heads are moved in CHUNKS of ``heads_k_stride`` KV heads (with their query heads), one
all-to-all per chunk carrying Q, K and V together (the backward: dO; dQ, dK and dV together).
The next chunk's all-to-all is issued before the current chunk is computed, and a chunk's
output all-to-all runs while the next chunk is computed, so communication overlaps compute
when a rank holds more than one chunk; with one KV head per rank (U = Hk, the usual GQA case)
there is one chunk and the all-to-alls are not overlapped. On NCCL ``Work.wait()`` only makes
the current stream wait (no host block); on gloo the collectives run on its worker threads.

``HeadShardedAttention`` runs any attention over the head shards: an ``inner`` callable (the
single-device kernel for Ulysses; an all-gather scheme over a second process group for the 2-D
hybrid). Its forward builds the inner call's autograd graph per chunk and its backward runs
``torch.autograd.grad`` through it, so any differentiable attention can be the inner one, with
the features it supports (softcap, window, sinks) passed through as keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .deferred import DeferredCollective

__all__ = ["HeadShardedAttention", "HeadShards", "HeadsToSequence", "check_head_split", "head_sharded_attention",
           "sequence_to_heads"]


def check_head_split(num_heads_q: int, num_heads_k: int, degree: int, what: str = "the all-to-all group") -> int:
    """The KV-head replication factor of a head split over ``degree`` ranks: 1 when Hk is a
    multiple of ``degree``, ``degree / Hk`` when ``degree`` is a multiple of Hk. ValueError naming
    q or k otherwise (Hq must be a multiple of ``degree``: each rank computes Hq/degree heads)."""
    if num_heads_q % degree:
        raise ValueError(f"q: expected a number of heads divisible by the {degree} ranks of {what} (each rank "
                         f"computes num_heads / {degree} heads after the all-to-all), got {num_heads_q}")
    if num_heads_k % degree == 0:
        return 1
    if degree % num_heads_k == 0:
        return degree // num_heads_k
    raise ValueError(f"k: expected a number of KV heads that is a multiple or a divisor of the {degree} ranks of "
                     f"{what} (a divisor: each KV head is replicated to the ranks of its query heads), got "
                     f"{num_heads_k}")


@dataclass
class HeadShards:
    """How one call splits its heads over the U ranks of ``group``.

    total_local: T, the rank's tokens (rows of q, k, v; ``batch`` x local sequence length in the
        batched layout). batch: B > 1 for the batched layout ``[B, L, H, D]`` (each rank holds
        tokens ``[r L, (r+1) L)`` of every sequence), 1 for packed varlen tokens (rank r holds
        rows ``[r T, (r+1) T)`` of the group's packed batch).
    heads_k_stride: KV heads of the head shard per all-to-all chunk (divides heads_k_local).
    """

    group: Optional[object]
    world_size: int
    rank: int
    total_local: int
    batch: int
    num_heads_q: int
    num_heads_k: int
    kv_replicas: int
    heads_k_stride: int

    @property
    def heads_q_local(self) -> int:
        return self.num_heads_q // self.world_size

    @property
    def heads_k_local(self) -> int:
        return self.num_heads_k * self.kv_replicas // self.world_size

    @property
    def num_chunks(self) -> int:
        return self.heads_k_local // self.heads_k_stride

    @property
    def heads_q_per_chunk(self) -> int:
        return self.heads_k_stride * (self.heads_q_local // self.heads_k_local)

    @property
    def total_heads_sharded(self) -> int:
        """U T: the rows of a head shard (every token of the group)."""
        return self.world_size * self.total_local

    def global_q_heads(self, chunk: int) -> slice:
        """The query heads (of all Hq) that this rank computes in ``chunk``."""
        start = self.rank * self.heads_q_local + chunk * self.heads_q_per_chunk
        return slice(start, start + self.heads_q_per_chunk)


# A tensor taking part in one all-to-all: (x [T or U T, H, D], heads per rank h, heads per chunk w).
Field = Tuple[Tensor, int, int]


def _all_to_all(send: Tensor, shards: HeadShards):
    """Starts the all-to-all of ``send`` ``[U, ...]`` (block j to rank j); returns (recv, work)."""
    if shards.world_size == 1:
        return send, None
    import torch.distributed as dist

    recv = torch.empty_like(send)
    work = dist.all_to_all_single(recv, send, group=shards.group, async_op=True)
    return recv, work


def _natural_rows(recv: Tensor, shards: HeadShards) -> Tensor:
    """``[U, T, W, D]`` (block i: rank i's tokens) -> ``[U T, W, D]`` in natural token order."""
    U, T, W, D = recv.shape
    if shards.batch == 1:
        return recv.view(U * T, W, D)
    B = shards.batch
    return recv.view(U, B, T // B, W, D).transpose(0, 1).reshape(U * T, W, D)


def _rank_major_rows(y: Tensor, shards: HeadShards) -> Tensor:
    """The inverse of ``_natural_rows`` for one head-sharded tensor: ``[U T, w, D]`` in natural
    order -> ``[U, T, w, D]`` (block j: rank j's tokens), a view where the order already is."""
    U, T = shards.world_size, shards.total_local
    if shards.batch == 1:
        return y.view(U, T, *y.shape[1:]) if y.is_contiguous() else y.reshape(U, T, *y.shape[1:])
    B = shards.batch
    return y.reshape(B, U, T // B, *y.shape[1:]).transpose(0, 1).reshape(U, T, *y.shape[1:])


def _pack_sequence_shards(fields: Sequence[Field], chunk: int, shards: HeadShards) -> Tensor:
    """The send buffer ``[U, T, W, D]`` of one chunk: block j holds, of every field, the chunk's
    heads that rank j computes."""
    U, T = shards.world_size, shards.total_local
    x0 = fields[0][0]
    W = sum(w for _, _, w in fields)
    send = torch.empty((U, T, W, x0.shape[-1]), dtype=x0.dtype, device=x0.device)
    offset = 0
    for x, h, w in fields:
        send[:, :, offset:offset + w] = x.unflatten(1, (U, h))[:, :, chunk * w:(chunk + 1) * w].transpose(0, 1)
        offset += w
    return send


def sequence_to_heads(shards: HeadShards, fields: Sequence[Field]) -> Iterator[List[Tensor]]:
    """Yields, per chunk c, each field's head shard ``[U T, w, D]`` (natural token order; views of
    one received buffer) for the chunk's heads. The all-to-all of chunk c+1 is issued before
    chunk c is yielded, so it is in flight while the caller computes chunk c."""

    def start(c):
        return _all_to_all(_pack_sequence_shards(fields, c, shards), shards)

    pending = start(0)
    for c in range(shards.num_chunks):
        recv, work = pending
        if c + 1 < shards.num_chunks:
            pending = start(c + 1)
        if work is not None:
            work.wait()  # NCCL: the current stream waits; no host block
        rows = _natural_rows(recv, shards)
        del recv, work
        views, offset = [], 0
        for _, _, w in fields:
            views.append(rows[:, offset:offset + w])
            offset += w
        yield views
        del rows, views


class HeadsToSequence(DeferredCollective):
    """The way back: each chunk's head-sharded results go to the ranks that own their tokens,
    asynchronously, one chunk behind (chunk c's all-to-all runs while chunk c+1 is computed;
    its result is copied into the destinations when chunk c+1's is submitted, or at ``finish``).

    destinations: per field, the rank's sequence-sharded result ``[T, h U, D]`` (contiguous,
    written chunk by chunk) and the field's heads per rank ``h`` and per chunk ``w``."""

    def __init__(self, shards: HeadShards, destinations: Sequence[Field]):
        super().__init__()
        self.shards = shards
        self.destinations = list(destinations)

    def submit(self, chunk: int, results: Sequence[Tensor]) -> None:
        """results: per destination, the chunk's head shard ``[U T, w, D]`` (natural order)."""
        shards = self.shards
        U, T = shards.world_size, shards.total_local
        W = sum(w for _, _, w in self.destinations)
        r0 = results[0]
        send = torch.empty((U, T, W, r0.shape[-1]), dtype=self.destinations[0][0].dtype, device=r0.device)
        offset = 0
        for y, (_, _, w) in zip(results, self.destinations):
            send[:, :, offset:offset + w] = _rank_major_rows(y, shards)
            offset += w
        recv, work = _all_to_all(send, shards)
        self.defer(chunk, recv, send, work)

    def complete(self, chunk: int, recv: Tensor) -> None:
        """Copies a chunk's received blocks into the destinations."""
        U = self.shards.world_size
        offset = 0
        for x, h, w in self.destinations:
            # block j of recv: rank j's heads of this chunk, for this rank's tokens
            x.unflatten(1, (U, h))[:, :, chunk * w:(chunk + 1) * w] = recv[:, :, offset:offset + w].transpose(0, 1)
            offset += w


# The attention run on the head shards of one chunk: (q [U T, hq, D], k, v [U T, hk, D], sinks
# [hq] fp32 or None) -> (out [U T, hq, D], lse [hq, U T] float32). Differentiable in q, k, v and
# sinks (its autograd graph is what the backward differentiates).
InnerAttention = Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], Tuple[Tensor, Tensor]]


def _replicated_kv_source(x: Tensor, shards: HeadShards) -> Tensor:
    """k or v with every KV head repeated ``kv_replicas`` times (consecutively); x itself when
    no head is replicated."""
    if shards.kv_replicas == 1:
        return x
    return x.repeat_interleave(shards.kv_replicas, dim=1)


def _sum_replicas(dx: Tensor, shards: HeadShards, dtype: torch.dtype) -> Tensor:
    """``[T, Hk r, D]`` gradients of the replicated heads -> ``[T, Hk, D]``, summed in fp32 (fp64
    for fp64) and rounded once."""
    if shards.kv_replicas == 1:
        return dx
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return dx.unflatten(1, (shards.num_heads_k, shards.kv_replicas)).to(acc).sum(2).to(dtype)


class HeadShardedAttention(torch.autograd.Function):
    """Autograd of attention over head shards: all-to-all in, ``inner`` per chunk, all-to-all out.

    ``HeadShardedAttention.apply(q, k, v, sinks, shards, inner, return_lse, record_graph,
    *caller_tensors)`` with q ``[T, Hq, D]``, k/v ``[T, Hk, D]`` (the rank's sequence shard), sinks
    fp32 ``[Hq]`` or None and ``record_graph`` (build the inner autograd graphs: the caller's grad
    mode, ``head_sharded_attention`` passes it) returns ``(out [T, Hq, D], lse [Hq, T] float32 or
    None)``; lse is computed (one more small
    all-to-all per chunk) only with ``return_lse`` and is not differentiable. caller_tensors: the
    caller's metadata tensors that the inner backward reads (saved, so that an in-place change
    before the backward raises). The sinks gradient of a rank is non-zero only on the heads it
    computes (a replicated parameter's gradient is the sum over the ranks, as for the weights).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor], shards: HeadShards,
                inner: InnerAttention, return_lse: bool, record_graph: bool, *caller_tensors: Tensor):
        T, Hq, D = q.shape
        hq, hk = shards.heads_q_per_chunk, shards.heads_k_stride
        hq_loc, hk_loc = shards.heads_q_local, shards.heads_k_local
        needs_grad = record_graph and any(ctx.needs_input_grad[:4])
        fields = [(q, hq_loc, hq), (_replicated_kv_source(k, shards), hk_loc, hk),
                  (_replicated_kv_source(v, shards), hk_loc, hk)]
        out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
        out_back = HeadsToSequence(shards, [(out, hq_loc, hq)])
        lse_seq = torch.empty((T, Hq, 1), dtype=torch.float32, device=q.device) if return_lse else None
        lse_back = HeadsToSequence(shards, [(lse_seq, hq_loc, hq)]) if return_lse else None
        graphs = []
        for c, (q_h, k_h, v_h) in enumerate(sequence_to_heads(shards, fields)):
            sinks_c = None if sinks is None else sinks.detach()[shards.global_q_heads(c)].clone()
            if needs_grad:
                with torch.enable_grad():
                    leaves = [t.detach().requires_grad_(True) for t in (q_h, k_h, v_h)]
                    if sinks_c is not None:
                        sinks_c.requires_grad_(True)
                    out_h, lse_h = inner(leaves[0], leaves[1], leaves[2], sinks_c)
                graphs.append((out_h, leaves, sinks_c))
            else:
                out_h, lse_h = inner(q_h, k_h, v_h, sinks_c)
            out_back.submit(c, [out_h.detach()])
            if return_lse:
                lse_back.submit(c, [lse_h.detach().t().unsqueeze(-1)])  # [U T, hq, 1]
            del out_h, lse_h
        out_back.finish()
        lse = None
        if return_lse:
            lse_back.finish()
            lse = lse_seq.squeeze(-1).t().contiguous()  # [Hq, T]
        ctx.save_for_backward(*caller_tensors)
        ctx.shards, ctx.graphs = shards, graphs
        ctx.kv_dtype, ctx.has_sinks = k.dtype, sinks is not None
        if lse is not None:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: Tensor, _dlse):
        _ = ctx.saved_tensors  # raises if a caller tensor the inner backward reads changed in place
        shards: HeadShards = ctx.shards
        graphs, ctx.graphs = ctx.graphs, None
        T = shards.total_local
        hq, hk = shards.heads_q_per_chunk, shards.heads_k_stride
        hq_loc, hk_loc = shards.heads_q_local, shards.heads_k_local
        D = dout.shape[-1]
        dq = torch.empty((T, shards.num_heads_q, D), dtype=dout.dtype, device=dout.device)
        dk = torch.empty((T, shards.num_heads_k * shards.kv_replicas, D), dtype=ctx.kv_dtype, device=dout.device)
        dv = torch.empty_like(dk)
        back = HeadsToSequence(shards, [(dq, hq_loc, hq), (dk, hk_loc, hk), (dv, hk_loc, hk)])
        dsinks = torch.zeros(shards.num_heads_q, dtype=torch.float32, device=dout.device) if ctx.has_sinks else None
        for c, (dout_h,) in enumerate(sequence_to_heads(shards, [(dout, hq_loc, hq)])):
            out_h, leaves, sinks_c = graphs[c]
            graphs[c] = None  # the chunk's graph is freed once its gradients are taken
            inputs = list(leaves) + ([sinks_c] if sinks_c is not None else [])
            grads = torch.autograd.grad(out_h, inputs, dout_h)
            del out_h, leaves
            back.submit(c, [grads[0], grads[1], grads[2]])
            if sinks_c is not None:
                dsinks[shards.global_q_heads(c)] = grads[3].to(torch.float32)
            del grads
        back.finish()
        dk = _sum_replicas(dk, shards, ctx.kv_dtype)
        dv = _sum_replicas(dv, shards, ctx.kv_dtype)
        n_caller = len(ctx.saved_tensors)
        return (dq, dk, dv, dsinks, None, None, None, None) + (None,) * n_caller



def head_sharded_attention(q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor], shards: HeadShards,
                           inner: InnerAttention, return_lse: bool,
                           *caller_tensors: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """``HeadShardedAttention`` on q ``[T, Hq, D]``, k/v ``[T, Hk, D]``: ``(out, lse or None)``.
    The inner attention's autograd graph is built only when a backward can follow (grad mode on
    at the call; inside the function's forward it is always off)."""
    return HeadShardedAttention.apply(q, k, v, sinks, shards, inner, return_lse, torch.is_grad_enabled(),
                                      *caller_tensors)
