"""Runs a worker in N gloo processes once per world size and collects each rank's JSON results
(shared by the context-parallel CPU tests: test_zigzag_cpu.py, test_ring_variants_cpu.py, ...).

The worker is called as worker(rank, world_size, port, seed, out_dir) and must write
out_dir/rank{rank}.json, whatever happens (exceptions go into the JSON, not out of the process);
finish_rank() writes it and tears the process group down in a safe order.

Each rank's stdout and stderr (native output included: gloo's messages, std::terminate's) go to
out_dir/rank{rank}.log, with Python's faulthandler dumping every thread's stack there on a fatal
signal (SIGABRT, SIGSEGV, ...) and on SIGUSR1. When a rank fails, aborts, or leaves no JSON, or
the ranks time out, the test fails with each rank's exit code and the end of its log."""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import pytest
import torch

# How much of each rank's log a failure report shows.
_LOG_TAIL_LINES = 80


def rel_err(x: torch.Tensor, ref: torch.Tensor, floor: float = 1.0) -> float:
    """max |x - ref| / max(floor, max |ref|) in float64; inf for a shape mismatch, NaN if x has a
    NaN, 0 for empty tensors."""
    x, ref = x.detach().double(), ref.detach().double()
    if x.shape != ref.shape:
        return float("inf")
    if torch.isnan(x).any():
        return float("nan")
    if x.numel() == 0:
        return 0.0
    return (x - ref).abs().max().item() / max(floor, ref.abs().max().item())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def package_env() -> Dict[str, str]:
    """A copy of os.environ whose PYTHONPATH starts with the directory holding the imported
    ring_flash_attn package, so that a child Python process imports the same package."""
    import ring_flash_attn as rfa

    env = dict(os.environ)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(rfa.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([package_root] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def assert_exit_status(r: subprocess.CompletedProcess, expected: int, stdout_tail: int = 4000,
                       stderr_tail: int = 3000) -> None:
    """Fails unless r exited with `expected`, showing the end of its stdout and stderr."""
    assert r.returncode == expected, \
        f"exit {r.returncode}\nstdout:\n{r.stdout[-stdout_tail:]}\nstderr:\n{r.stderr[-stderr_tail:]}"


def torchrun(script: str, args: List[str], nproc: int, timeout_s: float,
             stdout_tail: int = 4000) -> subprocess.CompletedProcess:
    """Runs `script args` under torch.distributed.run with nproc local processes on a free port,
    fails unless it exits 0, and returns the finished process (text stdout and stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", script, *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=package_env())
    assert_exit_status(r, 0, stdout_tail=stdout_tail)
    return r


def run_as_single_rank(script: str, timeout_s: float) -> subprocess.CompletedProcess:
    """Runs a Python script as rank 0 of a world of 1 (the variables torch.distributed.run would
    set, a free port) and returns the finished process without judging its exit status."""
    env = package_env()
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    return subprocess.run([sys.executable, script], capture_output=True, text=True, timeout=timeout_s, env=env)


def verdict_lines(stdout: str) -> List[str]:
    """The lines of a torchrun test script's output that give a case's verdict ("PASS ..." or
    "FAIL ...")."""
    return [ln for ln in stdout.splitlines() if ln.startswith(("PASS ", "FAIL "))]


def assert_every_case_passes(script: str, cases: int, nproc: int = 2, timeout_s: float = 180) -> str:
    """Runs a torchrun test script in its ``--device cpu`` mode on `nproc` gloo ranks: it exits 0,
    prints `cases` verdict lines, all PASS, and the summary "<cases> PASS / 0 FAIL (world_size
    <nproc>". Returns its stdout."""
    r = torchrun(script, ["--device", "cpu"], nproc=nproc, timeout_s=timeout_s)
    lines = verdict_lines(r.stdout)
    assert len(lines) == cases and all(ln.startswith("PASS ") for ln in lines), r.stdout[-4000:]
    assert f"{cases} PASS / 0 FAIL (world_size {nproc}" in r.stdout
    return r.stdout


def run_failing_driver(tmp_path, source: str, timeout_s: float = 120) -> str:
    """Writes `source` (dedented) to tmp_path/driver.py, runs it as rank 0 of a world of 1 and
    fails unless it exits with status 1 (a script's verdict that a case failed). Returns its
    stdout."""
    import textwrap

    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(source))
    r = run_as_single_rank(str(driver), timeout_s=timeout_s)
    assert_exit_status(r, 1)
    return r.stdout


def _log_path(out_dir: str, rank: int) -> str:
    return os.path.join(out_dir, f"rank{rank}.log")


def _rank_main(rank: int, worker: Callable, world_size: int, port: int, seed: int, out_dir: str) -> None:
    """The spawned process: output into the rank's log, fatal-signal stacks on, then the worker.
    An exception that escapes the worker is printed there with its traceback and re-raised.

    After the worker returns (its results written, its process group destroyed by finish_rank)
    the process ends with os._exit(0): nothing is left to run, and interpreter finalization with
    gloo's C++ threads and objects still alive is a known way for a PyTorch process to abort at
    exit (SIGABRT, "terminate called without an active exception") after all its work is done."""
    log = open(_log_path(out_dir, rank), "w", buffering=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log.fileno(), 1)  # native writes (gloo, libstdc++'s "terminate called ...") too
    os.dup2(log.fileno(), 2)
    faulthandler.enable(file=log, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)
    print(f"rank {rank} of {world_size}, pid {os.getpid()}, port {port}, seed {seed}", flush=True)
    try:
        worker(rank, world_size, port, seed, out_dir)
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        raise
    print(f"rank {rank}: worker returned", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def init_gloo_group(rank: int, world_size: int, port: int) -> None:
    """A worker's start: one CPU thread, then the gloo process group over 127.0.0.1:port (60 s
    collective timeout)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))


def finish_rank(rank: int, out_dir: str, results: dict) -> None:
    """The end of every worker, in its `finally`: writes out_dir/rank{rank}.json first (so the
    results survive whatever follows), then waits at a barrier until every rank is done with the
    process group, then destroys it. Without the barrier the first rank to finish tears down its
    gloo group (and, on rank 0, the TCP store) while a slower rank still talks to it; without
    destroy_process_group, gloo's worker threads are torn down at interpreter exit, which
    aborts the process ("terminate called without an active exception")."""
    import torch.distributed as dist

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    if not dist.is_initialized():
        return
    try:
        dist.barrier()
    except Exception:  # noqa: BLE001 - a peer is gone or stuck: still destroy the group
        print(f"rank {rank}: barrier before destroy_process_group failed:", file=sys.stderr)
        traceback.print_exc()
    finally:
        dist.destroy_process_group()


def _tail(path: str, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            text = f.readlines()
    except OSError as e:
        return f"(no log: {e})"
    cut = text[-lines:]
    head = f"(last {len(cut)} of {len(text)} lines)\n" if len(text) > lines else ""
    return head + "".join(cut)


def _failure_report(what: str, ctx, world_size: int, out_dir: str) -> str:
    parts = [f"{world_size} gloo processes: {what}"]
    for r, p in enumerate(ctx.processes):
        code = p.exitcode
        status = "running" if code is None else (f"killed by signal {-code} ({signal.Signals(-code).name})"
                                                 if code < 0 else f"exit code {code}")
        json_state = "wrote" if os.path.exists(os.path.join(out_dir, f"rank{r}.json")) else "did NOT write"
        parts.append(f"---- rank {r}: {status}; {json_state} rank{r}.json; log {_log_path(out_dir, r)}:\n"
                     + _tail(_log_path(out_dir, r)))
    return "\n".join(parts)


def _stop(ctx, grace_s: float = 3.0) -> None:
    """Dumps the stacks of the ranks still running into their logs (SIGUSR1), then kills them."""
    alive = [p for p in ctx.processes if p.is_alive()]
    for p in alive:
        try:
            os.kill(p.pid, signal.SIGUSR1)
        except OSError:
            pass
    time.sleep(grace_s if alive else 0)
    for p in alive:
        if p.is_alive():
            p.kill()
        p.join(5)


def spawn_and_collect(worker: Callable, world_size: int, seed: int, out_dir: str, timeout_s: float) -> List[dict]:
    """Spawns `world_size` processes of `worker`, waits at most `timeout_s`, returns per-rank results.
    Fails the test with every rank's exit code and log tail if a rank fails or aborts, leaves no
    JSON, or the ranks do not finish in time."""
    import torch.multiprocessing as mp

    os.makedirs(out_dir, exist_ok=True)
    for r in range(world_size):  # a leftover from an earlier run must not pass for this one's
        for name in (f"rank{r}.json", f"rank{r}.log"):
            if os.path.exists(os.path.join(out_dir, name)):
                os.remove(os.path.join(out_dir, name))
    ctx = mp.spawn(_rank_main, args=(worker, world_size, free_port(), seed, out_dir), nprocs=world_size,
                   join=False)
    deadline = time.monotonic() + timeout_s
    failure: Optional[str] = None
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                failure = f"did not finish in {timeout_s} s (stacks of the ranks still running are in their logs)"
                break
    except Exception as e:  # noqa: BLE001 - ProcessRaisedException / ProcessExitedException
        failure = f"a rank failed: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if failure is not None:
        _stop(ctx)
        pytest.fail(_failure_report(failure, ctx, world_size, out_dir), pytrace=False)
    missing = [r for r in range(world_size) if not os.path.exists(os.path.join(out_dir, f"rank{r}.json"))]
    if missing:
        pytest.fail(_failure_report(f"rank(s) {missing} exited without writing their results", ctx, world_size,
                                    out_dir), pytrace=False)
    per_rank = []
    for r in range(world_size):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            per_rank.append(json.load(f))
    return per_rank


class CachedSpawns:
    """One spawn per world size per test session; later tests reuse its results (or its failure,
    reported again without spawning again)."""

    def __init__(self, worker: Callable, seed: int, name: str, timeout_s: float):
        self.worker, self.seed, self.name, self.timeout_s = worker, seed, name, timeout_s
        self._results: Dict[int, List[dict]] = {}
        self._failures: Dict[int, str] = {}

    def __call__(self, world_size: int, tmp_root: str) -> List[dict]:
        if world_size in self._failures:
            pytest.fail(f"(the spawn shared by this test failed earlier)\n{self._failures[world_size]}",
                        pytrace=False)
        if world_size not in self._results:
            out_dir = os.path.join(tmp_root, f"{self.name}_w{world_size}")
            try:
                self._results[world_size] = spawn_and_collect(self.worker, world_size, self.seed, out_dir,
                                                              self.timeout_s)
            except pytest.fail.Exception as e:
                self._failures[world_size] = str(e)
                raise
        return self._results[world_size]

    def assert_each_rank(self, world_size: int, tmp_root: str, key: str, expected) -> None:
        """results[key] of every rank (an extra check's result: see record_check, a traceback when
        the check raised) equals `expected`, or ``expected(rank)`` when it is callable."""
        for r, res in enumerate(self(world_size, tmp_root)):
            want = expected(r) if callable(expected) else expected
            assert res[key] == want, f"rank {r} of {world_size}, {key}:\n got      {res[key]}\n expected {want}"


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


class CaseWorker:
    """The worker of a test module whose ranks run its cases: worker(rank, world_size, port, seed,
    out_dir) runs ``cases[world_size]`` through run_cases into results["cases"], then
    ``extra(rank, world_size, seed, results)`` when given (the module's own checks, adding keys to
    results), and always finishes with finish_rank. A class, not a closure: spawn pickles it."""

    def __init__(self, cases: Dict[int, List[dict]], run_case: Callable, extra: Optional[Callable] = None):
        self.cases, self.run_case, self.extra = cases, run_case, extra

    def __call__(self, rank: int, world_size: int, port: int, seed: int, out_dir: str) -> None:
        init_gloo_group(rank, world_size, port)
        results = {"cases": {}}
        try:
            results["cases"] = run_cases(self.cases[world_size], self.run_case, seed, rank, world_size)
            if self.extra is not None:
                self.extra(rank, world_size, seed, results)
        finally:
            finish_rank(rank, out_dir, results)


def case_params(cases: Dict[int, List[dict]]) -> list:
    """pytest parameters (world_size, case) of every case of every world size, with ids w<N>-<case id>."""
    return [pytest.param(ws, c, id=f"w{ws}-{c['id']}") for ws in sorted(cases) for c in cases[ws]]


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


class SpawnedCases(CachedSpawns):
    """The distributed cases of a test module: ``cases[world_size]`` run by a CaseWorker (with its
    `extra` checks) in one spawn per world size per session, each case's result the relative
    errors of `quantities`. params() gives the pytest parameters (world_size, case);
    assert_within(world_size, case, spawn_root) checks the case on every rank against tol[dtype]."""

    def __init__(self, name: str, cases: Dict[int, List[dict]], run_case: Callable, seed: int, timeout_s: float,
                 quantities, tol: Dict[str, float], extra: Optional[Callable] = None):
        super().__init__(CaseWorker(cases, run_case, extra), seed, name, timeout_s)
        self.cases, self.quantities, self.tol = cases, quantities, tol

    def params(self) -> list:
        return case_params(self.cases)

    def assert_within(self, world_size: int, case: dict, spawn_root: str) -> None:
        assert_case_within(self(world_size, spawn_root), case, self.quantities, self.tol[case["dtype"]], self.seed)


def record_check(results: dict, key: str, check: Callable[[], object]) -> None:
    """results[key] = check(), or the traceback of the exception it raised: a rank's extra check
    is reported by the test that reads it, not lost with the rank."""
    try:
        results[key] = check()
    except Exception:  # noqa: BLE001 - reported through the results
        results[key] = traceback.format_exc()


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
