#!/usr/bin/env python
"""What the attention features cost: sliding window, logit softcap and sink logits against plain
causal attention, on each GPU kernel tier, in one run.

Usage (one GPU):

    python benchmark/benchmark_features.py                       # the default rows, both tiers
    python benchmark/benchmark_features.py --tiers auto --passes fwd
    python benchmark/benchmark_features.py --csv out/features.csv
    python benchmark/benchmark_features.py --device cpu --seqlens 256 --window 64 --heads 2 1 --head-dim 32
                                                                 # the measurement path on the CPU

Rows. One sequence per call through ``ring_flash_attn.flash_attn_varlen_func`` (bf16, --heads Hq Hk,
--head-dim D), causal, for each length in --seqlens:
  causal                plain causal attention (the reference row)
  window_<W>            causal with window_size = (W, 0) (W = --window)
  softcap_<C>           causal with softcap = C (--softcap)
  sinks                 causal with learnable per-head sink logits (fp32 [Hq]); in fwd_bwd the
                        sinks' gradient is part of the timed backward
  softcap_sinks         both
The window row is the one the speed target is about (TFLOPS over visible pairs within 10% of
causal's at long L); the softcap and sink rows are about time (at most 10% over causal).

FLOPs are counted on visible (query, key) pairs: fwd = 4 * D * Hq * pairs, fwd_bwd = 3.5 * fwd;
TFLOPS = FLOPs / median time; `vs_causal` is the row's time over the causal row's time at the same
length, tier and pass (lower is better), `tflops_vs_causal` its TFLOPS over causal's.

Tiers (--tiers): sm80 (tier 1, mma.sync), sm90 (tier 2, TMA + wgmma), auto; each through
$RING_FLASH_ATTN_TIER, read per call. A tier that refuses a row (not built, not this card) is
reported with its reason and the run goes on.

Timing: CUDA events around each call (host timers on the CPU), --warmup calls first, median of
--num-runs. Progress on stderr, a table on stdout, a CSV (--csv) written at the end with columns
gpu,torch,tier,seqlen,variant,pass,time_ms,tflops,vs_causal,tflops_vs_causal,status.

Correctness spot check: each row's first forward output is compared, on its last 128 rows and
2 heads, with a float32 reference of the same mask, softcap and sinks; a difference above 2e-2
(bf16) or any non-finite value marks the row FAIL (exit status 1).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import ring_flash_attn as rfa

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import benchmark_grouped_attention as gb  # noqa: E402  (the timer)

TIER_ENV = "RING_FLASH_ATTN_TIER"


@dataclass(frozen=True)
class Variant:
    name: str
    window: Tuple[int, int]
    softcap: float
    sinks: bool


def variants(window: int, softcap: float) -> List[Variant]:
    return [
        Variant("causal", (-1, -1), 0.0, False),
        Variant(f"window_{window}", (window, 0), 0.0, False),
        Variant(f"softcap_{softcap:g}", (-1, -1), softcap, False),
        Variant("sinks", (-1, -1), 0.0, True),
        Variant("softcap_sinks", (-1, -1), softcap, True),
    ]


def visible_pairs(seqlen: int, window_left: int) -> int:
    """Causal (query, key) pairs of one sequence of `seqlen`, with a left window bound when >= 0."""
    if window_left < 0 or window_left >= seqlen - 1:
        return seqlen * (seqlen + 1) // 2
    w = window_left
    # Row i sees min(i, w) + 1 keys.
    full = seqlen - w  # rows i >= w see w + 1 keys
    return (w * (w + 1)) // 2 + full * (w + 1)


def reference(q, k, v, scale: float, window: Tuple[int, int], softcap: float, sinks, rows: int, heads: int):
    """fp32 causal reference of the last `rows` query rows and `heads` heads (one sequence, GQA):
    the rows whose window bound lies furthest from the sequence start."""
    L, Hq, D = q.shape
    Hk = k.shape[1]
    out = torch.empty(rows, heads, D, dtype=torch.float32, device=q.device)
    i = torch.arange(L - rows, L, device=q.device)[:, None]
    j = torch.arange(L, device=q.device)[None, :]
    visible = j <= i
    if window[0] >= 0:
        visible &= j >= i - window[0]
    for h in range(heads):
        kh = h // (Hq // Hk)
        s = (q[L - rows:, h].float() @ k[:, kh].float().T) * scale
        if softcap > 0:
            s = softcap * torch.tanh(s / softcap)
        s = s.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            s = torch.cat([s, sinks[h].float().expand(rows, 1)], dim=1)
            p = torch.softmax(s, dim=1)[:, :L]
        else:
            p = torch.softmax(s, dim=1)
        out[:, h] = p @ v[:, kh].float()
    return out


@dataclass
class Row:
    tier: str
    seqlen: int
    variant: str
    pass_name: str
    time_ms: float
    tflops: float
    status: str
    vs_causal: float = float("nan")
    tflops_vs_causal: float = float("nan")


def timer(device: torch.device) -> Callable[[Callable[[], None], int, int], float]:
    def run(fn: Callable[[], None], warmup: int, runs: int) -> float:
        for _ in range(warmup):
            fn()
        return gb.median_call_ms(fn, runs, device)
    return run


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Rows, metrics and the spot check: the docstring at the top of "
                                        "benchmark/benchmark_features.py.")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: the measurement path on the CPU backend, host timers (default: cuda)")
    ap.add_argument("--tiers", nargs="+", default=["sm80", "sm90"], choices=("sm80", "sm90", "auto"),
                    help="GPU kernel tiers, each through $RING_FLASH_ATTN_TIER (default: sm80 sm90)")
    ap.add_argument("--seqlens", nargs="+", type=int, default=[16384, 65536],
                    help="sequence lengths, one sequence per call (default: 16384 65536)")
    ap.add_argument("--window", type=int, default=4096, help="W of the window_<W> row, window_size = (W, 0) "
                                                                 "(default: 4096)")
    ap.add_argument("--softcap", type=float, default=50.0, help="C of the softcap_<C> rows (default: 50)")
    ap.add_argument("--heads", nargs=2, type=int, default=[32, 8], metavar=("HQ", "HK"),
                    help="query and KV heads (default: 32 8)")
    ap.add_argument("--head-dim", type=int, default=128, help="default: 128")
    ap.add_argument("--passes", nargs="+", default=["fwd", "fwd_bwd"], choices=("fwd", "fwd_bwd"),
                    help="default: fwd fwd_bwd")
    ap.add_argument("--variants", nargs="+", default=None,
                    help="row names to keep: causal, window_<W>, softcap_<C>, sinks, softcap_sinks (default: all)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first (default: 3)")
    ap.add_argument("--num-runs", type=int, default=10, help="timed calls, median reported (default: 10)")
    ap.add_argument("--csv", default=None, help="write the rows to this CSV at the end (default: none)")
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmark_features: no CUDA device (use --device cpu for the CPU path)", file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    Hq, Hk = args.heads
    D = args.head_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    scale = 1.0 / math.sqrt(D)
    run = timer(device)
    tiers = args.tiers if device.type == "cuda" else ["cpu"]
    rows: List[Row] = []
    failed = False
    all_variants = [v for v in variants(args.window, args.softcap) if args.variants is None or v.name in args.variants]
    total = len(tiers) * len(args.seqlens) * len(all_variants) * len(args.passes)
    done = 0
    t_start = time.time()
    old_tier = os.environ.get(TIER_ENV)
    try:
        for tier in tiers:
            if tier != "cpu":
                os.environ[TIER_ENV] = tier
            for L in args.seqlens:
                g = torch.Generator(device="cpu").manual_seed(L)
                q = torch.randn(L, Hq, D, generator=g).to(device, dtype)
                k = torch.randn(L, Hk, D, generator=g).to(device, dtype)
                v = torch.randn(L, Hk, D, generator=g).to(device, dtype)
                dout = torch.randn(L, Hq, D, generator=g).to(device, dtype)
                sinks0 = torch.randn(Hq, generator=g).to(device, torch.float32)
                cu = torch.tensor([0, L], dtype=torch.int32, device=device)
                for var in all_variants:
                    sinks = sinks0.clone().requires_grad_(True) if var.sinks else None
                    extra: Dict[str, object] = {}
                    if var.window != (-1, -1):
                        extra["window_size"] = var.window
                    if var.softcap > 0:
                        extra["softcap"] = var.softcap
                    if sinks is not None:
                        extra["sinks"] = sinks
                    pairs = visible_pairs(L, var.window[0])
                    status = "ok"
                    try:
                        with torch.no_grad():
                            out = rfa.flash_attn_varlen_func(q, k, v, cu, cu, L, L, softmax_scale=scale, causal=True,
                                                             **extra)
                        out = out[0] if isinstance(out, tuple) else out
                        ref = reference(q, k, v, scale, var.window, var.softcap, sinks0 if var.sinks else None,
                                        min(128, L), min(2, Hq))
                        got = out[L - min(128, L):, : min(2, Hq)].float()
                        diff = (got - ref).abs().max().item()
                        if not torch.isfinite(out).all() or diff > 2e-2:
                            status = f"FAIL (max diff {diff:.3g})"
                            failed = True
                    except Exception as e:  # a tier without the feature, or a real failure: reported
                        status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    for pass_name in args.passes:
                        done += 1
                        if status != "ok":
                            rows.append(Row(tier, L, var.name, pass_name, float("nan"), float("nan"), status))
                            continue
                        if pass_name == "fwd":
                            def call() -> None:
                                with torch.no_grad():
                                    rfa.flash_attn_varlen_func(q, k, v, cu, cu, L, L, softmax_scale=scale,
                                                               causal=True, **extra)
                            flops = 4.0 * D * Hq * pairs
                        else:
                            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
                            inputs = [qg, kg, vg] + ([sinks] if sinks is not None else [])

                            def call() -> None:
                                o = rfa.flash_attn_varlen_func(qg, kg, vg, cu, cu, L, L, softmax_scale=scale,
                                                               causal=True, **extra)
                                o = o[0] if isinstance(o, tuple) else o
                                torch.autograd.grad(o, inputs, dout)
                            flops = 3.5 * 4.0 * D * Hq * pairs
                        ms = run(call, args.warmup, args.num_runs)
                        rows.append(Row(tier, L, var.name, pass_name, ms, flops / (ms * 1e-3) / 1e12, status))
                        eta = (time.time() - t_start) / done * (total - done)
                        print(f"[{done}/{total}] {tier} L={L} {var.name} {pass_name}: {ms:.3f} ms, "
                              f"{rows[-1].tflops:.0f} TFLOPS (ETA {eta:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if old_tier is None:
            os.environ.pop(TIER_ENV, None)
        else:
            os.environ[TIER_ENV] = old_tier

    causal_of = {(r.tier, r.seqlen, r.pass_name): r for r in rows if r.variant == "causal" and r.status == "ok"}
    for r in rows:
        c = causal_of.get((r.tier, r.seqlen, r.pass_name))
        if c is not None and r.status == "ok":
            r.vs_causal = r.time_ms / c.time_ms
            r.tflops_vs_causal = r.tflops / c.tflops
    print(f"# benchmark_features on {gpu}, torch {torch.__version__}, Hq {Hq}, Hk {Hk}, D {D}, {dtype}, causal, "
          f"window ({args.window}, 0), softcap {args.softcap:g}")
    print(f"{'tier':5} {'L':>6} {'variant':16} {'pass':8} {'ms':>9} {'TFLOPS':>7} {'time/causal':>11} "
          f"{'TFLOPS/causal':>13}  status")
    for r in rows:
        print(f"{r.tier:5} {r.seqlen:6d} {r.variant:16} {r.pass_name:8} {r.time_ms:9.3f} {r.tflops:7.0f} "
              f"{r.vs_causal:11.3f} {r.tflops_vs_causal:13.3f}  {r.status}")
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["gpu", "torch", "tier", "seqlen", "variant", "pass", "time_ms", "tflops", "vs_causal",
                        "tflops_vs_causal", "status"])
            for r in rows:
                w.writerow([gpu, torch.__version__, r.tier, r.seqlen, r.variant, r.pass_name, f"{r.time_ms:.4f}",
                            f"{r.tflops:.2f}", f"{r.vs_causal:.4f}", f"{r.tflops_vs_causal:.4f}", r.status])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
