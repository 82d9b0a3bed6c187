"""benchmark/benchmark_cp_distributed.py (every context-parallel scheme, step vs kernels alone) and
benchmark/benchmark_collectives.py (link rates for the scaling model), end to end under torchrun
with 2 gloo ranks on the CPU backend (tiny shapes; the numbers mean nothing), and the scaling
model's link-rate file round trip."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

from dist_harness import torchrun

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCHEMES = ("ring", "zigzag_ring", "stripe", "llama3", "zigzag_llama3", "ulysses", "hybrid")


def _torchrun(script: str, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    return torchrun(os.path.join(_ROOT, "benchmark", script), list(args), nproc=nproc, timeout_s=240,
                    stdout_tail=3000)


def test_cp_distributed_benchmark_every_scheme_on_gloo(tmp_path):
    """Two ranks, every scheme, both passes: a table each and one CSV row per (rank, scheme, pass)
    with positive times, their ratio, and the hybrid's mesh."""
    out_csv = tmp_path / "cp.csv"
    r = _torchrun("benchmark_cp_distributed.py", "--device", "cpu", "--seqlens", "64", "--num-runs", "2",
                  "--warmup", "1", "--csv", str(out_csv))
    assert r.stdout.count("Kernels (ms)") == len(_SCHEMES) * 2, r.stdout
    assert "hybrid mesh: ulysses_degree 2 x kv_degree 1" in r.stdout, r.stdout
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert {(row["rank"], row["scheme"], row["pass"]) for row in rows} == {
        (str(rk), s, p) for rk in (0, 1) for s in _SCHEMES for p in ("fwd", "fwd_bwd")}
    assert len(rows) == 2 * len(_SCHEMES) * 2
    for row in rows:
        step, kern, ratio = float(row["step_ms"]), float(row["kernels_ms"]), float(row["ratio"])
        assert step > 0 and kern > 0 and abs(ratio - step / kern) <= 1e-3 * ratio + 1e-3, row
        assert row["world_size"] == "2" and row["backend"] == "gloo"
        assert float(row["kernels_tflops"]) > 0, row
        assert (row["mesh"] == "2x1 zigzag_llama3") == (row["scheme"] == "hybrid"), row


def test_collectives_benchmark_writes_the_scaling_models_rates(tmp_path):
    """Two ranks: every collective measured, the JSON holds positive intra-node rates, and the
    scaling model reads them as measured."""
    out_json = tmp_path / "links.json"
    _torchrun("benchmark_collectives.py", "--device", "cpu", "--sizes-mb", "0.25", "--num-runs", "2",
              "--json", str(out_json))
    with open(out_json) as f:
        rates = json.load(f)
    for collective in ("all_gather", "reduce_scatter", "all_to_all", "p2p"):
        assert rates[f"{collective}_intra"] > 0, rates
    assert rates["facts"]["world_size"] == 2
    r = subprocess.run([sys.executable, os.path.join(_ROOT, "scripts", "scaling_model.py"), "--measured-links",
                        str(out_json), "--models", "llama3-8b", "--tokens", "131072", "--gpus", "8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"all_to_all {rates['all_to_all_intra']:g} (measured)" in r.stdout, r.stdout
    assert "p2p 50 (datasheet)" in r.stdout  # across nodes: not measured on one node
