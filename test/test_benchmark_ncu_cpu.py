"""CPU-only checks of benchmark/ncu_hbm.py, the Nsight Compute measurement behind the grouped
attention benchmark's --measure-hbm: parsing canned ncu CSV output, error classification, the
ncu command line (its child arguments give back the same workload), the HBM column's header and
notes, the child entry point on the CPU backend, and the whole --measure-hbm path of the
benchmark on the CPU backend with a fake `ncu` ($NCU) and without one (analytic bytes).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from cases import library_available

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH_DIR = os.path.join(_ROOT, "benchmark")
_SCRIPT = os.path.join(_BENCH_DIR, "benchmark_grouped_attention.py")
_CHILD = os.path.join(_BENCH_DIR, "ncu_hbm.py")
if _BENCH_DIR not in sys.path:
    sys.path.insert(0, _BENCH_DIR)

import benchmark_grouped_attention as bench  # noqa: E402
import ncu_hbm as ncu  # noqa: E402

needs_library = pytest.mark.skipif(not library_available(), reason="libringattn cannot be loaded")


def test_measured_impls_are_the_librarys():
    assert ncu.MEASURED_IMPLS == bench.OUR_IMPLS


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
    launches = ncu.parse_ncu_csv(NCU_OUTPUT)
    assert [launch.launch_id for launch in launches] == ["0", "1"]
    assert launches[0].kernel.startswith("void ringattn::grouped_fwd_kernel<Traits<128, 32, 4>")  # commas kept
    assert launches[0].value == 52_428_800
    assert launches[1].value == pytest.approx(1.22e9)
    total, n = ncu.interpret_ncu_output(NCU_OUTPUT, 0)
    assert n == 2 and total == pytest.approx(52_428_800 + 1.22e9)
    assert ncu.parse_ncu_csv("==PROF== nothing\n") == []
    assert ncu.parse_ncu_csv(NCU_OUTPUT, metric="dram__bytes_write.sum") == []


@pytest.mark.parametrize("text, value", [
    ("1240000000", 1240000000.0), ("1,240,000,000", 1240000000.0), ("1.22", 1.22), ("9,00", 9.0),
    ("1,234.5", 1234.5), ("1.234.567,8", 1234567.8), ("52 428 800", 52428800.0), ("0", 0.0)])
def test_parse_ncu_number(text, value):
    assert ncu.parse_ncu_number(text) == pytest.approx(value)


def test_ncu_units():
    assert ncu.ncu_unit_scale("byte") == 1 and ncu.ncu_unit_scale("Mbyte") == 1e6
    assert ncu.ncu_unit_scale("Gbyte") == 1e9 and ncu.ncu_unit_scale("KB") == 1e3
    with pytest.raises(ValueError, match="unit"):
        ncu.ncu_unit_scale("%")


def test_interpret_ncu_output_failures():
    # no permission to read the counters: ncu itself fails, later calls would too
    perm = ("==PROF== Connected to process 1\n==ERROR== ERR_NVGPUCTRPERM - The user does not have permission to "
            "access NVIDIA GPU Performance Counters on the target device 0.\n")
    with pytest.raises(ncu.NcuError, match="ERR_NVGPUCTRPERM") as e:
        ncu.interpret_ncu_output(perm, 0)
    assert e.value.tool
    # the helper could not run this implementation: only this measurement is lost
    child = f"==PROF== Connected\n{ncu.CHILD_ERROR_PREFIX} fused unavailable (no library)\n"
    with pytest.raises(ncu.NcuError, match="fused unavailable") as e:
        ncu.interpret_ncu_output(child, ncu.CHILD_FAILED)
    assert not e.value.tool
    # nothing matched the kernel filter
    none = "==PROF== Connected\n==WARNING== No kernels were profiled.\n==PROF== Disconnected\n"
    with pytest.raises(ncu.NcuError, match="No kernels were profiled") as e:
        ncu.interpret_ncu_output(none, 0)
    assert not e.value.tool
    # ncu crashed
    with pytest.raises(ncu.NcuError, match="status 139") as e:
        ncu.interpret_ncu_output("Segmentation fault\n", 139)
    assert e.value.tool
    with pytest.raises(ncu.NcuError, match="unreadable"):
        ncu.interpret_ncu_output(NCU_OUTPUT.replace('"Gbyte"', '"%"'), 0)


@pytest.mark.parametrize("kwargs", [dict(seqlen=65536, world_size=8, rank=7), dict(seqlen=4096, num_groups=4),
                                    dict(seqlen=2048, num_groups=2, batch=3)])
def test_ncu_command_round_trip(kwargs):
    """The child's arguments in the ncu command give back the same workload and settings."""
    w = bench.build_workload(**kwargs)
    cmd = ncu.ncu_command("/opt/ncu", "baseline", w, "llama3-70b", "fp16", python="py", script="child.py",
                          extra=["--device", "cpu"])
    assert cmd[0] == "/opt/ncu"
    joined = " ".join(cmd)
    for part in ("--clock-control none", "--profile-from-start off", "--metrics dram__bytes_read.sum",
                 "-k regex:grouped_fwd_kernel", "--csv", "--print-units base", "py child.py baseline"):
        assert part in joined
    impl, args = ncu.parse_child_args(cmd[cmd.index("child.py") + 1:])
    assert impl == "baseline" and args.config == "llama3-70b" and args.dtype == "fp16"
    assert args.device == "cpu"
    assert bench.workloads_from_args(args) == [w]


def test_child_args_rejected():
    w = bench.build_workload(4096, num_groups=2)
    good = ncu.workload_arguments(w, "llama3-8b", "bf16")
    for bad in (["sdpa_flash", *good], [], ["fused", *good, "--seqlens", "4096", "8192"]):
        with pytest.raises(SystemExit) as e:
            ncu.parse_child_args(bad)
        assert e.value.code == 2


def test_find_ncu_honours_env(tmp_path, monkeypatch):
    fake = tmp_path / "ncu"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("NCU", str(fake))
    assert ncu.find_ncu() == str(fake)
    monkeypatch.setenv("NCU", str(tmp_path / "missing"))
    assert ncu.find_ncu() is None


def test_probe_without_ncu():
    probe = ncu.HbmProbe(None, "llama3-8b", "bf16")
    assert "ncu not found" in probe.describe(["fused"])
    notes = []
    assert probe.measure("fused", bench.build_workload(64, 2), notes.append) == (None, probe.unavailable)
    assert notes == []  # no progress line for a measurement that does not run


# ---- the HBM column's header and notes -----------------------------------------------------------


def test_column_header_and_notes():
    measured = {"baseline": True, "fused": True, "sdpa_flash": False}
    header, lines = ncu.HbmProbe.column(measured, {"baseline": "2 launches", "fused": "1 launch"})
    assert header == "HBM MB (ncu)"
    assert "baseline 2 launches, fused 1 launch" in lines[0] and lines[1].startswith("  (a): not measured")
    # nothing measured, one reason for all: one line says why
    header, lines = ncu.HbmProbe.column({"baseline": False, "fused": False},
                                        {"baseline": "ncu not found", "fused": "ncu not found"})
    assert header == "KV MB (analytic, no ncu)"
    assert lines == ["  HBM: not measured with ncu (ncu not found): the column holds the analytic K/V bytes"]
    # one row failed on its own: named
    header, lines = ncu.HbmProbe.column({"baseline": True, "fused": False},
                                        {"baseline": "2 launches", "fused": "crash"})
    assert header == "HBM MB (ncu)" and lines[-1].startswith("  ncu: fused not measured (crash)")
    # a pass that is never measured (backward)
    assert ncu.HbmProbe.column({"fused": False}, {}) == ("KV MB (analytic)", [])
    assert ncu.HbmProbe.wants("fused", "fwd") and not ncu.HbmProbe.wants("fused", "fwd_bwd")
    assert not ncu.HbmProbe.wants("sdpa_flash", "fwd")


# ---- the child entry point -----------------------------------------------------------------------


def _child_env():
    # The child imports the same ring_flash_attn as this process (the installed one under CI,
    # python/ with RING_FLASH_ATTN_LIBRARY in a development run), so it finds the same library.
    import ring_flash_attn

    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(ring_flash_attn.__file__)))
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(
        [package_parent, os.environ.get("PYTHONPATH", "")]))


@needs_library
def test_child_without_gpu_reports_its_failure():
    """Asked for a GPU where there is none, the child exits CHILD_FAILED with a reason that
    interpret_ncu_output reads as this call's failure, not ncu's. (Its CPU run is exercised by
    the fake ncu below.)"""
    args = ncu.workload_arguments(bench.build_workload(64, num_groups=2), "llama3-8b", "bf16")
    r = subprocess.run([sys.executable, _CHILD, "fused", *args], capture_output=True, text=True, env=_child_env(),
                       timeout=120)
    assert r.returncode == ncu.CHILD_FAILED, r.stdout + r.stderr
    with pytest.raises(ncu.NcuError, match="no CUDA GPU") as e:
        ncu.interpret_ncu_output(r.stdout + r.stderr, r.returncode)
    assert not e.value.tool


# ---- --measure-hbm end to end on the CPU backend -------------------------------------------------


# Checks ncu's options, runs the profiled command (the child, on the CPU backend) as ncu would, and
# prints ncu-like CSV: one launch per group for baseline, one for the others.
FAKE_NCU = """\
import subprocess, sys
argv = sys.argv[1:]
assert argv[:2] == ["--clock-control", "none"], argv
command = argv[argv.index("--print-units") + 2:]
assert command[1].endswith("ncu_hbm.py"), command
impl = command[2]
child = subprocess.run(command, capture_output=True, text=True)
print("==PROF== Connected to process 4242")
if child.returncode != 0:
    sys.stdout.write(child.stdout + child.stderr)
    sys.exit(child.returncode)
print('"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"')
for i in range(2 if impl == "baseline" else 1):  # baseline: one launch per group
    print(f'"{i}","grouped_fwd_kernel","dram__bytes_read.sum","byte","{(i + 1) * 1_500_000:,}"')
print("==PROF== Disconnected from process 4242")
"""


def _run_cpu_bench(tmp_path, env_extra, *argv):
    csv_path = tmp_path / "out.csv"
    env = dict(_child_env(), **env_extra)
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
