"""dist_harness itself: when a spawned rank fails or aborts, the test failure shows that rank's own
error (its traceback, or the native message and faulthandler's stacks of an abort), not only
the parent's "process 1 terminated with signal SIGABRT"."""

from __future__ import annotations

import json
import os

import pytest

from dist_harness import spawn_and_collect


def _raising_worker(rank: int, world_size: int, port: int, seed: int, out_dir: str) -> None:
    if rank == 1:
        raise RuntimeError("rank one fails on purpose")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank}, f)


def _aborting_worker(rank: int, world_size: int, port: int, seed: int, out_dir: str) -> None:
    if rank == 1:
        print("rank one is about to abort", flush=True)
        os.abort()  # what std::terminate does, e.g. "terminate called without an active exception"
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank}, f)


def _silent_worker(rank: int, world_size: int, port: int, seed: int, out_dir: str) -> None:
    if rank == 0:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"rank": rank}, f)


def _report(worker, tmp_path) -> str:
    with pytest.raises(pytest.fail.Exception) as info:
        spawn_and_collect(worker, 2, 0, str(tmp_path / "spawn"), timeout_s=120)
    return str(info.value)


def test_failing_rank_reports_its_own_traceback(tmp_path):
    report = _report(_raising_worker, tmp_path)
    assert "---- rank 1: exit code 1" in report, report
    assert "RuntimeError: rank one fails on purpose" in report, report
    assert "_raising_worker" in report, report  # the traceback, not just the message


def test_aborting_rank_reports_its_output_and_stacks(tmp_path):
    report = _report(_aborting_worker, tmp_path)
    assert "---- rank 1: killed by signal 6 (SIGABRT)" in report, report
    assert "rank one is about to abort" in report, report
    assert "Fatal Python error: Aborted" in report and "_aborting_worker" in report, report


def test_rank_without_results_is_reported(tmp_path):
    report = _report(_silent_worker, tmp_path)
    assert "rank(s) [1] exited without writing their results" in report, report
    assert "---- rank 1: exit code 0; did NOT write rank1.json" in report, report
