#!/usr/bin/env python
"""Every context-parallel scheme: one training step per rank, communication included, against the
same rank's attention kernels alone.

Usage (launch with torchrun; one process per GPU, NCCL):

    torchrun --nproc_per_node=1 benchmark/benchmark_cp_distributed.py          # one GPU: N = 1
    torchrun --nproc_per_node=8 benchmark/benchmark_cp_distributed.py --seqlens 65536 131072 \\
        --csv benchmark/results/cp_distributed.csv
    torchrun --nproc_per_node=8 benchmark/benchmark_cp_distributed.py --schemes hybrid --ulysses-degree 4
    # smoke test without GPUs (gloo, CPU backend, tiny sizes; the numbers mean nothing):
    torchrun --nproc_per_node=2 benchmark/benchmark_cp_distributed.py --device cpu

Schemes (--schemes; one causal sequence of --seqlens tokens, sharded as each scheme's layout
wants): ``ring``, ``zigzag_ring``, ``stripe`` (ring attention, batched form), ``llama3``,
``zigzag_llama3`` (all-gather of K/V, fused kernel), ``ulysses`` (all-to-all over heads) and
``hybrid`` (all-to-all inside groups of ``--ulysses-degree`` ranks, ``--kv-scheme`` across; both
default to ``choose_hybrid_layout``'s pick for ``--ranks-per-node``, default the ranks on this
node). A scheme the shape does not fit (heads not divisible, lengths) is reported and skipped.

What is timed, per rank, for every (seqlen, scheme, pass):

* step: the scheme's public function on the rank's shard, forward (``fwd``) or forward +
  backward (``fwd_bwd``): its communication (ring P2P, all-gathers and reduce-scatters,
  all-to-alls), the reorders and merges, and the attention kernels. Ranks run it in lockstep.
* kernels: the same rank's attention kernel calls alone, as the step issues them (same calls,
  shapes and masks), on data that is already where the kernels need it: no communication, no
  reorder, no merge. For the hybrid: the scheme across on the rank's head shard.

``ratio = step / kernels``: 1.0 means communication and data movement are hidden behind the
kernels. TFLOPS count the rank's own unmasked (q, k) pairs the FlashAttention way (fwd
4 * D * Hq * pairs, fwd_bwd 3.5x). Timing: CUDA events on GPUs, a host timer on CPU; --warmup
calls, then the median of --num-runs. Rank 0 prints one table per (seqlen, scheme, pass) with
every rank's row and appends the rows to --csv. A pass the library cannot run
(NotImplementedError) is reported and skipped.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import benchmark_grouped_attention as gb  # noqa: E402
import benchmark_zigzag_distributed as zd  # noqa: E402  (CONFIGS, the zigzag llama3 kernels, the timing)

SCHEMES = ("ring", "zigzag_ring", "stripe", "llama3", "zigzag_llama3", "ulysses", "hybrid")
PASSES = ("fwd", "fwd_bwd")
CSV_COLUMNS = ("device", "torch", "backend", "world_size", "rank", "config", "dtype", "seqlen", "scheme", "mesh",
               "heads_k_stride", "pass", "step_ms", "kernels_ms", "ratio", "step_tflops", "kernels_tflops")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Every CP scheme: step vs kernels alone per rank (launch with torchrun)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default cuda if available")
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES), help="default: all")
    p.add_argument("--seqlens", type=int, nargs="+", default=None,
                   help="global sequence lengths (multiples of 2 * world_size); default 16384 65536 on cuda, 64 on cpu")
    p.add_argument("--config", choices=sorted(zd.CONFIGS), default=None, help="default llama3-8b on cuda, tiny on cpu")
    p.add_argument("--dtype", choices=zd.DTYPES, default=None, help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES), help="default: both")
    p.add_argument("--heads-k-stride", type=int, default=None,
                   help="KV heads per all-gather slice / all-to-all chunk (default Hk / 2, capped to what divides)")
    p.add_argument("--ulysses-degree", type=int, default=None, help="hybrid: ranks per all-to-all group")
    p.add_argument("--kv-scheme", choices=("zigzag_llama3", "llama3", "zigzag_ring"), default=None,
                   help="hybrid: the scheme across the KV groups")
    p.add_argument("--ranks-per-node", type=int, default=None, help="for choose_hybrid_layout (default LOCAL_WORLD_SIZE)")
    p.add_argument("--num-runs", type=int, default=None, help="timed calls (median); default 20 on cuda, 3 on cpu")
    p.add_argument("--warmup", type=int, default=None, help="default 5 on cuda, 1 on cpu")
    p.add_argument("--csv", default=None, help="append one row per (rank, seqlen, scheme, pass) to this CSV (rank 0)")
    return p.parse_args(argv)


def _divisor_at_most(n: int, want: int) -> int:
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(want, 1))


def rank_pairs(scheme: str, seqlen: int, world: int, rank: int, kv_degree: int = 1, kv_rank: int = 0,
               kv_scheme: str = "zigzag_llama3") -> int:
    """Unmasked causal (q, k) pairs of one rank's queries (all heads of the scheme's call counted
    as the model's Hq: Ulysses and the hybrid compute Hq / U heads, so their pairs are divided)."""
    T = seqlen // world
    if scheme in ("ring", "llama3"):  # rows [r T, (r+1) T)
        return T * rank * T + T * (T + 1) // 2
    if scheme == "stripe":  # rows r, r + N, ...
        return world * T * (T - 1) // 2 + T * (rank + 1)
    if scheme in ("zigzag_ring", "zigzag_llama3"):
        return zd.rank_pairs(seqlen, 1, world, rank)
    if scheme == "ulysses":  # whole sequence on Hq / N heads
        return (seqlen * (seqlen + 1) // 2) // world
    # hybrid: the KV scheme's rank pairs over K ranks on Hq / U heads
    U = world // kv_degree
    return rank_pairs(kv_scheme, seqlen, kv_degree, kv_rank) // U


Case = zd.Case  # one scheme's step and kernels-alone functions for one (seqlen, pass) on this rank


def _randn(shape, dtype, device, gen):
    import torch

    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)


def _autograd_step(fn: Callable[..., object], tensors, dout, backward: bool) -> Callable[[], None]:
    leaves = [t.detach().requires_grad_(backward) for t in tensors]

    def step():
        out = fn(*leaves)
        if backward:
            out.backward(dout)

    return step


# ---- ring attention (ring, zigzag_ring, stripe) -------------------------------------------------------


def ring_case(scheme: str, seqlen: int, cfg, dtype, device, world: int, rank: int, backward: bool, group,
              gen) -> Case:
    import torch

    import ring_flash_attn as rfa
    from ring_flash_attn import ops
    from ring_flash_attn.cp import ring_engine as re
    from ring_flash_attn.cp.ring import RING_LAYOUT
    from ring_flash_attn.cp.stripe import STRIPE_LAYOUT
    from ring_flash_attn.cp.zigzag_ring import ZIGZAG_LAYOUT

    layout = {"ring": RING_LAYOUT, "zigzag_ring": ZIGZAG_LAYOUT, "stripe": STRIPE_LAYOUT}[scheme]
    fn = {"ring": rfa.ring_flash_attn_func, "zigzag_ring": rfa.zigzag_ring_flash_attn_func,
          "stripe": rfa.stripe_flash_attn_func}[scheme]
    T, Hq, Hk, D = seqlen // world, cfg.num_heads_q, cfg.num_heads_k, cfg.head_dim
    q, dout = (_randn((1, T, Hq, D), dtype, device, gen) for _ in range(2))
    k, v = (_randn((1, T, Hk, D), dtype, device, gen) for _ in range(2))
    step = _autograd_step(lambda q_, k_, v_: fn(q_, k_, v_, causal=True, group=group), (q, k, v), dout, backward)

    # kernels alone: the engine's per-step blocks on the local K/V (no transfer, no merge)
    q3, k3, v3, do3 = q[0], k[0], v[0], dout[0]
    cu = torch.tensor([0, T], dtype=torch.int32, device=device)
    plan = re._make_plan(layout, q3, cu, T, None, True, False, None, world, rank)
    kv = torch.stack([k3, v3])
    # The engine's own kernel calls of each step (K/V block of rank (rank - s) % world held).
    tasks = [[(qn, kn, causal, features, (rank - s) % world) for qn, kn, causal, features
              in re._step_calls(plan, s, (rank - s) % world)] for s in range(world)]
    out, lse = re._block_fwd(plan, q3, kv, "all", "all", True, rank, {})  # out / LSE for the backward calls

    def kernels():
        for step_tasks in tasks:
            for qn, kn, causal, features, src in step_tasks:
                re._block_fwd(plan, q3, kv, qn, kn, causal, src, features)
        if backward:
            for step_tasks in tasks:
                for qn, kn, causal, _features, _src in step_tasks:
                    qr, kr = plan.rows[qn], plan.rows[kn]
                    ops.grouped_bwd([qr.take(do3)], [qr.take(q3)], kr.take(kv[0]), kr.take(kv[1]), [qr.take(out)],
                                    [qr.take(lse, 1).contiguous()], [qr.cu], kr.cu, [None], [qr.max_seqlen],
                                    kr.max_seqlen, plan.scale, causal, False)

    return Case(step, kernels, rank_pairs(scheme, seqlen, world, rank))


# ---- all-gather schemes ------------------------------------------------------------------------------------


def llama3_case(seqlen: int, cfg, dtype, device, world: int, rank: int, backward: bool, hs: int, group,
                gen) -> Case:
    import torch

    import ring_flash_attn as rfa
    from ring_flash_attn import ops

    T, Hq, Hk, D = seqlen // world, cfg.num_heads_q, cfg.num_heads_k, cfg.head_dim
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=device)
    cu_q, cu_k, max_q, max_k, k_slice = rfa.llama3_flash_attn_prepare_cu_seqlens(cu, True, rank, world)
    q, dout = (_randn((T, Hq, D), dtype, device, gen) for _ in range(2))
    k, v = (_randn((T, Hk, D), dtype, device, gen) for _ in range(2))
    step = _autograd_step(lambda q_, k_, v_: rfa.llama3_flash_attn_varlen_func(
        q_, k_, v_, cu_q, cu_k, max_q, max_k, hs, k_slice, causal=True, group=group), (q, k, v), dout, backward)
    k_glob, v_glob = (_randn((seqlen, Hk, D), dtype, device, gen) for _ in range(2))
    hq = Hq // Hk * hs
    out = torch.empty_like(q)
    lse = torch.empty((Hk // hs, hq, T), dtype=torch.float32, device=device)
    dq = torch.empty_like(q)
    dkv = torch.empty((seqlen, 2, hs, D), dtype=dtype, device=device)

    def kernels():
        for s in range(Hk // hs):
            qsl, ksl = slice(s * hq, (s + 1) * hq), slice(s * hs, (s + 1) * hs)
            ops.fwd_into([q[:, qsl]], k_glob[k_slice, ksl], v_glob[k_slice, ksl], [cu_q], cu_k, [None], [max_q], max_k,
                         0.0, True, [out[:, qsl]], [lse[s]])
        if backward:
            for s in range(Hk // hs):
                qsl, ksl = slice(s * hq, (s + 1) * hq), slice(s * hs, (s + 1) * hs)
                ops.bwd_into([dout[:, qsl]], [q[:, qsl]], k_glob[k_slice, ksl], v_glob[k_slice, ksl], [out[:, qsl]],
                             [lse[s]], [cu_q], cu_k, [None], [max_q], max_k, 0.0, True, False, [dq[:, qsl]],
                             dkv[k_slice, 0], dkv[k_slice, 1])

    return Case(step, kernels, rank_pairs("llama3", seqlen, world, rank), hs=hs)


def zigzag_llama3_case(seqlen: int, cfg, dtype, device, world: int, rank: int, backward: bool, hs: int, group,
                       args) -> Case:
    inp = zd.build_inputs(seqlen, args, cfg, dtype, device, world, rank)
    pass_name = "fwd_bwd" if backward else "fwd"
    step = zd.make_step(inp, "fused", pass_name, hs, None, group)
    kernels = zd.make_kernels(inp, "fused", pass_name, hs, None, world, rank)
    return Case(step, kernels, zd.rank_pairs(seqlen, 1, world, rank), hs=hs)


# ---- all-to-all schemes ---------------------------------------------------------------------------------


def ulysses_case(seqlen: int, cfg, dtype, device, world: int, rank: int, backward: bool, hs: int, group,
                 gen) -> Case:
    import torch

    import ring_flash_attn as rfa
    from ring_flash_attn import ops
    from ring_flash_attn.cp.all_to_all import check_head_split

    T, Hq, Hk, D = seqlen // world, cfg.num_heads_q, cfg.num_heads_k, cfg.head_dim
    check_head_split(Hq, Hk, world)
    hk_loc, hq_loc = max(Hk, world) // world, Hq // world
    chunk = _divisor_at_most(hk_loc, hs)
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=device)
    meta = rfa.ulysses_prepare_cu_seqlens(cu, True, rank, world, max_seqlen=seqlen)
    q, dout = (_randn((T, Hq, D), dtype, device, gen) for _ in range(2))
    k, v = (_randn((T, Hk, D), dtype, device, gen) for _ in range(2))
    step = _autograd_step(lambda q_, k_, v_: rfa.ulysses_flash_attn_varlen_func(
        q_, k_, v_, *meta[:4], chunk, meta[4], causal=True, group=group), (q, k, v), dout, backward)
    # kernels alone: each chunk's whole-sequence attention on the rank's head shard
    q_h, do_h, out_h, dq_h = (_randn((seqlen, hq_loc, D), dtype, device, gen) for _ in range(4))
    k_h, v_h = (_randn((seqlen, hk_loc, D), dtype, device, gen) for _ in range(2))
    dk_h, dv_h = torch.empty_like(k_h), torch.empty_like(v_h)
    hq_c = chunk * hq_loc // hk_loc
    lse = torch.empty((hk_loc // chunk, hq_c, seqlen), dtype=torch.float32, device=device)

    def kernels():
        for c in range(hk_loc // chunk):
            qs, ks = slice(c * hq_c, (c + 1) * hq_c), slice(c * chunk, (c + 1) * chunk)
            ops.fwd_into([q_h[:, qs]], k_h[:, ks], v_h[:, ks], [cu], cu, [None], [seqlen], seqlen, 0.0, True,
                         [out_h[:, qs]], [lse[c]])
            if backward:
                ops.bwd_into([do_h[:, qs]], [q_h[:, qs]], k_h[:, ks], v_h[:, ks], [out_h[:, qs]], [lse[c]], [cu], cu,
                             [None], [seqlen], seqlen, 0.0, True, False, [dq_h[:, qs]], dk_h[:, ks], dv_h[:, ks])

    return Case(step, kernels, rank_pairs("ulysses", seqlen, world, rank), hs=chunk)


def hybrid_case(seqlen: int, cfg, dtype, device, world: int, rank: int, backward: bool, hs: int, mesh, args,
                gen) -> Case:
    import torch

    import ring_flash_attn as rfa

    U, K = mesh.ulysses_degree, mesh.kv_degree
    Hq, Hk, D = cfg.num_heads_q, cfg.num_heads_k, cfg.head_dim
    hk_loc, hq_loc = max(Hk, U) // U, Hq // U
    inner_hs = _divisor_at_most(hk_loc, hs)
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=device)
    meta = rfa.hybrid_prepare_cu_seqlens(cu, True, rank, mesh, max_seqlen=seqlen)
    T = seqlen // world
    q, dout = (_randn((T, Hq, D), dtype, device, gen) for _ in range(2))
    k, v = (_randn((T, Hk, D), dtype, device, gen) for _ in range(2))
    step = _autograd_step(lambda q_, k_, v_: rfa.hybrid_flash_attn_varlen_func(
        q_, k_, v_, *meta[:4], inner_hs, meta[4], causal=True, group=mesh), (q, k, v), dout, backward)
    # kernels alone: the scheme across, on this rank's head shard (Hq / U query heads) over K ranks
    sub = gb.ModelConfig("head shard", "head shard", hq_loc, hk_loc, D)
    kv_scheme = mesh.layout.kv_scheme
    if kv_scheme == "zigzag_ring":
        inner = ring_case("zigzag_ring", seqlen, sub, dtype, device, K, mesh.kv_rank, backward, None, gen)
    elif kv_scheme == "llama3":
        inner = llama3_case(seqlen, sub, dtype, device, K, mesh.kv_rank, backward, inner_hs, None, gen)
    else:
        inner = zigzag_llama3_case(seqlen, sub, dtype, device, K, mesh.kv_rank, backward, inner_hs, None, args)
    return Case(step, inner.kernels, rank_pairs("hybrid", seqlen, world, rank, K, mesh.kv_rank, kv_scheme),
                mesh=f"{U}x{K} {kv_scheme}", hs=inner_hs)


# ---- driver --------------------------------------------------------------------------------------------


def _fits(scheme: str, seqlen: int, cfg, world: int, mesh) -> Optional[str]:
    """Why the scheme cannot run this shape, or None."""
    if seqlen % (2 * world):
        return f"seqlen {seqlen} is not a multiple of 2 * world_size = {2 * world}"
    if scheme == "ulysses":
        from ring_flash_attn.cp.all_to_all import check_head_split

        try:
            check_head_split(cfg.num_heads_q, cfg.num_heads_k, world)
        except ValueError as e:
            return str(e)
    if scheme == "hybrid" and mesh is None:
        return "no mesh (see above)"
    return None


def _make_mesh(args, cfg, world: int, say):
    import ring_flash_attn as rfa

    per_node = args.ranks_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    layout = rfa.choose_hybrid_layout(cfg.num_heads_q, cfg.num_heads_k, world, per_node)
    U = args.ulysses_degree or layout.ulysses_degree
    kv_scheme = args.kv_scheme or layout.kv_scheme
    try:
        mesh = rfa.hybrid_mesh(U, kv_scheme=kv_scheme)
    except ValueError as e:
        say(f"hybrid: no mesh: {e}")
        return None
    say(f"hybrid mesh: ulysses_degree {mesh.ulysses_degree} x kv_degree {mesh.kv_degree}, {kv_scheme} across "
        f"(choose_hybrid_layout for {per_node} ranks per node: {layout.ulysses_degree}x{layout.kv_degree} "
        f"{layout.kv_scheme})")
    return mesh


def _fill_defaults(args: argparse.Namespace, on_gpu: bool) -> None:
    """The defaults that depend on the device: zigzag_distributed's, and its sequence lengths."""
    if args.seqlens is None:
        args.seqlens = [16384, 65536] if on_gpu else [64]
    zd._fill_defaults(args, on_gpu)
    args.batch = 1  # zd.build_inputs reads it


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch

    args = parse_args(argv)
    started = zd.start_model_run(args, _fill_defaults, master_port="29522")
    if started is None:
        return gb.EXIT_NO_GPU
    run, cfg, hs = started
    on_gpu, device, rank, world, dtype, env, say = run
    zd.say_model_header(run, args, cfg, "Context-parallel schemes, distributed: one step per rank vs its kernels alone",
                        f"causal, heads_k_stride {hs}", "benchmark/benchmark_cp_distributed.py", argv)
    mesh = _make_mesh(args, cfg, world, say) if "hybrid" in args.schemes else None

    rows: List[Dict[str, str]] = []
    for seqlen in args.seqlens:
        for scheme in args.schemes:
            why = _fits(scheme, seqlen, cfg, world, mesh)
            if why is not None:
                say(f"\nseqlen {seqlen}, {scheme}: skipped ({why})")
                continue
            for pass_name in args.passes:
                backward = pass_name == "fwd_bwd"
                gen = torch.Generator(device=device).manual_seed(1234 + rank)

                def build(scheme=scheme, backward=backward, gen=gen) -> Case:
                    if scheme in ("ring", "zigzag_ring", "stripe"):
                        return ring_case(scheme, seqlen, cfg, dtype, device, world, rank, backward, None, gen)
                    if scheme == "llama3":
                        return llama3_case(seqlen, cfg, dtype, device, world, rank, backward, hs, None, gen)
                    if scheme == "zigzag_llama3":
                        return zigzag_llama3_case(seqlen, cfg, dtype, device, world, rank, backward, hs, None, args)
                    if scheme == "ulysses":
                        return ulysses_case(seqlen, cfg, dtype, device, world, rank, backward, hs, None, gen)
                    return hybrid_case(seqlen, cfg, dtype, device, world, rank, backward, hs, mesh, args, gen)

                label = f"seqlen {seqlen}, {scheme}, {pass_name}"
                timed = zd.time_on_every_rank(build, args, device, world, say, label)
                if timed is None:
                    continue
                case, per_rank = timed
                if rank == 0:
                    def fields(r: int, scheme=scheme, pass_name=pass_name, case=case) -> Dict[str, str]:
                        return dict(zd.run_fields(env, world, r, args, seqlen), scheme=scheme, mesh=case.mesh,
                                    heads_k_stride=str(case.hs), **{"pass": pass_name})

                    case_rows, table = zd.rank_report(per_rank, cfg, pass_name, fields)
                    rows.extend(case_rows)
                    what = f", mesh {case.mesh}" if case.mesh else ""
                    say(f"\nseqlen {seqlen}, {scheme}{what}, pass {pass_name}:")
                    say(table)
                del case, timed
                if on_gpu:
                    torch.cuda.empty_cache()
    gb.finish_distributed_run(run, 0, args.csv, rows, CSV_COLUMNS)  # does not return
    return 0


if __name__ == "__main__":
    sys.exit(main())
