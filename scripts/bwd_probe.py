#!/usr/bin/env python3
"""Backward timing probe: fused (one grouped call) vs baseline (one call per group), atomic dQ vs
deterministic dQ, on the per-rank zigzag workload (Llama3-8B heads, bf16). Kernel development
only; the benchmark of record is benchmark/benchmark_grouped_attention.py."""
import torch

from ring_flash_attn import flash_attn_varlen_func, grouped_flash_attn_varlen_func


def bench(fn, n=10):
    for _ in range(2):
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
    for L, N, r in [(65536, 8, 0), (65536, 8, 7), (16384, 2, 0)]:
        c = L // (2 * N)
        lk = [(r + 1) * c, (2 * N - r) * c]
        kmax = max(lk)
        q = [torch.randn(c, hq, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2)]
        k = torch.randn(kmax, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(kmax, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        cu_q = torch.tensor([0, c], dtype=torch.int32, device="cuda")
        cu_k = torch.tensor([0, kmax], dtype=torch.int32, device="cuda")
        used = [torch.tensor([n], dtype=torch.int32, device="cuda") for n in lk]
        cu_ks = [torch.tensor([0, n], dtype=torch.int32, device="cuda") for n in lk]
        dout = [torch.randn(c, hq, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        row = [f"L={L} N={N} r={r}"]
        for det in (False, True):
            outs = grouped_flash_attn_varlen_func(q, k, v, [cu_q, cu_q], cu_k, [c, c], kmax, seqused_k_list=used,
                                                  deterministic=det)
            t_f = bench(lambda: torch.autograd.grad(outs, [*q, k, v], dout, retain_graph=True))
            base = [flash_attn_varlen_func(q[g], k[: lk[g]], v[: lk[g]], cu_q, cu_ks[g], c, lk[g], causal=True,
                                           deterministic=det) for g in range(2)]
            t_b = bench(lambda: torch.autograd.grad(base, [*q, k, v], dout, retain_graph=True))
            row.append(f"det={int(det)}: fused bwd {t_f:.2f} ms, baseline bwd {t_b:.2f} ms")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
