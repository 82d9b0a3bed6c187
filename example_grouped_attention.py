#!/usr/bin/env python3
"""Quick sanity check of the three grouped-attention implementations.

Two query groups share one K/V stream, as in zigzag llama3 context parallelism: the "early"
group sees the first half of the keys, the "late" group all of them (causal, bottom-right).

* baseline        - one library call per group (flash_attn_varlen_func)
* Python grouped  - one G=1 call over both groups with K/V duplicated per group
                    (ring_flash_attn.grouped_python._flash_attn_varlen_forward_grouped)
* fused grouped   - one fused grouped kernel launch (grouped_flash_attn_varlen_func)

On a GPU it runs a Llama3-8B-like configuration (seqlen 4096, 32 Q heads, 8 KV heads, head dim 128,
batch 2, fp16). Without a GPU it runs a small configuration on the CPU backend and says so.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ring_flash_attn import flash_attn_varlen_func, grouped_flash_attn_varlen_func
from ring_flash_attn.grouped_python import _flash_attn_varlen_forward_grouped

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark"))
from benchmark_grouped_attention import median_call_ms  # noqa: E402  (the benchmarks' timer)


def _timer(device: torch.device):
    """run(fn, iters): fn once or a few times untimed, then the median milliseconds of `iters`
    calls (the benchmarks' timer: CUDA events on a GPU, the host timer on the CPU)."""
    warmup = 3 if device.type == "cuda" else 1

    def run(fn, iters):
        for _ in range(warmup):
            fn()
        return median_call_ms(fn, iters, device)
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=None,
                        help="keys per sequence (default: 4096 on a GPU, 256 on the CPU)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed calls per implementation, median reported (default: 20 on a GPU, 3 on the CPU)")
    args = parser.parse_args()

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    if on_gpu:
        seqlen, hq, hk, d, batch, dtype, iters = args.seqlen or 4096, 32, 8, 128, 2, torch.float16, args.iters or 20
    else:
        seqlen, hq, hk, d, batch, dtype, iters = args.seqlen or 256, 8, 2, 64, 2, torch.float32, args.iters or 3

    print("Testing grouped flash attention implementations")
    print("===============================================")
    if not on_gpu:
        print("(no GPU found: running a small configuration on the CPU backend)")
    print()
    print("Configuration:")
    print(f"  Sequence length: {seqlen}")
    print(f"  Num heads Q: {hq}")
    print(f"  Num heads KV: {hk}")
    print(f"  Head dim: {d}")
    print(f"  Batch size: {batch}")
    print(f"  Device: {device.type}")
    print(f"  Dtype: {dtype}")
    print()

    torch.manual_seed(0)
    half = seqlen // 2
    # Each sequence: K/V of `seqlen` tokens; group 0 = first half of the queries (sees keys
    # [0, half)), group 1 = second half (sees all keys). Both causal, bottom-right aligned.
    k = torch.randn(batch * seqlen, hk, d, device=device, dtype=dtype)
    v = torch.randn_like(k)
    q_list = [torch.randn(batch * half, hq, d, device=device, dtype=dtype) for _ in range(2)]
    cu_k = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * seqlen
    cu_q = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * half
    seqused = [torch.full((batch,), half, device=device, dtype=torch.int32), None]
    # The baseline calls each group with its own K/V view; group 0's keys are a strided gather.
    k0 = torch.cat([k[b * seqlen: b * seqlen + half] for b in range(batch)])
    v0 = torch.cat([v[b * seqlen: b * seqlen + half] for b in range(batch)])
    cu_k0 = cu_q

    def baseline():
        return [flash_attn_varlen_func(q_list[0], k0, v0, cu_q, cu_k0, half, half, causal=True),
                flash_attn_varlen_func(q_list[1], k, v, cu_q, cu_k, half, seqlen, causal=True)]

    def python_grouped():
        outs, _ = _flash_attn_varlen_forward_grouped(q_list, k, v, [cu_q, cu_q], cu_k, [half, half], seqlen,
                                                     seqused_k_list=seqused, causal=True)
        return outs

    def fused():
        return grouped_flash_attn_varlen_func(q_list, k, v, [cu_q, cu_q], cu_k, [half, half], seqlen,
                                              seqused_k_list=seqused, causal=True)

    run = _timer(device)
    tol = 2e-3 if dtype == torch.float16 else 1e-4
    print("Running baseline (two separate calls)...")
    ref = baseline()
    t_base = run(baseline, iters)
    print(f"  Time: {t_base:.2f} ms")
    print()
    results = {}
    ok_all = True
    for label, fn in [("Python wrapper", python_grouped), ("fused CUDA kernel" if on_gpu else "fused kernel", fused)]:
        print(f"Running grouped attention ({label})...")
        outs = fn()
        t = run(fn, iters)
        results[label] = t
        print(f"  Time: {t:.2f} ms")
        print(f"  Speedup: {t_base / t:.2f}x")
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(outs, ref))
        if diff <= tol:
            print(f"  \u2713 Outputs match baseline (max abs diff {diff:.2e})")
        else:
            ok_all = False
            print(f"  \u2717 Outputs differ from baseline: max abs diff {diff:.2e} > {tol:.0e}")
        print()

    print("Summary:")
    print(f"  Baseline: {t_base:.2f} ms")
    for label, t in results.items():
        ratio = t_base / t
        print(f"  {label}: {t:.2f} ms ({ratio:.2f}x the baseline's speed, {'faster' if ratio >= 1 else 'slower'})")
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
