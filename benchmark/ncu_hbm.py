#!/usr/bin/env python
"""Measured HBM bytes for benchmark/benchmark_grouped_attention.py --measure-hbm (Nsight Compute).

With --measure-hbm the benchmark's HBM column holds measured DRAM reads instead of the analytic
K/V bytes. After timing a workload, each forward call of baseline, grouped_python, fused and
fused_sm80 runs once more in a subprocess under Nsight Compute:

    ncu --clock-control none --profile-from-start off --metrics dram__bytes_read.sum
        -k regex:grouped_fwd_kernel --csv --print-units base
        python benchmark/ncu_hbm.py IMPL <the workload's benchmark arguments>

This file run as a script is that subprocess: it takes the benchmark's own workload arguments
(exactly one workload), makes one warm-up forward call of IMPL and one more inside a
cudaProfilerStart/Stop range, which is all that ncu profiles. It can be run without ncu too (it
then only checks that the call works):

    python benchmark/ncu_hbm.py fused --seqlens 65536 --world-size 8 --rank 0

The cell is the DRAM bytes read summed over that call's grouped_fwd_kernel launches (baseline:
one per group); ncu flushes the caches before each launch. It counts all DRAM reads of the
attention kernels (Q, and K/V as often as L2 misses it), so it is larger than the analytic K/V
bytes; grouped_python's K/V copies are other kernels and not counted. Other rows (other
implementations, backward passes) keep the analytic number, marked "(a)". When ncu is missing or
fails, a note says why and the column is "KV MB (analytic, no ncu)". The CSV's hbm_mb holds
whichever number the table shows (the columns do not change).

Everything above the child entry point is pure Python (no torch) and is tested by
test/test_benchmark_ncu_cpu.py with canned ncu output and a fake ncu.
"""

from __future__ import annotations

import csv
import glob
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

NCU_METRIC = "dram__bytes_read.sum"
NCU_KERNEL_REGEX = "grouped_fwd_kernel"  # the attention kernel of baseline, grouped_python and fused (both tiers)
MEASURED_IMPLS = ("baseline", "grouped_python", "fused", "fused_sm80")  # the library's own implementations
NCU_TIMEOUT_S = 240  # one measurement: a Python start, a warm-up call and one profiled call
CHILD_FAILED = 3  # exit status of the child when the implementation cannot run
CHILD_ERROR_PREFIX = "ncu-child error:"
# ncu prints SI-prefixed byte units unless --print-units base; binary prefixes for completeness
_BYTE_UNITS = {"byte": 1.0, "b": 1.0, "kbyte": 1e3, "kb": 1e3, "mbyte": 1e6, "mb": 1e6, "gbyte": 1e9,
               "gb": 1e9, "tbyte": 1e12, "tb": 1e12, "kibyte": 2.0 ** 10, "kib": 2.0 ** 10,
               "mibyte": 2.0 ** 20, "mib": 2.0 ** 20, "gibyte": 2.0 ** 30, "gib": 2.0 ** 30}


class NcuError(Exception):
    """No usable ncu measurement. tool=True: ncu itself failed (missing permissions, a crash, a
    timeout), so later measurements would fail the same way; False: this one call failed."""

    def __init__(self, message: str, tool: bool):
        super().__init__(message)
        self.tool = tool


@dataclass(frozen=True)
class NcuLaunch:
    """One profiled kernel launch of ncu's CSV: its ID, kernel name and the metric in bytes."""

    launch_id: str
    kernel: str
    value: float


# ---- ncu's output (pure Python) ------------------------------------------------------------------


def parse_ncu_number(text: str) -> float:
    """A number as ncu prints it: '1240000000', '1,240,000,000' (thousands separators), '1.24',
    '9,00' or '1.234.567,8' (comma as the decimal separator, as some locales print)."""
    s = text.strip().replace("\u202f", "").replace("\u00a0", "").replace(" ", "")
    if s.count(".") >= 2 or ("." in s and "," in s and s.rfind(",") > s.rfind(".")):
        s = s.replace(".", "").replace(",", ".")  # 1.234.567,8
    elif "," in s:
        head, *groups = s.split(",")
        if groups and all(len(g.split(".")[0]) == 3 for g in groups) and 1 <= len(head.lstrip("+-")) <= 3:
            s = s.replace(",", "")  # 1,240,000,000 or 1,234.5
        elif len(groups) == 1:
            s = s.replace(",", ".")  # 9,00
    return float(s)


def ncu_unit_scale(unit: str) -> float:
    """Bytes per `unit` (ValueError for a unit that is not a byte count)."""
    key = unit.strip().lower()
    if key not in _BYTE_UNITS:
        raise ValueError(f"unexpected ncu unit {unit!r} (expected bytes)")
    return _BYTE_UNITS[key]


def parse_ncu_csv(text: str, metric: str = NCU_METRIC) -> List[NcuLaunch]:
    """The launches that report `metric` in `ncu --csv` output (one row per launch and metric),
    in order, values in bytes. Everything that is not a row of that table is skipped: ==PROF==,
    ==WARNING== and ==ERROR== lines and whatever the profiled program printed."""
    header: Optional[Dict[str, int]] = None
    launches = []
    for line in text.splitlines():
        if not line.startswith('"'):
            continue
        try:
            fields = next(csv.reader([line]))
        except (csv.Error, StopIteration):
            continue
        if "Metric Name" in fields and "Metric Value" in fields:
            header = {name: i for i, name in enumerate(fields)}
            continue
        if header is None or len(fields) != len(header) or fields[header["Metric Name"]] != metric:
            continue
        unit = fields[header["Metric Unit"]] if "Metric Unit" in header else "byte"
        value = parse_ncu_number(fields[header["Metric Value"]]) * ncu_unit_scale(unit)
        launch_id = fields[header["ID"]] if "ID" in header else str(len(launches))
        kernel = fields[header["Kernel Name"]] if "Kernel Name" in header else "?"
        launches.append(NcuLaunch(launch_id, kernel, value))
    return launches


def interpret_ncu_output(text: str, returncode: int, metric: str = NCU_METRIC) -> Tuple[float, int]:
    """(sum of `metric` over the profiled launches, number of launches) from one ncu run of the
    child (stdout and stderr together); NcuError when there is nothing usable."""
    messages = list(dict.fromkeys(line.strip() for line in text.splitlines()
                                  if line.startswith("==ERROR==") or line.startswith("==WARNING==")))
    child_errors = [line.strip() for line in text.splitlines() if line.startswith(CHILD_ERROR_PREFIX)]
    if child_errors:
        raise NcuError(child_errors[0][len(CHILD_ERROR_PREFIX):].strip(), tool=False)
    errors = [m for m in messages if m.startswith("==ERROR==")]
    if errors:
        raise NcuError(errors[0], tool=True)
    if returncode != 0:
        tail = [line.strip() for line in text.splitlines() if line.strip()][-1:] or ["no output"]
        raise NcuError(f"ncu exited with status {returncode} ({tail[0][:200]})", tool=True)
    try:
        launches = parse_ncu_csv(text, metric)
    except ValueError as e:
        raise NcuError(f"unreadable ncu output: {e}", tool=True) from None
    if not launches:
        warning = f" ({messages[0]})" if messages else ""
        raise NcuError(f"ncu reported no {metric} for a {NCU_KERNEL_REGEX} launch{warning}", tool=False)
    return sum(launch.value for launch in launches), len(launches)


# ---- running ncu (pure Python) -------------------------------------------------------------------


def workload_arguments(w, config: str, dtype: str) -> List[str]:
    """The benchmark arguments that give back workload `w` (a benchmark Workload) alone."""
    args = ["--seqlens", str(w.seqlen), "--config", config, "--dtype", dtype, "--batch", str(w.batch)]
    if w.world_size is not None:
        return args + ["--world-size", str(w.world_size), "--rank", str(w.rank)]
    return args + ["--num-groups", str(w.num_groups)]


def ncu_command(ncu: str, impl: str, w, config: str, dtype: str, python: Optional[str] = None,
                script: Optional[str] = None, extra: Sequence[str] = ()) -> List[str]:
    """The ncu command line that profiles one forward call of `impl` on workload `w` (this file's
    child entry point): DRAM bytes read by the kernels matching NCU_KERNEL_REGEX, inside the
    child's cudaProfilerStart/Stop range only, clocks untouched."""
    return [ncu, "--clock-control", "none", "--profile-from-start", "off", "--metrics", NCU_METRIC,
            "-k", f"regex:{NCU_KERNEL_REGEX}", "--csv", "--print-units", "base",
            python or sys.executable, script or os.path.abspath(__file__), impl,
            *workload_arguments(w, config, dtype), *extra]


def find_ncu() -> Optional[str]:
    """$NCU if set, else ncu on PATH, in $CUDA_HOME/bin, /usr/local/cuda/bin or the newest
    /opt/nvidia/nsight-compute/*/ncu; None when there is none."""
    if os.environ.get("NCU"):
        return shutil.which(os.environ["NCU"])
    found = shutil.which("ncu")
    if found:
        return found
    candidates = [os.path.join(d, "bin", "ncu") for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if d]
    candidates += sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True)
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


class HbmProbe:
    """Runs one forward call of one of the library's implementations under ncu, in a subprocess,
    and returns its DRAM bytes read; tells the benchmark's table how to head and annotate its
    HBM column.

    `unavailable` holds the reason once ncu is known not to work here (missing, no permission to
    read the counters, crashed, timed out): later calls then return it at once."""

    def __init__(self, ncu: Optional[str], config: str, dtype: str, extra: Sequence[str] = ()):
        self.ncu = ncu
        self.config = config
        self.dtype = dtype
        self.extra = list(extra)
        self.unavailable: Optional[str] = None if ncu else (
            "ncu not found ($NCU, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, /opt/nvidia/nsight-compute)")

    def describe(self, impls: Sequence[str]) -> str:
        """The report's header line about the HBM column."""
        if self.unavailable:
            return (f"HBM: --measure-hbm: {self.unavailable}; the HBM column holds the analytic K/V bytes "
                    f"(\"KV MB (analytic, no ncu)\")")
        return (f"HBM: --measure-hbm: {self.ncu} measures {NCU_METRIC} of one fwd call of each of "
                f"{', '.join(n for n in MEASURED_IMPLS if n in impls) or 'none requested'} "
                f"({NCU_KERNEL_REGEX} launches, in a subprocess); other rows and passes keep the analytic "
                f"K/V bytes")

    @staticmethod
    def wants(impl: str, pass_name: str) -> bool:
        return pass_name == "fwd" and impl in MEASURED_IMPLS

    def measure(self, impl: str, w, note: Callable[[str], None] = lambda text: None
                ) -> Tuple[Optional[float], str]:
        """(bytes, '<n> launch(es)') or (None, reason). `note` gets a progress line first."""
        if self.unavailable:
            return None, self.unavailable
        note(f"  ncu: one {impl} fwd call ({w.describe()})")
        cmd = ncu_command(self.ncu, impl, w, self.config, self.dtype, extra=self.extra)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=NCU_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.unavailable = f"ncu did not finish within {NCU_TIMEOUT_S} s"
            return None, self.unavailable
        except OSError as e:
            self.unavailable = f"ncu could not be started ({type(e).__name__}: {e})"
            return None, self.unavailable
        try:
            total, launches = interpret_ncu_output(r.stdout + "\n" + r.stderr, r.returncode)
        except NcuError as e:
            if e.tool:
                self.unavailable = str(e)
            return None, str(e)
        return total, f"{launches} launch{'es' if launches != 1 else ''}"

    @staticmethod
    def column(measured: Dict[str, bool], details: Dict[str, str]) -> Tuple[str, List[str]]:
        """(header, lines under the table) of one pass's HBM column. measured: impl -> whether its
        cell holds an ncu measurement, for the table's rows in order; details: impl -> launches,
        or why it was not measured. The header is "HBM MB (ncu)" when any row was measured
        (the others then show their analytic bytes marked "(a)"), "KV MB (analytic, no ncu)"
        when nothing was and a measurement failed, else "KV MB (analytic)"."""
        failed = {n: details[n] for n, m in measured.items() if not m and n in details}
        lines = []
        if any(measured.values()):
            header = "HBM MB (ncu)"
            launches = ", ".join(f"{n} {details[n]}" for n, m in measured.items() if m)
            lines.append(f"  HBM MB (ncu): {NCU_METRIC} summed over the call's {NCU_KERNEL_REGEX} launches "
                         f"({launches}); one call each under ncu, which flushes the caches before every launch")
            if not all(measured.values()):
                lines.append("  (a): not measured, the analytic K/V bytes (ncu measures the fwd calls of "
                             f"{', '.join(MEASURED_IMPLS)} only)")
        elif failed:
            header = "KV MB (analytic, no ncu)"
            if len(set(failed.values())) == 1:
                return header, [f"  HBM: not measured with ncu ({next(iter(failed.values()))}): the column "
                                f"holds the analytic K/V bytes"]
        else:
            header = "KV MB (analytic)"
        lines += [f"  ncu: {n} not measured ({reason}); its HBM cell holds the analytic K/V bytes"
                  for n, reason in failed.items()]
        return header, lines


# ---- the child: one forward call under ncu (needs torch) ----------------------------------------


def parse_child_args(argv: Sequence[str]):
    """(impl, the benchmark's parsed arguments) of `IMPL <benchmark workload arguments>`; exits
    with status 2 and a message naming the problem for anything else."""
    import benchmark_grouped_attention as bench

    def usage_error(message: str):
        print(f"usage: ncu_hbm.py IMPL <benchmark workload arguments>\nncu_hbm.py: error: {message}", file=sys.stderr)
        sys.exit(2)

    if not argv or argv[0] not in MEASURED_IMPLS:
        usage_error(f"IMPL: expected one of {', '.join(MEASURED_IMPLS)}, got {argv[0] if argv else 'nothing'}")
    args = bench.parse_args(list(argv[1:]))
    if len(bench.workloads_from_args(args)) != 1:
        usage_error("expected exactly one workload (one --seqlens, --num-groups and --rank value)")
    return argv[0], args


def child_main(argv: Sequence[str]) -> int:
    """One untimed warm-up forward call of IMPL on the single workload of the arguments, then one
    more inside a cudaProfilerStart/Stop range (what ncu profiles with --profile-from-start off).
    Reasons for failing go to stderr after CHILD_ERROR_PREFIX, exit status CHILD_FAILED."""
    import torch

    import benchmark_grouped_attention as bench

    name, args = parse_child_args(argv)

    def fail(reason: str) -> int:
        print(f"{CHILD_ERROR_PREFIX} {reason}", file=sys.stderr, flush=True)
        return CHILD_FAILED

    if args.device == "cuda" and not torch.cuda.is_available():
        return fail("no CUDA GPU is available")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = bench.CONFIGS[args.config]
    (w,) = bench.workloads_from_args(args)
    notes: Dict[str, str] = {}
    to_stderr = bench.Report(printer=lambda text: print(text, file=sys.stderr, flush=True))
    impls = bench.make_impls([name], w, cfg, bench.make_meta(w, device), to_stderr, notes)
    if name not in impls:
        return fail(f"{name} unavailable ({'; '.join(notes.values()) or 'unknown reason'})")
    impl = impls[name]
    torch.manual_seed(0)
    try:
        fn = bench.make_pass_fn(impl, "fwd", bench.make_input_set(w, cfg, dtype, device, False), w)
        with impl.context():
            fn()  # warm-up, outside the profiled range
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        with impl.context():
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
        return fail(f"{name} failed: {bench.first_line(e)}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        sys.exit(0)
    sys.exit(child_main(sys.argv[1:]))
