#!/usr/bin/env python
"""Zigzag llama3 context parallelism: one training step per rank, communication included,
against the same rank's attention kernels alone.

Usage (launch with torchrun; one process per GPU, NCCL):

    torchrun --nproc_per_node=8 benchmark/benchmark_zigzag_distributed.py
    torchrun --nproc_per_node=8 benchmark/benchmark_zigzag_distributed.py --seqlens 65536 --impls fused \\
        --heads-k-stride 4 --csv benchmark/results/zigzag_distributed.csv
    # smoke test without GPUs (gloo, CPU backend, tiny sizes; the numbers mean nothing):
    torchrun --nproc_per_node=2 benchmark/benchmark_zigzag_distributed.py --device cpu

What is timed, per rank, for every (seqlen, implementation, pass):

* step: ``zigzag_llama3_flash_attn_varlen_func`` on the rank's zigzag shard, forward (pass
  ``fwd``) or forward + backward (``fwd_bwd``): the K/V all-gathers (next slice in flight while
  the current one is computed), the zigzag-to-natural reorder, the attention kernels, and in the
  backward the dK/dV reduce-scatters (overlapped one slice behind). Ranks run it in lockstep.
* kernels: the same rank's attention calls alone, exactly as the step issues them (same
  implementation, same ``heads_k_stride`` slices, same two query groups and per-group
  ``seqused_k``), on K/V that is already gathered and in natural order: no communication, no
  reorder, no index maps.

``ratio = step / kernels``: 1.0 means communication and data movement are fully hidden behind the
kernels; the excess is what is not. TFLOPS count unmasked (q, k) pairs the FlashAttention way
(fwd 4 * D * Hq * pairs, fwd_bwd 3.5x), for the rank's own workload (its early chunk sees
(r+1) c keys, its late chunk (2N-r) c keys, c = L / 2N).

Timing: CUDA events around each call on GPUs, a host timer on CPU; --warmup calls, then the median
of --num-runs. Rank 0 prints one table per (seqlen, implementation, pass) with every rank's row
and appends the rows to --csv. A pass the library cannot run (no CUDA backward yet:
NotImplementedError) is reported and skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import benchmark_grouped_attention as gb  # noqa: E402  (pure-Python helpers: configs, pairs, tables)

IMPLS = ("baseline", "grouped_python", "fused")
IMPL_FLAGS = {"baseline": {}, "grouped_python": {"use_grouped_attention": True}, "fused": {"use_fused_kernel": True}}
PASSES = ("fwd", "fwd_bwd")
CSV_COLUMNS = ("device", "torch", "backend", "world_size", "rank", "config", "dtype", "seqlen", "batch",
               "heads_k_stride", "impl", "pass", "step_ms", "kernels_ms", "ratio", "step_tflops", "kernels_tflops")
CONFIGS = dict(gb.CONFIGS)
CONFIGS["tiny"] = gb.ModelConfig("tiny", "tiny (CPU smoke test)", 4, 2, 32)
DTYPES = ("bf16", "fp16", "fp32")


def rank_pairs(seqlen: int, batch: int, world_size: int, rank: int) -> int:
    """Unmasked causal pairs of one rank's two query chunks over the whole batch."""
    c = seqlen // (2 * world_size)
    return batch * (gb.count_pairs(c, (rank + 1) * c) + gb.count_pairs(c, (2 * world_size - rank) * c))


def run_fields(env: Dict[str, str], world_size: int, rank: int, args, seqlen: int) -> Dict[str, str]:
    """The CSV fields that say where and what ran (this benchmark's and benchmark_cp_distributed.py's)."""
    return {"device": env["device"], "torch": env["torch"], "backend": env["backend"], "world_size": str(world_size),
            "rank": str(rank), "config": args.config, "dtype": args.dtype, "seqlen": str(seqlen)}


def timing_fields(step_ms: float, kernels_ms: float, flops: float) -> Dict[str, str]:
    """The CSV fields of a rank's step and kernels-alone times: ms, their ratio, TFLOPS (to 5
    significant digits, not 3 decimals: a tiny CPU run is well below 0.001 TFLOPS and would print 0)."""
    return {"step_ms": f"{step_ms:.4f}", "kernels_ms": f"{kernels_ms:.4f}",
            "ratio": f"{step_ms / kernels_ms:.3f}" if kernels_ms > 0 else "",
            "step_tflops": f"{flops / (step_ms * 1e9):.5g}" if step_ms > 0 else "",
            "kernels_tflops": f"{flops / (kernels_ms * 1e9):.5g}" if kernels_ms > 0 else ""}


class Case:
    """One timed case on this rank: the whole step and its kernels alone (callables), the rank's
    unmasked (q, k) pairs (its FLOPs), and what the CSV reports of the call (mesh, heads_k_stride)."""

    def __init__(self, step: Callable[[], None], kernels: Callable[[], None], pairs: int, mesh: str = "",
                 hs: int = 0):
        self.step, self.kernels, self.pairs, self.mesh, self.hs = step, kernels, pairs, mesh, hs


def time_on_every_rank(build: Callable[[], Case], args, device, world_size: int, say: Callable[..., None],
                       label: str) -> Optional[Tuple[Case, List[Tuple[float, float, float]]]]:
    """Builds this rank's case and times its step and kernels (time_calls after a barrier) on
    every rank in lockstep. Returns (the case, each rank's (step_ms, kernels_ms, pairs)), or None
    after saying "<label>: skipped" when a rank raised NotImplementedError (with rank 0's reason)."""
    import torch
    import torch.distributed as dist

    reason = ""
    try:
        case = build()
        dist.barrier()
        facts = [time_calls(case.step, args.num_runs, args.warmup, device),
                 time_calls(case.kernels, args.num_runs, args.warmup, device), float(case.pairs)]
        ok = torch.ones(1, device=device)
    except NotImplementedError as e:
        ok = torch.zeros(1, device=device)
        reason = str(e).splitlines()[0][:160]
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if ok.item() == 0:
        say(f"\n{label}: skipped (NotImplementedError" + (f" on rank 0: {reason})" if reason else " on another rank)"))
        return None
    mine = torch.tensor(facts, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(gathered, mine)
    return case, [tuple(t.tolist()) for t in gathered]


def rank_report(per_rank: Sequence[Tuple[float, float, float]], cfg, pass_name: str,
                fields: Callable[[int], Dict[str, str]]) -> Tuple[List[Dict[str, str]], str]:
    """Rank 0's report of one timed case: a CSV row per rank (fields(rank), then its times, ratio
    and TFLOPS) and the box table of them."""
    rows, table = [], []
    for r, (s_ms, k_ms, pairs) in enumerate(per_rank):
        flops = gb.attention_flops(int(pairs), cfg.num_heads_q, cfg.head_dim, pass_name)
        row = dict(fields(r), **timing_fields(s_ms, k_ms, flops))
        rows.append(row)
        table.append([str(r), f"{s_ms:.3f}", f"{k_ms:.3f}", row["ratio"], row["step_tflops"], row["kernels_tflops"]])
    headers = ["Rank", "Step (ms)", "Kernels (ms)", "Ratio", "Step TFLOPS", "Kernels TFLOPS"]
    return rows, gb.box_table(headers, table, ["r"] * len(headers))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Zigzag llama3 step vs kernels-alone benchmark (launch with torchrun)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda (NCCL) or cpu (gloo, CPU backend); default cuda if available")
    p.add_argument("--seqlens", type=int, nargs="+", default=None,
                   help="global sequence lengths (multiples of 2 * world_size); "
                        "default 16384 65536 on cuda, 256 on cpu")
    p.add_argument("--batch", type=int, default=1, help="sequences of each length in the packed batch (default: 1)")
    p.add_argument("--config", choices=sorted(CONFIGS), default=None, help="default llama3-8b on cuda, tiny on cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS), help="default: all")
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES), help="default: both")
    p.add_argument("--heads-k-stride", type=int, default=None, help="KV heads per all-gather slice (default Hk / 2)")
    p.add_argument("--grad-reduce-dtype", choices=("same", "fp32"), default="same",
                   help="dtype of the dK/dV reduce-scatter: the dtype of k (same) or fp32 (the library's default)")
    p.add_argument("--num-runs", type=int, default=None, help="timed calls (median); default 20 on cuda, 3 on cpu")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first; default 5 on cuda, 1 on cpu")
    p.add_argument("--csv", default=None, help="append one row per (rank, seqlen, impl, pass) to this CSV (rank 0)")
    args = p.parse_args(argv)
    return args


def _fill_defaults(args, on_gpu: bool) -> None:
    if args.seqlens is None:
        args.seqlens = [16384, 65536] if on_gpu else [256]
    if args.config is None:
        args.config = "llama3-8b" if on_gpu else "tiny"
    if args.dtype is None:
        args.dtype = "bf16" if on_gpu else "fp32"
    if args.num_runs is None:
        args.num_runs = 20 if on_gpu else 3
    if args.warmup is None:
        args.warmup = 5 if on_gpu else 1


def time_calls(fn: Callable[[], None], runs: int, warmup: int, device) -> float:
    """Median ms of `runs` calls after `warmup` calls (CUDA events on a GPU, host timer on CPU)."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(runs)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def build_inputs(seqlen: int, args, cfg, dtype, device, world_size: int, rank: int):
    """The rank's shard of a random packed batch (random data; the layout is all that matters)."""
    import torch

    from ring_flash_attn import zigzag_llama3_prepare_cu_seqlens

    T = seqlen * args.batch // world_size
    gen = torch.Generator(device=device).manual_seed(1234 + rank)

    def randn(h, n=T):
        return torch.randn((n, h, cfg.head_dim), generator=gen, device=device, dtype=torch.float32).to(dtype)

    cu = torch.arange(args.batch + 1, dtype=torch.int32, device=device) * seqlen
    cu_q, cu_k, max_q, max_k, _ = zigzag_llama3_prepare_cu_seqlens(cu, True, rank, world_size, max_seqlen=seqlen)
    return dict(q=randn(cfg.num_heads_q), k=randn(cfg.num_heads_k), v=randn(cfg.num_heads_k),
                dout=randn(cfg.num_heads_q), cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k,
                k_glob=randn(cfg.num_heads_k, T * world_size), v_glob=randn(cfg.num_heads_k, T * world_size))


def make_step(inp, impl: str, pass_name: str, hs: int, reduce_dtype, group):
    from ring_flash_attn import zigzag_llama3_flash_attn_varlen_func

    backward = pass_name == "fwd_bwd"
    q, k, v = (inp[n].detach().requires_grad_(backward) for n in ("q", "k", "v"))

    def step():
        out = zigzag_llama3_flash_attn_varlen_func(
            q, k, v, inp["cu_q"], inp["cu_k"], inp["max_q"], inp["max_k"], hs, None, causal=True, group=group,
            grad_reduce_dtype=reduce_dtype, **IMPL_FLAGS[impl])
        if backward:
            out.backward(inp["dout"])

    return step


def make_kernels(inp, impl: str, pass_name: str, hs: int, reduce_dtype, world_size: int, rank: int):
    """The step's attention calls alone, on K/V already gathered and in natural order."""
    import torch

    from ring_flash_attn.cp import zigzag_llama3 as zl

    q, k_glob, v_glob = inp["q"], inp["k_glob"], inp["v_glob"]
    plan = zl._make_plan(q, inp["k"], inp["cu_k"], inp["max_k"], hs, None, True, False, reduce_dtype,
                         zl.resolve_impl(**IMPL_FLAGS[impl]), None, world_size, rank)
    T, Hq, D = q.shape
    half, hq = plan.half, plan.heads_q_per_slice
    out = torch.empty_like(q)
    lse = torch.empty((plan.num_slices, 2, hq, half), dtype=torch.float32, device=q.device)
    dq = torch.empty_like(q)
    dout = inp["dout"]
    slices = [(slice(s * hs, (s + 1) * hs), slice(s * hq, (s + 1) * hq)) for s in range(plan.num_slices)]

    def kernels():
        for s, (ksl, qsl) in enumerate(slices):
            zl._fwd_slice(plan, (q[:half, qsl], q[half:, qsl]), k_glob[:, ksl], v_glob[:, ksl],
                          (out[:half, qsl], out[half:, qsl]), (lse[s, 0], lse[s, 1]))
        if pass_name == "fwd_bwd":
            for s, (ksl, qsl) in enumerate(slices):
                zl._bwd_slice(plan, s, dout, q, out, lse[s], dq, k_glob[:, ksl], v_glob[:, ksl])

    return kernels


def heads_k_stride(args, cfg) -> int:
    """--heads-k-stride, or by default half the model's KV heads (two slices)."""
    return args.heads_k_stride or max(1, cfg.num_heads_k // 2)


def start_model_run(args, fill_defaults: Callable, master_port: str
                    ) -> Optional[Tuple[gb.DistributedRun, gb.ModelConfig, int]]:
    """The start of a benchmark of one model over torchrun ranks: gb.start_distributed (with
    ``fill_defaults(args, on_gpu)``), then the model of --config and the run's heads_k_stride
    (heads_k_stride()). Returns (run, model config, heads_k_stride), or None when
    gb.start_distributed gives None (the caller exits with gb.EXIT_NO_GPU)."""
    run = gb.start_distributed(args, fill_defaults, master_port=master_port)
    if run is None:
        return None
    cfg = CONFIGS[args.config]
    return run, cfg, heads_k_stride(args, cfg)


def say_model_header(run: gb.DistributedRun, args, cfg: gb.ModelConfig, title: str, settings: str, script: str,
                     argv: Optional[Sequence[str]]) -> None:
    """The lines before the tables (rank 0): `title`; world size, device, backend, torch, dtype and
    the model, then `settings` (the benchmark's own); the Command and Date lines of `script`; the
    timing (--warmup, median of --num-runs, ratio = step / kernels)."""
    env, say = run.env, run.say
    say(title)
    say(f"world_size {run.world_size}, {env['device']} ({env['backend']}), torch {env['torch']}, {args.dtype}, "
        f"{cfg.label} ({cfg.num_heads_q} Q heads, {cfg.num_heads_k} KV heads, head_dim {cfg.head_dim}), {settings}")
    gb.say_command(say, script, run.world_size, argv)
    timer = "CUDA events" if run.on_gpu else "host timer (CPU smoke test: the numbers mean nothing)"
    say(f"Timing: {timer}, {args.warmup} warm-up, median of {args.num_runs}; ratio = step / kernels")


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    args = parse_args(argv)
    started = start_model_run(args, _fill_defaults, master_port="29518")
    if started is None:
        return gb.EXIT_NO_GPU
    run, cfg, hs = started
    on_gpu, device, rank, world, dtype, env, say = run
    reduce_dtype = torch.float32 if args.grad_reduce_dtype == "fp32" else dtype  # "same": the dtype of k
    say_model_header(run, args, cfg, "Zigzag llama3 distributed benchmark: one step per rank vs its kernels alone",
                     f"heads_k_stride {hs}, batch {args.batch}, grad reduce {args.grad_reduce_dtype}",
                     "benchmark/benchmark_zigzag_distributed.py", argv)

    rows: List[Dict[str, str]] = []
    status = 0
    for seqlen in args.seqlens:
        if seqlen % (2 * world):
            say(f"error: --seqlens {seqlen} is not a multiple of 2 * world_size = {2 * world}")
            status = 1
            continue
        inp = build_inputs(seqlen, args, cfg, dtype, device, world, rank)
        for impl in args.impls:
            for pass_name in args.passes:
                def build(impl=impl, pass_name=pass_name) -> Case:
                    return Case(make_step(inp, impl, pass_name, hs, reduce_dtype, None),
                                make_kernels(inp, impl, pass_name, hs, reduce_dtype, world, rank),
                                rank_pairs(seqlen, args.batch, world, rank))

                timed = time_on_every_rank(build, args, device, world, say, f"seqlen {seqlen}, {impl}, {pass_name}")
                if timed is None or rank != 0:
                    continue

                def fields(r: int, impl=impl, pass_name=pass_name) -> Dict[str, str]:
                    return dict(run_fields(env, world, r, args, seqlen), batch=str(args.batch),
                                heads_k_stride=str(hs), impl=impl, **{"pass": pass_name})

                my_rows, table = rank_report(timed[1], cfg, pass_name, fields)
                rows.extend(my_rows)
                c = seqlen // (2 * world)
                say(f"\nseqlen {seqlen} x batch {args.batch} (chunks of {c}), impl {impl}, pass {pass_name}:")
                say(table)
        del inp
        if on_gpu:
            torch.cuda.empty_cache()
    gb.finish_distributed_run(run, status, args.csv, rows, CSV_COLUMNS)  # does not return
    return status


if __name__ == "__main__":
    sys.exit(main())
