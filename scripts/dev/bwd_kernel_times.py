#!/usr/bin/env python3
"""Per-kernel times of one backward call (torch profiler), on the per-rank zigzag workload
(Llama3-8B heads, bf16, L=64K, N=8, rank 0), for the default (dQ in the dK/dV kernel) and the deterministic mode of the
current tier. Kernel development only. --once: a single backward call, for running under ncu."""
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from probe_common import zigzag_rank
from ring_flash_attn import grouped_flash_attn_varlen_func


def main():
    w = zigzag_rank(65536, 8, 0, requires_grad=True)
    leaves = [*w.q, w.k, w.v]
    dout = [torch.randn_like(q) for q in w.q]
    modes = (False,) if "--once" in sys.argv else (False, True)
    for det in modes:
        outs = grouped_flash_attn_varlen_func(w.q, w.k, w.v, [w.cu_q, w.cu_q], w.cu_k, [w.c, w.c], w.kmax,
                                              seqused_k_list=w.seqused, deterministic=det)
        if "--once" in sys.argv:
            torch.autograd.grad(outs, leaves, dout, retain_graph=True)
            torch.autograd.grad(outs, leaves, dout, retain_graph=True)
            torch.cuda.synchronize()
            return
        for _ in range(3):
            torch.autograd.grad(outs, leaves, dout, retain_graph=True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                torch.autograd.grad(outs, leaves, dout, retain_graph=True)
            torch.cuda.synchronize()
        times = defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                times[e.name[:90]] += e.device_time / 5 / 1000.0
        total = sum(times.values())
        print(f"deterministic={int(det)}: backward kernels {total:.2f} ms per call "
              f"({2.5 * w.fwd_flops / total / 1e9:.0f} TFLOPS over the backward's FLOPs)")
        for name, ms in sorted(times.items(), key=lambda x: -x[1])[:6]:
            print(f"  {ms:8.3f} ms  {name}")


if __name__ == "__main__":
    main()
