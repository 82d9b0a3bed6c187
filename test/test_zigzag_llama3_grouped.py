#!/usr/bin/env python
"""Zigzag llama3 context parallelism on GPUs (NCCL), any number of ranks:

    torchrun --nproc_per_node=N test/test_zigzag_llama3_grouped.py
    torchrun --nproc_per_node=N test/test_zigzag_llama3_grouped.py --seqlens 4096 --impls fused

For every workload (one sequence of each --seqlens length, plus one varlen batch of three
sequences of different lengths; Llama3-8B heads by default: 32 query / 8 KV heads, D = 128,
bf16, causal) and every implementation (baseline = one call per group, grouped_python, fused),
each rank runs ``zigzag_llama3_flash_attn_varlen_func`` on its zigzag shard and checks:

* forward: out against the shard of (a) an fp32 reference computed blockwise in PyTorch on the
  rounded inputs, with FlashAttention's pass rule
  ``max|out - ref_fp32| <= 2 * max|out_single - ref_fp32| + floor``, where ``out_single`` is the
  library's single-device G=1 call on the unsharded batch (the "full attention" the zigzag result
  must match); LSE against the fp32 reference; grouped implementations against the baseline;
* backward (dQ, dK, dV after the reduce-scatter): the same rule against the fp32 reference's
  gradients. While the library has no CUDA backward (NotImplementedError) these checks are
  reported as SKIP, not as passes;
* no host synchronisation: one forward (and backward when available) runs under
  ``torch.cuda.set_sync_debug_mode("error")``;
* CUDA graphs: the fused forward is captured once and replayed on new inputs (--skip-graph to
  leave it out).

Every rank checks its own shard; the verdicts are combined over ranks (all-reduce), rank 0 prints
one line per check, and the exit status is 1 if any check failed on any rank.

Under pytest this file collects no tests (its functions are not named test_*); it only runs as a
script. ``--device cpu`` runs it on gloo and the CPU backend (small shapes; the no-sync and
CUDA-graph checks are skipped): test/test_zigzag_cpu.py does that with 2 ranks, so the script
itself is exercised without GPUs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback
from typing import Dict, List, Optional, Sequence, Tuple

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import ring_flash_attn  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "python"))

import ring_flash_attn as rfa  # noqa: E402
import torchrun_script as ts  # noqa: E402  (next to this script)
from ring_flash_attn.cp import zigzag_layout as zu  # noqa: E402

IMPLS = {
    "baseline": {},
    "grouped_python": {"use_grouped_attention": True},
    "fused": {"use_fused_kernel": True},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


# ---- fp32 reference, blockwise (no [H, L, L] matrix in memory) --------------------------------------


def _expand(t: torch.Tensor, rep: int) -> torch.Tensor:
    return t.repeat_interleave(rep, dim=1) if rep > 1 else t


def reference_fwd(q, k, v, cu: List[int], scale: float, block: int = 1024):
    """Causal attention per sequence in fp32: (out [T, Hq, D] fp32, lse [Hq, T] fp32)."""
    T, Hq, D = q.shape
    rep = Hq // k.shape[1]
    out = torch.empty((T, Hq, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((Hq, T), dtype=torch.float32, device=q.device)
    for b in range(len(cu) - 1):
        s0, s1 = cu[b], cu[b + 1]
        ks = _expand(k[s0:s1].float(), rep)
        vs = _expand(v[s0:s1].float(), rep)
        for i0 in range(0, s1 - s0, block):
            i1 = min(i0 + block, s1 - s0)
            qb = q[s0 + i0:s0 + i1].float()
            s = torch.einsum("qhd,khd->hqk", qb, ks[:i1]) * scale
            i = torch.arange(i0, i1, device=q.device)[:, None]
            j = torch.arange(i1, device=q.device)[None, :]
            s.masked_fill_(j > i, -math.inf)
            l = torch.logsumexp(s, dim=-1)  # [Hq, rows]
            p = torch.exp(s - l[..., None])
            out[s0 + i0:s0 + i1] = torch.einsum("hqk,khd->qhd", p, vs[:i1])
            lse[:, s0 + i0:s0 + i1] = l
    return out, lse


def reference_bwd(q, k, v, out32, lse32, dout, cu: List[int], scale: float, block: int = 1024):
    """Gradients of the causal attention above, in fp32 (flash-attention's formulas)."""
    T, Hq, D = q.shape
    Hk = k.shape[1]
    rep = Hq // Hk
    dq = torch.zeros((T, Hq, D), dtype=torch.float32, device=q.device)
    dk = torch.zeros((T, Hk, D), dtype=torch.float32, device=q.device)
    dv = torch.zeros((T, Hk, D), dtype=torch.float32, device=q.device)
    delta = (dout.float() * out32).sum(-1).t()  # [Hq, T]
    for b in range(len(cu) - 1):
        s0, s1 = cu[b], cu[b + 1]
        L = s1 - s0
        ks = _expand(k[s0:s1].float(), rep)
        vs = _expand(v[s0:s1].float(), rep)
        dks = torch.zeros((L, Hq, D), dtype=torch.float32, device=q.device)
        dvs = torch.zeros((L, Hq, D), dtype=torch.float32, device=q.device)
        for i0 in range(0, L, block):
            i1 = min(i0 + block, L)
            qb = q[s0 + i0:s0 + i1].float()
            dob = dout[s0 + i0:s0 + i1].float()
            s = torch.einsum("qhd,khd->hqk", qb, ks[:i1]) * scale
            i = torch.arange(i0, i1, device=q.device)[:, None]
            j = torch.arange(i1, device=q.device)[None, :]
            s.masked_fill_(j > i, -math.inf)
            p = torch.exp(s - lse32[:, s0 + i0:s0 + i1, None])
            dvs[:i1] += torch.einsum("hqk,qhd->khd", p, dob)
            dp = torch.einsum("qhd,khd->hqk", dob, vs[:i1])
            ds = p * (dp - delta[:, s0 + i0:s0 + i1, None])
            dq[s0 + i0:s0 + i1] = torch.einsum("hqk,khd->qhd", ds, ks[:i1]) * scale
            dks[:i1] += torch.einsum("hqk,qhd->khd", ds, qb) * scale
        dk[s0:s1] = dks.view(L, Hk, rep, D).sum(2)
        dv[s0:s1] = dvs.view(L, Hk, rep, D).sum(2)
    return dq, dk, dv


# ---- checks ---------------------------------------------------------------------------------------


class Results:
    def __init__(self):
        self.rows: List[Tuple[str, str, str]] = []  # (name, verdict, detail)

    def add(self, name: str, verdict: str, detail: str = "") -> None:
        self.rows.append((name, verdict, detail))


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def pass_rule(name: str, got: torch.Tensor, ref32: torch.Tensor, single: torch.Tensor, res: Results,
              roundings: int = 1) -> None:
    """FlashAttention's rule with the single-device call as the low-precision baseline; the floor is
    `roundings` units of rounding at the reference's largest magnitude (dK/dV are N partial
    sums, each rounded to the dtype once, before the cross-rank reduction)."""
    if torch.isnan(got).any():
        res.add(name, FAIL, "NaN")
        return
    err = max_err(got, ref32)
    base = max_err(single, ref32)
    floor = roundings * torch.finfo(got.dtype).eps * max(1.0, ref32.abs().max().item())
    ok = err <= 2 * base + floor
    res.add(name, PASS if ok else FAIL, f"max|zz - ref32| {err:.3e} vs 2 * {base:.3e} + {floor:.1e} (single call)")


def make_batch(lens: Sequence[int], hq: int, hk: int, d: int, dtype, device, seed: int):
    """The same global batch on every rank (same seed)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    total = sum(lens)

    def randn(h):
        return torch.randn((total, h, d), generator=gen, device=device, dtype=torch.float32).to(dtype)

    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return randn(hq), randn(hk), randn(hk), randn(hq), cu


def run_zigzag(q, k, v, dout, cu_t, max_len, rank, world, hs, flags, backward: bool, reduce_dtype=None):
    """Shard, run forward (and backward), return (out, lse, grads or None) of this rank."""
    cu_q, cu_k, max_q, max_k, lks = rfa.zigzag_llama3_prepare_cu_seqlens(
        cu_t, True, rank, world, max_seqlen=max_len)
    ql, kl, vl = (zu.zigzag_shard(t, cu_t, rank, world).requires_grad_(backward) for t in (q, k, v))
    out, lse, _ = rfa.zigzag_llama3_flash_attn_varlen_func(
        ql, kl, vl, cu_q, cu_k, max_q, max_k, hs, lks, causal=True, return_attn_probs=True,
        grad_reduce_dtype=reduce_dtype, **flags)
    grads = None
    if backward:
        grads = torch.autograd.grad(out, (ql, kl, vl), zu.zigzag_shard(dout, cu_t, rank, world))
    return out.detach(), lse, grads


def check_workload(name: str, lens: Sequence[int], args, rank: int, world: int, res: Results,
                   device: Optional[torch.device] = None) -> None:
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype]
    hq, hk, d = args.num_heads_q, args.num_heads_k, args.head_dim
    q, k, v, dout, cu = make_batch(lens, hq, hk, d, dtype, device, args.seed + sum(lens))
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    scale = 1.0 / math.sqrt(d)

    def shard(t):
        return zu.zigzag_shard(t, cu_t, rank, world)

    # single-device full attention on the unsharded batch (the library, G = 1) and fp32 reference
    out_single, lse_single, _ = rfa.flash_attn_varlen_func(q, k, v, cu_t, cu_t, max(lens), max(lens),
                                                           causal=True, return_attn_probs=True)
    ref_out, ref_lse = reference_fwd(q, k, v, cu, scale)
    grads_single, bwd_skip = None, ""
    try:
        qs, ks_, vs_ = (t.clone().requires_grad_(True) for t in (q, k, v))
        o = rfa.flash_attn_varlen_func(qs, ks_, vs_, cu_t, cu_t, max(lens), max(lens), causal=True)
        grads_single = torch.autograd.grad(o, (qs, ks_, vs_), dout)
    except NotImplementedError as e:
        bwd_skip = f"no CUDA backward in this build ({str(e).splitlines()[0][:100]})"
    ref_grads = None
    if grads_single is not None:
        ref_grads = reference_bwd(q, k, v, ref_out, ref_lse, dout, cu, scale)

    outs = {}
    for impl in args.impls:
        tag = f"{name} {impl}"
        try:
            out, lse, grads = run_zigzag(q, k, v, dout, cu_t, max(lens), rank, world, args.heads_k_stride, IMPLS[impl],
                                         backward=grads_single is not None,
                                         reduce_dtype=torch.float32 if args.grad_reduce_dtype == "fp32" else q.dtype)
        except Exception as e:  # noqa: BLE001 - reported as a failed check
            res.add(f"{tag} run", FAIL, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            if rank == 0:
                traceback.print_exc()
            continue
        outs[impl] = out
        pass_rule(f"{tag} fwd out", out, shard(ref_out), shard(out_single), res)
        lse_err = max_err(lse, shard(ref_lse.t()).t())
        res.add(f"{tag} fwd lse", PASS if lse_err <= 2e-3 else FAIL, f"max|lse - ref32| {lse_err:.3e}")
        if grads is None:
            res.add(f"{tag} bwd", SKIP, bwd_skip)
            continue
        for gname, g, rg, sg in zip(("dq", "dk", "dv"), grads, ref_grads, grads_single):
            pass_rule(f"{tag} bwd {gname}", g, shard(rg), shard(sg), res, roundings=1 if gname == "dq" else world)
    if "baseline" in outs:
        for impl, out in outs.items():
            if impl != "baseline":
                diff = max_err(out, outs["baseline"])
                base = max_err(shard(out_single), shard(ref_out))
                res.add(f"{name} {impl} vs baseline", PASS if diff <= 2 * base + 1e-3 else FAIL,
                        f"max|diff| {diff:.3e}")


def check_no_sync(args, rank: int, world: int, res: Results) -> None:
    """Forward (and backward when available) with syncing CUDA calls turned into errors."""
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype]
    lens = [2048, 4096, 1024]
    q, k, v, dout, cu = make_batch(lens, args.num_heads_q, args.num_heads_k, args.head_dim, dtype, device, args.seed)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    cu_q, cu_k, max_q, max_k, lks = rfa.zigzag_llama3_prepare_cu_seqlens(cu_t, True, rank, world, max_seqlen=4096)
    ql, kl, vl = (zu.zigzag_shard(t, cu_t, rank, world) for t in (q, k, v))
    dl = zu.zigzag_shard(dout, cu_t, rank, world)
    for impl in args.impls:
        flags = IMPLS[impl]

        def step(backward):
            qq, kk, vv = (t.detach().requires_grad_(backward) for t in (ql, kl, vl))
            out = rfa.zigzag_llama3_flash_attn_varlen_func(qq, kk, vv, cu_q, cu_k, max_q, max_k,
                                                           args.heads_k_stride, lks, **flags)
            if backward:
                torch.autograd.grad(out, (qq, kk, vv), dl)

        for backward in (False, True):
            tag = f"no host sync {impl} {'fwd+bwd' if backward else 'fwd'}"
            try:
                step(backward)  # warm-up (library load, communicator set-up)
            except NotImplementedError:
                res.add(tag, SKIP, "no CUDA backward in this build")
                continue
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step(backward)
                res.add(tag, PASS)
            except Exception as e:  # noqa: BLE001
                res.add(tag, FAIL, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()


def check_cuda_graph(args, rank: int, world: int, res: Results) -> None:
    """Capture the fused forward once, replay it on new inputs, compare with eager."""
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype]
    lens = [2048, 4096]
    q, k, v, _, cu = make_batch(lens, args.num_heads_q, args.num_heads_k, args.head_dim, dtype, device, args.seed + 1)
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    cu_q, cu_k, max_q, max_k, lks = rfa.zigzag_llama3_prepare_cu_seqlens(cu_t, True, rank, world, max_seqlen=4096)
    static = [zu.zigzag_shard(t, cu_t, rank, world) for t in (q, k, v)]

    def fwd():
        return rfa.zigzag_llama3_flash_attn_varlen_func(*static, cu_q, cu_k, max_q, max_k, args.heads_k_stride,
                                                        lks, use_fused_kernel=True)

    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fwd()  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (e.g. NCCL's watchdog) do not break the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = fwd()
        q2, k2, v2, _, _ = make_batch(lens, args.num_heads_q, args.num_heads_k, args.head_dim, dtype, device,
                                      args.seed + 2)
        for dst, src in zip(static, (q2, k2, v2)):
            dst.copy_(zu.zigzag_shard(src, cu_t, rank, world))
        graph.replay()
        torch.cuda.synchronize()
        eager = fwd()
        diff = max_err(static_out, eager)
        res.add("cuda graph fused fwd replay == eager", PASS if diff == 0.0 else FAIL, f"max|diff| {diff:.3e}")
    except Exception as e:  # noqa: BLE001
        res.add("cuda graph fused fwd", FAIL, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")


# ---- driver ---------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--num-heads-q", type=int, default=32)
    p.add_argument("--num-heads-k", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--heads-k-stride", type=int, default=4,
                   help="KV heads per all-gather slice (default 4: two slices of Llama3-8B's 8 KV heads)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--impls", nargs="+", choices=list(IMPLS), default=list(IMPLS))
    p.add_argument("--seed", type=int, default=None, help="default: a fresh random seed (printed)")
    p.add_argument("--skip-graph", action="store_true", help="leave out the CUDA graph capture check")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a smoke test of this script on gloo and the CPU backend (use small sizes; the "
                        "no-sync and CUDA-graph checks are skipped)")
    p.add_argument("--grad-reduce-dtype", choices=("same", "fp32"), default="same",
                   help="dtype of the dK/dV reduce-scatter: the dtype of k (same, the default here) or fp32 "
                        "(the library's default)")
    p.add_argument("--varlen-unit", type=int, default=16,
                   help="the varlen batch has sequences of 96, 32 and 160 x (unit * world_size) tokens")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch.distributed as dist

    args = parse_args(argv)
    on_gpu = args.device == "cuda"
    if ts.cuda_missing("test_zigzag_llama3_grouped.py", args.device):
        return 2
    device, device_name = ts.start_process_group(args.device, 29517)
    rank, world = dist.get_rank(), dist.get_world_size()
    args.seed = ts.shared_seed(args.seed, device)
    for L in args.seqlens:
        if L % (2 * world):
            raise SystemExit(f"--seqlens: {L} is not a multiple of 2 * world_size = {2 * world}")
    if rank == 0:
        print(f"zigzag llama3: world_size {world}, {device_name}, torch {torch.__version__}, "
              f"{args.dtype}, Hq {args.num_heads_q} Hk {args.num_heads_k} D {args.head_dim}, "
              f"heads_k_stride {args.heads_k_stride}, seed {args.seed}", flush=True)

    res = Results()
    unit = args.varlen_unit * world  # lengths that are multiples of 2N
    workloads = [(f"L={L}", [L]) for L in args.seqlens]
    workloads.append(("varlen [3 seqs]", [unit * 96, unit * 32, unit * 160]))
    for name, lens in workloads:
        check_workload(name, lens, args, rank, world, res, device)
        if on_gpu:
            torch.cuda.empty_cache()
    if on_gpu:
        check_no_sync(args, rank, world, res)
        if not args.skip_graph:
            check_cuda_graph(args, rank, world, res)
    else:
        res.add("no host sync / cuda graph", SKIP, "--device cpu")

    for name, verdict, detail in res.rows:  # each rank's own failures, before any further collective
        if verdict == FAIL:
            print(f"[rank {rank}] FAIL  {name}   [{detail}]", flush=True)
    # combine verdicts over ranks (by check name; ranks may differ in their rows): FAIL anywhere -> FAIL
    all_rows: List[List[Tuple[str, str, str]]] = [None] * world  # type: ignore[list-item]
    dist.all_gather_object(all_rows, res.rows)
    severity = {PASS: 0, SKIP: 1, FAIL: 2}
    merged: Dict[str, Tuple[str, str]] = {}  # name -> (verdict, detail), insertion-ordered
    for r, rows in enumerate(all_rows):
        for name, verdict, detail in rows:
            prev = merged.get(name)
            if prev is None or severity[verdict] > severity[prev[0]]:
                merged[name] = (verdict, f"{detail} (rank {r})" if detail else f"rank {r}")
    verdicts = [v for v, _ in merged.values()]
    failed = verdicts.count(FAIL)
    if rank == 0:
        for name, (verdict, detail) in merged.items():
            print(f"{verdict}  {name}   [{detail}]", flush=True)
    return ts.finish(rank, f"\n{verdicts.count(PASS)} passed, {verdicts.count(SKIP)} skipped, {failed} failed "
                           f"(world_size {world}, seed {args.seed})", failed)


if __name__ == "__main__":
    sys.exit(main())
