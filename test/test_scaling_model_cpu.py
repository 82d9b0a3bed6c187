"""scripts/scaling_model.py: its byte counts against hand-computed volumes, the pipeline rule, the
helper it reports against the package's, and a full run printing the documented tables."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import pytest

import ring_flash_attn as rfa

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SCRIPT = os.path.join(_ROOT, "scripts", "scaling_model.py")


def _model_module():
    spec = importlib.util.spec_from_file_location("scaling_model", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaling_model"] = module
    spec.loader.exec_module(module)
    return module


sm = _model_module()
_8B = sm.MODELS["llama3-8b"]
_70B = sm.MODELS["llama3-70b"]


def test_pipeline_exposure():
    assert sm.pipeline_exposed(8.0, 100.0, 1) == 8.0  # one piece: nothing to overlap
    assert sm.pipeline_exposed(8.0, 100.0, 4) == 2.0  # the first piece only
    assert sm.pipeline_exposed(8.0, 1.0, 4) == 2.0 + 5.0  # and what the compute cannot cover


def test_bytes_per_gpu_match_hand_counts():
    S, N, D, Hk = 131072, 64, 128, 8
    kv = 2 * S * Hk * D * 2  # K and V of the whole sequence, bf16
    links, rates = sm.Links(), sm.Rates()
    ag = sm.all_gather_scheme(_8B, S, N, 8, links, rates, 2, 2, zigzag=True)
    assert math.isclose(ag.bytes_gb * 1e9, 3 * kv * (N - 1) / N)  # gather fwd, gather + reduce-scatter bwd
    ring = sm.ring_scheme(_8B, S, N, 8, links, rates, 2, 2, zigzag=True)
    assert math.isclose(ring.bytes_gb * 1e9, (N - 1) * 3 * kv / N)  # N-1 blocks fwd, blocks + grads bwd
    uly = sm.ulysses_scheme(_8B, S, 8, 8, links, rates, 2)
    per_pass = 7 / 8 * (S / 8) * D * 2 * (2 * 32 + 2 * 8)  # Q, K, V in and O out
    assert math.isclose(uly.bytes_gb * 1e9, 2 * per_pass)
    hybrid = sm.hybrid_scheme(_8B, S, 8, 8, links, rates, 2, 2, 8)  # 8 x 1: Ulysses alone
    assert math.isclose(hybrid.bytes_gb, uly.bytes_gb) and math.isclose(hybrid.compute_ms, uly.compute_ms)


def test_ulysses_needs_the_heads():
    r = sm.ulysses_scheme(_8B, 131072, 64, 8, sm.Links(), sm.Rates(), 2)
    assert r.feasible and "cannot be split over 64 ranks" in r.feasible


def test_model_reports_the_packages_helper():
    for model in (_8B, _70B):
        for gpus in (8, 16, 64, 1024):
            layout = rfa.choose_hybrid_layout(model.num_heads_q, model.num_heads_k, gpus, 8)
            assert sm.helper_layout(model, gpus, 8) == (layout.ulysses_degree, layout.kv_scheme)


def test_measured_links_override_the_datasheet():
    links = sm.Links({"all_to_all_intra": 300.0})
    assert links.gbps("all_to_all", "intra") == 300.0 and links.source("all_to_all", "intra") == "measured"
    assert links.gbps("all_gather", "intra") == 450.0 and links.source("all_gather", "inter") == "datasheet"


@pytest.mark.parametrize("model", ["llama3-8b", "llama3-70b"])
def test_helper_is_close_to_the_best_mesh_where_communication_matters(model):
    """Across nodes (16..128 GPUs, 128K..1M tokens) the helper's mesh is within 5% of the best
    mesh the model finds."""
    m = sm.MODELS[model]
    for tokens in (131072, 1048576):
        for gpus in (16, 32, 64, 128):
            _, picked, best = sm.evaluate(m, tokens, gpus, 8, sm.Links(), sm.Rates())
            assert picked.step_ms <= 1.05 * best.step_ms, (tokens, gpus, picked, best)


def test_script_prints_the_tables(tmp_path):
    out_csv = tmp_path / "scaling.csv"
    r = subprocess.run([sys.executable, _SCRIPT, "--csv", str(out_csv)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for model in ("llama3-8b", "llama3-70b"):
        assert f"{model}: shortest sequence" in r.stdout
    assert "measured, one H200" in r.stdout and "(datasheet)" in r.stdout
    rows = out_csv.read_text().splitlines()
    assert len(rows) == 1 + 2 * 4 * 8 * len(sm.SCHEMES)  # models x tokens x GPU counts x schemes
