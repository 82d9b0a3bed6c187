"""benchmark/benchmark_features.py on the CPU backend: every row runs, passes its spot check
against the fp32 reference, and lands in the CSV with the documented columns."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmark"))

import benchmark_features as bf  # noqa: E402


def test_visible_pairs_counts_the_causal_window():
    L, w = 10, 3
    brute = sum(1 for i in range(L) for j in range(L) if j <= i and j >= i - w)
    assert bf.visible_pairs(L, w) == brute
    assert bf.visible_pairs(L, -1) == L * (L + 1) // 2
    assert bf.visible_pairs(L, L + 5) == L * (L + 1) // 2


def test_cpu_run_writes_every_row(tmp_path, capsys):
    path = tmp_path / "features.csv"
    rc = bf.main(["--device", "cpu", "--seqlens", "96", "--window", "16", "--heads", "2", "1", "--head-dim", "16",
                  "--softcap", "5", "--num-runs", "1", "--warmup", "0", "--csv", str(path)])
    assert rc == 0, capsys.readouterr()
    rows = list(csv.DictReader(path.open()))
    assert {r["variant"] for r in rows} == {"causal", "window_16", "softcap_5", "sinks", "softcap_sinks"}
    assert {r["pass"] for r in rows} == {"fwd", "fwd_bwd"}
    assert all(r["status"] == "ok" for r in rows), rows
    assert set(rows[0]) >= {"gpu", "torch", "tier", "seqlen", "variant", "pass", "time_ms", "tflops", "vs_causal"}


def test_spot_check_catches_a_wrong_mask(monkeypatch, tmp_path):
    # A reference with a different window must make the window row fail (the check can fail).
    real = bf.reference

    def wrong(q, k, v, scale, window, softcap, sinks, rows, heads):
        return real(q, k, v, scale, (window[0] + 7, window[1]) if window[0] >= 0 else window, softcap, sinks, rows,
                    heads)

    monkeypatch.setattr(bf, "reference", wrong)
    rc = bf.main(["--device", "cpu", "--seqlens", "96", "--window", "16", "--heads", "2", "1", "--head-dim", "16",
                  "--passes", "fwd", "--variants", "window_16", "--num-runs", "1", "--warmup", "0",
                  "--csv", str(tmp_path / "f.csv")])
    assert rc == 1
