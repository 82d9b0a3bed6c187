#!/usr/bin/env python3
"""Quick timing probe of the fused forward vs PyTorch SDPA (flash backend) on the per-rank zigzag
workload (Llama3-8B heads, bf16). For kernel development; the benchmark of record is
benchmark/benchmark_grouped_attention.py."""
import sys

import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from probe_common import bench, zigzag_rank
from ring_flash_attn import flash_attn_varlen_func, grouped_flash_attn_varlen_func


def main():
    shapes = [(131072, 8, 0), (65536, 8, 0), (65536, 8, 7), (16384, 2, 0), (8192, 1, 0)]
    if "--fused-only" in sys.argv:
        shapes = [(65536, 8, 0), (16384, 2, 0)]
    for L, N, r in shapes:
        w = zigzag_rank(L, N, r)
        fused = lambda: grouped_flash_attn_varlen_func(w.q, w.k, w.v, [w.cu_q, w.cu_q], w.cu_k, [w.c, w.c], w.kmax,
                                                       seqused_k_list=w.seqused)
        base = lambda: [flash_attn_varlen_func(w.q[g], w.k[: w.lk[g]], w.v[: w.lk[g]], w.cu_q, w.cu_ks[g], w.c,
                                               w.lk[g], causal=True) for g in range(2)]
        qt = [x.unsqueeze(0).transpose(1, 2) for x in w.q]
        kt = [w.k[:n].unsqueeze(0).transpose(1, 2) for n in w.lk]
        vt = [w.v[:n].unsqueeze(0).transpose(1, 2) for n in w.lk]
        masks = [causal_lower_right(w.c, n) for n in w.lk]

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
                row.append(f"{name} {t:.3f} ms {w.fwd_flops / t / 1e9:.0f} TF")
            except Exception as e:  # report and go on
                row.append(f"{name} n/a ({type(e).__name__}: {str(e)[:60]})")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
