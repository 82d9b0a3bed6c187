"""benchmark/benchmark_ring_variants.py without GPUs: its FLOP count and workloads (pure Python), and
the script end to end under torchrun on gloo and the CPU backend (tiny sizes; the numbers mean
nothing, the rows and their arithmetic do)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

import ring_flash_attn as rfa
from dist_harness import torchrun

_HERE = os.path.dirname(os.path.abspath(__file__))
_SCRIPT = os.path.join(os.path.dirname(_HERE), "benchmark", "benchmark_ring_variants.py")
if os.path.dirname(_SCRIPT) not in sys.path:
    sys.path.insert(0, os.path.dirname(_SCRIPT))

import benchmark_ring_variants as brv  # noqa: E402


def test_flops_follow_flash_attention_count():
    """Causal: L (L + 1) / 2 pairs of the GLOBAL sequence (N x tokens per GPU), 4 * D * Hq per pair
    forward, 3.5x that for forward + backward; non-causal: L^2 pairs."""
    L = 4 * 8192
    (fwd,) = brv.iteration_flops("zigzag_ring", 8192, 4, 32, 128, True, "fwd")
    assert fwd == 4 * 128 * 32 * L * (L + 1) // 2
    (both,) = brv.iteration_flops("stripe", 8192, 4, 32, 128, True, "fwd_bwd")
    assert both == pytest.approx(3.5 * fwd)
    (full,) = brv.iteration_flops("ring", 8192, 4, 32, 128, False, "fwd")
    assert full == 4 * 128 * 32 * L * L
    # varlen: one entry per batch, every sequence N times its local length
    per_batch = brv.iteration_flops("llama3_varlen", 8192, 2, 32, 128, True, "fwd")
    lens = [[2 * 8192], [2 * 256, 2 * 7392, 2 * 544], [2 * 4096] * 2, [2 * n for n in (3104, 3200, 1600, 160, 128)]]
    assert per_batch == [4 * 128 * 32 * sum(n * (n + 1) // 2 for n in b) for b in lens]
    # iterations cycle through the batches, starting after the warm-up ones
    assert brv.total_flops([1.0, 10.0, 100.0, 1000.0], 3, 6) == 1000 + 1 + 10 + 100 + 1000 + 1


def test_varlen_batches_scale_to_even_lengths():
    assert brv.varlen_local_batches(8192) == [list(b) for b in brv.VARLEN_BOUNDARIES_8K]
    for S in (64, 1000, 8192 * 3):
        for cu in brv.varlen_local_batches(S):
            lens = [b - a for a, b in zip(cu, cu[1:])]
            assert cu[0] == 0 and cu[-1] == S and all(n > 0 and n % 2 == 0 for n in lens), (S, cu)
    assert brv.varlen_local_batches(2) == [[0, 2]] * 4
    with pytest.raises(ValueError, match="seqlen-per-gpu"):
        brv.varlen_local_batches(63)


def test_heads_k_stride_divides_kv_heads():
    assert brv.heads_k_stride_for(8, 4) == 4
    assert brv.heads_k_stride_for(2, 4) == 2
    assert brv.heads_k_stride_for(6, 4) == 3
    assert brv.heads_k_stride_for(5, 4) == 1


def _torchrun(nproc: int, args, timeout: int = 120) -> subprocess.CompletedProcess:
    return torchrun(_SCRIPT, ["--device", "cpu"] + list(args), nproc=nproc, timeout_s=timeout, stdout_tail=3000)


def _table_rows(stdout: str):
    """Data rows of the box table: lists of cell texts."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("│") and "Variant" not in line:
            rows.append([c.strip() for c in line.strip("│").split("│")])
    return rows


def test_every_variant_on_two_gloo_ranks(tmp_path):
    """Forward + backward, deterministic, 2 ranks: a table row and a CSV row per variant, whose
    numbers agree with each other and with the FLOP count."""
    out_csv = tmp_path / "ring_variants.csv"
    r = _torchrun(2, ["--seqlen-per-gpu", "32", "--num-iter", "2", "--warmup", "1", "--deterministic",
                      "--csv", str(out_csv)])
    table = _table_rows(r.stdout)
    assert [row[0] for row in table] == list(brv.VARIANTS), r.stdout
    for row in table:
        assert row[1:3] == ["32", "64"] and float(row[3]) > 0 and float(row[4]) > 0, row
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert [row["variant"] for row in rows] == list(brv.VARIANTS)
    for row in rows:
        assert row["world_size"] == "2" and row["backend"] == "gloo" and row["pass"] == "fwd_bwd", row
        assert row["deterministic"] == "True" and row["tokens_per_gpu"] == "32" and row["total_tokens"] == "64"
        iter_s, ms = float(row["iter_per_s"]), float(row["ms_per_iter"])
        assert iter_s > 0 and abs(iter_s * ms - 1e3) <= 1e-3 * 1e3, row
        per_batch = brv.iteration_flops(row["variant"], 32, 2, 4, 16, True, "fwd_bwd")
        flops = brv.total_flops(per_batch, 1, 2)
        assert float(row["flops_per_iter"]) == pytest.approx(flops / 2, rel=1e-5), row
        assert float(row["tflops_per_gpu"]) == pytest.approx(flops / 2 / (2 / iter_s) / 1e12, rel=1e-2, abs=1e-4)
        assert row["function"] == brv.FUNCTION_NAMES[row["variant"]]
        assert hasattr(rfa, row["function"])


def test_forward_only_one_rank(tmp_path):
    out_csv = tmp_path / "fwd.csv"
    r = _torchrun(1, ["--variants", "stripe", "zigzag_llama3_varlen", "--fwd-only", "--no-causal",
                      "--seqlen-per-gpu", "16", "--num-iter", "2", "--warmup", "0", "--csv", str(out_csv)])
    assert [row[0] for row in _table_rows(r.stdout)] == ["stripe", "zigzag_llama3_varlen"]
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert [(row["variant"], row["pass"], row["causal"], row["world_size"]) for row in rows] == [
        ("stripe", "fwd", "False", "1"), ("zigzag_llama3_varlen", "fwd", "False", "1")]
