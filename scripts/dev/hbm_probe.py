#!/usr/bin/env python3
"""One fused call and one baseline pair (two calls) on the per-rank zigzag workload, for ncu:

  ncu --clock-control none --metrics dram__bytes_read.sum,lts__t_sector_hit_rate.pct \
      -k regex:grouped_fwd_kernel python3 scripts/dev/hbm_probe.py [L N r]

Prints the analytic K/V bytes next to what ncu measures (ncu prints per kernel launch; the first
launch is the fused one, the next two the baseline's)."""
import sys

import torch

from probe_common import D, HK, HQ, zigzag_rank
from ring_flash_attn import flash_attn_varlen_func, grouped_flash_attn_varlen_func


def main():
    L, N, r = (int(x) for x in sys.argv[1:4]) if len(sys.argv) > 3 else (65536, 8, 0)
    w = zigzag_rank(L, N, r)
    grouped_flash_attn_varlen_func(w.q, w.k, w.v, [w.cu_q, w.cu_q], w.cu_k, [w.c, w.c], w.kmax, seqused_k_list=w.seqused)
    for g in range(2):
        flash_attn_varlen_func(w.q[g], w.k[: w.lk[g]], w.v[: w.lk[g]], w.cu_q, w.cu_ks[g], w.c, w.lk[g], causal=True)
    torch.cuda.synchronize()
    kv = 2 * HK * D * 2  # bytes per key of K and V
    print(f"analytic K/V bytes: fused {w.kmax * kv / 1e6:.0f} MB (shared prefix once), "
          f"baseline {sum(w.lk) * kv / 1e6:.0f} MB (each group its own prefix); "
          f"Q+O {4 * w.c * HQ * D * 2 / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
