"""Shared pieces of the kernel-development probes (bench_probe.py, bwd_probe.py, hbm_probe.py):
the per-rank zigzag workload with Llama3-8B heads in bf16, and a CUDA-event timer."""
import os
import sys
from dataclasses import dataclass
from typing import Callable, List

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmark"))
from benchmark_grouped_attention import median_call_ms  # noqa: E402  (the benchmarks' timer)

HQ, HK, D = 32, 8, 128


@dataclass
class ZigzagRank:
    """Rank r of N, sequence length L: group 0 = chunk r (sees (r+1)c keys), group 1 = chunk
    2N-1-r (sees (2N-r)c keys), c = L/2N, over one K/V of the longer prefix."""

    c: int
    lk: List[int]
    q: List[torch.Tensor]
    k: torch.Tensor
    v: torch.Tensor
    cu_q: torch.Tensor
    cu_k: torch.Tensor
    cu_ks: List[torch.Tensor]  # per group, for one call per group
    seqused: List[torch.Tensor]

    @property
    def kmax(self) -> int:
        return max(self.lk)

    @property
    def fwd_flops(self) -> int:
        pairs = sum(self.c * n - self.c * (self.c - 1) // 2 for n in self.lk)
        return 4 * D * HQ * pairs


def zigzag_rank(L: int, N: int, r: int, requires_grad: bool = False) -> ZigzagRank:
    c = L // (2 * N)
    lk = [(r + 1) * c, (2 * N - r) * c]
    kw = dict(device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)
    i32 = dict(dtype=torch.int32, device="cuda")
    return ZigzagRank(
        c=c, lk=lk,
        q=[torch.randn(c, HQ, D, **kw) for _ in range(2)],
        k=torch.randn(max(lk), HK, D, **kw), v=torch.randn(max(lk), HK, D, **kw),
        cu_q=torch.tensor([0, c], **i32), cu_k=torch.tensor([0, max(lk)], **i32),
        cu_ks=[torch.tensor([0, n], **i32) for n in lk],
        seqused=[torch.tensor([n], **i32) for n in lk])


def bench(fn: Callable[[], object], n: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of `n` calls, timed with CUDA events after `warmup` calls (the
    benchmarks' timer)."""
    for _ in range(warmup):
        fn()
    return median_call_ms(fn, n, torch.device("cuda"))
