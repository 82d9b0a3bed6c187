#!/usr/bin/env python
"""Link rates of the collectives the context-parallel schemes use, for scripts/scaling_model.py.

Usage (torchrun; one process per GPU, NCCL):

    torchrun --nproc_per_node=8 benchmark/benchmark_collectives.py --json benchmark/results/links.json
    python scripts/scaling_model.py --measured-links benchmark/results/links.json
    # smoke test without GPUs (gloo; the numbers mean nothing):
    torchrun --nproc_per_node=2 benchmark/benchmark_collectives.py --device cpu --sizes-mb 1

Per collective and per-rank buffer size (bf16): ``all_gather`` (``all_gather_into_tensor``),
``reduce_scatter`` (``reduce_scatter_tensor``), ``all_to_all`` (``all_to_all_single``) and ``p2p``
(every rank sends its buffer to rank + 1 and receives from rank - 1 with ``batch_isend_irecv``,
as the ring schemes do). Reported: the median time of --num-runs calls (CUDA events) and the BUS
bandwidth per GPU, the bytes each GPU sends per second: (N-1)/N x the gathered / scattered /
exchanged size for the three collectives (nccl-tests' convention), the buffer for p2p. That is
the quantity the scaling model divides its per-GPU bytes by.

--json writes, for the largest size, ``{"<collective>_<scope>": GB/s, ...}`` plus the run's
facts; scope is ``intra`` when every rank is on one node (LOCAL_WORLD_SIZE == WORLD_SIZE), else
``inter`` (a collective over several nodes runs at the pace of the links between them). With one
rank there is nothing to measure: the script says so and writes no rates.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Callable, Optional, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import benchmark_grouped_attention as gb  # noqa: E402

COLLECTIVES = ("all_gather", "reduce_scatter", "all_to_all", "p2p")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Collective link rates for the scaling model (launch with torchrun)")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default cuda if available")
    p.add_argument("--sizes-mb", type=float, nargs="+", default=None,
                   help="per-rank buffer sizes in MB (default 8 64 256 on cuda, 1 on cpu)")
    p.add_argument("--collectives", nargs="+", choices=COLLECTIVES, default=list(COLLECTIVES), help="default: all")
    p.add_argument("--num-runs", type=int, default=None, help="timed calls (median); default 20 on cuda, 3 on cpu")
    p.add_argument("--warmup", type=int, default=None, help="default 5 on cuda, 1 on cpu")
    p.add_argument("--json", default=None, help="write the largest size's bus bandwidths here (rank 0)")
    return p.parse_args(argv)


def bus_bytes(collective: str, buffer_bytes: int, world: int) -> float:
    """Bytes each GPU sends in one call with a per-rank buffer of ``buffer_bytes``."""
    if collective == "p2p":
        return float(buffer_bytes)
    if collective == "all_gather":  # it receives (N-1) buffers and sends as much
        return float(buffer_bytes) * (world - 1)
    return float(buffer_bytes) * (world - 1) / world  # reduce_scatter of / all-to-all of one buffer


def make_call(collective: str, numel: int, device, world: int, rank: int) -> Callable[[], None]:
    import torch
    import torch.distributed as dist

    x = torch.randn(numel, device=device, dtype=torch.float32).to(torch.bfloat16)
    if collective == "all_gather":
        out = torch.empty(numel * world, device=device, dtype=x.dtype)
        return lambda: dist.all_gather_into_tensor(out, x)
    if collective == "reduce_scatter":
        out = torch.empty(numel // world, device=device, dtype=x.dtype)
        return lambda: dist.reduce_scatter_tensor(out, x)
    if collective == "all_to_all":
        out = torch.empty_like(x)
        return lambda: dist.all_to_all_single(out, x)
    recv = torch.empty_like(x)

    def p2p():
        ops = [dist.P2POp(dist.isend, x, (rank + 1) % world), dist.P2POp(dist.irecv, recv, (rank - 1) % world)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    return p2p


def time_call(fn: Callable[[], None], runs: int, warmup: int, device) -> float:
    """Median ms (CUDA events on a GPU, host timer on CPU), ranks in lockstep."""
    import torch.distributed as dist

    for _ in range(warmup):
        fn()
    dist.barrier()
    return gb.median_call_ms(fn, runs, device)


def main(argv: Optional[Sequence[str]] = None) -> int:
    import torch
    import torch.distributed as dist

    args = parse_args(argv)
    on_gpu = gb.distributed_on_gpu(args.device)
    if on_gpu is None:
        return gb.EXIT_NO_GPU
    sizes = sorted(args.sizes_mb or ([8, 64, 256] if on_gpu else [1]))
    runs = args.num_runs or (20 if on_gpu else 3)
    warmup = args.warmup if args.warmup is not None else (5 if on_gpu else 1)
    device = gb.init_distributed(on_gpu, master_port="29521")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    scope = "intra" if local == world else "inter"
    env = gb.distributed_environment(device, on_gpu)
    say = gb.rank0_printer(rank)
    say(f"Collective link rates: world_size {world} ({local} per node, scope {scope}), {env['device']} "
        f"({env['backend']}), torch {env['torch']}; {datetime.datetime.now():%Y-%m-%d %H:%M:%S}")
    if world == 1:
        say("one rank: no link to measure (run with --nproc_per_node >= 2); no rates written")
        gb.finish_distributed(0)
        return 0
    say(f"median of {runs} after {warmup} warm-up; bus GB/s = bytes each GPU sends per second")
    rows, rates = [], {}
    for collective in args.collectives:
        for mb in sizes:
            numel = max(world, int(mb * 1e6 / 2) // world * world)  # bf16, divisible by the world size
            fn = make_call(collective, numel, device, world, rank)
            ms = time_call(fn, runs, warmup, device)
            t = torch.tensor([ms], dtype=torch.float64, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's
            ms = t.item()
            gbps = bus_bytes(collective, numel * 2, world) / (ms * 1e-3) / 1e9
            rows.append([collective, f"{numel * 2 / 1e6:.1f}", f"{ms:.3f}", f"{gbps:.1f}"])
            rates[f"{collective}_{scope}"] = round(gbps, 2)  # the largest size wins (sizes ascending)
            del fn
    say(gb.box_table(["Collective", "Buffer MB per rank", "Time (ms)", "Bus GB/s per GPU"], rows,
                     ["l", "r", "r", "r"]))
    if rank == 0 and args.json:
        facts = {"device": env["device"], "backend": env["backend"], "world_size": world, "per_node": local,
                 "date": f"{datetime.datetime.now():%Y-%m-%d}", "buffer_mb": max(sizes)}
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({**rates, "facts": facts}, f, indent=1)
        say(f"wrote {args.json}")
    gb.finish_distributed(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
