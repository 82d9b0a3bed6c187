#!/usr/bin/env python
"""Ulysses and the 2-D hybrid on GPUs (NCCL), any number of ranks:

    torchrun --nproc_per_node=N test/test_all_to_all_gpu.py
    torchrun --nproc_per_node=N test/test_all_to_all_gpu.py --kinds hybrid --kv-schemes zigzag_ring

Cases (each in bf16 and fp16, causal and not, head dims 64 and 128 for the plain varlen form):

    ulysses          ulysses_flash_attn_varlen_func (+ kvpacked, qkvpacked) on contiguous pieces of
                     a packed batch with odd lengths crossing the rank boundaries
    ulysses_batched  ulysses_flash_attn_func on [B, L, H, D] shards
    hybrid           hybrid_flash_attn_varlen_func on every mesh U x K of the world (U | N) whose
                     heads split, with each scheme across (--kv-schemes): zigzag llama3 and zigzag
                     ring on lengths that are multiples of 2K, llama3 on odd lengths

GQA 8 query / 2 KV heads (the KV heads are replicated on the all-to-all groups larger than 2; the
qkvpacked form packs 8 / 8). Per case: the global batch is drawn on every rank from the same seed,
each rank runs the call on its shard (forward with return_attn_probs=True, backward), the
results are gathered into global order and rank 0 compares them with the fp32 reference by
FlashAttention's rule, as test_ring_variants_gpu.py does (its helpers: the driver, the pass rule, the NaN
refill of the allocator before every call, the LSE tolerance). Rank 0 prints one PASS/FAIL line
per case and "P PASS / F FAIL"; the exit status is 1 if a case failed. ``--device cpu`` runs it
on gloo and the CPU backend with tiny lengths (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
try:
    import ring_flash_attn  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "python"))

import ring_flash_attn as rfa  # noqa: E402
import test_ring_variants_gpu as rv  # noqa: E402  (driver, reference, pass rule, gather, poison)

KINDS = ("ulysses", "ulysses_batched", "hybrid")
KV_SCHEMES = ("zigzag_llama3", "zigzag_ring", "llama3")


@dataclass(frozen=True)
class Case:
    kind: str
    form: str  # func, kvpacked, qkvpacked
    dtype: str
    causal: bool
    head_dim: int
    ulysses_degree: int = 0  # hybrid
    kv_degree: int = 0  # hybrid
    kv_scheme: str = ""  # hybrid

    @property
    def heads(self) -> Tuple[int, int]:
        return (8, 8) if self.form == "qkvpacked" else (8, 2)

    @property
    def name(self) -> str:
        mesh = f" {self.ulysses_degree}x{self.kv_degree} {self.kv_scheme}" if self.kind == "hybrid" else ""
        return (f"{self.kind:15s} {self.form:9s} {self.dtype} {'causal' if self.causal else 'full':6s} "
                f"D{self.head_dim:<3d}{mesh}")


def build_cases(kinds: Sequence[str], kv_schemes: Sequence[str], N: int) -> List[Case]:
    combos = [(dt, c, d) for dt in ("bf16", "fp16") for c in (True, False) for d in (64, 128)]
    cases: List[Case] = []
    for kind in kinds:
        if kind in ("ulysses", "ulysses_batched"):
            if 8 % N:
                continue  # 8 query heads do not split over N ranks
            for dt, c, d in combos:
                cases.append(Case(kind, "func", dt, c, d))
            if kind == "ulysses":
                cases += [Case(kind, "kvpacked", "bf16", True, 128), Case(kind, "qkvpacked", "fp16", False, 64)]
            continue
        for U in [u for u in range(1, N + 1) if N % u == 0 and 8 % u == 0]:
            for kv in kv_schemes:
                cases.append(Case(kind, "func", "bf16", True, 128, U, N // U, kv))
                cases.append(Case(kind, "func", "fp16", False, 64, U, N // U, kv))
        U = 2 if N % 2 == 0 else 1
        cases.append(Case(kind, "kvpacked", "bf16", True, 64, U, N // U, kv_schemes[0]))
    return cases


def _lengths(case: Case, N: int, args) -> List[int]:
    """Global sequence lengths: odd where the layout allows, multiples of 2K for the zigzag layout."""
    if case.kind == "ulysses_batched":
        return [N * args.seqlen_local] * 2
    lens = [N * n for n in args.varlen_local_lens]
    if case.kind == "hybrid" and case.kv_scheme in ("zigzag_llama3", "zigzag_ring"):
        # every length a multiple of 2K (zigzag) and of N (each KV group's part splits over U)
        two_k = 2 * case.kv_degree
        step = two_k * N // math.gcd(two_k, N)
        return [max(step, (n + step - 1) // step * step) for n in lens]
    lens[0] += 7  # sequence boundaries inside the ranks' pieces
    lens[-1] += (-sum(lens)) % N
    return lens


_MESHES = {}


def run_case(case: Case, seed: int, args, rank: int, N: int, device, poison: rv.Poison) -> Tuple[bool, str]:
    dtype = rv.DTYPES[case.dtype]
    hq, hk = case.heads
    d = case.head_dim
    lens = _lengths(case, N, args)
    cu_list = rv._cumsum(lens)
    total = cu_list[-1]
    cu = torch.tensor(cu_list, dtype=torch.int32, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(h):
        return torch.randn((total, h, d), generator=gen, device=device, dtype=torch.float32).to(dtype)

    q, k, v, dout = randn(hq), randn(hk), randn(hk), randn(hq)
    mesh = None
    if case.kind == "hybrid":  # one mesh (its process groups) per degree, the scheme across per case
        if case.ulysses_degree not in _MESHES:
            _MESHES[case.ulysses_degree] = rfa.hybrid_mesh(case.ulysses_degree)
        mesh = dataclasses.replace(_MESHES[case.ulysses_degree], layout=rfa.HybridLayout(
            case.ulysses_degree, case.kv_degree, case.kv_scheme))
    rows_all = torch.arange(total, device=device)
    if case.kind == "hybrid":
        rows = [rfa.hybrid_shard(rows_all, cu, r, mesh) for r in range(N)]
    elif case.kind == "ulysses":
        rows = [rfa.ulysses_shard(rows_all, cu, r, N) for r in range(N)]
    else:  # batched: rows [r L, (r+1) L) of each sequence
        L = args.seqlen_local
        rows = [torch.cat([torch.arange(b * N * L + r * L, b * N * L + (r + 1) * L, device=device)
                           for b in range(len(lens))]) for r in range(N)]
    geo = rv.Geometry(cu_list, rows)
    ql, kl, vl, dl = (t.index_select(0, rows[rank]) for t in (q, k, v, dout))
    err = ""
    try:
        poison()
        kw = dict(causal=case.causal, return_attn_probs=True)
        if case.kind == "ulysses_batched":
            B, L = len(lens), args.seqlen_local
            leaves = [t.reshape(B, L, *t.shape[1:]).detach().clone().requires_grad_(True) for t in (ql, kl, vl)]
            out, lse, _ = rfa.ulysses_flash_attn_func(*leaves, **kw)
            grads = torch.autograd.grad(out, leaves, dl.reshape(out.shape))
            dq, dk, dv = (g.reshape(-1, *g.shape[2:]) for g in grads)
            out_rows, lse_rows = out.detach().reshape(-1, hq, d), lse.permute(0, 2, 1).reshape(-1, hq)
        else:
            if case.kind == "ulysses":
                meta = rfa.ulysses_prepare_cu_seqlens(cu, case.causal, rank, N)
                fns = (rfa.ulysses_flash_attn_varlen_func, rfa.ulysses_flash_attn_varlen_kvpacked_func,
                       rfa.ulysses_flash_attn_varlen_qkvpacked_func)
                extra = dict(kw)
            else:
                meta = rfa.hybrid_prepare_cu_seqlens(cu, case.causal, rank, mesh)
                fns = (rfa.hybrid_flash_attn_varlen_func, rfa.hybrid_flash_attn_varlen_kvpacked_func,
                       rfa.hybrid_flash_attn_varlen_qkvpacked_func)
                extra = dict(kw, group=mesh)
            args_meta = (*meta[:4], 1, meta[4])
            if case.form == "func":
                leaves = [t.detach().clone().requires_grad_(True) for t in (ql, kl, vl)]
                out, lse, _ = fns[0](*leaves, *args_meta, **extra)
                dq, dk, dv = torch.autograd.grad(out, leaves, dl)
            elif case.form == "kvpacked":
                leaves = [ql.detach().clone().requires_grad_(True),
                          torch.stack([kl, vl], dim=1).detach().requires_grad_(True)]
                out, lse, _ = fns[1](*leaves, *args_meta, **extra)
                g = torch.autograd.grad(out, leaves, dl)
                dq, dk, dv = g[0], g[1][:, 0], g[1][:, 1]
            else:
                leaves = [torch.stack([ql, kl, vl], dim=1).detach().requires_grad_(True)]
                out, lse, _ = fns[2](*leaves, *args_meta, **extra)
                dq, dk, dv = torch.autograd.grad(out, leaves, dl)[0].unbind(1)
            out_rows, lse_rows = out.detach(), lse.t()
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - reported as this case's failure
        err = rv.failure_line(e, rank, N)
    if not rv._all_ok(not err, device):
        return False, f"run failed: {err or 'on another rank'}"
    verdict = rv.gathered_verdict({"out": out_rows, "lse": lse_rows, "dq": dq, "dk": dk, "dv": dv}, geo, rank, N,
                                  (q, k, v, dout), case.causal, dtype)
    if verdict is None:
        return True, ""
    ok, details = verdict
    mesh_text = [f"mesh {mesh.ulysses_degree}x{mesh.kv_degree}"] if mesh is not None else []
    return ok, " ".join(mesh_text + details)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--kv-schemes", nargs="+", choices=KV_SCHEMES, default=list(KV_SCHEMES))
    p.add_argument("--seqlen-local", type=int, default=None, help="batched: tokens per rank per sequence")
    p.add_argument("--varlen-local-lens", type=int, nargs="+", default=None,
                   help="varlen: tokens per rank of each sequence (global N x this, adjusted per layout)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-poison", action="store_true")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)

    def header(N: int, device_name: str, num_cases: int) -> str:
        return (f"all-to-all schemes: world_size {N}, {device_name}, torch {torch.__version__}, {num_cases} cases, "
                f"seed {args.seed}")

    return rv.script_main(args, "test_all_to_all_gpu.py", 29523, lambda N: build_cases(args.kinds, args.kv_schemes, N),
                          header, run_case)


if __name__ == "__main__":
    sys.exit(main())
