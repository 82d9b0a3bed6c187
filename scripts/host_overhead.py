#!/usr/bin/env python3
"""Host (CPU) time per call of each layer of the Python path, on a tiny problem so that the
kernel's own work is negligible (the per-call host overhead; numbers in docs/performance.md).

    python scripts/host_overhead.py            # CUDA if present, else the CPU backend
    python scripts/host_overhead.py --device cpu --calls 5000
    python scripts/host_overhead.py --cprofile # also where the forward+backward's time goes

Forward layers, each timed over --calls calls after a warm-up (median of --repeats):
  ctypes call      ringattn_abi_version(): the price of one foreign call
  lib call fwd     ringattn_grouped_fwd on prebuilt structs: the library's own host work per
                   call (validation in C, on CUDA the launches; on the CPU backend its compute)
  fwd_into         + the Python checks (or the cached plan's), pointer writes, workspace (outputs given)
  op (no grad)     torch.ops.ring_flash_attn.grouped_fwd: + dispatcher, torch.library's autograd
                   wrapper, allocation (the path torch.compile'd graphs call); its kernel is
                   libringattn_torch's C++ one when ring_flash_attn.ops_implementation() is
                   "torch_shim" (printed in the header; RING_FLASH_ATTN_TORCH_SHIM=0 for the
                   Python kernel), which the public rows below then run too
  public (no grad) grouped_flash_attn_varlen_func under torch.no_grad() (eager: no dispatcher)
  public (grad)    the same with inputs that require grad (records the autograd node)
  fwd+bwd (grad)   forward + torch.autograd.grad of both groups' outputs
Backward layers:
  lib call bwd     ringattn_grouped_bwd on prebuilt structs
  bwd_into         + Python (gradients given)
  op bwd           torch.ops.ring_flash_attn.grouped_bwd (allocates the gradients)
Reference:
  autograd floor   a no-op torch.autograd.Function with the same inputs and outputs (allocating
                   them), forward + torch.autograd.grad: what PyTorch's autograd costs by itself

On CUDA the kernels run asynchronously; the timed loop runs --chunk calls at a time and
synchronises between chunks outside the timed region, so a row is the host's time even where
the GPU takes longer per call than the host (the queue never fills). On the CPU backend the
numbers include its (small) compute, which 'lib call fwd/bwd' shows. The differences between
consecutive rows are what each layer adds.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch

import ring_flash_attn as rfa
from ring_flash_attn import _lib, ops


def timed(fn, calls: int, repeats: int, sync, chunk: int) -> float:
    """Median over `repeats` of the host time per call of `calls` calls, in microseconds."""
    for _ in range(max(calls // 10, 5)):
        fn()
    sync()
    runs = []
    for _ in range(repeats):
        total = 0.0
        done = 0
        while done < calls:
            n = min(chunk, calls - done)
            t = time.perf_counter()
            for _ in range(n):
                fn()
            total += time.perf_counter() - t
            sync()  # outside the timed region: the launch queue starts empty in every chunk
            done += n
        runs.append(total / calls * 1e6)
    return statistics.median(runs)


class _NoOpAttention(torch.autograd.Function):
    """The autograd shape of the public call (k, v, sinks, *q_list in; outs and LSEs out),
    doing nothing but allocate: PyTorch's own cost of an autograd.Function round trip."""

    @staticmethod
    def forward(ctx, args, k, v, sinks, *q_list):
        outs = [torch.empty_like(q) for q in q_list]
        lses = [torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device) for q in q_list]
        ctx.save_for_backward(*q_list, k, v, *outs, *lses)
        ctx.set_materialize_grads(False)
        return (*outs, *lses)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        G = (len(saved) - 2) // 3
        return (None, torch.empty_like(saved[G]), torch.empty_like(saved[G + 1]), None,
                *[torch.empty_like(q) for q in saved[:G]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="The layers timed: the docstring at the top of scripts/host_overhead.py.")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                    help="default: cuda when a GPU is available, else cpu")
    ap.add_argument("--calls", type=int, default=2000,
                    help="calls per timed repeat of a layer; a quarter for fwd+bwd and the autograd floor (default: 2000)")
    ap.add_argument("--repeats", type=int, default=5, help="repeats, median reported (default: 5)")
    ap.add_argument("--chunk", type=int, default=32, help="calls between two (untimed) synchronisations")
    ap.add_argument("--cprofile", action="store_true", help="print cProfile's top functions of fwd+bwd (grad)")
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
    douts = [torch.randn_like(x) for x in q]
    dqs = [torch.empty_like(x) for x in q]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
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

    def autograd_floor():
        o = _NoOpAttention.apply(None, kg, vg, None, *qg)[:2]
        torch.autograd.grad(o, [*qg, kg, vg], [torch.ones_like(x) for x in o])

    # The library's own share: structs built (and validated) once, each with a workspace that
    # lives as long as the loop.
    ops.fwd_into(q, k, v, [cu, cu], cu, [], [L, L], L, scale, True, outs, lses)
    fwd_plan = ops._build_fwd(q, k, v, [cu, cu], cu, [], [L, L], L, scale, True, outs, lses, (-1, -1), 0.0, None,
                              None)
    bwd_plan = ops._build_bwd(douts, q, k, v, outs, lses, [cu, cu], cu, [], [L, L], L, scale, True, False, dqs, dk,
                              dv, (-1, -1), 0.0, None, None)
    workspaces = []
    for plan in (fwd_plan, bwd_plan):
        if plan.workspace_size:
            ws = torch.empty(plan.workspace_size, dtype=torch.uint8, device=dev)
            plan.params.workspace = ws.data_ptr()
            workspaces.append(ws)

    def lib_call(plan):
        def call():
            ops._check_call(plan.run(plan.ref), plan.pass_name)
        return call

    sections = [
        [
            ("ctypes call", lambda: lib.ringattn_abi_version()),
            ("lib call fwd", lib_call(fwd_plan)),
            ("fwd_into", lambda: ops.fwd_into(q, k, v, [cu, cu], cu, [], [L, L], L, scale, True, outs, lses)),
            ("op (no grad)", lambda: torch.ops.ring_flash_attn.grouped_fwd(q, k, v, [cu, cu], cu, [None, None],
                                                                             [L, L], L, scale, True, False)),
            ("public (no grad)", no_grad_public),
            ("public (grad)", lambda: public(qg, kg, vg)),
            ("fwd+bwd (grad)", fwd_bwd),
        ],
        [
            ("lib call bwd", lib_call(bwd_plan)),
            ("bwd_into", lambda: ops.bwd_into(douts, q, k, v, outs, lses, [cu, cu], cu, [], [L, L], L, scale, True,
                                              False, dqs, dk, dv)),
            ("op bwd", lambda: torch.ops.ring_flash_attn.grouped_bwd(douts, q, k, v, outs, lses, [cu, cu], cu,
                                                                     [None, None], [L, L], L, scale, True, False)),
        ],
        [
            ("autograd floor", autograd_floor),
        ],
    ]
    print(f"host time per call, {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU backend'}), "
          f"torch {torch.__version__}, 2 groups x {L} tokens, Hq {Hq}, Hk {Hk}, D {D}, {dtype}; "
          f"median of {args.repeats} x {args.calls} calls; op kernels: {rfa.ops_implementation()}")
    for rows in sections:
        prev = None
        for name, fn in rows:
            heavy = name in ("fwd+bwd (grad)", "autograd floor")
            us = timed(fn, args.calls if not heavy else max(args.calls // 4, 10), args.repeats, sync, args.chunk)
            delta = "" if prev is None else f"  (+{us - prev:6.1f})"
            print(f"  {name:18s} {us:8.1f} us{delta}")
            prev = us
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(max(args.calls // 4, 10)):
            fwd_bwd()
        sync()
        prof.disable()
        print("\ncProfile of fwd+bwd (grad), by own time:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    del workspaces


if __name__ == "__main__":
    main()
