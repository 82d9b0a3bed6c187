#!/usr/bin/env python3
"""Backward timing probe: fused (one grouped call) vs baseline (one call per group), atomic dQ vs
deterministic dQ, on the per-rank zigzag workload (Llama3-8B heads, bf16). Kernel development
only; the benchmark of record is benchmark/benchmark_grouped_attention.py."""
import torch

from probe_common import bench, zigzag_rank
from ring_flash_attn import flash_attn_varlen_func, grouped_flash_attn_varlen_func


def main():
    for L, N, r in [(65536, 8, 0), (65536, 8, 7), (16384, 2, 0)]:
        w = zigzag_rank(L, N, r, requires_grad=True)
        leaves = [*w.q, w.k, w.v]
        dout = [torch.randn_like(q) for q in w.q]
        row = [f"L={L} N={N} r={r}"]
        for det in (False, True):
            outs = grouped_flash_attn_varlen_func(w.q, w.k, w.v, [w.cu_q, w.cu_q], w.cu_k, [w.c, w.c], w.kmax,
                                                  seqused_k_list=w.seqused, deterministic=det)
            t_f = bench(lambda: torch.autograd.grad(outs, leaves, dout, retain_graph=True), n=10, warmup=2)
            base = [flash_attn_varlen_func(w.q[g], w.k[: w.lk[g]], w.v[: w.lk[g]], w.cu_q, w.cu_ks[g], w.c, w.lk[g],
                                           causal=True, deterministic=det) for g in range(2)]
            t_b = bench(lambda: torch.autograd.grad(base, leaves, dout, retain_graph=True), n=10, warmup=2)
            row.append(f"det={int(det)}: fused bwd {t_f:.2f} ms, baseline bwd {t_b:.2f} ms")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
