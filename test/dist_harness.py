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
import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max(1, max |ref|) in float64; inf for a shape mismatch, NaN if x has a NaN."""
    x, ref = x.detach().double(), ref.detach().double()
    if x.shape != ref.shape:
        return float("inf")
    if torch.isnan(x).any():
        return float("nan")
    if x.numel() == 0:
        return 0.0
    return (x - ref).abs().max().item() / max(1.0, ref.abs().max().item())


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


def run_cases(cases: List[dict], run_case: Callable, seed: int, rank: int, world_size: int) -> Dict[str, dict]:
    """run_case(case, seed + i, rank, world_size) for every case; an exception is recorded (as its
    traceback) under the case's id instead of stopping the others."""
    import traceback

    results = {}
    for i, case in enumerate(cases):
        try:
            results[case["id"]] = run_case(case, seed + i, rank, world_size)
        except Exception:  # noqa: BLE001 - reported per case
            results[case["id"]] = {"exception": traceback.format_exc()}
    return results


def assert_case_within(per_rank: List[dict], case: dict, quantities, tol: float, seed: int) -> None:
    """Every rank ran `case` without an exception and each of its `quantities` (relative errors)
    is at most `tol`."""
    world_size = len(per_rank)
    for r, res in enumerate(per_rank):
        got = res["cases"][case["id"]]
        assert "exception" not in got, f"rank {r} of {world_size} (seed {seed}):\n{got.get('exception')}"
        for name in quantities:
            err = got[name]
            assert err <= tol, (f"rank {r} of {world_size}, case {case['id']} (seed {seed}): {name} "
                                f"max|err| / max(1, max|ref|) = {err:.3e} > {tol:.1e}")


class NoHostReads:
    """Reading a tensor value into Python (``.item()``, ``.tolist()``, ``bool()/int()/float()``,
    ``.numpy()``) raises, and `module`'s host-side metadata checks are off: what is left is the hot
    path, which must not read a value (on CUDA each such read is a device-to-host sync)."""

    _METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        import torch

        self._saved = {m: getattr(torch.Tensor, m) for m in self._METHODS}
        for m in self._METHODS:
            def refuse(*args, _m=m, **kwargs):
                raise AssertionError(f"host read of a tensor value in the hot path: Tensor.{_m}")
            setattr(torch.Tensor, m, refuse)
        self._checks = self.module.metadata_checks_enabled
        self.module.metadata_checks_enabled = lambda device: False
        return self

    def __exit__(self, *exc):
        import torch

        for m, f in self._saved.items():
            setattr(torch.Tensor, m, f)
        self.module.metadata_checks_enabled = self._checks
        return False
