"""CPU-only checks of the benchmark's pure-Python parts and of the Python-grouped implementation.

* benchmark/benchmark_grouped_attention.py: workload construction (default and zigzag per-rank),
  the unmasked-pairs count and the FLOPs formula against brute force, the analytic K/V bytes
  against the figures in DESIGN.md, the CSV header, and the command line without a GPU.
* --measure-hbm: parsing canned Nsight Compute CSV output, the ncu command line (its child
  arguments give back the same workload), error classification, and the whole path on the CPU
  backend with a fake `ncu` ($NCU) and without one (fallback to the analytic bytes).
* scripts/host_overhead.py runs on the CPU backend (one timing row per layer).
* The progress lines ([i/n], elapsed time) and benchmark/plot_results.py (grouping always; the
  PNG only where matplotlib is importable).
* ring_flash_attn.grouped_python._flash_attn_varlen_forward_grouped against the fused
  grouped_flash_attn_varlen_func on the CPU backend (float32; GQA, varlen, seqused_k, rows after
  the last sequence), forward and gradients.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from cases import cu_seqlens

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH_DIR = os.path.join(_ROOT, "benchmark")
_SCRIPT = os.path.join(_BENCH_DIR, "benchmark_grouped_attention.py")
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)

import benchmark_grouped_attention as bench  # noqa: E402


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


def test_kv_bytes_match_design_figures():
    # DESIGN.md section 3: L = 65536, N = 8, Llama3-8B (8 KV heads, D = 128), bf16:
    # two calls read 285 MB of K/V, the shared stream 268 MB at rank 0 and 151 MB at rank 7.
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
    assert "--_ncu-child" not in r.stdout  # internal


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU exit path")
def test_no_gpu_exits_with_code_2():
    r = _run_script("--seqlens", "1024")
    assert r.returncode == 2
    assert "no CUDA GPU" in r.stderr
    assert "Traceback" not in r.stderr


# ---- --measure-hbm: ncu output and command ----------------------------------------------------

# `ncu --csv` output for two launches, written by hand after ncu's long CSV form (not captured from
# a run): its own ==PROF== lines, the profiled program's output, one row per launch and metric, a
# kernel name with commas, and values with thousands separators and in scaled units.
NCU_OUTPUT = """\
==PROF== Connected to process 4242 (/usr/bin/python3.12)
note: something the program printed
==PROF== Profiling "grouped_fwd_kernel" - 0: 0%....50%....100% - 1 pass
==PROF== Profiling "grouped_fwd_kernel" - 1: 0%....50%....100% - 1 pass
==PROF== Disconnected from process 4242
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","4242","python3.12","127.0.0.1","void ringattn::grouped_fwd_kernel<Traits<128, 32, 4>, true>(Params, int)","1","7","(128, 1, 1)","(32, 32, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","52,428,800"
"0","4242","python3.12","127.0.0.1","void ringattn::grouped_fwd_kernel<Traits<128, 32, 4>, true>(Params, int)","1","7","(128, 1, 1)","(32, 32, 1)","0","9.0","Command line profiler metrics","lts__t_sector_hit_rate.pct","%","90.31"
"1","4242","python3.12","127.0.0.1","void ringattn::grouped_fwd_kernel<Traits<128, 32, 4>, true>(Params, int)","1","7","(128, 1, 1)","(512, 32, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","Gbyte","1.22"
"""


def test_parse_ncu_csv_canned_output():
    launches = bench.parse_ncu_csv(NCU_OUTPUT)
    assert [launch.launch_id for launch in launches] == ["0", "1"]
    assert launches[0].kernel.startswith("void ringattn::grouped_fwd_kernel<Traits<128, 32, 4>")  # commas kept
    assert launches[0].value == 52_428_800
    assert launches[1].value == pytest.approx(1.22e9)
    total, n = bench.interpret_ncu_output(NCU_OUTPUT, 0)
    assert n == 2 and total == pytest.approx(52_428_800 + 1.22e9)
    assert bench.parse_ncu_csv("==PROF== nothing\n") == []
    assert bench.parse_ncu_csv(NCU_OUTPUT, metric="dram__bytes_write.sum") == []


@pytest.mark.parametrize("text, value", [
    ("1240000000", 1240000000.0), ("1,240,000,000", 1240000000.0), ("1.22", 1.22), ("9,00", 9.0),
    ("1,234.5", 1234.5), ("1.234.567,8", 1234567.8), ("52 428 800", 52428800.0), ("0", 0.0)])
def test_parse_ncu_number(text, value):
    assert bench.parse_ncu_number(text) == pytest.approx(value)


def test_ncu_units():
    assert bench.ncu_unit_scale("byte") == 1 and bench.ncu_unit_scale("Mbyte") == 1e6
    assert bench.ncu_unit_scale("Gbyte") == 1e9 and bench.ncu_unit_scale("KB") == 1e3
    with pytest.raises(ValueError, match="unit"):
        bench.ncu_unit_scale("%")


def test_interpret_ncu_output_failures():
    # no permission to read the counters: ncu itself fails, later calls would too
    perm = ("==PROF== Connected to process 1\n==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to "
            "access NVIDIA GPU Performance Counters on the target device 0.\n")
    with pytest.raises(bench.NcuError, match="ERR_NVGPUCTRPERM") as e:
        bench.interpret_ncu_output(perm, 0)
    assert e.value.tool
    # the helper could not run this implementation: only this measurement is lost
    child = f"==PROF== Connected\n{bench.NCU_CHILD_ERROR_PREFIX} fused unavailable (no library)\n"
    with pytest.raises(bench.NcuError, match="fused unavailable") as e:
        bench.interpret_ncu_output(child, bench.NCU_CHILD_FAILED)
    assert not e.value.tool
    # nothing matched the kernel filter
    none = "==PROF== Connected\n==WARNING== No kernels were profiled.\n==PROF== Disconnected\n"
    with pytest.raises(bench.NcuError, match="No kernels were profiled") as e:
        bench.interpret_ncu_output(none, 0)
    assert not e.value.tool
    # ncu crashed
    with pytest.raises(bench.NcuError, match="status 139") as e:
        bench.interpret_ncu_output("Segmentation fault\n", 139)
    assert e.value.tool
    with pytest.raises(bench.NcuError, match="unreadable"):
        bench.interpret_ncu_output(NCU_OUTPUT.replace('"Gbyte"', '"%"'), 0)


@pytest.mark.parametrize("kwargs", [dict(seqlen=65536, world_size=8, rank=7), dict(seqlen=4096, num_groups=4),
                                    dict(seqlen=2048, num_groups=2, batch=3)])
def test_ncu_command_round_trip(kwargs):
    w = bench.build_workload(**kwargs)
    cmd = bench.ncu_command("/opt/ncu", "baseline", w, "llama3-70b", "fp16", python="py", script="bench.py",
                            extra=["--device", "cpu"])
    assert cmd[0] == "/opt/ncu"
    joined = " ".join(cmd)
    for part in ("--clock-control none", "--profile-from-start off", "--metrics dram__bytes_read.sum",
                 "-k regex:grouped_fwd_kernel", "--csv", "--print-units base", "py bench.py --_ncu-child baseline"):
        assert part in joined
    args = bench.parse_args(cmd[cmd.index("bench.py") + 1:])
    assert args.ncu_child == "baseline" and args.config == "llama3-70b" and args.dtype == "fp16"
    assert args.device == "cpu"
    assert bench.workloads_from_args(args) == [w]


def test_find_ncu_honours_env(tmp_path, monkeypatch):
    fake = tmp_path / "ncu"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("NCU", str(fake))
    assert bench.find_ncu() == str(fake)
    monkeypatch.setenv("NCU", str(tmp_path / "missing"))
    assert bench.find_ncu() is None


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


# ---- --measure-hbm end to end on the CPU backend -------------------------------------------------


FAKE_NCU = """\
import sys
argv = sys.argv[1:]
assert argv[:2] == ["--clock-control", "none"], argv
impl = argv[argv.index("--_ncu-child") + 1]
print("==PROF== Connected to process 4242")
print('"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"')
for i in range(2 if impl == "baseline" else 1):  # baseline: one launch per group
    print(f'"{i}","grouped_fwd_kernel","dram__bytes_read.sum","byte","{(i + 1) * 1_500_000:,}"')
print("==PROF== Disconnected from process 4242")
"""


def _library_available() -> bool:
    try:
        from ring_flash_attn import _lib
    except ImportError:
        return False
    return _lib.is_available()


needs_library = pytest.mark.skipif(not _library_available(), reason="libringattn cannot be loaded")


def _run_cpu_bench(tmp_path, env_extra, *argv):
    csv_path = tmp_path / "out.csv"
    # The child imports the same ring_flash_attn as this process (the installed one under CI,
    # python/ with RING_FLASH_ATTN_LIBRARY in a development run), so it finds the same library.
    import ring_flash_attn

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(ring_flash_attn.__file__)))
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(
        [package_parent, os.environ.get("PYTHONPATH", "")]), **env_extra)
    r = subprocess.run([sys.executable, _SCRIPT, "--device", "cpu", "--seqlens", "64", "--num-runs", "1",
                        "--warmup", "0", "--output-dir", "", "--csv", str(csv_path), "--measure-hbm", *argv],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    with open(csv_path, newline="") as f:
        rows = {(row["impl"], row["pass"]): row for row in csv.DictReader(f)}
    return r, rows


@needs_library
def test_measure_hbm_with_fake_ncu(tmp_path):
    fake = tmp_path / "ncu"
    fake.write_text(f"#!{sys.executable}\n" + FAKE_NCU)
    fake.chmod(0o755)
    r, rows = _run_cpu_bench(tmp_path, {"NCU": str(fake)}, "--impls", "baseline", "grouped_python", "fused",
                             "sdpa_flash")
    assert "HBM MB (ncu)" in r.stdout and "KV MB (analytic)" not in r.stdout
    assert "baseline 2 launches" in r.stdout and "fused 1 launch" in r.stdout
    assert rows["baseline", "fwd"]["hbm_mb"] == "4.5"  # 1.5 MB + 3.0 MB, the sum of its two launches
    assert rows["grouped_python", "fwd"]["hbm_mb"] == rows["fused", "fwd"]["hbm_mb"] == "1.5"
    # sdpa_flash is not measured: analytic K/V bytes, marked in the table
    w = bench.build_workload(64, 2)
    assert float(rows["sdpa_flash", "fwd"]["hbm_mb"]) == pytest.approx(
        bench.kv_bytes_read(w, "sdpa_flash", 8, 128, 2) / 1e6, abs=0.06)
    assert " (a) " in r.stdout
    assert "[1/1]" in r.stderr and "ncu: one baseline fwd call" in r.stderr
    assert list(rows["fused", "fwd"].keys()) == list(bench.CSV_COLUMNS)


@needs_library
def test_measure_hbm_without_ncu_falls_back(tmp_path):
    r, rows = _run_cpu_bench(tmp_path, {"NCU": str(tmp_path / "no-ncu-here")}, "--impls", "baseline", "fused",
                             "--passes", "fwd", "fwd_bwd")
    assert "KV MB (analytic, no ncu)" in r.stdout and "HBM MB (ncu)" not in r.stdout
    assert "KV MB (analytic) " in r.stdout  # the fwd_bwd table: never measured
    assert "ncu not found" in r.stdout
    assert "HBM: not measured with ncu" in r.stdout
    w = bench.build_workload(64, 2)
    for pass_name in ("fwd", "fwd_bwd"):
        assert float(rows["fused", pass_name]["hbm_mb"]) == pytest.approx(
            bench.kv_bytes_read(w, "fused", 8, 128, 2, pass_name) / 1e6, abs=0.06)
    assert "[1/2]" in r.stderr and "[2/2]" in r.stderr and "elapsed" in r.stderr


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
    names = ("ctypes call", "fwd_into", "op (no grad)", "public (no grad)", "public (grad)", "fwd+bwd (grad)")
    for name in names:
        line = next((l for l in res.stdout.splitlines() if l.strip().startswith(name)), None)
        assert line is not None, f"no row {name!r} in:\n{res.stdout}"
        us = float(line.split(" us")[0].split()[-1])
        assert us > 0.0, line
