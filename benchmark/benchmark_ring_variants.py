#!/usr/bin/env python
"""Every context-parallel variant in upstream ring-flash-attention's benchmark setting.

Usage (launch with torchrun; one process per GPU, NCCL; any N, N = 1 included):

    torchrun --nproc_per_node=1 benchmark/benchmark_ring_variants.py
    torchrun --nproc_per_node=8 benchmark/benchmark_ring_variants.py --variants zigzag_ring llama3_varlen \\
        --csv benchmark/results/ring_variants.csv
    torchrun --nproc_per_node=1 benchmark/benchmark_ring_variants.py --fwd-only --num-iter 500
    # smoke test without GPUs (gloo, CPU backend, tiny sizes; the numbers mean nothing):
    torchrun --nproc_per_node=2 benchmark/benchmark_ring_variants.py --device cpu

The setting (upstream's benchmark/benchmark_kvpacked_func.py and benchmark_varlen_kvpacked_func.py):
Llama3-8B attention (32 query heads, 8 KV heads, head dim 128), bf16, causal, --seqlen-per-gpu
tokens on every GPU (default 8192, so N x 8192 tokens in all), the kvpacked forms, forward +
backward (--fwd-only: forward under no_grad), deterministic=False (--deterministic), random
inputs. Variants:

    ring, zigzag_ring, stripe     one sequence of N x S tokens, [1, S, H, D] per rank
    ring_varlen,                  the packed S tokens per rank cycle, call after call, through four
    zigzag_ring_varlen,           batches (as upstream's varlen benchmark): one sequence; 256, 7392
    llama3_varlen,                and 544 tokens; two halves; 3104, 3200, 1600, 160 and 128 tokens
    zigzag_llama3_varlen          (scaled to S, rounded to even lengths). The ring varlen forms get the
                                  rank's LOCAL cu_seqlens (every sequence N times longer globally);
                                  llama3 gets llama3_flash_attn_prepare_cu_seqlens's metadata for
                                  the global batch (contiguous pieces), zigzag llama3 that of
                                  zigzag_llama3_prepare_cu_seqlens (zigzag shards; the fused
                                  kernel unless --zigzag-llama3-impl says otherwise);
                                  heads_k_stride 4 for both llama3 forms, as upstream.

Timing, as upstream: --warmup untimed iterations, then --num-iter iterations back to back between
two CUDA events (a host timer on CPU); iter/s = iterations / elapsed time of the slowest rank.
TFLOPS per GPU = FLOPs of the whole (global) attention / N / elapsed. FLOPs are counted the
FlashAttention way on unmasked (query, key) pairs only: forward 4 * D * Hq * pairs, backward 2.5x
the forward (forward + backward 3.5x); a causal sequence of L tokens has L (L + 1) / 2 pairs
(FlashAttention's own benchmark counts L^2 / 2, 0.01% less at 8K; upstream reports no FLOPs).
Peak memory: torch.cuda.max_memory_allocated over the warm-up and timed iterations, inputs
included, the largest over ranks.

Rank 0 prints one table (variant, tokens/GPU, total tokens, iter/s, ms/iter, TFLOPS/GPU, peak
memory) and appends one row per variant to --csv.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, List, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import benchmark_grouped_attention as gb  # noqa: E402  (pure-Python helpers: pairs, FLOPs, tables)

VARIANTS = ("ring", "zigzag_ring", "stripe", "ring_varlen", "zigzag_ring_varlen", "llama3_varlen",
            "zigzag_llama3_varlen")
FUNCTION_NAMES = {
    "ring": "ring_flash_attn_kvpacked_func",
    "zigzag_ring": "zigzag_ring_flash_attn_kvpacked_func",
    "stripe": "stripe_flash_attn_kvpacked_func",
    "ring_varlen": "ring_flash_attn_varlen_kvpacked_func",
    "zigzag_ring_varlen": "zigzag_ring_flash_attn_varlen_kvpacked_func",
    "llama3_varlen": "llama3_flash_attn_varlen_kvpacked_func",
    "zigzag_llama3_varlen": "zigzag_llama3_flash_attn_varlen_kvpacked_func",
}
ZIGZAG_LLAMA3_IMPLS = {"baseline": {}, "grouped_python": {"use_grouped_attention": True},
                       "fused": {"use_fused_kernel": True}}
# The varlen batches, as sequence boundaries in a batch of 8192 tokens per rank (upstream's).
VARLEN_BOUNDARIES_8K = ((0, 8192), (0, 256, 7648, 8192), (0, 4096, 8192), (0, 3104, 6304, 7904, 8064, 8192))
DTYPES = ("bf16", "fp16", "fp32")
CSV_COLUMNS = ("device", "torch", "backend", "world_size", "variant", "function", "dtype", "causal", "num_heads",
               "num_kv_heads", "head_dim", "heads_k_stride", "tokens_per_gpu", "total_tokens", "pass",
               "deterministic", "warmup", "num_iter", "iter_per_s", "ms_per_iter", "tflops_per_gpu", "peak_mem_mib",
               "flops_per_iter")


# ---- workloads and FLOPs (pure Python) ----------------------------------------------------------


def varlen_local_batches(seqlen_per_gpu: int) -> List[List[int]]:
    """The four varlen batches scaled to `seqlen_per_gpu` local tokens: cumulative local lengths,
    every length even (the zigzag layouts need two equal chunks per rank) and non-zero."""
    if seqlen_per_gpu < 2 or seqlen_per_gpu % 2:
        raise ValueError(f"--seqlen-per-gpu: expected an even number >= 2, got {seqlen_per_gpu}")
    batches = []
    for bounds in VARLEN_BOUNDARIES_8K:
        cu = [0]
        for b in bounds[1:-1]:
            x = (b * seqlen_per_gpu // 8192) // 2 * 2
            if cu[-1] < x < seqlen_per_gpu:
                cu.append(x)
        cu.append(seqlen_per_gpu)
        batches.append(cu)
    return batches


def causal_pairs(lengths: Sequence[int], causal: bool) -> int:
    return sum(gb.count_pairs(n, n, causal) for n in lengths)


def iteration_flops(variant: str, seqlen_per_gpu: int, world_size: int, num_heads: int, head_dim: int,
                    causal: bool, pass_name: str) -> List[float]:
    """FLOPs of one iteration of the global attention (a list: the varlen variants cycle through
    their batches, one entry per batch)."""
    if variant in ("ring", "zigzag_ring", "stripe"):
        batches = [[world_size * seqlen_per_gpu]]
    else:
        batches = [[world_size * (b - a) for a, b in zip(cu, cu[1:])] for cu in varlen_local_batches(seqlen_per_gpu)]
    return [gb.attention_flops(causal_pairs(lens, causal), num_heads, head_dim, pass_name) for lens in batches]


def total_flops(per_batch: Sequence[float], first_iter: int, num_iter: int) -> float:
    """Iterations first_iter .. first_iter + num_iter - 1, iteration i running batch i mod len."""
    return sum(per_batch[(first_iter + i) % len(per_batch)] for i in range(num_iter))


# ---- the calls ---------------------------------------------------------------------------------


def heads_k_stride_for(num_kv_heads: int, wanted: int) -> int:
    """`wanted` if it divides the KV heads, else the largest divisor below it."""
    for hs in range(min(wanted, num_kv_heads), 0, -1):
        if num_kv_heads % hs == 0:
            return hs
    return 1


def make_iteration(variant: str, args, dtype, device, rank: int, world_size: int, hs: int):
    """Inputs of the rank (random) and a function iteration(i) running call i (forward, or forward +
    backward) of the variant."""
    import torch

    import ring_flash_attn as rfa

    S, Hq, Hk, D = args.seqlen_per_gpu, args.num_heads, args.num_kv_heads, args.head_dim
    backward = not args.fwd_only
    gen = torch.Generator(device=device).manual_seed(1234 + rank)

    def randn(*shape, grad=False):
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        return t.requires_grad_(grad)

    common = dict(causal=args.causal, window_size=(-1, -1), alibi_slopes=None, deterministic=args.deterministic,
                  return_attn_probs=False)
    func = getattr(rfa, FUNCTION_NAMES[variant])
    if variant in ("ring", "zigzag_ring", "stripe"):
        q, kv, dout = randn(1, S, Hq, D, grad=backward), randn(1, S, 2, Hk, D, grad=backward), randn(1, S, Hq, D)
        calls = [lambda: func(q, kv, **common)]
    else:
        q, kv, dout = randn(S, Hq, D, grad=backward), randn(S, 2, Hk, D, grad=backward), randn(S, Hq, D)
        calls = []
        for cu_list in varlen_local_batches(S):
            cu_local = torch.tensor(cu_list, dtype=torch.int32, device=device)
            max_local = max(b - a for a, b in zip(cu_list, cu_list[1:]))
            if variant in ("ring_varlen", "zigzag_ring_varlen"):
                calls.append(lambda cu=cu_local, m=max_local: func(q, kv, cu, m, **common))
            elif variant == "llama3_varlen":
                meta = rfa.llama3_flash_attn_prepare_cu_seqlens(cu_local * world_size, causal=args.causal, rank=rank,
                                                                world_size=world_size)
                calls.append(lambda m=meta: func(q, kv, m[0], m[1], m[2], m[3], hs, m[4], **common))
            else:  # zigzag_llama3_varlen
                meta = rfa.zigzag_llama3_prepare_cu_seqlens(cu_local * world_size, args.causal, rank, world_size,
                                                            max_seqlen=world_size * max_local)
                flags = ZIGZAG_LLAMA3_IMPLS[args.zigzag_llama3_impl]
                calls.append(lambda m=meta: func(q, kv, m[0], m[1], m[2], m[3], hs, m[4], **common, **flags))

    if not backward:
        def iteration(i: int) -> None:
            with torch.no_grad():
                calls[i % len(calls)]()
    else:
        def iteration(i: int) -> None:
            q.grad = None
            kv.grad = None
            calls[i % len(calls)]().backward(dout)
    return iteration


def run_timed(iteration: Callable[[int], None], warmup: int, num_iter: int, device) -> float:
    """Seconds for iterations warmup .. warmup + num_iter - 1 back to back, after the warm-up."""
    import torch
    import torch.distributed as dist

    for i in range(warmup):
        iteration(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        dist.barrier()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for i in range(num_iter):
            iteration(warmup + i)
        end.record()
        torch.cuda.synchronize(device)
        return begin.elapsed_time(end) / 1e3
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(num_iter):
        iteration(warmup + i)
    return time.perf_counter() - t0


# ---- driver ---------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Every ring / llama3 variant in upstream ring-flash-attention's "
                                            "benchmark setting (launch with torchrun)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--seqlen-per-gpu", type=int, default=None, help="tokens per GPU (even); default 8192, 64 on cpu")
    p.add_argument("--num-iter", type=int, default=None,
                   help="timed iterations; default 100 (500 with --fwd-only) as upstream, 3 on cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first; default 10, 1 on cpu")
    p.add_argument("--fwd-only", action="store_true", help="forward only, under torch.no_grad()")
    p.add_argument("--deterministic", action="store_true", help="deterministic=True (bit-identical backward)")
    p.add_argument("--no-causal", dest="causal", action="store_false", help="non-causal attention (default causal)")
    p.add_argument("--csv", default=None, help="append one row per variant to this CSV (rank 0)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda (NCCL) or cpu (gloo, CPU backend); default cuda if available")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16, fp32 on cpu")
    p.add_argument("--num-heads", type=int, default=None, help="query heads; default 32 (Llama3-8B), 4 on cpu")
    p.add_argument("--num-kv-heads", type=int, default=None, help="KV heads; default 8 (Llama3-8B), 2 on cpu")
    p.add_argument("--head-dim", type=int, default=None, help="default 128, 16 on cpu")
    p.add_argument("--heads-k-stride", type=int, default=4,
                   help="llama3 variants: KV heads per all-gather slice (default 4, upstream's; lowered to a "
                        "divisor of the KV heads)")
    p.add_argument("--zigzag-llama3-impl", choices=list(ZIGZAG_LLAMA3_IMPLS), default="fused",
                   help="zigzag_llama3_varlen: implementation flag (default fused: the fused grouped kernel)")
    return p.parse_args(argv)


def _fill_defaults(args, on_gpu: bool) -> None:
    def default(name, gpu_value, cpu_value):
        if getattr(args, name) is None:
            setattr(args, name, gpu_value if on_gpu else cpu_value)

    default("seqlen_per_gpu", 8192, 64)
    default("num_iter", 500 if args.fwd_only else 100, 3)
    default("warmup", 10, 1)
    default("dtype", "bf16", "fp32")
    default("num_heads", 32, 4)
    default("num_kv_heads", 8, 2)
    default("head_dim", 128, 16)


def _first_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text[:160]}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch
    import torch.distributed as dist

    args = parse_args(argv)

    def prepare(args: argparse.Namespace, on_gpu: bool) -> None:
        _fill_defaults(args, on_gpu)
        varlen_local_batches(args.seqlen_per_gpu)  # validates --seqlen-per-gpu before any process group

    # On the CPU a smoke test: idle OpenMP workers cost more than they give on tiny tensors.
    run = gb.start_distributed(args, prepare, master_port="29521", cpu_threads=1)
    if run is None:
        return gb.EXIT_NO_GPU
    on_gpu, device, rank, N, dtype, env, say = run
    hs = heads_k_stride_for(args.num_kv_heads, args.heads_k_stride)
    pass_name = "fwd" if args.fwd_only else "fwd_bwd"

    say("Ring / llama3 context-parallel variants, upstream ring-flash-attention's benchmark setting")
    say(f"world_size {N}, {env['device']} ({env['backend']}), torch {env['torch']}, {args.dtype}, "
        f"{args.num_heads} Q heads / {args.num_kv_heads} KV heads, head_dim {args.head_dim}, "
        f"{'causal' if args.causal else 'non-causal'}, {args.seqlen_per_gpu} tokens per GPU, "
        f"{'forward' if args.fwd_only else 'forward + backward'}, deterministic={args.deterministic}, "
        f"llama3 heads_k_stride {hs}, zigzag llama3 impl {args.zigzag_llama3_impl}")
    gb.say_command(say, "benchmark/benchmark_ring_variants.py", N, argv)
    timer = "CUDA events" if on_gpu else "host timer (CPU smoke test: the numbers mean nothing)"
    say(f"Timing: {timer}; {args.warmup} warm-up iterations, then {args.num_iter} timed back to back "
        f"(slowest rank); varlen variants cycle through {len(VARLEN_BOUNDARIES_8K)} batches")

    table, rows = [], []
    status = 0
    for variant in args.variants:
        reason = ""
        elapsed, peak = float("nan"), 0.0
        try:
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            iteration = make_iteration(variant, args, dtype, device, rank, N, hs)
            elapsed = run_timed(iteration, args.warmup, args.num_iter, device)
            if on_gpu:
                peak = torch.cuda.max_memory_allocated(device) / 2**20
            del iteration
            ok = 1.0
        except Exception as e:  # noqa: BLE001 - reported in the table
            reason = _first_line(e)
            ok = 0.0
            if on_gpu:
                torch.cuda.synchronize(device)
        stats = torch.tensor([ok, elapsed if ok else 0.0, peak], dtype=torch.float64, device=device)
        lowest = stats[:1].clone()
        dist.all_reduce(lowest, op=dist.ReduceOp.MIN)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        if lowest.item() == 0:
            status = 1
            say(f"{variant}: failed ({reason or 'on another rank'})")
            table.append([variant, str(args.seqlen_per_gpu), str(N * args.seqlen_per_gpu), "error", "", "", ""])
            continue
        elapsed, peak = stats[1].item(), stats[2].item()
        flops = total_flops(iteration_flops(variant, args.seqlen_per_gpu, N, args.num_heads, args.head_dim,
                                            args.causal, pass_name), args.warmup, args.num_iter)
        iter_s = args.num_iter / elapsed
        ms = elapsed * 1e3 / args.num_iter
        tflops = flops / N / elapsed / 1e12
        peak_text = f"{peak:.0f}" if on_gpu else "-"
        table.append([variant, str(args.seqlen_per_gpu), str(N * args.seqlen_per_gpu), f"{iter_s:.3f}", f"{ms:.3f}",
                      f"{tflops:.1f}" if on_gpu else f"{tflops:.4f}", peak_text])
        rows.append({
            "device": env["device"], "torch": env["torch"], "backend": env["backend"], "world_size": str(N),
            "variant": variant, "function": FUNCTION_NAMES[variant], "dtype": args.dtype,
            "causal": str(args.causal), "num_heads": str(args.num_heads), "num_kv_heads": str(args.num_kv_heads),
            "head_dim": str(args.head_dim), "heads_k_stride": str(hs) if "llama3" in variant else "",
            "tokens_per_gpu": str(args.seqlen_per_gpu), "total_tokens": str(N * args.seqlen_per_gpu),
            "pass": pass_name, "deterministic": str(args.deterministic), "warmup": str(args.warmup),
            "num_iter": str(args.num_iter), "iter_per_s": f"{iter_s:.4f}", "ms_per_iter": f"{ms:.4f}",
            "tflops_per_gpu": f"{tflops:.4f}", "peak_mem_mib": f"{peak:.1f}" if on_gpu else "",
            "flops_per_iter": f"{flops / args.num_iter:.6e}",
        })
    say()
    say(gb.box_table(["Variant", "Tokens/GPU", "Total tokens", "iter/s", "ms/iter", "TFLOPS/GPU", "Peak MiB"],
                     table, ["l", "r", "r", "r", "r", "r", "r"]))
    say("TFLOPS/GPU: FlashAttention's count on unmasked (q, k) pairs (fwd 4*D*Hq*pairs, fwd+bwd 3.5x; a causal "
        "sequence of L tokens has L(L+1)/2 pairs), whole global attention / world size / elapsed")
    gb.finish_distributed_run(run, status, args.csv, rows, CSV_COLUMNS)  # does not return
    return status


if __name__ == "__main__":
    sys.exit(main())
