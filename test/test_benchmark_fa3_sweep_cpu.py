"""benchmark/benchmark_fa3_sweep.py without a GPU.

* Pure Python: the shape list (batch and heads from 16K tokens and hidden 2048), the measurement
  order, FLOP counts against hand-computed values, the run-time estimate of the default sweep,
  ETA and progress lines, the grouped skip notes, the CSV (columns, row-by-row writing, reading
  back), the table (cells, ratio column, missing and failed cells) and the plot's panels (the PNG
  itself only where matplotlib imports; the message when it does not).
* With torch on the CPU: the chunked fp32 reference against SDPA's math in float64, the output
  check (NaN fails, tolerance for ours), and the script end to end: --dry-run and --from-csv in
  subprocesses, --device cpu (the real measurement path, host timers, tiny shapes) in a
  subprocess and in process (a failed check makes the exit status 1), --time-budget-s, and the
  exit status 2 without a GPU.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import re
import subprocess
import sys

import pytest
import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH_DIR = os.path.join(_ROOT, "benchmark")
_SCRIPT = os.path.join(_BENCH_DIR, "benchmark_fa3_sweep.py")
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)

import benchmark_fa3_sweep as sweep  # noqa: E402

REQUIRED_COLUMNS = ("gpu", "head_dim", "seqlen", "batch", "causal", "impl", "pass", "time_ms", "tflops")
TINY = ["--tokens", "256", "--hidden", "64", "--head-dims", "32", "--seqlens", "64", "128", "--num-runs", "2",
        "--warmup", "2"]


def run_script(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # The environment as is: the package this test imports (installed, or the tree's through the
    # caller's PYTHONPATH) is the one the script gets; python/ of the tree has no library.
    return subprocess.run([sys.executable, _SCRIPT, *argv], capture_output=True, text=True, timeout=timeout,
                          cwd=_ROOT)


def read_rows(path: str):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def tables_text(stdout: str) -> str:
    """The tables part of the report: from the first 'head dim' line to 'Notes:' (or the end)."""
    start = stdout.index("head dim ")
    end = stdout.find("Notes:", start)
    return stdout[start:end if end >= 0 else len(stdout)].strip()


# ---- shapes, cases, FLOPs -----------------------------------------------------------------------


def test_default_shapes_follow_the_paper_sweep():
    shapes = sweep.build_shapes(sweep.DEFAULT_HEAD_DIMS, sweep.DEFAULT_SEQLENS)
    assert len(shapes) == 18
    assert [(s.head_dim, s.seqlen, s.batch, s.num_heads) for s in shapes[:6]] == [
        (64, 512, 32, 32), (64, 1024, 16, 32), (64, 2048, 8, 32), (64, 4096, 4, 32), (64, 8192, 2, 32),
        (64, 16384, 1, 32)]
    assert (shapes[6].head_dim, shapes[6].seqlen, shapes[6].batch, shapes[6].num_heads) == (128, 512, 32, 16)
    assert (shapes[-1].head_dim, shapes[-1].seqlen, shapes[-1].batch, shapes[-1].num_heads) == (256, 16384, 1, 8)
    assert all(s.tokens == 16384 and s.num_heads * s.head_dim == 2048 for s in shapes)


@pytest.mark.parametrize("kwargs, match", [
    (dict(head_dims=[128], seqlens=[3000]), "seqlens: expected divisors of tokens \\(16384\\), got 3000"),
    (dict(head_dims=[128], seqlens=[32768]), "seqlens: .* got 32768"),
    (dict(head_dims=[96], seqlens=[512]), "head_dims: expected divisors of hidden \\(2048\\), got 96"),
    (dict(head_dims=[128], seqlens=[512], tokens=0), "tokens: expected >= 1, got 0"),
])
def test_build_shapes_rejects_shapes_that_do_not_divide(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sweep.build_shapes(**kwargs)


def test_cases_run_variant_by_variant():
    shapes = sweep.build_shapes([64, 128], [512])
    cases = sweep.build_cases(shapes, sweep.CAUSAL_CHOICES["both"], sweep.PASSES, sweep.DEFAULT_IMPLS)
    assert len(cases) == 2 * 2 * 2 * 4
    first = [(c.shape.head_dim, c.pass_name, c.causal, c.impl) for c in cases[:5]]
    assert first == [(64, "fwd", True, "ours"), (64, "fwd", True, "sdpa_flash"), (64, "fwd", True, "sdpa_cudnn"),
                     (64, "fwd", True, "fa3"), (64, "fwd", False, "ours")]
    assert (cases[8].pass_name, cases[8].causal) == ("fwd_bwd", True)
    assert cases[16].shape.head_dim == 128
    assert sweep.CAUSAL_CHOICES["yes"] == (True,) and sweep.CAUSAL_CHOICES["no"] == (False,)


def test_flops_match_hand_computed_values():
    d128_l512 = sweep.Shape(head_dim=128, seqlen=512, batch=32, num_heads=16)
    # causal: 32 sequences x 512 * 513 / 2 pairs = 4,202,496 pairs; 4 * 128 * 16 = 8192 FLOPs a pair
    assert sweep.shape_pairs(d128_l512, True) == 4_202_496
    assert sweep.case_flops(sweep.Case(d128_l512, True, "fwd", "ours")) == 34_426_847_232
    # non-causal: 32 x 512^2 = 2^23 pairs, 2^36 FLOPs
    assert sweep.case_flops(sweep.Case(d128_l512, False, "fwd", "ours")) == 68_719_476_736
    assert sweep.case_flops(sweep.Case(d128_l512, False, "fwd_bwd", "ours")) == 240_518_168_576
    d64_l16k = sweep.Shape(head_dim=64, seqlen=16384, batch=1, num_heads=32)
    assert sweep.case_flops(sweep.Case(d64_l16k, False, "fwd", "sdpa_cudnn")) == 2_199_023_255_552  # 2^41
    assert sweep.case_flops(sweep.Case(d64_l16k, True, "fwd", "sdpa_cudnn")) == 1_099_578_736_640
    assert sweep.tflops_of(1e12, 1.0) == pytest.approx(1000.0)
    assert sweep.tflops_of(2_199_023_255_552, 4.0) == pytest.approx(549.755813888)


def test_default_sweep_is_estimated_within_four_minutes():
    shapes = sweep.build_shapes(sweep.DEFAULT_HEAD_DIMS, sweep.DEFAULT_SEQLENS)
    cases = sweep.build_cases(shapes, (True, False), sweep.PASSES, sweep.DEFAULT_IMPLS)
    args = sweep.parse_args([])
    estimate = sweep.estimate_seconds(cases, args.num_runs, args.warmup)
    assert len(cases) == 288
    assert 60 < estimate < 240, estimate
    # more timed calls cost more; the fixed start is counted once
    assert sweep.estimate_seconds(cases, 40, args.warmup) > estimate
    assert sweep.estimate_seconds([], 20, 5) == sweep.ESTIMATE_START_S


def test_eta_and_progress_lines():
    assert sweep.eta_seconds(10.0, 1.0, 4.0) == pytest.approx(30.0)
    assert sweep.eta_seconds(10.0, 0.0, 4.0) is None
    assert sweep.eta_seconds(10.0, 4.0, 4.0) == 0.0
    assert [sweep.format_duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m05s"]
    shape = sweep.Shape(128, 512, 32, 16)
    cases = [sweep.Case(shape, True, "fwd", "ours"), sweep.Case(shape, False, "fwd", "ours")]
    weights = sweep.case_weights(cases)
    assert weights[1] > weights[0]  # non-causal has about twice the FLOPs
    assert sum(weights) == pytest.approx(2 + 2)  # a fixed 1 each plus FLOPs / mean FLOPs
    now = [100.0]
    stream = io.StringIO()
    progress = sweep.Progress(cases, stream=stream, clock=lambda: now[0])
    now[0] = 110.0
    line = progress.finished(cases[0], "1.000 ms, 34.4 TFLOPS")
    eta = 10.0 * (sum(weights) - weights[0]) / weights[0]
    assert line == (f"[1/2] D=128 L=512 B=32 H=16 causal fwd ours: 1.000 ms, 34.4 TFLOPS (elapsed 10s, "
                    f"ETA {sweep.format_duration(eta)})")
    assert stream.getvalue() == line + "\n"


def test_skip_notes_are_grouped_by_reason():
    log = sweep.SkipLog()
    for L in (512, 1024, 2048, 4096, 8192, 16384):
        log.add("fa3", f"D=128 L={L} causal fwd", "FlashAttention-3 is not importable (x)")
    log.add("sdpa_flash", "D=256 L=512 causal fwd_bwd", "RuntimeError: refused")
    log.add("ours", "D=64 L=512 causal fwd", "RuntimeError: boom", verb="failed")
    assert log.lines() == [
        "fa3 skipped (6 measurements: D=128 L=512 causal fwd; D=128 L=1024 causal fwd; D=128 L=2048 causal fwd; "
        "D=128 L=4096 causal fwd; and 2 more): FlashAttention-3 is not importable (x)",
        "sdpa_flash skipped (1 measurement: D=256 L=512 causal fwd_bwd): RuntimeError: refused",
        "ours failed (1 measurement: D=64 L=512 causal fwd): RuntimeError: boom",
    ]


# ---- CSV, table, plot ---------------------------------------------------------------------------


def sample_measurements():
    """D=128: L=512 all four variants of ours and cuDNN, L=1024 causal fwd only (ours failed its check)."""
    out = []
    for pass_name in sweep.PASSES:
        for causal in (True, False):
            case = sweep.Case(sweep.Shape(128, 512, 32, 16), causal, pass_name, "ours")
            flops = sweep.case_flops(case)
            out.append(sweep.Measurement.of(case, flops / 400e12 * 1e3, 1e-3))  # 400 TFLOPS
            cud = sweep.Case(case.shape, causal, pass_name, "sdpa_cudnn")
            out.append(sweep.Measurement.of(cud, flops / 500e12 * 1e3, 2e-3))  # 500 TFLOPS
    bad = sweep.Case(sweep.Shape(128, 1024, 16, 16), True, "fwd", "ours")
    out.append(sweep.Measurement.of(bad, sweep.case_flops(bad) / 300e12 * 1e3, float("nan"),
                                    "FAIL: 3 non-finite output values"))
    return out


def test_csv_rows_have_the_columns_and_read_back(tmp_path):
    env = {"gpu": "NVIDIA H200", "torch": "2.11", "cuda": "13.0", "library": "0.1.0, sm90"}
    path = str(tmp_path / "sub" / "fa3_sweep.csv")
    sink = sweep.CsvSink(path)
    measurements = sample_measurements()
    for m in measurements[:3]:
        sink.write(m.csv_row(env, "bf16"))
    # each row is on disk as soon as it is written (an interrupted sweep keeps them)
    assert len(read_rows(path)[1]) == 3
    for m in measurements[3:]:
        sink.write(m.csv_row(env, "bf16"))
    sink.close()
    header, rows = read_rows(path)
    assert tuple(header) == sweep.CSV_COLUMNS
    assert set(REQUIRED_COLUMNS) <= set(header) and {"torch", "cuda"} <= set(header)
    first = rows[0]
    assert (first["gpu"], first["head_dim"], first["seqlen"], first["batch"], first["causal"], first["impl"],
            first["pass"], first["library"]) == ("NVIDIA H200", "128", "512", "32", "1", "ours", "fwd", "0.1.0, sm90")
    assert float(first["tflops"]) == pytest.approx(400.0, abs=0.01)
    assert rows[-1]["status"].startswith("FAIL") and rows[-1]["check_max_abs_diff"] == "nan"
    back, env_back = sweep.read_csv(path)
    assert env_back["gpu"] == "NVIDIA H200" and env_back["dtype"] == "bf16"
    assert len(back) == len(measurements)
    for a, b in zip(back, measurements):
        assert (a.head_dim, a.num_heads, a.seqlen, a.batch, a.causal, a.impl, a.pass_name, a.status) == \
               (b.head_dim, b.num_heads, b.seqlen, b.batch, b.causal, b.impl, b.pass_name, b.status)
        assert a.tflops == pytest.approx(b.tflops, abs=0.01) and a.time_ms == pytest.approx(b.time_ms, abs=1e-4)
    not_ours = tmp_path / "other.csv"
    not_ours.write_text("gpu,seqlen\nx,1\n")
    with pytest.raises(ValueError, match="missing columns head_dim, batch, causal, impl, pass, time_ms, tflops"):
        sweep.read_csv(str(not_ours))


def test_table_cells_ratio_missing_and_failed():
    measurements = sample_measurements()
    impls = sweep.table_impls(measurements, sweep.IMPLS)
    assert impls == ["ours", "sdpa_cudnn"]  # flash and fa3 measured nothing: no column
    variants = sweep.table_variants(sweep.PASSES, (True, False))
    assert variants == [("fwd", True), ("fwd", False), ("fwd_bwd", True), ("fwd_bwd", False)]
    text = sweep.format_table(measurements, 128, impls, variants, [512, 1024, 2048])
    lines = text.splitlines()
    assert lines[0] == "head dim 128 (16 heads): TFLOPS; ours/best = ours / the best other implementation"
    for label in ("causal fwd", "non-causal fwd", "causal fwd+bwd", "non-causal fwd+bwd"):
        assert label in lines[1]
    assert lines[2].split() == ["L", "B"] + ["|", "ours", "cudnn", "ours/best"] * 4 and lines[2].split()[0] == "L"
    assert set(lines[3]) == {"-"}
    assert lines[4].split() == ["512", "32"] + ["|", "400.0", "500.0", "0.80x"] * 4
    assert lines[5].split() == ["1024", "16", "|", "300.0!", "-", "-"] + ["|", "-", "-", "-"] * 3
    assert lines[6].split() == ["2048", "-"] + ["|", "-", "-", "-"] * 4
    # the columns line up: every row as long as the header (right-aligned cells)
    assert len({len(line) for line in lines[2:]}) == 1
    # one implementation only: no ratio column
    alone = sweep.format_table(measurements, 128, ["sdpa_cudnn"], variants[:1])
    assert "ours/best" not in alone and alone.splitlines()[4].split() == ["512", "32", "|", "500.0"]


def test_host_bound_calls_are_marked_and_the_kernel_table_uses_gpu_time(tmp_path):
    """A call whose time exceeds its kernels' time alone (gpu_time_ms, host queued ahead) by more
    than HOST_BOUND_RATIO is marked 'h' in the call-time table; --table-time gpu shows the kernels'
    TFLOPS; gpu_time_ms survives the CSV."""
    shape = sweep.Shape(128, 512, 32, 16)
    ours = sweep.Case(shape, True, "fwd_bwd", "ours")
    cud = sweep.Case(shape, True, "fwd_bwd", "sdpa_cudnn")
    flops = sweep.case_flops(ours)
    slow_host = sweep.Measurement.of(ours, flops / 100e12 * 1e3, gpu_time_ms=flops / 400e12 * 1e3,
                                     host_ms=flops / 100e12 * 1e3)  # 100 vs 400
    kernels = sweep.Measurement.of(cud, flops / 250e12 * 1e3, gpu_time_ms=flops / 260e12 * 1e3)  # within 1.15x
    assert slow_host.host_bound and not kernels.host_bound
    assert slow_host.gpu_tflops == pytest.approx(400.0) and slow_host.rate("gpu") == pytest.approx(400.0)
    unmeasured = sweep.Measurement.of(cud, 1.0)
    assert not unmeasured.host_bound and unmeasured.rate("gpu") is None
    variants = [("fwd_bwd", True)]
    call = sweep.format_table([slow_host, kernels], 128, ["ours", "sdpa_cudnn"], variants).splitlines()
    assert call[4].split() == ["512", "32", "|", "100.0h", "250.0", "0.40x"]
    gpu = sweep.format_table([slow_host, kernels], 128, ["ours", "sdpa_cudnn"], variants, table_time="gpu")
    assert "kernels alone" in gpu.splitlines()[0]
    assert gpu.splitlines()[4].split() == ["512", "32", "|", "400.0", "260.0", "1.54x"]
    assert sweep.host_bound_lines([slow_host, kernels], "call")[0].startswith("h: host-bound call")
    assert "ours 1" in sweep.host_bound_lines([slow_host, kernels], "call")[0]
    assert sweep.host_bound_lines([kernels], "call") == []
    # the CSV keeps the kernels' time; a CSV without the columns (older runs) reads as not measured
    path = str(tmp_path / "fa3_sweep.csv")
    sink = sweep.CsvSink(path)
    for m in (slow_host, kernels, unmeasured):
        sink.write(m.csv_row({"gpu": "x"}, "bf16"))
    sink.close()
    back, _ = sweep.read_csv(path)
    assert back[0].gpu_time_ms == pytest.approx(slow_host.gpu_time_ms, abs=1e-4) and back[0].host_bound
    assert back[0].host_ms == pytest.approx(slow_host.host_ms, abs=1e-4) and back[1].host_ms is None
    assert back[2].gpu_time_ms is None and back[2].gpu_tflops is None
    old = tmp_path / "old.csv"
    header = [c for c in sweep.CSV_COLUMNS if c not in ("gpu_time_ms", "gpu_tflops", "host_ms")]
    row = slow_host.csv_row({"gpu": "x"}, "bf16")
    old.write_text(",".join(header) + "\n" + ",".join(row[c] for c in header) + "\n")
    (m_old,), _ = sweep.read_csv(str(old))
    assert m_old.gpu_time_ms is None and not m_old.host_bound


def test_best_other_ratio():
    ms = {m.impl: m for m in sample_measurements()[:2]}
    assert sweep.best_other_ratio(ms) == pytest.approx(0.8, abs=1e-6)
    assert sweep.best_other_ratio({"ours": ms["ours"]}) is None
    assert sweep.best_other_ratio({"sdpa_cudnn": ms["sdpa_cudnn"]}) is None
    # Our deterministic mode is not one of the "others" ours is compared with.
    det = dataclasses.replace(ms["ours"], impl="ours_deterministic", time_ms=ms["ours"].time_ms / 4)
    assert sweep.best_other_ratio({**ms, "ours_deterministic": det}) == pytest.approx(0.8, abs=1e-6)
    assert sweep.best_other_ratio({"ours": ms["ours"], "ours_deterministic": det}) is None


def test_plot_panels_group_by_head_dim_and_pass():
    panels = sweep.plot_panels(sample_measurements())
    assert list(panels) == [(128, "fwd"), (128, "fwd_bwd")]
    fwd = panels[(128, "fwd")]
    assert list(fwd) == [("ours", True), ("ours", False), ("sdpa_cudnn", True), ("sdpa_cudnn", False)]
    assert [x for x, _ in fwd[("ours", True)]] == [512]  # the failed L=1024 point is left out
    assert fwd[("sdpa_cudnn", False)][0][1] == pytest.approx(500.0)


def test_plot_png_where_matplotlib_imports(tmp_path):
    pytest.importorskip("matplotlib")
    path = str(tmp_path / "fa3_sweep.png")
    assert sweep.save_plot(sample_measurements(), path, "title") is None
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_why(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    path = tmp_path / "fa3_sweep.png"
    why = sweep.save_plot(sample_measurements(), str(path), "title")
    assert why is not None and "matplotlib is not importable" in why
    assert not path.exists()
    assert sweep.save_plot([], str(path), "title") == "nothing measured"


def test_default_paths_start_with_fa3_sweep():
    csv_path, png_path = sweep.default_paths("out", "NVIDIA H200", "20261204-120000")
    assert csv_path == os.path.join("out", "fa3_sweep_NVIDIA_H200_20261204-120000.csv")
    assert png_path == os.path.join("out", "fa3_sweep_NVIDIA_H200_20261204-120000.png")


# ---- reference and check (torch, CPU) ------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_reference_attention_matches_sdpa_math_in_float64(causal):
    gen = torch.Generator().manual_seed(7)
    L, h, D = 100, 3, 16
    q, k, v = (torch.randn(L, h, D, generator=gen, dtype=torch.float64) for _ in range(3))
    ref = sweep.reference_attention(q, k, v, causal, chunk=32)  # 4 chunks, the last one short
    expect = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=causal).transpose(0, 1)
    assert torch.isfinite(ref).all()
    assert (ref - expect).abs().max().item() < 1e-12
    if causal:  # row 0 sees key 0 only
        assert torch.equal(ref[0], v[0])


def test_check_output_fails_nan_and_ours_beyond_tolerance():
    shape = sweep.Shape(head_dim=8, seqlen=16, batch=2, num_heads=4)
    gen = torch.Generator().manual_seed(3)
    out = torch.randn(shape.tokens, shape.num_heads, shape.head_dim, generator=gen)
    ref = out[: shape.seqlen, :2].clone()
    diff, status = sweep.check_output(out, ref, shape, "ours", 2e-2)
    assert (diff, status) == (0.0, "ok")
    off = out.clone()
    off[3, 1, 2] += 0.5
    diff, status = sweep.check_output(off, ref, shape, "ours", 2e-2)
    assert diff == pytest.approx(0.5) and status.startswith("FAIL: max |out - reference|")
    assert sweep.check_output(off, ref, shape, "sdpa_cudnn", 2e-2)[1] == "ok"  # reported, not failed
    nan = out.clone()
    nan[-1, -1, -1] = float("nan")  # outside the checked slice: still fails
    diff, status = sweep.check_output(nan, ref, shape, "sdpa_flash", 2e-2)
    assert math.isnan(diff) and status == "FAIL: 1 non-finite output values"


# ---- end to end ----------------------------------------------------------------------------------


def test_dry_run_end_to_end(tmp_path):
    csv_path = str(tmp_path / "fa3_sweep.csv")
    png_path = str(tmp_path / "fa3_sweep.png")
    r = run_script("--dry-run", "--csv", csv_path, "--plot", png_path)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "DRY RUN" in r.stdout and "estimated time on an H200" in r.stdout
    for d, h in ((64, 32), (128, 16), (256, 8)):
        assert f"head dim {d} ({h} heads): TFLOPS" in r.stdout
    assert "fa3 skipped (72 measurements" in r.stdout
    assert "[288/288]" in r.stderr and "ETA" in r.stderr
    header, rows = read_rows(csv_path)
    assert set(REQUIRED_COLUMNS) <= set(header)
    assert len(rows) == 18 * 2 * 2 * 3  # shapes x causal x passes x (ours, flash, cuDNN)
    assert {r_["impl"] for r_ in rows} == {"ours", "sdpa_flash", "sdpa_cudnn"}
    assert {r_["pass"] for r_ in rows} == {"fwd", "fwd_bwd"} and {r_["causal"] for r_ in rows} == {"0", "1"}
    for row in rows:
        shape = sweep.Shape(int(row["head_dim"]), int(row["seqlen"]), int(row["batch"]), int(row["num_heads"]))
        flops = sweep.case_flops(sweep.Case(shape, row["causal"] == "1", row["pass"], row["impl"]))
        assert float(row["tflops"]) == pytest.approx(flops / (float(row["time_ms"]) * 1e-3) / 1e12, rel=1e-3)
        assert int(row["batch"]) * int(row["seqlen"]) == 16384
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "Plot: not written (matplotlib is not importable" in r.stdout
    else:
        assert os.path.getsize(png_path) > 0 and f"Plot: {png_path}" in r.stdout

    # the fake host time makes the shortest fwd+bwd calls host-bound: marked, with the footnote
    assert "h: host-bound call" in r.stdout and re.search(r"\b\d+\.\dh\b", tables_text(r.stdout))
    assert all(row["gpu_time_ms"] and float(row["gpu_time_ms"]) <= float(row["time_ms"]) for row in rows)

    # --from-csv prints the same tables again
    again = run_script("--from-csv", csv_path, "--plot", "")
    assert again.returncode == 0, again.stderr + again.stdout
    assert tables_text(again.stdout) == tables_text(r.stdout)
    kernels = run_script("--from-csv", csv_path, "--plot", "", "--table-time", "gpu")
    assert kernels.returncode == 0, kernels.stderr + kernels.stdout
    assert "TFLOPS of the kernels alone (host queued ahead)" in kernels.stdout and "h: host-bound" not in kernels.stdout


def test_dry_run_selects_subsets(tmp_path):
    csv_path = str(tmp_path / "fa3_sweep.csv")
    r = run_script("--dry-run", "--head-dims", "128", "--seqlens", "2048", "4096", "--causal", "no", "--passes",
                   "fwd_bwd", "--impls", "ours", "sdpa_cudnn", "--csv", csv_path, "--plot", "")
    assert r.returncode == 0, r.stderr + r.stdout
    _, rows = read_rows(csv_path)
    assert sorted((row["seqlen"], row["impl"]) for row in rows) == [
        ("2048", "ours"), ("2048", "sdpa_cudnn"), ("4096", "ours"), ("4096", "sdpa_cudnn")]
    assert all(row["causal"] == "0" and row["pass"] == "fwd_bwd" and row["head_dim"] == "128" for row in rows)
    table = tables_text(r.stdout).splitlines()
    assert "non-causal fwd+bwd" in table[1] and "causal fwd " not in table[1]
    assert "Plot:" not in r.stdout


def test_bad_arguments_name_the_flag():
    r = run_script("--dry-run", "--seqlens", "3000")
    assert r.returncode == 2 and "seqlens: expected divisors of tokens (16384), got 3000" in r.stderr
    r = run_script("--dry-run", "--num-runs", "0")
    assert r.returncode == 2 and "--num-runs: expected >= 1, got 0" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_without_a_gpu_exits_2_and_points_at_dry_run(tmp_path):
    r = run_script("--csv", str(tmp_path / "fa3_sweep.csv"))
    assert r.returncode == sweep.EXIT_NO_GPU
    assert "no CUDA GPU is available" in r.stderr and "--dry-run" in r.stderr
    assert not (tmp_path / "fa3_sweep.csv").exists()


def test_cpu_device_runs_the_measurement_path(tmp_path):
    csv_path = str(tmp_path / "fa3_sweep.csv")
    r = run_script("--device", "cpu", *TINY, "--csv", csv_path, "--plot", "")
    assert r.returncode == 0, r.stderr + r.stdout
    _, rows = read_rows(csv_path)
    measured = {(row["impl"], row["seqlen"], row["causal"], row["pass"]) for row in rows}
    expect = {(impl, L, c, p) for impl in ("ours", "sdpa_flash") for L in ("64", "128") for c in ("0", "1")
              for p in sweep.PASSES}
    assert measured == expect  # cuDNN has no CPU kernel, FlashAttention-3 is not installed here
    for row in rows:
        assert row["status"] == "ok" and float(row["time_ms"]) > 0 and math.isfinite(float(row["tflops"]))
        diff = float(row["check_max_abs_diff"])
        assert 0 < diff < sweep.CHECK_TOLERANCE["bf16"], row  # bf16 output vs the fp32 reference
    assert "sdpa_cudnn skipped (8 measurements" in r.stdout
    assert "fa3 skipped (8 measurements" in r.stdout
    assert "Correctness (max |out - fp32 reference|" in r.stdout
    assert "[32/32]" in r.stderr  # ours, flash, cuDNN, fa3 x 2 L x 2 flags x 2 passes


def test_cpu_device_runs_the_deterministic_mode_on_request(tmp_path):
    """ours_deterministic runs only when named: its own column, checked against the reference like
    ours, and left out of the ours/best ratio (whose "best" is another library)."""
    csv_path = str(tmp_path / "fa3_sweep.csv")
    r = run_script("--device", "cpu", *TINY, "--seqlens", "64", "--causal", "yes", "--impls", "ours",
                   "ours_deterministic", "--csv", csv_path, "--plot", "")
    assert r.returncode == 0, r.stderr + r.stdout
    _, rows = read_rows(csv_path)
    assert {(row["impl"], row["pass"]) for row in rows} == {(i, p) for i in ("ours", "ours_deterministic")
                                                           for p in sweep.PASSES}
    for row in rows:
        assert row["status"] == "ok" and 0 < float(row["check_max_abs_diff"]) < sweep.CHECK_TOLERANCE["bf16"], row
    tables = tables_text(r.stdout)
    assert "ours det" in tables and "ours/best" not in tables
    assert "ours_deterministic" not in sweep.DEFAULT_IMPLS and "ours" in sweep.DEFAULT_IMPLS
    # Read back, the CSV's tables have every implementation it holds (no --impls given).
    again = run_script("--from-csv", csv_path, "--plot", "")
    assert again.returncode == 0, again.stderr + again.stdout
    assert tables_text(again.stdout).startswith(tables)


def test_cpu_device_failed_check_sets_exit_status(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sweep.CHECK_TOLERANCE, "bf16", 0.0)  # every bf16 output of ours now "fails"
    csv_path = str(tmp_path / "fa3_sweep.csv")
    status = sweep.main(["--device", "cpu", *TINY, "--seqlens", "64", "--impls", "ours", "sdpa_flash", "--passes",
                         "fwd", "--csv", csv_path, "--plot", ""])
    out = capsys.readouterr().out
    assert status == sweep.EXIT_FAILURES
    _, rows = read_rows(csv_path)
    assert {row["impl"]: row["status"].split(":")[0] for row in rows if row["causal"] == "1"} == \
           {"ours": "FAIL", "sdpa_flash": "ok"}
    assert "FAIL: ours D=32 L=64 causal fwd: FAIL: max |out - reference|" in out
    assert "!" in tables_text(out).splitlines()[4]


def test_time_budget_stops_new_measurements(tmp_path):
    csv_path = str(tmp_path / "fa3_sweep.csv")
    r = run_script("--device", "cpu", *TINY, "--impls", "ours", "--time-budget-s", "0.000001", "--csv", csv_path,
                   "--plot", "")
    assert r.returncode == 0, r.stderr + r.stdout
    _, rows = read_rows(csv_path)
    assert len(rows) < 2 * 2 * 2  # later (shape, pass) groups did not run
    assert "--time-budget-s 1e-06 spent" in r.stdout
    assert "not run (--time-budget-s" in r.stderr


def test_cpu_device_check_that_raises_keeps_the_time(tmp_path, monkeypatch, capsys):
    def broken_reference(*args, **kwargs):
        raise RuntimeError("reference broke")

    monkeypatch.setattr(sweep, "reference_attention", broken_reference)
    csv_path = str(tmp_path / "fa3_sweep.csv")
    status = sweep.main(["--device", "cpu", *TINY, "--seqlens", "64", "--impls", "ours", "--passes", "fwd",
                         "--causal", "yes", "--csv", csv_path, "--plot", ""])
    capsys.readouterr()
    assert status == 0
    _, rows = read_rows(csv_path)
    assert len(rows) == 1 and float(rows[0]["time_ms"]) > 0
    assert rows[0]["status"] == "unchecked: RuntimeError: reference broke" and rows[0]["check_max_abs_diff"] == ""
