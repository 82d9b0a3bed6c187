#!/usr/bin/env python3
"""One fused call and one baseline pair (two calls) on the per-rank zigzag workload, for ncu:

  ncu --clock-control none --metrics dram__bytes_read.sum,lts__t_sector_hit_rate.pct \
      -k regex:grouped_fwd_kernel python3 scripts/hbm_probe.py [L N r]

Prints the analytic K/V bytes next to what ncu measures (ncu prints per kernel launch; the first
launch is the fused one, the next two the baseline's)."""
import sys

import torch

from ring_flash_attn import flash_attn_varlen_func, grouped_flash_attn_varlen_func


def main():
    L, N, r = (int(x) for x in sys.argv[1:4]) if len(sys.argv) > 3 else (65536, 8, 0)
    hq, hk, d = 32, 8, 128
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
    grouped_flash_attn_varlen_func(q, k, v, [cu_q, cu_q], cu_k, [c, c], kmax, seqused_k_list=used)
    for g in range(2):
        flash_attn_varlen_func(q[g], k[: lk[g]], v[: lk[g]], cu_q, cu_ks[g], c, lk[g], causal=True)
    torch.cuda.synchronize()
    kv = 2 * hk * d * 2  # bytes per key of K and V
    print(f"analytic K/V bytes: fused {kmax * kv / 1e6:.0f} MB (shared prefix once), "
          f"baseline {sum(lk) * kv / 1e6:.0f} MB (each group its own prefix); Q+O {4 * c * hq * d * 2 / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
