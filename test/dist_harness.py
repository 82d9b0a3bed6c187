"""Runs a worker in N gloo processes once per world size and collects each rank's JSON results
(shared by the context-parallel CPU tests: test_zigzag_cpu.py, test_ring_variants_cpu.py).

The worker is called as worker(rank, world_size, port, seed, out_dir) and must write
out_dir/rank{rank}.json, whatever happens (exceptions go into the JSON, not out of the process)."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Callable, Dict, List

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_collect(worker: Callable, world_size: int, seed: int, out_dir: str, timeout_s: float) -> List[dict]:
    """Spawns `world_size` processes of `worker`, waits at most `timeout_s`, returns per-rank results."""
    import torch.multiprocessing as mp

    os.makedirs(out_dir, exist_ok=True)
    ctx = mp.spawn(worker, args=(world_size, free_port(), seed, out_dir), nprocs=world_size, join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world_size} gloo processes did not finish in {timeout_s} s")
    per_rank = []
    for r in range(world_size):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            per_rank.append(json.load(f))
    return per_rank


class CachedSpawns:
    """One spawn per world size per test session; later tests reuse its results."""

    def __init__(self, worker: Callable, seed: int, name: str, timeout_s: float):
        self.worker, self.seed, self.name, self.timeout_s = worker, seed, name, timeout_s
        self._results: Dict[int, List[dict]] = {}

    def __call__(self, world_size: int, tmp_root: str) -> List[dict]:
        if world_size not in self._results:
            out_dir = os.path.join(tmp_root, f"{self.name}_w{world_size}")
            self._results[world_size] = spawn_and_collect(self.worker, world_size, self.seed, out_dir,
                                                          self.timeout_s)
        return self._results[world_size]
