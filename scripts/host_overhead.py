#!/usr/bin/env python3
"""Host (CPU) time per call of each layer of the Python path, on a tiny problem so that the
kernel's own work is negligible (the per-call host overhead; numbers in docs/performance.md).

    python scripts/host_overhead.py            # CUDA if present, else the CPU backend
    python scripts/host_overhead.py --device cpu --calls 5000

Layers, each timed over --calls calls after a warm-up (median of --repeats):
  ctypes call      ringattn_abi_version(): the price of one foreign call
  fwd_into         validation, struct filling, workspace query, the library call (outputs given)
  op (no grad)     torch.ops.ring_flash_attn.grouped_fwd: + dispatcher, autograd key, allocation
  public (no grad) grouped_flash_attn_varlen_func under torch.no_grad()
  public (grad)    the same with inputs that require grad (records the autograd node)
  fwd+bwd (grad)   forward + torch.autograd.grad of both groups' outputs
On CUDA the kernels run asynchronously and take a few microseconds at this size, so the loop is
bound by the host and the numbers are host time; the CPU backend's numbers include its (small)
compute. The differences between consecutive rows are what each layer adds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import ring_flash_attn as rfa
from ring_flash_attn import _lib, ops


def timed(fn, calls: int, repeats: int, sync) -> float:
    for _ in range(max(calls // 10, 5)):
        fn()
    sync()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        runs.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    L, Hq, Hk, D = 16, 2, 1, 64
    q = [torch.randn(L, Hq, D, device=dev, dtype=dtype) for _ in range(2)]
    k = torch.randn(L, Hk, D, device=dev, dtype=dtype)
    v = torch.randn(L, Hk, D, device=dev, dtype=dtype)
    cu = torch.tensor([0, L], dtype=torch.int32, device=dev)
    outs = [torch.empty_like(x) for x in q]
    lses = [torch.empty(Hq, L, dtype=torch.float32, device=dev) for _ in q]
    scale = D ** -0.5
    lib = _lib.get()

    qg = [x.clone().requires_grad_() for x in q]
    kg, vg = k.clone().requires_grad_(), v.clone().requires_grad_()

    def public(qs, kk, vv):
        return rfa.grouped_flash_attn_varlen_func(qs, kk, vv, [cu, cu], cu, [L, L], L, causal=True)

    def fwd_bwd():
        o = public(qg, kg, vg)
        torch.autograd.grad(o, [*qg, kg, vg], [torch.ones_like(x) for x in o])

    def no_grad_public():
        with torch.no_grad():
            public(q, k, v)

    rows = [
        ("ctypes call", lambda: lib.ringattn_abi_version()),
        ("fwd_into", lambda: ops.fwd_into(q, k, v, [cu, cu], cu, [], [L, L], L, scale, True, outs, lses)),
        ("op (no grad)", lambda: torch.ops.ring_flash_attn.grouped_fwd(q, k, v, [cu, cu], cu, [None, None], [L, L], L,
                                                                         scale, True, False)),
        ("public (no grad)", no_grad_public),
        ("public (grad)", lambda: public(qg, kg, vg)),
        ("fwd+bwd (grad)", fwd_bwd),
    ]
    print(f"host time per call, {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU backend'}), "
          f"torch {torch.__version__}, 2 groups x {L} tokens, Hq {Hq}, Hk {Hk}, D {D}, {dtype}; "
          f"median of {args.repeats} x {args.calls} calls")
    prev = None
    for name, fn in rows:
        us = timed(fn, args.calls if name != "fwd+bwd (grad)" else max(args.calls // 4, 10), args.repeats, sync)
        delta = "" if prev is None else f"  (+{us - prev:6.1f})"
        print(f"  {name:18s} {us:8.1f} us{delta}")
        prev = us


if __name__ == "__main__":
    main()
