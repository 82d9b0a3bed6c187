"""CPU-only checks of the benchmark's pure-Python parts and of the Python-grouped implementation.

* benchmark/benchmark_grouped_attention.py: workload construction (default and zigzag per-rank),
  the unmasked-pairs count and the FLOPs formula against brute force, the analytic K/V bytes
  against figures worked out by hand, the CSV header, and the command line without a GPU.
  (--measure-hbm, the Nsight Compute part: test/test_benchmark_ncu_cpu.py.)
* scripts/host_overhead.py runs on the CPU backend (one timing row per layer).
* The progress lines ([i/n], elapsed time) and benchmark/plot_results.py (grouping always; the
  PNG only where matplotlib is importable).
* ring_flash_attn.grouped_python._flash_attn_varlen_forward_grouped against the fused
  grouped_flash_attn_varlen_func on the CPU backend (float32; GQA, varlen, seqused_k, rows after
  the last sequence), forward and gradients.
"""

from __future__ import annotations

import contextlib
import csv
import os
import subprocess
import sys

import pytest
import torch

from cases import cu_seqlens, library_available

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH_DIR = os.path.join(_ROOT, "benchmark")
_SCRIPT = os.path.join(_BENCH_DIR, "benchmark_grouped_attention.py")
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)

import benchmark_grouped_attention as bench  # noqa: E402

needs_library = pytest.mark.skipif(not library_available(), reason="libringattn cannot be loaded")


# ---- workloads ---------------------------------------------------------------------------------


def brute_force_pairs(q_len: int, k_len: int, causal: bool = True) -> int:
    """Count (i, j) with query i < Lq, key j < Lk visible under the bottom-right causal mask."""
    return sum(1 for i in range(q_len) for j in range(k_len) if not causal or j <= i + k_len - q_len)


@pytest.mark.parametrize("q_len", [0, 1, 2, 5, 8, 13])
@pytest.mark.parametrize("k_len", [0, 1, 3, 5, 8, 21])
@pytest.mark.parametrize("causal", [True, False])
def test_count_pairs_matches_brute_force(q_len, k_len, causal):
    assert bench.count_pairs(q_len, k_len, causal) == brute_force_pairs(q_len, k_len, causal)


def test_flops_formula():
    w = bench.build_workload(24, num_groups=3)  # chunks of 8: 8x8, 8x16, 8x24
    pairs = sum(brute_force_pairs(g.q_len, g.k_len) for g in w.groups)
    assert bench.workload_pairs(w) == pairs == 24 * 25 // 2  # the groups tile one causal square
    fwd = bench.attention_flops(pairs, num_heads_q=4, head_dim=16, pass_name="fwd")
    assert fwd == 4 * 16 * 4 * pairs
    assert bench.attention_flops(pairs, 4, 16, "bwd") == 2.5 * fwd
    assert bench.attention_flops(pairs, 4, 16, "fwd_bwd") == 3.5 * fwd


def test_default_workload_equal_chunks():
    w = bench.build_workload(4096, num_groups=4, batch=3)
    assert w.num_groups == 4 and w.kv_len == 4096 and w.world_size is None
    assert [(g.q_start, g.q_len, g.k_len) for g in w.groups] == [
        (0, 1024, 1024), (1024, 1024, 2048), (2048, 1024, 3072), (3072, 1024, 4096)]
    assert [w.total_q(g) for g in range(4)] == [3 * 1024] * 4
    assert w.total_k == 3 * 4096
    with pytest.raises(ValueError, match="multiple of num_groups"):
        bench.build_workload(100, num_groups=3)


@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_zigzag_workload_token_counts(world_size):
    L = 2 * world_size * 8  # chunk c = 8
    c = 8
    total_pairs = 0
    for rank in range(world_size):
        w = bench.build_workload(L, world_size=world_size, rank=rank, batch=2)
        early, late = w.groups
        assert (early.q_start, early.q_len, early.k_len) == (rank * c, c, (rank + 1) * c)
        late_chunk = 2 * world_size - 1 - rank
        assert (late.q_start, late.q_len, late.k_len) == (late_chunk * c, c, (2 * world_size - rank) * c)
        assert w.kv_len == (2 * world_size - rank) * c
        assert w.total_q(0) == w.total_q(1) == 2 * c  # batch 2
        assert w.total_k == 2 * w.kv_len
        for g in w.groups:  # bottom-right causal: the chunk's last query sees the last key
            assert g.q_start + g.q_len == g.k_len
        total_pairs += bench.workload_pairs(w)
    # the ranks' chunks tile the full causal attention of each sequence exactly once
    assert total_pairs == 2 * L * (L + 1) // 2


def test_world_size_one_is_the_default_two_group_workload():
    z = bench.build_workload(64, world_size=1, rank=0)
    d = bench.build_workload(64, num_groups=2)
    assert z.groups == d.groups and z.kv_len == d.kv_len == 64


def test_zigzag_workload_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of 2 \\* world_size"):
        bench.build_workload(100, world_size=8)
    with pytest.raises(ValueError, match="rank"):
        bench.build_workload(64, world_size=2, rank=2)
    with pytest.raises(ValueError, match="2 groups"):
        bench.build_workload(64, num_groups=4, world_size=2)


def test_kv_bytes_match_hand_worked_figures():
    # L = 65536, N = 8, Llama3-8B (8 KV heads, D = 128), bf16: chunks of c = 4096 tokens, 4 KiB of
    # K+V per key; two calls read c + 16c keys = 285 MB of K/V, the shared stream 16c = 268 MB at
    # rank 0 and 9c = 151 MB at rank 7.
    cfg = bench.CONFIGS["llama3-8b"]
    w0 = bench.build_workload(65536, world_size=8, rank=0)
    w7 = bench.build_workload(65536, world_size=8, rank=7)
    mb = lambda w, impl: bench.kv_bytes_read(w, impl, cfg.num_heads_k, cfg.head_dim, 2) / 1e6  # noqa: E731
    assert round(mb(w0, "baseline")) == 285
    assert round(mb(w0, "fused")) == 268
    assert round(mb(w7, "fused")) == 151
    # grouped_python: read once + write G copies of the shared K/V, then the per-group reads
    assert mb(w0, "grouped_python") == pytest.approx(3 * 268.435456 + 285.212672)
    # fwd_bwd reads K/V in both passes
    assert bench.kv_bytes_read(w0, "fused", cfg.num_heads_k, cfg.head_dim, 2, pass_name="fwd_bwd") == \
        2 * bench.kv_bytes_read(w0, "fused", cfg.num_heads_k, cfg.head_dim, 2)


# ---- CSV, command line -------------------------------------------------------------------------


def test_csv_header_and_append(tmp_path):
    assert ",".join(bench.CSV_COLUMNS) == (
        "gpu,torch,cuda,config,seqlen,world_size,rank,num_groups,impl,pass,time_ms,tflops,hbm_mb")
    w = bench.build_workload(8192, world_size=2, rank=1)
    row = bench.csv_row("GPU", "2.11", "13.0", "llama3-8b", w, "fused", "fwd", 1.23456, 300.0, 42.0)
    path = tmp_path / "sub" / "r.csv"
    bench.append_csv(str(path), [row])
    bench.append_csv(str(path), [row, row])
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert lines[0] == list(bench.CSV_COLUMNS)
    assert len(lines) == 4  # one header, three rows
    assert lines[1] == ["GPU", "2.11", "13.0", "llama3-8b", "8192", "2", "1", "2", "fused", "fwd", "1.2346",
                        "300.00", "42.0"]


def test_box_table_shape():
    text = bench.box_table(["A", "Time (ms)"], [["x", "1.0"], ["longer", "10.25"]], ["l", "r"])
    lines = text.splitlines()
    assert len(lines) == 6 and len({len(line) for line in lines}) == 1


def test_parse_args_defaults_and_errors():
    args = bench.parse_args([])
    assert args.num_groups == [2] and args.config == "llama3-8b" and args.num_runs == 50
    assert args.passes == ["fwd"] and args.dtype == "bf16" and args.world_size is None
    assert args.output_dir == os.path.join("benchmark", "results")
    assert len(bench.workloads_from_args(args)) == len(args.seqlens)
    args = bench.parse_args(["--seqlens", "65536", "--world-size", "8", "--rank", "0", "7"])
    assert [(w.rank, w.kv_len) for w in bench.workloads_from_args(args)] == [(0, 65536), (7, 36864)]
    for bad in (["--world-size", "2", "--num-groups", "4"], ["--world-size", "2", "--rank", "2"],
                ["--seqlens", "100", "--num-groups", "3"], ["--impls", "nope"]):
        with pytest.raises(SystemExit) as e:
            bench.parse_args(bad)
        assert e.value.code == 2


def _run_script(*argv):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, _SCRIPT, *argv], capture_output=True, text=True, env=env,
                          timeout=120)


def test_help_without_gpu():
    r = _run_script("--help")
    assert r.returncode == 0, r.stderr
    for flag in ("--seqlens", "--num-groups", "--config", "--num-runs", "--world-size", "--rank", "--csv",
                 "--passes", "--impls", "--output-dir", "--measure-hbm"):
        assert flag in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit path")
def test_no_gpu_exits_with_code_2():
    r = _run_script("--seqlens", "1024")
    assert r.returncode == 2
    assert "no CUDA GPU" in r.stderr
    assert "Traceback" not in r.stderr


# ---- progress ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (44.6, "45s"), (65, "1m05s"), (3723, "1h02m03s")])
def test_format_elapsed(seconds, text):
    assert bench.format_elapsed(seconds) == text


def test_progress_plain_lines():
    import io

    now = [100.0]
    stream = io.StringIO()
    prog = bench.Progress(4, stream=stream, clock=lambda: now[0])
    assert prog.bar is None  # not a terminal: plain lines, tqdm or not
    prog.start("L=4096 | fwd")
    now[0] += 65
    prog.note("  ncu: one fused fwd call")
    prog.start("L=4096 | fwd_bwd")
    prog.advance_to(3)  # the rest of a workload that ran out of memory
    now[0] += 3600
    prog.start("L=8192 | fwd")
    prog.close()
    assert stream.getvalue().splitlines() == [
        "[1/4] L=4096 | fwd (elapsed 0s)",
        "  ncu: one fused fwd call",
        "[2/4] L=4096 | fwd_bwd (elapsed 1m05s)",
        "[4/4] L=8192 | fwd (elapsed 1h01m05s)",
        "done: 4/4 steps in 1h01m05s",
    ]


def test_progress_bar_when_tqdm_is_there():
    tqdm = pytest.importorskip("tqdm")  # noqa: F841
    import io

    stream = io.StringIO()
    prog = bench.Progress(3, stream=stream, use_bar=True)
    assert prog.bar is not None
    prog.start("a")
    prog.start("b")
    assert prog.bar.n == 1
    prog.close()
    assert "3/3" in stream.getvalue() and "done: 2/3 steps" in stream.getvalue()


# ---- benchmark/plot_results.py -------------------------------------------------------------------

PLOT_CSV = """\
gpu,torch,cuda,config,seqlen,world_size,rank,num_groups,impl,pass,time_ms,tflops,hbm_mb
NVIDIA H100 80GB HBM3,2.11.0+cu130,13.0,llama3-8b,4096,,,2,baseline,fwd,0.5,270.00,40.0
NVIDIA H100 80GB HBM3,2.11.0+cu130,13.0,llama3-8b,4096,,,2,fused,fwd,0.45,290.00,30.0
NVIDIA H100 80GB HBM3,2.11.0+cu130,13.0,llama3-8b,8192,,,2,fused,fwd,1.8,300.00,60.0
NVIDIA H100 80GB HBM3,2.11.0+cu130,13.0,llama3-8b,8192,1,0,2,fused,fwd,1.7,310.00,60.0
NVIDIA H100 80GB HBM3,2.11.0+cu130,13.0,llama3-8b,8192,,,2,baseline,fwd,1.9,305.00,70.0
NVIDIA H100 80GB HBM3,2.11.0+cu130,13.0,llama3-8b,65536,8,7,2,fused,fwd,14.2,310.00,150.0
NVIDIA H100 80GB HBM3,2.11.0+cu130,13.0,llama3-70b,4096,,,4,sdpa_flash,fwd_bwd,3.0,220.00,80.0
"""


def _plot_module():
    import plot_results

    return plot_results


def test_plot_grouping(tmp_path):
    pr = _plot_module()
    path = tmp_path / "b.csv"
    path.write_text(PLOT_CSV)
    rows = pr.read_rows([str(path)])
    prow, pcol, data = pr.collect(rows)
    assert prow == [("fwd", "llama3-8b"), ("fwd_bwd", "llama3-70b")]
    assert pcol == ["2 groups", "4 groups", "N=8, rank 7"]
    # --world-size 1 is the 2-group workload: its 8192 point is averaged with the default one
    assert data[(("fwd", "llama3-8b"), "2 groups")]["fused"] == [(4096, 290.0), (8192, 305.0)]
    assert data[(("fwd", "llama3-8b"), "N=8, rank 7")] == {"fused": [(65536, 310.0)]}
    assert data[(("fwd_bwd", "llama3-70b"), "4 groups")] == {"sdpa_flash": [(4096, 220.0)]}
    assert pr.impl_order(rows) == ["baseline", "fused", "sdpa_flash"]
    assert [pr.seqlen_label(n) for n in (4096, 131072, 1000)] == ["4K", "128K", "1000"]
    assert "NVIDIA H100 80GB HBM3" in pr.title_text(rows, "tflops", [str(path)])
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a benchmark CSV"):
        pr.read_rows([str(bad)])


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is a tool dependency, not installed here")
    pr = _plot_module()
    path = tmp_path / "b.csv"
    path.write_text(PLOT_CSV)
    out = tmp_path / "plots" / "b.png"
    assert pr.main([str(path), "-o", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pr.main([str(path), "--metric", "time_ms"]) == 0
    assert (tmp_path / "b_time_ms.png").exists()


def test_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    pr = _plot_module()
    path = tmp_path / "b.csv"
    path.write_text(PLOT_CSV)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert pr.main([str(path)]) == pr.EXIT_NO_MATPLOTLIB
    err = capsys.readouterr().err
    assert "needs matplotlib" in err and "pip install matplotlib" in err
    assert not (tmp_path / "b.png").exists()


# ---- grouped_python vs the fused kernel (CPU backend) ------------------------------------------



# (query lengths per group and sequence, key lengths, seqused per group (None = all), extra rows
#  after the last sequence per group (q) and for K/V, Hq, Hk, causal)
CASES = {
    "g2-gqa-causal": ([[5, 17, 1], [9, 3, 8]], [12, 17, 9], [[4, 17, 0], None], [0, 0], 0, 8, 2, True),
    "g3-gqa-tail-rows": ([[3, 13, 2], [7, 1, 5], [0, 4, 4]], [7, 13, 5],
                         [[3, 13, 5], None, [0, 10, 4]], [0, 2, 1], 3, 4, 2, True),
    "g3-mqa-noncausal": ([[6, 2], [1, 11], [4, 4]], [10, 7], [None, [5, 7], [10, 0]], [1, 0, 0], 0, 4, 1, False),
}


@needs_library
@pytest.mark.parametrize("name", sorted(CASES))
def test_grouped_python_matches_fused_kernel(name):
    from ring_flash_attn import grouped_flash_attn_varlen_func
    from ring_flash_attn.grouped_python import _flash_attn_varlen_forward_grouped

    seqlens_q, seqlens_k, used, extra_q, extra_k, Hq, Hk, causal = CASES[name]
    D = 16
    gen = torch.Generator().manual_seed(7)
    G = len(seqlens_q)
    total_k = sum(seqlens_k) + extra_k
    q_list = [torch.randn(sum(seqlens_q[g]) + extra_q[g], Hq, D, generator=gen).requires_grad_() for g in range(G)]
    k = torch.randn(total_k, Hk, D, generator=gen).requires_grad_()
    v = torch.randn(total_k, Hk, D, generator=gen).requires_grad_()
    cu_q = [cu_seqlens(s) for s in seqlens_q]
    cu_k = cu_seqlens(seqlens_k)
    seqused = [None if u is None else torch.tensor(u, dtype=torch.int32) for u in used]
    max_q = [max(s) for s in seqlens_q]
    args = (q_list, k, v, cu_q, cu_k, max_q, max(seqlens_k))

    out_f, lse_f = grouped_flash_attn_varlen_func(*args, seqused_k_list=seqused, softmax_scale=0.3, causal=causal,
                                                  return_lse=True)
    out_p, lse_p = _flash_attn_varlen_forward_grouped(*args, seqused_k_list=seqused, softmax_scale=0.3,
                                                      causal=causal)
    assert len(out_p) == len(lse_p) == G
    for g in range(G):
        assert out_p[g].shape == q_list[g].shape and out_p[g].dtype == q_list[g].dtype
        assert lse_p[g].shape == (Hq, q_list[g].shape[0]) and lse_p[g].dtype == torch.float32
        assert lse_p[g].is_contiguous()
        torch.testing.assert_close(out_p[g], out_f[g], atol=1e-5, rtol=1e-5)
        assert torch.equal(torch.isneginf(lse_p[g]), torch.isneginf(lse_f[g]))
        finite = torch.isfinite(lse_f[g])
        torch.testing.assert_close(lse_p[g][finite], lse_f[g][finite], atol=1e-5, rtol=1e-5)

    douts = [torch.randn(o.shape, generator=gen) for o in out_f]
    leaves = [*q_list, k, v]
    grads_f = torch.autograd.grad(out_f, leaves, douts)
    grads_p = torch.autograd.grad(out_p, leaves, douts)
    names = [f"dq[{g}]" for g in range(G)] + ["dk", "dv"]
    for n, a, b in zip(names, grads_p, grads_f):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@needs_library
def test_grouped_python_single_group_and_errors():
    from ring_flash_attn import flash_attn_varlen_func
    from ring_flash_attn.grouped_python import _flash_attn_varlen_forward_grouped

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(10, 4, 16, generator=gen)
    k = torch.randn(12, 2, 16, generator=gen)
    v = torch.randn(12, 2, 16, generator=gen)
    cu_q, cu_k = cu_seqlens([4, 6]), cu_seqlens([5, 7])
    out, lse = _flash_attn_varlen_forward_grouped([q], k, v, [cu_q], cu_k, [6], 7)
    ref, ref_lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 7, causal=True, return_attn_probs=True)
    torch.testing.assert_close(out[0], ref)
    torch.testing.assert_close(lse[0], ref_lse)

    with pytest.raises(ValueError, match="cu_seqlens_q_list"):
        _flash_attn_varlen_forward_grouped([q, q], k, v, [cu_q], cu_k, [6, 6], 7)
    with pytest.raises(ValueError, match="cu_seqlens_q_list\\[0\\]"):
        _flash_attn_varlen_forward_grouped([q], k, v, [cu_seqlens([10])], cu_k, [10], 7)
    with pytest.raises(ValueError, match="seqused_k_list\\[0\\]"):
        _flash_attn_varlen_forward_grouped([q], k, v, [cu_q], cu_k, [6], 7,
                                           seqused_k_list=[torch.tensor([1], dtype=torch.int32)])
    with pytest.raises(ValueError, match="q_list"):
        _flash_attn_varlen_forward_grouped([], k, v, [], cu_k, [], 7)


# ---- scripts/host_overhead.py ------------------------------------------------------------------


def test_host_overhead_script_runs_on_cpu():
    """The per-call host-time script (run by scripts/device_run.sh on the GPU) runs on the CPU
    backend and prints one timing row per layer."""
    script = os.path.join(_ROOT, "scripts", "host_overhead.py")
    res = subprocess.run([sys.executable, script, "--device", "cpu", "--calls", "4", "--repeats", "1"],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    names = ("ctypes call", "lib call fwd", "fwd_into", "op (no grad)", "public (no grad)", "public (grad)",
             "fwd+bwd (grad)", "lib call bwd", "bwd_into", "op bwd", "autograd floor")
    for name in names:
        line = next((l for l in res.stdout.splitlines() if l.strip().startswith(name)), None)
        assert line is not None, f"no row {name!r} in:\n{res.stdout}"
        us = float(line.split(" us")[0].split()[-1])
        assert us > 0.0, line


# ---- scripts/dev/ncu_table.py -------------------------------------------------------------------

_NCU_REPORT = """==PROF== Connected to process 123
  grouped_fwd_kernel(FwdKernelParams) (1024, 1, 1)x(384, 1, 1), Context 1, Stream 7, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    DRAM Frequency                  Ghz         {freq}
    Duration                         ms        {dur}
    Compute (SM) Throughput           %        {sm}
    ----------------------- ----------- ------------
    Duration                         ms        99.99
"""


def test_ncu_table_puts_reports_side_by_side(tmp_path):
    """ncu_table.py (used by scripts/dev/fwd_ncu_ab.sh and features_ncu.sh): one row per metric of
    the first report, the first value of each metric, '-' where a report lacks it."""
    a = tmp_path / "a.txt"
    b = tmp_path / "b.txt"
    a.write_text(_NCU_REPORT.format(freq="2.62", dur="33.74", sm="57.77"))
    b.write_text(_NCU_REPORT.format(freq="2.62", dur="25.08", sm="55.81").replace(
        "    Compute (SM) Throughput           %        55.81\n", ""))
    script = os.path.join(_ROOT, "scripts", "dev", "ncu_table.py")
    res = subprocess.run([sys.executable, script, f"causal={a}", f"window={b}"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    rows = {line[:48].strip(): line.split() for line in res.stdout.splitlines()[1:]}
    assert res.stdout.splitlines()[0].split()[-2:] == ["causal", "window"]
    assert rows["Duration"][-2:] == ["33.74", "25.08"]  # the first launch's, not the later 99.99
    assert rows["Compute (SM) Throughput"][-2:] == ["57.77", "-"]
    assert rows["DRAM Frequency"][-2:] == ["2.62", "2.62"]
    missing = subprocess.run([sys.executable, script, f"x={tmp_path / 'none.txt'}"], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 1 and "no report" in missing.stderr
    empty = tmp_path / "empty.txt"
    empty.write_text("==ERROR== no kernel profiled\n")
    res = subprocess.run([sys.executable, script, str(empty)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no metric lines" in res.stderr


# ---- time_calls / time_calls_queued on a simulated GPU stream ------------------------------------


class _FakeStream:
    """One CUDA stream and the host, on two simulated clocks (ms): a call costs the host host_ms,
    then queues kernel_ms of GPU work; an event completes when the stream reaches it."""

    def __init__(self, host_ms: float, kernel_ms: float, cycles_per_ms: float = 1.5e6):
        self.host = 0.0
        self.gpu = 0.0  # when the stream's queued work ends
        self.host_ms, self.kernel_ms, self.cycles_per_ms = host_ms, kernel_ms, cycles_per_ms
        stream = self

        class Event:
            def __init__(self, enable_timing: bool = False):
                self.stamp = None

            def record(self):
                stream.gpu = max(stream.gpu, stream.host)
                self.stamp = stream.gpu

            def synchronize(self):
                stream.host = max(stream.host, self.stamp)

            def elapsed_time(self, other):
                return other.stamp - self.stamp

        self.Event = Event

    def call(self):
        self.host += self.host_ms
        self.gpu = max(self.gpu, self.host) + self.kernel_ms

    def sleep(self, cycles):
        self.gpu = max(self.gpu, self.host) + cycles / self.cycles_per_ms

    def synchronize(self):
        self.host = max(self.host, self.gpu)

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "Event", self.Event)
        monkeypatch.setattr(torch.cuda, "_sleep", self.sleep)
        monkeypatch.setattr(torch.cuda, "synchronize", self.synchronize)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(bench.time, "perf_counter", lambda: self.host / 1e3)
        monkeypatch.setattr(bench, "_SLEEP_CYCLES_PER_MS", {})


@pytest.mark.parametrize("host_ms,kernel_ms", [(1.0, 0.3), (0.2, 0.5)])
def test_queued_timing_takes_the_host_out(monkeypatch, host_ms, kernel_ms):
    """time_calls sees the larger of the host's and the kernels' time per call (a host-bound call
    keeps the GPU waiting); time_calls_queued holds the stream until every call is queued and sees
    the kernels' time alone, with no GPU wait between calls; time_calls reports the host's time
    per call when asked."""
    stream = _FakeStream(host_ms, kernel_ms)
    stream.install(monkeypatch)
    device = torch.device("cuda")
    host = []
    seen = bench.time_calls([stream.call], 20, 3, contextlib.nullcontext, device, host)
    assert seen == pytest.approx(max(host_ms, kernel_ms))
    assert host == [pytest.approx(host_ms)]
    assert bench.sleep_cycles_per_ms() == pytest.approx(1.5e6)
    gpu, idle = bench.time_calls_queued([stream.call], 20, host[0], contextlib.nullcontext)
    assert gpu == pytest.approx(kernel_ms) and idle == pytest.approx(0.0)
