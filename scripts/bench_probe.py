#!/usr/bin/env python3
"""Quick timing probe of the fused forward vs PyTorch SDPA (flash backend) on the per-rank zigzag
workload (Llama3-8B heads, bf16). For kernel development; the benchmark of record is
benchmark/benchmark_grouped_attention.py."""
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from ring_flash_attn import flash_attn_varlen_func, grouped_flash_attn_varlen_func


def bench(fn, n=20):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def main():
    hq, hk, d = 32, 8, 128
    shapes = [(131072, 8, 0), (65536, 8, 0), (65536, 8, 7), (16384, 2, 0), (8192, 1, 0)]
    if "--fused-only" in sys.argv:
        shapes = [(65536, 8, 0), (16384, 2, 0)]
    for L, N, r in shapes:
        c = L // (2 * N)
        lk = [(r + 1) * c, (2 * N - r) * c]
        kmax = max(lk)
        q = [torch.randn(c, hq, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        k = torch.randn(kmax, hk, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cu_q = torch.tensor([0, c], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, kmax], dtype=torch.int32, device="cuda")
        used = [torch.tensor([n], dtype=torch.int32, device="cuda") for n in lk]
        cu_ks = [torch.tensor([0, n], dtype=torch.int32, device="cuda") for n in lk]
        pairs = sum(c * n - c * (c - 1) // 2 for n in lk)
        flops = 4 * d * hq * pairs
        fused = lambda: grouped_flash_attn_varlen_func(q, k, v, [cu_q, cu_q], cu_k, [c, c], kmax, seqused_k_list=used)
        base = lambda: [flash_attn_varlen_func(q[g], k[: lk[g]], v[: lk[g]], cu_q, cu_ks[g], c, lk[g], causal=True)
                        for g in range(2)]
        qt = [x.unsqueeze(0).transpose(1, 2) for x in q]
        kt = [k[:n].unsqueeze(0).transpose(1, 2) for n in lk]
        vt = [v[:n].unsqueeze(0).transpose(1, 2) for n in lk]
        masks = [causal_lower_right(c, n) for n in lk]

        def sdpa(backend):
            def f():
                with sdpa_kernel(backend):
                    for g in range(2):
                        F.scaled_dot_product_attention(qt[g], kt[g], vt[g], attn_mask=masks[g], enable_gqa=True)
            return f
        row = [f"L={L} N={N} r={r}"]
        impls = [("fused", fused), ("baseline", base), ("sdpa_flash", sdpa(SDPBackend.FLASH_ATTENTION)),
                 ("sdpa_cudnn", sdpa(SDPBackend.CUDNN_ATTENTION))]
        if "--fused-only" in sys.argv:
            impls = impls[:1]
        elif "--ours" in sys.argv:
            impls = impls[:2]
        for name, fn in impls:
            try:
                t = bench(fn)
                row.append(f"{name} {t:.3f} ms {flops / t / 1e9:.0f} TF")
            except Exception as e:  # report and go on
                row.append(f"{name} n/a ({type(e).__name__}: {str(e)[:60]})")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
