#!/usr/bin/env python
"""The ring variants and llama3 (contiguous layout) on GPUs (NCCL), any number of ranks:

    torchrun --nproc_per_node=N test/test_ring_variants_gpu.py            # 72 cases
    torchrun --nproc_per_node=N test/test_ring_variants_gpu.py --full     # every combination (144)
    torchrun --nproc_per_node=N test/test_ring_variants_gpu.py --families ring stripe --forms func

Families (python/ring_flash_attn/cp/: ring.py, zigzag_ring.py, stripe.py and llama3.py), each in
its three forms (func, kvpacked, qkvpacked):

    ring, zigzag_ring, stripe                   batched [B, L, H, D], the ring schemes' layouts
    ring_varlen, zigzag_ring_varlen             packed [T, H, D], the rank's LOCAL cu_seqlens
    llama3_varlen                               contiguous pieces of the packed batch, metadata of
                                                llama3_flash_attn_prepare_cu_seqlens

A case is (family, form, dtype, causal, head dim). The func form runs every combination of
bf16/fp16, causal/non-causal and D = 64/128; the kvpacked and qkvpacked forms run two of them each
(--full: all eight). GQA 8 query / 2 KV heads (qkvpacked: 4 / 4, it packs equal head counts);
local lengths are odd where the layout allows (ring, stripe: 113 tokens per rank; zigzag: 114, so
chunks of 57) and varlen batches mix 1-token, odd and long sequences; llama3's sequences cross the
rank boundaries.

Per case: the global batch is drawn on every rank from the same seed; each rank runs the variant
(forward with return_attn_probs=True, then backward) on its shard; out, LSE, dQ, dK and dV are
gathered into global order and rank 0 compares them with an fp32 PyTorch reference of full
attention on the unsharded batch (test/reference.py, on the rounded inputs), with FlashAttention's
rule: max|x - ref_fp32| <= 2 * max|x_lowp - ref_fp32| + floor, x_lowp being the same reference in
the test dtype, floor = 1e-4 + N * eps(dtype) * max(1, max|ref_fp32|) (N = world size: the ring
rounds each rank's partial result to the dtype once before the fp32 merge). LSE: |lse - ref| <=
2e-3. NaN fails (the CUDA allocator is refilled with NaN before every call, so an element left
unwritten shows up). The func form also checks that return_attn_probs=False returns the same
output, and bf16 / causal / D=128 func cases that deterministic=True gives a bit-identical backward.

Rank 0 prints one PASS/FAIL line per case and a final "P PASS / F FAIL" line; the exit status is 1
if any case failed on any rank.

Under pytest this file collects no tests (no test_* functions); it only runs as a script.
``--device cpu`` runs it on gloo and the CPU backend with tiny lengths (a smoke test of the script:
test/test_ring_variants_gpu_script_cpu.py does that with 2 ranks).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)  # reference.py
try:
    import ring_flash_attn  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(_HERE), "python"))

import ring_flash_attn as rfa  # noqa: E402
import torchrun_script as ts  # noqa: E402
from reference import grouped_attention_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FORMS = ("func", "kvpacked", "qkvpacked")
PASS, FAIL = "PASS", "FAIL"
FLOOR = 1e-4
LSE_TOL = 2e-3


@dataclass(frozen=True)
class Family:
    kind: str  # "batched", "varlen" (the ring schemes' varlen forms) or "llama3"
    layout: str  # "ring" (contiguous), "zigzag" or "stripe"
    funcs: Tuple[Callable, Callable, Callable]  # func, kvpacked, qkvpacked


FAMILIES: Dict[str, Family] = {
    "ring": Family("batched", "ring", (rfa.ring_flash_attn_func, rfa.ring_flash_attn_kvpacked_func,
                                       rfa.ring_flash_attn_qkvpacked_func)),
    "zigzag_ring": Family("batched", "zigzag", (rfa.zigzag_ring_flash_attn_func,
                                                rfa.zigzag_ring_flash_attn_kvpacked_func,
                                                rfa.zigzag_ring_flash_attn_qkvpacked_func)),
    "stripe": Family("batched", "stripe", (rfa.stripe_flash_attn_func, rfa.stripe_flash_attn_kvpacked_func,
                                           rfa.stripe_flash_attn_qkvpacked_func)),
    "ring_varlen": Family("varlen", "ring", (rfa.ring_flash_attn_varlen_func,
                                             rfa.ring_flash_attn_varlen_kvpacked_func,
                                             rfa.ring_flash_attn_varlen_qkvpacked_func)),
    "zigzag_ring_varlen": Family("varlen", "zigzag", (rfa.zigzag_ring_flash_attn_varlen_func,
                                                      rfa.zigzag_ring_flash_attn_varlen_kvpacked_func,
                                                      rfa.zigzag_ring_flash_attn_varlen_qkvpacked_func)),
    "llama3_varlen": Family("llama3", "ring", (rfa.llama3_flash_attn_varlen_func,
                                               rfa.llama3_flash_attn_varlen_kvpacked_func,
                                               rfa.llama3_flash_attn_varlen_qkvpacked_func)),
}

_ALL_COMBOS = [(dt, causal, d) for dt in ("bf16", "fp16") for causal in (True, False) for d in (64, 128)]
# the packed forms' combinations when not --full: between them every dtype, mask and head dim
_PACKED_COMBOS = {"kvpacked": [("bf16", True, 128), ("fp16", False, 64)],
                  "qkvpacked": [("fp16", True, 64), ("bf16", False, 128)]}


@dataclass(frozen=True)
class Case:
    family: str
    form: str
    dtype: str
    causal: bool
    head_dim: int
    heads_q: int
    heads_k: int
    heads_k_stride: int  # llama3 only
    check_deterministic: bool

    @property
    def name(self) -> str:
        mask = "causal" if self.causal else "full"
        return (f"{self.family:18s} {self.form:9s} {self.dtype} {mask:6s} D{self.head_dim:<3d} "
                f"Hq{self.heads_q}/Hk{self.heads_k}")


def build_cases(families: Sequence[str], forms: Sequence[str], full: bool) -> List[Case]:
    cases = []
    for fam in families:
        for form in forms:
            combos = _ALL_COMBOS if (full or form == "func") else _PACKED_COMBOS[form]
            for dt, causal, d in combos:
                hq, hk = (4, 4) if form == "qkvpacked" else (8, 2)
                hs = 1 if form == "func" else hk  # llama3: two all-gather slices, or one
                cases.append(Case(fam, form, dt, causal, d, hq, hk, hs,
                                  check_deterministic=form == "func" and (dt, causal, d) == ("bf16", True, 128)))
    return cases


# ---- layouts: which global rows each rank holds -------------------------------------------------


@dataclass
class Geometry:
    """The global packed batch (cu of its sequences) and, per rank, the global rows it holds in local
    order. Batched families: B sequences of S = N L tokens, flattened b-major ([B, L] -> B L rows)."""

    cu_global: List[int]
    rows: List[torch.Tensor]  # per rank, int64 on the device
    batch: int = 0  # batched families: B
    local_len: int = 0  # batched families: L
    cu_local: Optional[List[int]] = None  # ring varlen forms: the rank's LOCAL cumulative lengths


def _cumsum(lens: Sequence[int]) -> List[int]:
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return cu


def _even(n: int) -> int:
    return n + (n % 2)


def _seq_rows(layout: str, start: int, length: int, r: int, N: int) -> List[torch.Tensor]:
    """Global rows of rank r in one sequence [start, start + length) of the layout."""
    if layout == "ring":
        n = length // N
        return [torch.arange(start + r * n, start + (r + 1) * n)]
    if layout == "zigzag":
        c = length // (2 * N)
        return [torch.arange(start + r * c, start + (r + 1) * c),
                torch.arange(start + (2 * N - 1 - r) * c, start + (2 * N - r) * c)]
    return [start + torch.arange(length // N) * N + r]  # stripe: local i is global i N + r


def geometry(fam: Family, args, N: int, device) -> Geometry:
    if fam.kind == "batched":
        L = _even(args.seqlen_local) if fam.layout == "zigzag" else args.seqlen_local
        S, B = N * L, args.batch
        rows = [torch.cat([torch.cat(_seq_rows(fam.layout, b * S, S, r, N)) for b in range(B)]) for r in range(N)]
        return Geometry(_cumsum([S] * B), [x.to(device) for x in rows], batch=B, local_len=L)
    if fam.kind == "varlen":
        local = [_even(n) for n in args.varlen_local_lens] if fam.layout == "zigzag" else list(args.varlen_local_lens)
        lens = [N * n for n in local]
        cu = _cumsum(lens)
        rows = [torch.cat([torch.cat(_seq_rows(fam.layout, cu[b], lens[b], r, N)) for b in range(len(lens))])
                for r in range(N)]
        return Geometry(cu, [x.to(device) for x in rows], cu_local=_cumsum(local))
    # llama3: contiguous pieces of the packed batch; the first sequence is 7 tokens longer than a
    # multiple of N (so for N > 1 the sequence boundaries fall inside the ranks' pieces), the last
    # one pads the total to a multiple of N
    lens = [N * n for n in args.varlen_local_lens]
    lens[0] += 7
    lens[-1] += (-sum(lens)) % N
    T = sum(lens) // N
    return Geometry(_cumsum(lens), [torch.arange(r * T, (r + 1) * T, device=device) for r in range(N)])


# ---- the reference ------------------------------------------------------------------------------


def reference(q, k, v, dout, cu: torch.Tensor, causal: bool, dtype) -> Dict[str, torch.Tensor]:
    """Full attention on the global batch in `dtype` (autograd for the gradients)."""
    ins = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    (out,), (lse,) = grouped_attention_reference([ins[0]], ins[1], ins[2], [cu], cu, None, None, causal)
    dq, dk, dv = torch.autograd.grad(out, ins, dout.to(dtype))
    return {"out": out.detach(), "lse": lse, "dq": dq, "dk": dk, "dv": dv}


# ---- one case -----------------------------------------------------------------------------------


class Poison:
    """Refills the CUDA caching allocator with NaN: the cache is emptied, then NaN tensors are
    allocated (one large block and a few of the small pool's) and freed, so the next torch.empty
    calls get NaN-filled memory. A no-op on CPU."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled and device.type == "cuda"

    def __call__(self) -> None:
        if not self.enabled:
            return
        torch.cuda.empty_cache()
        large = torch.full((64 << 20,), float("nan"), dtype=torch.float32, device=self.device)
        small = [torch.full((1 << 18,), float("nan"), dtype=torch.float32, device=self.device) for _ in range(16)]
        del large, small


def _local_call(fam: Family, case: Case, geo: Geometry, rank: int, N: int, q, k, v, deterministic: bool,
                return_attn_probs: bool = True):
    """The variant on the rank's shard (q [T, Hq, D], k/v [T, Hk, D], leaves as the form packs them):
    returns (result, leaves, unpack) where unpack(grads) -> (dq, dk, dv) as [T, H, D] tensors."""
    func, kvpacked, qkvpacked = fam.funcs
    kw = dict(causal=case.causal, deterministic=deterministic, return_attn_probs=return_attn_probs)
    dev = q.device
    if fam.kind == "batched":
        B, L = geo.batch, geo.local_len
        q, k, v = (t.reshape(B, L, *t.shape[1:]) for t in (q, k, v))
        args: tuple = ()
        pack_dim = 2
    elif fam.kind == "varlen":
        cu_local = torch.tensor(geo.cu_local, dtype=torch.int32, device=dev)
        max_local = max(b - a for a, b in zip(geo.cu_local, geo.cu_local[1:]))
        args = (cu_local, max_local)
        pack_dim = 1
    else:
        cu = torch.tensor(geo.cu_global, dtype=torch.int32, device=dev)
        cu_q, cu_k, max_q, max_k, local_k_slice = rfa.llama3_flash_attn_prepare_cu_seqlens(
            cu, causal=case.causal, rank=rank, world_size=N)
        args = (cu_q, cu_k, max_q, max_k, case.heads_k_stride, local_k_slice)
        pack_dim = 1
    T = q.shape[0] * (q.shape[1] if fam.kind == "batched" else 1)

    def flat(t):
        return t.reshape(T, *t.shape[-2:])

    if case.form == "func":
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        res = func(*leaves, *args, **kw)
        return res, leaves, lambda g: tuple(flat(x) for x in g)
    if case.form == "kvpacked":
        leaves = [q.detach().clone().requires_grad_(True),
                  torch.stack([k, v], dim=pack_dim).detach().requires_grad_(True)]
        res = kvpacked(*leaves, *args, **kw)
        return res, leaves, lambda g: (flat(g[0]),) + tuple(flat(x) for x in g[1].unbind(pack_dim))
    leaves = [torch.stack([q, k, v], dim=pack_dim).detach().requires_grad_(True)]
    res = qkvpacked(*leaves, *args, **kw)
    return res, leaves, lambda g: tuple(flat(x) for x in g[0].unbind(pack_dim))


def _lse_rows(fam: Family, lse: torch.Tensor) -> torch.Tensor:
    """The returned LSE as [T_local, Hq] rows (batched: [B, Hq, L]; varlen: [Hq, T])."""
    if fam.kind == "batched":
        return lse.permute(0, 2, 1).reshape(-1, lse.shape[1])
    return lse.t()


def _gather_rows(x: torch.Tensor, geo: Geometry, N: int, total: int) -> torch.Tensor:
    """The ranks' [T_local, ...] tensors (float32) placed at their global rows; rows no rank holds
    stay NaN."""
    import torch.distributed as dist

    x = x.detach().float().contiguous()
    parts = [torch.empty_like(x) for _ in range(N)]
    dist.all_gather(parts, x)
    out = torch.full((total,) + tuple(x.shape[1:]), float("nan"), dtype=torch.float32, device=x.device)
    for r in range(N):
        out.index_copy_(0, geo.rows[r], parts[r])
    return out


def _all_ok(flag: bool, device) -> bool:
    import torch.distributed as dist

    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def failure_line(e: BaseException, rank: int, N: int) -> str:
    """The one-line text of the exception that failed a case's run (its traceback is printed on
    rank 0, or on the only rank)."""
    if rank == 0 or N == 1:
        traceback.print_exc()
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def _pass_rule(name: str, got, ref32, reflp, dtype, N: int) -> Tuple[bool, str]:
    if torch.isnan(got).any():
        return False, f"{name} NaN"
    err = (got - ref32).abs().max().item()
    base = (reflp.float() - ref32).abs().max().item()
    allowed = 2 * base + FLOOR + N * torch.finfo(dtype).eps * max(1.0, ref32.abs().max().item())
    return err <= allowed, f"{name} {err:.2e}<={allowed:.2e}" if err <= allowed else f"{name} {err:.2e}>{allowed:.2e}"


def run_case(case: Case, seed: int, args, rank: int, N: int, device, poison: Poison) -> Tuple[bool, str]:
    fam = FAMILIES[case.family]
    dtype = DTYPES[case.dtype]
    geo = geometry(fam, args, N, device)
    total, hq, hk, d = geo.cu_global[-1], case.heads_q, case.heads_k, case.head_dim
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(h):  # rounded to the test dtype once; the references use these exact values
        return torch.randn((total, h, d), generator=gen, device=device, dtype=torch.float32).to(dtype)

    q, k, v, dout = randn(hq), randn(hk), randn(hk), randn(hq)
    mine = geo.rows[rank]
    ql, kl, vl, dl = (t.index_select(0, mine) for t in (q, k, v, dout))
    notes: List[str] = []

    # forward + backward on the shards
    err = ""
    try:
        poison()
        res, leaves, unpack = _local_call(fam, case, geo, rank, N, ql, kl, vl, deterministic=False)
        out, lse, none = res
        if none is not None or lse.dtype != torch.float32 or out.dtype != dtype:
            raise AssertionError(f"return_attn_probs=True: expected (out {dtype}, lse float32, None), got "
                                 f"({out.dtype}, {lse.dtype}, {type(none).__name__})")
        poison()
        grads = torch.autograd.grad(out, leaves, dl.reshape(out.shape))
        dq, dk, dv = unpack(grads)
        out_rows = out.detach().reshape(-1, hq, d)
        lse_rows = _lse_rows(fam, lse)
        if device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - reported as this case's failure
        err = failure_line(e, rank, N)
    if not _all_ok(not err, device):
        return False, f"run failed: {err or 'on another rank'}"

    # extra checks on the rank's own shard (combined over ranks)
    extra_ok = True
    if case.form == "func":
        with torch.no_grad():
            poison()
            alone, _, _ = _local_call(fam, case, geo, rank, N, ql, kl, vl, deterministic=False,
                                      return_attn_probs=False)
        same = isinstance(alone, torch.Tensor) and torch.equal(alone.reshape(out_rows.shape), out_rows)
        if not _all_ok(same, device):
            extra_ok = False
            notes.append("return_attn_probs=False: not the same output")
    if case.check_deterministic:
        runs = []
        for _ in range(2):
            poison()
            (o, _l, _n), lv, up = _local_call(fam, case, geo, rank, N, ql, kl, vl, deterministic=True)
            runs.append((o.detach(),) + up(torch.autograd.grad(o, lv, dl.reshape(o.shape))))
        same = all(torch.equal(a, b) for a, b in zip(*runs))
        if _all_ok(same, device):
            notes.append("deterministic bwd bit-identical")
        else:
            extra_ok = False
            notes.append("deterministic=True: backward differs between two runs")

    verdict = gathered_verdict({"out": out_rows, "lse": lse_rows, "dq": dq, "dk": dk, "dv": dv}, geo, rank, N,
                               (q, k, v, dout), case.causal, dtype)
    if verdict is None:
        return extra_ok, ""
    ok, details = verdict
    return extra_ok and ok, " ".join(details + notes)


def gathered_verdict(rows: Dict[str, torch.Tensor], geo: Geometry, rank: int, N: int, inputs, causal: bool,
                     dtype) -> Optional[Tuple[bool, List[str]]]:
    """Gathers every rank's `rows` (out [T, Hq, D], lse [T, Hq], dq, dk, dv of its shard) into
    global order; rank 0 then compares them with the references of full attention on the global
    `inputs` (q, k, v, dout): out, dQ, dK, dV by the pass rule, LSE within LSE_TOL of the fp32
    reference. Returns (ok, one text per quantity) on rank 0, None on the others."""
    total = geo.cu_global[-1]
    got = {name: _gather_rows(t, geo, N, total) for name, t in rows.items()}
    if rank != 0:
        return None
    cu = torch.tensor(geo.cu_global, dtype=torch.int32)
    ref32 = reference(*inputs, cu, causal, torch.float32)
    reflp = reference(*inputs, cu, causal, dtype)
    ok, details = True, []
    for name in ("out", "dq", "dk", "dv"):
        good, text = _pass_rule(name, got[name], ref32[name], reflp[name], dtype, N)
        ok &= good
        details.append(text)
    lse_got, lse_ref = got["lse"].t(), ref32["lse"]
    if torch.isnan(lse_got).any():
        ok = False
        details.append("lse NaN")
    else:
        lse_err = (lse_got - lse_ref).abs().max().item()
        ok &= lse_err <= LSE_TOL
        details.append(f"lse {lse_err:.1e}")
    return ok, details


# ---- driver ---------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    p.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    p.add_argument("--full", action="store_true", help="every dtype / mask / head-dim combination for every form")
    p.add_argument("--seqlen-local", type=int, default=None,
                   help="batched families: tokens per rank of each sequence (zigzag rounds up to even); "
                        "default 113 (cuda), 5 (cpu)")
    p.add_argument("--batch", type=int, default=2, help="batched families: sequences per batch")
    p.add_argument("--varlen-local-lens", type=int, nargs="+", default=None,
                   help="varlen families: tokens per rank of each sequence (global length N x this; zigzag "
                        "rounds up to even; llama3 shifts the boundaries); default 113 1 64 203 (cuda), 5 1 3 (cpu)")
    p.add_argument("--seed", type=int, default=None, help="default: a fresh random seed (printed)")
    p.add_argument("--no-poison", action="store_true", help="do not refill the allocator with NaN before calls")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a smoke test of this script on gloo and the CPU backend (tiny lengths)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)

    def header(N: int, device_name: str, num_cases: int) -> str:
        return (f"ring variants: world_size {N}, {device_name}, torch {torch.__version__}, {num_cases} cases, "
                f"seed {args.seed}, batched local length {args.seqlen_local} x batch {args.batch}, varlen local "
                f"lengths {args.varlen_local_lens}")

    return script_main(args, "test_ring_variants_gpu.py", 29519,
                       lambda N: build_cases(args.families, args.forms, args.full), header, run_case)


def script_main(args: argparse.Namespace, script: str, default_port: int, make_cases: Callable[[int], list],
                header: Callable[[int, str, int], str], run_case: Callable) -> int:
    """The driver of a torchrun case script (this one, test_all_to_all_gpu.py): the default
    lengths of --seqlen-local and --varlen-local-lens for the device, the process group (on
    127.0.0.1:default_port for a plain ``python`` run), a seed shared by the ranks, then
    run_case(case, seed + i, args, rank, N, device, poison) for every case of make_cases(N).
    Rank 0 prints header(N, device name, number of cases), one PASS/FAIL line per case (the
    verdict of every rank) and "P PASS / F FAIL"; returns the exit status (1 if a case failed, 2
    without the GPUs --device cuda asks for)."""
    import torch.distributed as dist

    on_gpu = args.device == "cuda"
    if ts.cuda_missing(script, args.device):
        return 2
    if args.seqlen_local is None:
        args.seqlen_local = 113 if on_gpu else 5
    if args.varlen_local_lens is None:
        args.varlen_local_lens = [113, 1, 64, 203] if on_gpu else [5, 1, 3]
    device, device_name = ts.start_process_group(args.device, default_port, timeout=datetime.timedelta(minutes=5),
                                                 cpu_threads=1)
    rank, N = dist.get_rank(), dist.get_world_size()
    args.seed = ts.shared_seed(args.seed, device)
    cases = make_cases(N)
    if rank == 0:
        print(header(N, device_name, len(cases)), flush=True)

    poison = Poison(device, not args.no_poison)
    failed = 0
    for i, case in enumerate(cases):
        ok, detail = run_case(case, args.seed + i, args, rank, N, device, poison)
        # the verdict of every rank: a rank's own failure (e.g. its deterministic check) counts
        ok = _all_ok(ok, device)
        failed += not ok
        if rank == 0:
            print(f"{PASS if ok else FAIL}  {case.name}  [{detail}]", flush=True)
    return ts.finish(rank, f"\n{len(cases) - failed} PASS / {failed} FAIL (world_size {N}, seed {args.seed})", failed)


if __name__ == "__main__":
    sys.exit(main())
