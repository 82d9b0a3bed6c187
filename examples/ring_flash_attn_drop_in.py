"""Drop-in check: a script written against upstream ring-flash-attention's public API.

Everything below uses only what upstream's ``ring_flash_attn`` package exports, imported the way
upstream users import it; nothing of this project's own API. The same file runs on upstream
(with flash-attn on GPUs) and on this package (CUDA GPUs, or the CPU backend with gloo):

    torchrun --nproc_per_node 2 examples/ring_flash_attn_drop_in.py

With a GPU every rank takes ``cuda:LOCAL_RANK`` and the process group is NCCL, data in bfloat16;
without one the group is gloo on the CPU, data in float32. Each function gets the shard of a
global batch that its layout prescribes (contiguous, zigzag, stripe; varlen: per sequence), and
its output and input gradients are compared with a single-process reference on the whole batch
(plain PyTorch attention in float64). Pass rule, in the spirit of FlashAttention's tests:
``max|x - ref| <= 4 * max|x_lowp - ref| + floor`` (relative to ``max(1, max|ref|)``), where
``x_lowp`` is the same plain attention computed in the data dtype. Rank 0 prints one
``PASS``/``FAIL`` line per function; the exit status is 1 if any failed.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ring_flash_attn import (
    llama3_flash_attn_prepare_cu_seqlens,
    llama3_flash_attn_varlen_func,
    llama3_flash_attn_varlen_kvpacked_func,
    ring_flash_attn_func,
    ring_flash_attn_kvpacked_func,
    ring_flash_attn_qkvpacked_func,
    ring_flash_attn_varlen_func,
    ring_flash_attn_varlen_qkvpacked_func,
    stripe_flash_attn_func,
    zigzag_ring_flash_attn_func,
    zigzag_ring_flash_attn_qkvpacked_func,
    zigzag_ring_flash_attn_varlen_func,
)

Tensor = torch.Tensor


# ---- reference: plain attention over the whole (unsharded) batch -----------------------------------


def reference_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, cu_seqlens: Optional[List[int]] = None,
                        softmax_scale: Optional[float] = None) -> Tensor:
    """Batched: q ``[B, L, Hq, D]``, k/v ``[B, L, Hk, D]`` -> ``[B, L, Hq, D]``. Varlen (with
    ``cu_seqlens``): q ``[T, Hq, D]``, k/v ``[T, Hk, D]`` -> ``[T, Hq, D]``, sequences apart.
    Computed in the dtype of q (autograd works through it)."""
    if cu_seqlens is not None:
        outs = [reference_attention(q[None, a:b], k[None, a:b], v[None, a:b], causal, None, softmax_scale)[0]
                for a, b in zip(cu_seqlens, cu_seqlens[1:])]
        return torch.cat(outs, dim=0)
    B, L, Hq, D = q.shape
    rep = Hq // k.shape[2]
    k = k.repeat_interleave(rep, dim=2)
    v = v.repeat_interleave(rep, dim=2)
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if causal:
        mask = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v)


# ---- layouts: the rank's shard of a global tensor ---------------------------------------------------


def shard_batched(x: Tensor, layout: str, rank: int, world_size: int) -> Tensor:
    """x ``[B, L, ...]`` -> the rank's tokens (dim 1) in upstream's layout."""
    if layout == "ring":  # contiguous
        return x.chunk(world_size, dim=1)[rank]
    if layout == "zigzag":  # chunk r and chunk 2N-1-r of 2N chunks
        chunks = x.chunk(2 * world_size, dim=1)
        return torch.cat([chunks[rank], chunks[2 * world_size - 1 - rank]], dim=1)
    if layout == "stripe":  # tokens r, r+N, r+2N, ...
        return x[:, rank::world_size]
    raise ValueError(layout)


def shard_varlen(x: Tensor, cu_seqlens: List[int], layout: str, rank: int, world_size: int) -> Tensor:
    """x ``[T, ...]`` packed -> the rank's tokens, sequence by sequence (ring: contiguous piece of
    every sequence; zigzag: chunks r and 2N-1-r of every sequence; llama3: contiguous piece of the
    whole packed batch)."""
    if layout == "llama3":
        return x.chunk(world_size, dim=0)[rank]
    parts = []
    for a, b in zip(cu_seqlens, cu_seqlens[1:]):
        seq = x[a:b]
        if layout == "ring":
            parts.append(seq.chunk(world_size, dim=0)[rank])
        else:
            chunks = seq.chunk(2 * world_size, dim=0)
            parts += [chunks[rank], chunks[2 * world_size - 1 - rank]]
    return torch.cat(parts, dim=0)


# ---- the checks ---------------------------------------------------------------------------------------


class Setup:
    def __init__(self, rank: int, world_size: int, device: torch.device, dtype: torch.dtype):
        self.rank, self.world_size, self.device, self.dtype = rank, world_size, device, dtype
        self.gen = torch.Generator().manual_seed(1234)  # the same data on every rank

    def randn(self, *shape: int) -> Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64)


def run_check(s: Setup, inputs: Dict[str, Tensor], call: Callable[[Dict[str, Tensor]], Tensor],
              reference: Callable[[Dict[str, Tensor]], Tensor], shard: Callable[[Tensor], Tensor],
              grads: Tuple[str, ...]) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Runs `call` on the rank's shards of `inputs` and `reference` on the whole ones (in float64,
    and in the data dtype); returns, for the output and the gradient of each input named in
    `grads`, the error of the distributed result and that of the low-precision reference, both
    relative to max(1, max|ref|)."""
    exact = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    lowp = {k: v.to(s.device, s.dtype).requires_grad_(True) for k, v in inputs.items()}
    local = {k: shard(v).to(s.device, s.dtype).contiguous().requires_grad_(True) for k, v in inputs.items()}
    ref_out = reference(exact)
    dout = s.randn(*ref_out.shape)
    ref_out.backward(dout)
    lowp_out = reference(lowp)
    lowp_out.backward(dout.to(s.device, s.dtype))
    out = call(local)
    out.backward(shard(dout).to(s.device, s.dtype))

    def err(x: Tensor, ref: Tensor) -> float:
        x = x.detach().double().cpu()
        if x.shape != ref.shape or not torch.isfinite(x).all():
            return float("inf")
        return ((x - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()

    dist_err = {"out": err(out, shard(ref_out.detach()))}
    lowp_err = {"out": err(lowp_out, ref_out.detach())}
    for name in grads:
        dist_err["d" + name] = err(local[name].grad, shard(exact[name].grad))
        lowp_err["d" + name] = err(lowp[name].grad, exact[name].grad)
    return dist_err, lowp_err


def main() -> int:
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        dtype, floor = torch.bfloat16, 2e-2
    else:
        device, dtype, floor = torch.device("cpu"), torch.float32, 1e-5
    s = Setup(rank, world_size, device, dtype)
    N = world_size
    B, L, Hq, Hk, D = 2, 64 * N, 4, 2, 64  # batched: global length L, a multiple of 2N
    lens = [2 * N * m for m in (3, 17, 8, 4)]  # varlen: every length a multiple of 2N
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    T, max_len = cu[-1], max(lens)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    if rank == 0:
        print(f"backend {backend}, device {device.type}, dtype {str(dtype).replace('torch.', '')}, world size {N}",
              flush=True)

    results = []

    def check(name, inputs, call, reference, shard, grads):
        results.append((name,) + run_check(s, inputs, call, reference, shard, grads))

    grads_qkv = ("q", "k", "v")

    # batched API, separate q/k/v (GQA), each layout
    for name, fn, layout, causal in (("ring_flash_attn_func", ring_flash_attn_func, "ring", True),
                                     ("ring_flash_attn_func(causal=False)", ring_flash_attn_func, "ring", False),
                                     ("zigzag_ring_flash_attn_func", zigzag_ring_flash_attn_func, "zigzag", True),
                                     ("stripe_flash_attn_func", stripe_flash_attn_func, "stripe", True)):
        inputs = {"q": s.randn(B, L, Hq, D), "k": s.randn(B, L, Hk, D), "v": s.randn(B, L, Hk, D)}
        check(name, inputs,
              lambda t, fn=fn, causal=causal: fn(t["q"], t["k"], t["v"], causal=causal),
              lambda t, causal=causal: reference_attention(t["q"], t["k"], t["v"], causal),
              lambda x, layout=layout: shard_batched(x, layout, rank, N), grads_qkv)

    # batched API, packed
    inputs = {"kv": s.randn(B, L, 2, Hk, D), "q": s.randn(B, L, Hq, D)}
    check("ring_flash_attn_kvpacked_func", inputs,
          lambda t: ring_flash_attn_kvpacked_func(t["q"], t["kv"], causal=True),
          lambda t: reference_attention(t["q"], t["kv"][:, :, 0], t["kv"][:, :, 1], True),
          lambda x: shard_batched(x, "ring", rank, N), ("q", "kv"))
    for name, fn, layout in (("ring_flash_attn_qkvpacked_func", ring_flash_attn_qkvpacked_func, "ring"),
                             ("zigzag_ring_flash_attn_qkvpacked_func", zigzag_ring_flash_attn_qkvpacked_func,
                              "zigzag")):
        inputs = {"qkv": s.randn(B, L, 3, Hq, D)}
        check(name, inputs,
              lambda t, fn=fn: fn(t["qkv"], causal=True),
              lambda t: reference_attention(t["qkv"][:, :, 0], t["qkv"][:, :, 1], t["qkv"][:, :, 2], True),
              lambda x, layout=layout: shard_batched(x, layout, rank, N), ("qkv",))

    # varlen API: local cu_seqlens = global // N, local max_seqlen = global max // N
    local_cu, local_max = cu_t // N, max_len // N
    for name, fn, layout in (("ring_flash_attn_varlen_func", ring_flash_attn_varlen_func, "ring"),
                             ("zigzag_ring_flash_attn_varlen_func", zigzag_ring_flash_attn_varlen_func, "zigzag")):
        inputs = {"q": s.randn(T, Hq, D), "k": s.randn(T, Hk, D), "v": s.randn(T, Hk, D)}
        check(name, inputs,
              lambda t, fn=fn: fn(t["q"], t["k"], t["v"], local_cu, local_max, causal=True),
              lambda t: reference_attention(t["q"], t["k"], t["v"], True, cu),
              lambda x, layout=layout: shard_varlen(x, cu, layout, rank, N), grads_qkv)
    inputs = {"qkv": s.randn(T, 3, Hq, D)}
    check("ring_flash_attn_varlen_qkvpacked_func", inputs,
          lambda t: ring_flash_attn_varlen_qkvpacked_func(t["qkv"], local_cu, local_max, causal=True),
          lambda t: reference_attention(t["qkv"][:, 0], t["qkv"][:, 1], t["qkv"][:, 2], True, cu),
          lambda x: shard_varlen(x, cu, "ring", rank, N), ("qkv",))

    # llama3 (contiguous piece of the packed batch; any sequence lengths, total % N == 0)
    lens3 = [7, 29, 1, 20 * N + (-37) % N]  # odd lengths (for N = 2), crossing rank boundaries; total % N == 0
    cu3 = [0]
    for n in lens3:
        cu3.append(cu3[-1] + n)
    assert cu3[-1] % N == 0
    cu3_t = torch.tensor(cu3, dtype=torch.int32, device=device)
    cu_q, cu_k, max_q, max_k, k_slice = llama3_flash_attn_prepare_cu_seqlens(cu3_t, causal=True, rank=rank,
                                                                              world_size=N)
    T3 = cu3[-1]
    inputs = {"q": s.randn(T3, Hq, D), "k": s.randn(T3, Hk, D), "v": s.randn(T3, Hk, D)}
    check("llama3_flash_attn_varlen_func", inputs,
          lambda t: llama3_flash_attn_varlen_func(t["q"], t["k"], t["v"], cu_q, cu_k, max_q, max_k,
                                                  heads_k_stride=1, local_k_slice=k_slice, causal=True),
          lambda t: reference_attention(t["q"], t["k"], t["v"], True, cu3),
          lambda x: shard_varlen(x, cu3, "llama3", rank, N), grads_qkv)
    inputs = {"kv": s.randn(T3, 2, Hk, D), "q": s.randn(T3, Hq, D)}
    check("llama3_flash_attn_varlen_kvpacked_func", inputs,
          lambda t: llama3_flash_attn_varlen_kvpacked_func(t["q"], t["kv"], cu_q, cu_k, max_q, max_k,
                                                           heads_k_stride=Hk, local_k_slice=k_slice, causal=True),
          lambda t: reference_attention(t["q"], t["kv"][:, 0], t["kv"][:, 1], True, cu3),
          lambda x: shard_varlen(x, cu3, "llama3", rank, N), ("q", "kv"))

    # every rank's worst error per quantity: all-reduce MAX, then rank 0 reports
    failed = 0
    for name, dist_err, lowp_err in results:
        keys = list(dist_err)
        t = torch.tensor([dist_err[k] for k in keys], dtype=torch.float64,
                         device=device if backend == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        worst = dict(zip(keys, t.tolist()))
        ok = all(worst[k] <= 4 * lowp_err[k] + floor for k in keys)
        failed += not ok
        if rank == 0:
            detail = ", ".join(f"{k} {worst[k]:.1e} (bound {4 * lowp_err[k] + floor:.1e})" for k in keys)
            print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if rank == 0:
        print(f"{len(results) - failed} passed, {failed} failed", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
