#!/usr/bin/env python
"""The FlashAttention-3 paper's attention sweep: several implementations, one table, CSV and plot.

Usage (one GPU):

    python benchmark/benchmark_fa3_sweep.py                                  # the whole sweep
    python benchmark/benchmark_fa3_sweep.py --head-dims 128 --passes fwd --causal yes
    python benchmark/benchmark_fa3_sweep.py --csv out/fa3_sweep.csv --plot out/fa3_sweep.png
    python benchmark/benchmark_fa3_sweep.py --dry-run                        # no GPU: fake times
    python benchmark/benchmark_fa3_sweep.py --from-csv out/fa3_sweep.csv     # table + plot again

Shapes: head dims D in --head-dims (64 128 256), sequence lengths L in --seqlens (512 .. 16384),
--tokens (16384) tokens per batch, so batch B = tokens / L, and a hidden size of --hidden (2048),
so H = hidden / D heads, the same for queries and keys/values (MHA). Every sequence of a batch
has length L. bf16 (--dtype), causal and non-causal (--causal), passes fwd and fwd_bwd (--passes).

Implementations (--impls; names as in the CSV):

  ours        ring_flash_attn.flash_attn_varlen_func: one varlen call over the batch (cu_seqlens of
              B equal lengths) on [B*L, H, D] tensors; fwd_bwd through autograd
  ours_deterministic  the same with deterministic=True (a fixed-order dQ); only when named in
              --impls. The tables' ours/best ratio compares ours with the other libraries only
  sdpa_flash  torch.nn.functional.scaled_dot_product_attention under
              torch.nn.attention.sdpa_kernel([SDPBackend.FLASH_ATTENTION]) on [B, H, L, D] views
              of the same tensors (is_causal)
  sdpa_cudnn  the same with SDPBackend.CUDNN_ATTENTION
  fa3         FlashAttention-3's flash_attn_func on [B, L, H, D] views, when its Python interface
              (module flash_attn_interface) imports; otherwise skipped with a note

A backend that refuses a shape (or fails in any other way) is reported with its reason and the
sweep goes on; an error that leaves the CUDA context unusable stops the measurements, and what
was measured before is still reported.

Timing: CUDA events around each call, --warmup untimed calls first (the first call, which
surfaces errors, among them), the median of --num-runs: the call's time, what a caller sees; the
host's time per call (mean over the timed calls) goes to the CSV's host_ms. A call whose host
work (Python, autograd, launches) takes longer than its kernels keeps the GPU waiting, and its
time is then the host's. So where host_ms is over half the call's time, the calls are timed again
with the stream held busy (torch.cuda._sleep) until all of them are queued: the kernels' time
alone (CSV gpu_time_ms / gpu_tflops; the call's time where the host already ran ahead). A call
more than 1.15x slower than its kernels is host-bound: 'h' in the tables. --table-time gpu fills
the tables with the kernels' rates; --no-gpu-time skips the second timing. When one input set (Q, K, V, output, and
for fwd_bwd dO and the gradients) is smaller than twice the L2 cache, the calls rotate through 3
input sets so that L2 does not hold the inputs between calls. Inputs and dO are torch.randn.

FLOPs are counted the FlashAttention way, on unmasked (query, key) pairs: fwd = 4 * D * H *
pairs, fwd_bwd = 3.5 * fwd, with pairs = B * L * L (non-causal) or B * L * (L + 1) / 2 (causal);
TFLOPS = FLOPs / median time.

Correctness spot check (--no-check turns it off): once per (shape, causal flag, implementation),
a forward call's output on the first sequence and the first 2 heads against an fp32 reference
computed here (chunked softmax(Q K^T / sqrt(D)) V); its max |difference| goes to the CSV column
check_max_abs_diff. A non-finite value anywhere in the output fails every row of that
implementation at that shape and causal flag; for ours (either mode) so does a difference above 2e-2 (bf16)
or 1e-2 (fp16). Failed rows say FAIL in the status column and the table, and the exit status is 1.

Output: a header on stdout, then per head dim a table (rows L; per variant -- causal fwd,
non-causal fwd, causal fwd+bwd, non-causal fwd+bwd -- the TFLOPS of each implementation, 'h'
after a host-bound call, and ours / the best other); progress on stderr, one line per measurement with elapsed time and an
ETA; a CSV (--csv; default <output-dir>/fa3_sweep_<gpu>_<date>.csv), written row by row while
the sweep runs; a PNG (--plot; default next to the CSV) with one panel per (head dim, pass),
TFLOPS vs L, one line per implementation and causal flag, when matplotlib imports.

Without a GPU: --dry-run builds the shape list, the FLOPs, the table, the CSV and the plot with
fake times (no torch needed); --device cpu runs the real measurement path on the CPU (host
timers; use tiny shapes such as --tokens 256 --hidden 64 --head-dims 32 --seqlens 64 128). Both
are exercised by test/test_benchmark_fa3_sweep_cpu.py.

Helpers shared with benchmark/benchmark_grouped_attention.py: count_pairs and attention_flops
(FLOP count), time_calls (CUDA-event timing) and environment (GPU and library versions).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import math
import os
import shlex
import signal
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from benchmark_grouped_attention import attention_flops, count_pairs, import_torch_for  # noqa: E402  (pure Python)
from benchmark_grouped_attention import format_elapsed as format_duration  # noqa: E402,F401  (45s, 3m07s, 1h02m03s)

# ---- constants -----------------------------------------------------------------------------------

IMPLS = ("ours", "ours_deterministic", "sdpa_flash", "sdpa_cudnn", "fa3")
DEFAULT_IMPLS = ("ours", "sdpa_flash", "sdpa_cudnn", "fa3")  # ours_deterministic on request
OUR_IMPLS = ("ours", "ours_deterministic")
IMPL_LABELS = {"ours": "ours", "ours_deterministic": "ours det", "sdpa_flash": "flash", "sdpa_cudnn": "cudnn",
               "fa3": "fa3"}  # table columns
PASSES = ("fwd", "fwd_bwd")
PASS_LABELS = {"fwd": "fwd", "fwd_bwd": "fwd+bwd"}
CAUSAL_CHOICES = {"both": (True, False), "yes": (True,), "no": (False,)}
DEFAULT_HEAD_DIMS = (64, 128, 256)
DEFAULT_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
TOKENS_PER_BATCH = 16384
HIDDEN = 2048
DTYPE_NAMES = ("bf16", "fp16")
CHECK_TOLERANCE = {"bf16": 2e-2, "fp16": 1e-2}
CHECK_HEADS = 2  # heads of the first sequence compared against the fp32 reference
CSV_COLUMNS = ("gpu", "torch", "cuda", "library", "dtype", "head_dim", "num_heads", "seqlen", "batch", "causal",
               "impl", "pass", "time_ms", "tflops", "gpu_time_ms", "gpu_tflops", "host_ms", "check_max_abs_diff",
               "status")
# A call is host-bound when its time (what a caller sees) exceeds the GPU's time for it (host
# queued ahead) by more than this factor: its host work, not its kernels, set the pace.
HOST_BOUND_RATIO = 1.15
TABLE_TIMES = ("call", "gpu")
FA3_MODULES = ("flash_attn_interface", "flash_attn_3.flash_attn_interface")
EXIT_FAILURES = 1
EXIT_NO_GPU = 2

# Run-time estimate (printed before the sweep; see estimate_seconds): rates an H200 reaches on
# these shapes, the host time of one call, and the fixed cost of one measurement (inputs, first
# call, cuDNN graph build, correctness check) and of the start (imports, CUDA context).
ESTIMATE_TFLOPS = {"fwd": 350.0, "fwd_bwd": 300.0}
ESTIMATE_HOST_MS = {"fwd": 0.3, "fwd_bwd": 1.3}
ESTIMATE_CASE_S = 0.3
ESTIMATE_START_S = 20.0


# ---- shapes and FLOPs (pure Python) --------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """batch sequences of seqlen tokens, num_heads heads of head_dim (Q, K, V: [batch * seqlen,
    num_heads, head_dim])."""

    head_dim: int
    seqlen: int
    batch: int
    num_heads: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seqlen

    def describe(self) -> str:
        return f"D={self.head_dim} L={self.seqlen} B={self.batch} H={self.num_heads}"


def build_shapes(head_dims: Sequence[int], seqlens: Sequence[int], tokens: int = TOKENS_PER_BATCH,
                 hidden: int = HIDDEN) -> List[Shape]:
    """The sweep's shapes, head dim major, then sequence length, each in the order given.

    batch = tokens / L and heads = hidden / D; ValueError (naming the argument) when L does not
    divide tokens or D does not divide hidden."""
    if tokens < 1:
        raise ValueError(f"tokens: expected >= 1, got {tokens}")
    if hidden < 1:
        raise ValueError(f"hidden: expected >= 1, got {hidden}")
    shapes = []
    for D in head_dims:
        if D < 1 or hidden % D:
            raise ValueError(f"head_dims: expected divisors of hidden ({hidden}), got {D}")
        for L in seqlens:
            if L < 1 or tokens % L:
                raise ValueError(f"seqlens: expected divisors of tokens ({tokens}), got {L}")
            shapes.append(Shape(head_dim=D, seqlen=L, batch=tokens // L, num_heads=hidden // D))
    return shapes


@dataclass(frozen=True)
class Case:
    """One measurement: one implementation, one pass, one causal flag, one shape."""

    shape: Shape
    causal: bool
    pass_name: str
    impl: str

    def describe(self) -> str:
        return f"{self.shape.describe()} {causal_label(self.causal)} {self.pass_name} {self.impl}"


def causal_label(causal: bool) -> str:
    return "causal" if causal else "non-causal"


def build_cases(shapes: Sequence[Shape], causal_flags: Sequence[bool], passes: Sequence[str],
                impls: Sequence[str]) -> List[Case]:
    """Every measurement, in run order: shape, then pass, then causal flag, then implementation
    (the implementations of one variant run back to back, on the same inputs)."""
    return [Case(s, c, p, i) for s in shapes for p in passes for c in causal_flags for i in impls]


def shape_pairs(shape: Shape, causal: bool) -> int:
    """Unmasked (query, key) pairs per head over the batch."""
    return shape.batch * count_pairs(shape.seqlen, shape.seqlen, causal)


def case_flops(case: Case) -> float:
    """FlashAttention's count: 4 * D * H * pairs forward, 3.5x that for forward + backward."""
    return attention_flops(shape_pairs(case.shape, case.causal), case.shape.num_heads, case.shape.head_dim,
                           case.pass_name)


def tflops_of(flops: float, time_ms: float) -> float:
    return flops / (time_ms * 1e-3) / 1e12


def calls_per_case(num_runs: int, warmup: int, check: bool, gpu_time: bool = False) -> int:
    """Calls of one measurement: warm-up (at least the first call), timed, the fwd_bwd dO draw
    and the correctness check counted as one more each; with gpu_time, the queued-ahead timing
    (once; twice where the first hold was too short)."""
    return max(1, warmup) + num_runs + 1 + (1 if check else 0) + (num_runs if gpu_time else 0)


def estimate_seconds(cases: Sequence[Case], num_runs: int, warmup: int, check: bool = True,
                     gpu_time: bool = False) -> float:
    """A rough a-priori run time on an H200 (ESTIMATE_* constants): per call the larger of the
    GPU time at ESTIMATE_TFLOPS and the host time, plus fixed costs per measurement and start."""
    calls = calls_per_case(num_runs, warmup, check, gpu_time)
    total = ESTIMATE_START_S
    for c in cases:
        gpu_s = case_flops(c) / (ESTIMATE_TFLOPS[c.pass_name] * 1e12)
        total += calls * max(gpu_s, ESTIMATE_HOST_MS[c.pass_name] * 1e-3) + ESTIMATE_CASE_S
    return total


def case_weights(cases: Sequence[Case]) -> List[float]:
    """Progress weight of each measurement: half a fixed share, half in proportion to its FLOPs
    (short measurements cost about the same fixed time; long ones cost their FLOPs)."""
    if not cases:
        return []
    flops = [case_flops(c) for c in cases]
    mean = sum(flops) / len(flops)
    return [1.0 + (f / mean if mean > 0 else 0.0) for f in flops]


def eta_seconds(elapsed: float, done_weight: float, total_weight: float) -> Optional[float]:
    """Remaining time if the rest goes at the rate so far; None before anything is done."""
    if done_weight <= 0 or elapsed <= 0:
        return None
    return elapsed * max(0.0, total_weight - done_weight) / done_weight


class Progress:
    """One line per measurement on stderr: [i/n] what: result (elapsed 1m05s, ETA 2m10s)."""

    def __init__(self, cases: Sequence[Case], stream=None, clock: Optional[Callable[[], float]] = None):
        self.weights = {id(c): w for c, w in zip(cases, case_weights(cases))}
        self.total = len(cases)
        self.total_weight = sum(self.weights.values())
        self.done = 0
        self.done_weight = 0.0
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock or time.monotonic
        self.t0 = self.clock()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def finished(self, case: Case, outcome: str) -> str:
        """Count `case` as done and print its line; returns the line."""
        self.done += 1
        self.done_weight += self.weights.get(id(case), 1.0)
        elapsed = self.elapsed()
        eta = eta_seconds(elapsed, self.done_weight, self.total_weight)
        eta_text = "?" if eta is None else format_duration(eta)
        line = (f"[{self.done}/{self.total}] {case.describe()}: {outcome} "
                f"(elapsed {format_duration(elapsed)}, ETA {eta_text})")
        print(line, file=self.stream, flush=True)
        return line

    def note(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class SkipLog:
    """Measurements that did not run, grouped by (implementation, reason), so that a backend that
    refuses every shape for the same reason gives one line, not one per shape."""

    MAX_PLACES = 4

    def __init__(self):
        self.places: "OrderedDict[Tuple[str, str, str], List[str]]" = OrderedDict()

    def add(self, impl: str, place: str, reason: str, verb: str = "skipped") -> None:
        self.places.setdefault((impl, verb, reason), []).append(place)

    def lines(self) -> List[str]:
        out = []
        for (impl, verb, reason), places in self.places.items():
            shown = "; ".join(places[: self.MAX_PLACES])
            if len(places) > self.MAX_PLACES:
                shown += f"; and {len(places) - self.MAX_PLACES} more"
            count = f"{len(places)} measurement{'s' if len(places) != 1 else ''}"
            out.append(f"{impl} {verb} ({count}: {shown}): {reason}")
        return out


# ---- results, CSV, table, plot (pure Python) -----------------------------------------------------


@dataclass
class Measurement:
    """One measured (shape, causal flag, pass, implementation); check_diff None: not checked."""

    head_dim: int
    num_heads: int
    seqlen: int
    batch: int
    causal: bool
    impl: str
    pass_name: str
    time_ms: float
    tflops: float
    check_diff: Optional[float] = None
    status: str = "ok"
    gpu_time_ms: Optional[float] = None  # the kernels' time alone (host queued ahead); None: not measured
    gpu_tflops: Optional[float] = None
    host_ms: Optional[float] = None  # the host's time per call (mean over the timed calls); None: not measured

    @property
    def failed(self) -> bool:
        return self.status.startswith("FAIL")

    @property
    def host_bound(self) -> bool:
        """The call took longer than its kernels: the host's work per call set its time."""
        return self.gpu_time_ms is not None and self.time_ms > HOST_BOUND_RATIO * self.gpu_time_ms

    def rate(self, table_time: str = "call") -> Optional[float]:
        """TFLOPS by the call's time ("call") or by the kernels' time alone ("gpu", None when not
        measured)."""
        return self.tflops if table_time == "call" else self.gpu_tflops

    @classmethod
    def of(cls, case: Case, time_ms: float, check_diff: Optional[float] = None, status: str = "ok",
           gpu_time_ms: Optional[float] = None, host_ms: Optional[float] = None) -> "Measurement":
        s = case.shape
        flops = case_flops(case)
        return cls(s.head_dim, s.num_heads, s.seqlen, s.batch, case.causal, case.impl, case.pass_name, time_ms,
                   tflops_of(flops, time_ms), check_diff, status, gpu_time_ms,
                   None if gpu_time_ms is None else tflops_of(flops, gpu_time_ms), host_ms)

    def csv_row(self, env: Dict[str, str], dtype: str) -> Dict[str, str]:
        return {
            "gpu": env.get("gpu", ""),
            "torch": env.get("torch", ""),
            "cuda": env.get("cuda", ""),
            "library": env.get("library", ""),
            "dtype": dtype,
            "head_dim": str(self.head_dim),
            "num_heads": str(self.num_heads),
            "seqlen": str(self.seqlen),
            "batch": str(self.batch),
            "causal": "1" if self.causal else "0",
            "impl": self.impl,
            "pass": self.pass_name,
            "time_ms": f"{self.time_ms:.4f}",
            "tflops": f"{self.tflops:.2f}",
            "gpu_time_ms": "" if self.gpu_time_ms is None else f"{self.gpu_time_ms:.4f}",
            "gpu_tflops": "" if self.gpu_tflops is None else f"{self.gpu_tflops:.2f}",
            "host_ms": "" if self.host_ms is None else f"{self.host_ms:.4f}",
            "check_max_abs_diff": "" if self.check_diff is None else f"{self.check_diff:.3e}",
            "status": self.status,
        }

    @classmethod
    def from_csv_row(cls, row: Dict[str, str]) -> "Measurement":
        diff = row.get("check_max_abs_diff", "").strip()
        gpu_ms = (row.get("gpu_time_ms") or "").strip()  # absent in CSVs written before the column
        gpu_tflops = (row.get("gpu_tflops") or "").strip()
        host_ms = (row.get("host_ms") or "").strip()
        return cls(int(row["head_dim"]), int(row.get("num_heads") or 0), int(row["seqlen"]), int(row["batch"]),
                   row["causal"].strip().lower() in ("1", "true", "yes"), row["impl"], row["pass"],
                   float(row["time_ms"]), float(row["tflops"]), float(diff) if diff else None,
                   row.get("status", "ok") or "ok", float(gpu_ms) if gpu_ms else None,
                   float(gpu_tflops) if gpu_tflops else None, float(host_ms) if host_ms else None)


class CsvSink:
    """The run's CSV, written row by row (flushed), so that an interrupted sweep keeps what it
    measured. path None: nothing is written."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self.rows = 0
        self._file = None
        self._writer = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._file = open(path, "w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=CSV_COLUMNS, lineterminator="\n")
            self._writer.writeheader()
            self._file.flush()

    def write(self, row: Dict[str, str]) -> None:
        if self._writer is not None:
            self._writer.writerow(row)
            self._file.flush()
            self.rows += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._writer = None


def read_csv(path: str) -> Tuple[List[Measurement], Dict[str, str]]:
    """The measurements of a CSV written by this script, and the environment of its first row;
    ValueError when a column is missing."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        required = ("gpu", "head_dim", "seqlen", "batch", "causal", "impl", "pass", "time_ms", "tflops")
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a fa3_sweep CSV (missing columns {', '.join(missing)}; expected "
                             f"{','.join(CSV_COLUMNS)})")
        rows = list(reader)
    env = {k: rows[0].get(k, "") for k in ("gpu", "torch", "cuda", "library", "dtype")} if rows else {}
    return [Measurement.from_csv_row(r) for r in rows], env


VARIANTS = tuple((p, c) for p in PASSES for c in (True, False))  # the table's column groups, in order


def variant_label(pass_name: str, causal: bool) -> str:
    return f"{causal_label(causal)} {PASS_LABELS[pass_name]}"


def best_other_ratio(cells: Dict[str, Measurement], table_time: str = "call") -> Optional[float]:
    """ours' TFLOPS over the best other implementation's (by the call's or the kernels' time),
    None when either is missing."""
    ours = cells.get("ours")
    others = [m.rate(table_time) for name, m in cells.items()
              if name not in OUR_IMPLS and m.rate(table_time) is not None]
    if ours is None or ours.rate(table_time) is None or not others or max(others) <= 0:
        return None
    return ours.rate(table_time) / max(others)


def format_table(measurements: Sequence[Measurement], head_dim: int, impls: Sequence[str],
                 variants: Sequence[Tuple[str, bool]], seqlens: Optional[Sequence[int]] = None,
                 table_time: str = "call") -> str:
    """One head dim's table: rows L (and B); per variant a column per implementation (TFLOPS;
    '-' not measured, 'h' after a host-bound call, '!' after a failed check) and 'ours/best'
    (ours over the best other).

    seqlens: the rows (default: those measured at this head dim, ascending). table_time: TFLOPS by
    the call's time ("call", what a caller sees) or by the kernels' time alone ("gpu")."""
    mine = [m for m in measurements if m.head_dim == head_dim]
    if seqlens is None:
        seqlens = sorted({m.seqlen for m in mine})
    cell: Dict[Tuple[int, str, bool], Dict[str, Measurement]] = {}
    batch: Dict[int, int] = {}
    heads = sorted({m.num_heads for m in mine})
    for m in mine:
        cell.setdefault((m.seqlen, m.pass_name, m.causal), {})[m.impl] = m
        batch[m.seqlen] = m.batch
    ratio_label = "ours/best"
    show_ratio = "ours" in impls and any(i not in OUR_IMPLS for i in impls)
    block_headers = [IMPL_LABELS.get(i, i) for i in impls] + ([ratio_label] if show_ratio else [])

    rows: List[List[str]] = []
    for L in seqlens:
        row = [str(L), str(batch.get(L, "-"))]
        for pass_name, causal in variants:
            cells = cell.get((L, pass_name, causal), {})
            for impl in impls:
                m = cells.get(impl)
                rate = None if m is None else m.rate(table_time)
                row.append("-" if rate is None else f"{rate:.1f}" + ("h" if table_time == "call" and m.host_bound
                                                                     else "") + ("!" if m.failed else ""))
            if show_ratio:
                ratio = best_other_ratio(cells, table_time)
                row.append("-" if ratio is None else f"{ratio:.2f}x")
        rows.append(row)

    lead_headers = ["L", "B"]
    n_block = len(block_headers)
    headers = lead_headers + block_headers * len(variants)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    # widen the last column of a block when the variant label is wider than the block
    for v, (pass_name, causal) in enumerate(variants):
        first = len(lead_headers) + v * n_block
        block_width = sum(widths[first:first + n_block]) + 2 * (n_block - 1)
        need = len(variant_label(pass_name, causal)) - block_width
        if need > 0:
            widths[first + n_block - 1] += need

    def join(parts: Sequence[str]) -> str:
        out = "  ".join(parts[: len(lead_headers)])
        for v in range(len(variants)):
            first = len(lead_headers) + v * n_block
            out += " | " + "  ".join(parts[first:first + n_block])
        return out.rstrip()

    def block_span(v: int) -> int:
        first = len(lead_headers) + v * n_block
        return sum(widths[first:first + n_block]) + 2 * (n_block - 1)

    lead_width = sum(widths[: len(lead_headers)]) + 2 * (len(lead_headers) - 1)
    group_line = " " * lead_width + "".join(
        " | " + variant_label(p, c).center(block_span(v)) for v, (p, c) in enumerate(variants))
    header_line = join([h.rjust(widths[i]) for i, h in enumerate(headers)])
    rule = "-" * len(header_line)
    body = [join([text.rjust(widths[i]) for i, text in enumerate(r)]) for r in rows]
    what = "TFLOPS" if table_time == "call" else "TFLOPS of the kernels alone (host queued ahead)"
    title = (f"head dim {head_dim} ({', '.join(str(h) for h in heads) or '?'} heads): {what}; "
             f"{ratio_label} = ours / the best other implementation" if show_ratio else
             f"head dim {head_dim} ({', '.join(str(h) for h in heads) or '?'} heads): {what}")
    return "\n".join([title, group_line.rstrip(), header_line, rule] + body)


def table_impls(measurements: Sequence[Measurement], requested: Sequence[str]) -> List[str]:
    """The table's implementation columns: those requested that measured something, in IMPLS
    order (an implementation that never ran has its reason in the notes instead)."""
    measured = {m.impl for m in measurements}
    return [i for i in IMPLS if i in requested and i in measured]


def table_variants(passes: Sequence[str], causal_flags: Sequence[bool]) -> List[Tuple[str, bool]]:
    return [(p, c) for p, c in VARIANTS if p in passes and c in causal_flags]


PlotSeries = Dict[Tuple[str, bool], List[Tuple[int, float]]]  # (impl, causal) -> sorted [(L, TFLOPS)]


def plot_panels(measurements: Sequence[Measurement]) -> "OrderedDict[Tuple[int, str], PlotSeries]":
    """The plot's data: (head dim, pass) panels in display order, each mapping (impl, causal) to
    its [(L, TFLOPS)] points sorted by L. Failed rows are left out (their numbers mean nothing)."""
    panels: Dict[Tuple[int, str], PlotSeries] = {}
    for m in measurements:
        if m.failed:
            continue
        panels.setdefault((m.head_dim, m.pass_name), {}).setdefault((m.impl, m.causal), []).append(
            (m.seqlen, m.tflops))

    def panel_key(key):
        d, p = key
        return d, PASSES.index(p) if p in PASSES else len(PASSES)

    def series_key(key):
        impl, causal = key
        return IMPLS.index(impl) if impl in IMPLS else len(IMPLS), not causal

    out: "OrderedDict[Tuple[int, str], PlotSeries]" = OrderedDict()
    for key in sorted(panels, key=panel_key):
        out[key] = OrderedDict((s, sorted(panels[key][s])) for s in sorted(panels[key], key=series_key))
    return out


PLOT_COLORS = {"ours": "tab:red", "ours_deterministic": "tab:orange", "sdpa_flash": "tab:blue",
               "sdpa_cudnn": "tab:green", "fa3": "tab:purple"}
PLOT_MARKERS = {"ours": "o", "ours_deterministic": "v", "sdpa_flash": "s", "sdpa_cudnn": "^", "fa3": "D"}


def save_plot(measurements: Sequence[Measurement], path: str, title: str) -> Optional[str]:
    """Write the PNG; returns None on success, else why not (matplotlib missing, nothing to plot)."""
    panels = plot_panels(measurements)
    if not panels:
        return "nothing measured"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib is not importable ({type(e).__name__}: {e}); pip install matplotlib"
    head_dims = sorted({d for d, _ in panels})
    passes = [p for p in PASSES if any(k[1] == p for k in panels)]
    fig, axes = plt.subplots(len(head_dims), len(passes), figsize=(6.0 * len(passes), 3.8 * len(head_dims)),
                             squeeze=False)
    for r, d in enumerate(head_dims):
        for c, p in enumerate(passes):
            ax = axes[r][c]
            series = panels.get((d, p), {})
            for (impl, causal), points in series.items():
                xs = [x for x, _ in points]
                ys = [y for _, y in points]
                ax.plot(xs, ys, color=PLOT_COLORS.get(impl, "black"), marker=PLOT_MARKERS.get(impl, "x"),
                        linestyle="-" if causal else "--", label=f"{impl} ({causal_label(causal)})")
            xs_all = sorted({x for pts in series.values() for x, _ in pts})
            ax.set_xscale("log", base=2)
            if xs_all:
                ax.set_xticks(xs_all)
                ax.set_xticklabels([f"{x // 1024}k" if x >= 1024 and x % 1024 == 0 else str(x) for x in xs_all])
            ax.set_title(f"head dim {d}, {PASS_LABELS.get(p, p)}")
            ax.set_xlabel("sequence length L")
            ax.set_ylabel("TFLOPS")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            if series:
                ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def file_tag(text: str) -> str:
    """A file-name-safe tag: NVIDIA H200 -> NVIDIA_H200."""
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_") or "unknown"


def default_paths(output_dir: str, gpu: str, stamp: str) -> Tuple[str, str]:
    stem = os.path.join(output_dir, f"fa3_sweep_{file_tag(gpu)}_{stamp}")
    return stem + ".csv", stem + ".png"


# ---- dry run (pure Python) -----------------------------------------------------------------------

FAKE_PEAK_TFLOPS = {"ours": 600.0, "ours_deterministic": 540.0, "sdpa_flash": 380.0, "sdpa_cudnn": 620.0,
                    "fa3": 650.0}


# --dry-run's made-up host time per call: short fake calls come out host-bound, as real ones do.
FAKE_HOST_MS = {"fwd": 0.05, "fwd_bwd": ESTIMATE_HOST_MS["fwd_bwd"]}


def fake_time_ms(case: Case) -> float:
    """A made-up, deterministic time for --dry-run: a rate that grows with L, lower when causal
    and for fwd_bwd. Only the code paths are real."""
    rate = FAKE_PEAK_TFLOPS.get(case.impl, 300.0) * case.shape.seqlen / (case.shape.seqlen + 1024.0)
    rate *= (0.85 if case.causal else 1.0) * (0.8 if case.pass_name == "fwd_bwd" else 1.0)
    return case_flops(case) / (rate * 1e12) * 1e3


# ---- arguments -----------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="The FlashAttention-3 paper's attention sweep (head dims 64/128/256, L 512..16384 with 16K "
                    "tokens per batch, hidden 2048, causal and not, fwd and fwd+bwd): ring_flash_attn, SDPA flash, "
                    "SDPA cuDNN and FlashAttention-3.",
        epilog="Details in the docstring at the top of benchmark/benchmark_fa3_sweep.py. Needs a CUDA GPU unless "
               "--dry-run, --from-csv or --device cpu (exit status 2 without one).",
    )
    p.add_argument("--head-dims", type=int, nargs="+", default=list(DEFAULT_HEAD_DIMS),
                   help="head dims D (default: %(default)s)")
    p.add_argument("--seqlens", type=int, nargs="+", default=list(DEFAULT_SEQLENS),
                   help="sequence lengths L, each a divisor of --tokens (default: %(default)s)")
    p.add_argument("--causal", choices=sorted(CAUSAL_CHOICES), default="both",
                   help="causal mask: yes, no or both (default: %(default)s)")
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES), help="default: %(default)s")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                   help=f"implementations (default: {' '.join(DEFAULT_IMPLS)}; with --from-csv, every one in the "
                        f"CSV; unavailable ones are skipped with a note)")
    p.add_argument("--num-runs", type=int, default=20, help="timed calls, median reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed calls first, the first call included (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="default: %(default)s")
    p.add_argument("--tokens", type=int, default=TOKENS_PER_BATCH,
                   help="tokens per batch: B = tokens / L (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=HIDDEN, help="hidden size: H = hidden / D (default: %(default)s)")
    p.add_argument("--csv", metavar="PATH", default=None,
                   help="the run's CSV, overwritten, one row per measurement (default: "
                        "<output-dir>/fa3_sweep_<gpu>_<date>.csv; '' for none)")
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="the run's PNG (default: the CSV's name with .png; '' for none)")
    p.add_argument("--output-dir", default=os.path.join("benchmark", "results"),
                   help="folder of the default CSV and PNG (default: %(default)s)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness spot check")
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no new measurement after this many seconds; the rest is reported as not run")
    p.add_argument("--dry-run", action="store_true",
                   help="no measurement: the shape list, FLOPs, table, CSV and plot with fake times (no GPU, no torch)")
    p.add_argument("--from-csv", metavar="PATH", default=None,
                   help="no measurement: print the tables and draw the plot of a CSV this script wrote")
    p.add_argument("--no-gpu-time", action="store_true",
                   help="time each call only as a caller sees it (by default each measurement is timed a second "
                        "time with the host queued ahead, the kernels' time alone: CSV columns gpu_time_ms, "
                        "gpu_tflops, and the tables' host-bound marks)")
    p.add_argument("--table-time", choices=TABLE_TIMES, default="call",
                   help="the tables' TFLOPS: by the call's time (what a caller sees) or by the kernels' time "
                        "alone (default: %(default)s)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: run the measurement code on the CPU with host timers, to test the script "
                        "(tiny shapes; the numbers mean nothing) (default: %(default)s)")
    args = p.parse_args(argv)
    if args.num_runs < 1:
        p.error(f"--num-runs: expected >= 1, got {args.num_runs}")
    if args.warmup < 0:
        p.error(f"--warmup: expected >= 0, got {args.warmup}")
    if args.time_budget_s is not None and args.time_budget_s <= 0:
        p.error(f"--time-budget-s: expected > 0, got {args.time_budget_s}")
    if args.dry_run and args.from_csv:
        p.error("--dry-run and --from-csv: expected at most one of them")
    try:
        build_shapes(args.head_dims, args.seqlens, args.tokens, args.hidden)
    except ValueError as e:
        p.error(str(e))
    return args


# ---- measurement (torch; GPU, or CPU for the script's own test) ----------------------------------


def short_reason(e: BaseException, limit: int = 240) -> str:
    """`Type: first line of the message`, cut to `limit` characters."""
    lines = str(e).strip().splitlines()
    text = f"{type(e).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_text(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Skip(Exception):
    """A measurement that cannot run here (unavailable implementation, refused shape)."""


class ContextLost(Exception):
    """The CUDA context is unusable (a sticky error): no further measurement can run."""


@dataclass
class Runner:
    """One implementation at one shape and causal flag.

    forward(q, k, v): q, k, v [B*L, H, D] -> the output in the implementation's own layout;
    to_varlen(out) -> [B*L, H, D]; context: entered around every call (backend selection)."""

    forward: Callable
    to_varlen: Callable
    context: Callable = contextlib.nullcontext


def import_fa3():
    """(flash_attn_func, module name) of FlashAttention-3's Python interface; Skip when missing."""
    import importlib

    reasons = []
    for name in FA3_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 (ImportError, or a broken build failing on import)
            reasons.append(f"{name}: {short_reason(e, 120)}")
            continue
        fn = getattr(module, "flash_attn_func", None)
        if fn is None:
            reasons.append(f"{name} has no flash_attn_func")
            continue
        return fn, name
    raise Skip("FlashAttention-3 is not importable (" + "; ".join(reasons) + ")")


def make_runner(impl: str, shape: Shape, causal: bool, device, cache: Dict[str, object]) -> Runner:
    """The runner of `impl`; Skip (with the reason) when it cannot be built here."""
    import torch

    B, L, H, D = shape.batch, shape.seqlen, shape.num_heads, shape.head_dim
    if impl in OUR_IMPLS:
        deterministic = impl == "ours_deterministic"
        if "ours" not in cache:
            try:
                import ring_flash_attn as rfa
                from ring_flash_attn import _lib

                _lib.get()
                cache["ours"] = rfa
            except Exception as e:  # noqa: BLE001 (any import or load failure)
                cache["ours"] = Skip(f"ring_flash_attn unavailable ({short_reason(e)})")
        rfa = cache["ours"]
        if isinstance(rfa, Skip):
            raise rfa
        cu = torch.arange(B + 1, device=device, dtype=torch.int32) * L

        def forward_ours(q, k, v):
            return rfa.flash_attn_varlen_func(q, k, v, cu, cu, L, L, causal=causal, deterministic=deterministic)

        return Runner(forward_ours, lambda out: out)
    if impl in ("sdpa_flash", "sdpa_cudnn"):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = SDPBackend.FLASH_ATTENTION if impl == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION

        def forward_sdpa(q, k, v):
            q4, k4, v4 = (t.view(B, L, H, D).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D] views
            return F.scaled_dot_product_attention(q4, k4, v4, is_causal=causal)

        return Runner(forward_sdpa, lambda out: out.transpose(1, 2).reshape(B * L, H, D),
                      context=lambda: sdpa_kernel([backend]))
    if impl == "fa3":
        if "fa3" not in cache:
            try:
                cache["fa3"] = import_fa3()
            except Skip as e:
                cache["fa3"] = e
        found = cache["fa3"]
        if isinstance(found, Skip):
            raise found
        fa3_func, _ = found

        def forward_fa3(q, k, v):
            out = fa3_func(q.view(B, L, H, D), k.view(B, L, H, D), v.view(B, L, H, D), causal=causal)
            return out[0] if isinstance(out, (tuple, list)) else out  # some versions return (out, lse)

        return Runner(forward_fa3, lambda out: out.reshape(B * L, H, D))
    raise ValueError(f"impl: expected one of {', '.join(IMPLS)}, got {impl!r}")


def make_input_sets(shape: Shape, n_sets: int, dtype, device, requires_grad: bool):
    """n_sets of (q, k, v), each [B*L, H, D] torch.randn."""
    import torch

    size = (shape.tokens, shape.num_heads, shape.head_dim)
    return [tuple(torch.randn(size, device=device, dtype=dtype, requires_grad=requires_grad) for _ in range(3))
            for _ in range(n_sets)]


def input_set_bytes(shape: Shape, pass_name: str, elem_size: int) -> int:
    """Bytes one call touches: Q, K, V and the output; fwd_bwd also dO, dQ, dK, dV."""
    tensors = 4 if pass_name == "fwd" else 8
    return tensors * shape.tokens * shape.num_heads * shape.head_dim * elem_size


def make_call(runner: Runner, pass_name: str, inputs, seed: int):
    """A zero-argument callable for one timed call on one input set. fwd_bwd: dO is drawn once
    here (shaped and strided like the output), outside the timed region."""
    import torch

    q, k, v = inputs
    if pass_name == "fwd":
        def fwd():
            with torch.no_grad():
                return runner.forward(q, k, v)

        return fwd
    with torch.no_grad():
        out = runner.forward(q, k, v)
    gen = torch.Generator(device=out.device).manual_seed(seed)
    dout = torch.empty_like(out).normal_(generator=gen)
    del out

    def fwd_bwd():
        out = runner.forward(q, k, v)
        return torch.autograd.grad(out, (q, k, v), dout)

    return fwd_bwd


def reference_attention(q, k, v, causal: bool, chunk: int = 1024):
    """softmax(q k^T / sqrt(D)) v in the inputs' float type, chunked over queries.

    q, k, v: [L, h, D] (one sequence); causal: query i sees keys j <= i. Returns [L, h, D]."""
    import torch

    L, _, D = q.shape
    scale = 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    for i0 in range(0, L, chunk):
        i1 = min(L, i0 + chunk)
        keys = i1 if causal else L
        s = torch.einsum("qhd,khd->hqk", q[i0:i1], k[:keys]) * scale
        if causal:
            rows = torch.arange(i0, i1, device=q.device)[:, None]
            cols = torch.arange(keys, device=q.device)[None, :]
            s = s.masked_fill(cols > rows, float("-inf"))
        out[i0:i1] = torch.einsum("hqk,khd->qhd", torch.softmax(s, dim=-1), v[:keys])
    return out


def check_output(out_varlen, reference, shape: Shape, impl: str, tolerance: float) -> Tuple[float, str]:
    """(max |out - reference| on the checked slice, status): FAIL for a non-finite output anywhere,
    and for ours (either mode) for a difference above `tolerance`."""
    import torch

    if not bool(torch.isfinite(out_varlen).all()):
        bad = int((~torch.isfinite(out_varlen)).sum())
        return float("nan"), f"FAIL: {bad} non-finite output values"
    h = reference.shape[1]
    diff = float((out_varlen[: shape.seqlen, :h].float() - reference).abs().max())
    if not math.isfinite(diff):
        return diff, "FAIL: non-finite difference"
    if impl in OUR_IMPLS and diff > tolerance:
        return diff, f"FAIL: max |out - reference| {diff:.3e} > {tolerance:g}"
    return diff, "ok"


def first_call(runner: Runner, pass_name: str, sets, device) -> List[Callable]:
    """Build the calls (one per input set) and run the first once; Skip with the reason (and any
    warnings PyTorch gave, e.g. why an SDPA backend refused) when that fails."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with runner.context():
                calls = [make_call(runner, pass_name, s, seed=1234 + i) for i, s in enumerate(sets)]
                calls[0]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return calls
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 (a refused shape or any other failure: report it)
            if device.type == "cuda" and not cuda_usable():
                raise ContextLost(short_reason(e)) from e
            hints = [str(c.message).strip().splitlines()[0][:160] for c in caught if str(c.message).strip()]
            reason = short_reason(e)
            if hints:
                reason += " | " + " | ".join(dict.fromkeys(hints))
            raise Skip(reason) from e


def cuda_usable() -> bool:
    """False when the CUDA context carries a sticky error (an illegal address, a launch failure)."""
    import torch

    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2.0
    except Exception:  # noqa: BLE001
        return False


class Sweep:
    """Runs the cases, writes each measurement to the CSV as it completes, and keeps the notes."""

    def __init__(self, args, device, env: Dict[str, str], sink: CsvSink, progress: Progress):
        import torch

        self.args = args
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        self.elem_size = torch.tensor([], dtype=self.dtype).element_size()
        self.env = env
        self.sink = sink
        self.progress = progress
        self.l2_bytes = (torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda"
                         else 32 << 20)
        self.measurements: List[Measurement] = []
        self.notes: "OrderedDict[str, None]" = OrderedDict()  # run-wide notes, each once
        self.skips = SkipLog()  # measurements that did not run, and why
        self.module_cache: Dict[str, object] = {}
        self.checks: Dict[Tuple[Shape, bool, str], Tuple[Optional[float], str]] = {}  # (shape, causal, impl)
        self.context_lost: Optional[str] = None
        self.stopped_for_time = False

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes[text] = None

    def record(self, case: Case, time_ms: float, gpu_time_ms: Optional[float] = None,
               host_ms: Optional[float] = None) -> Measurement:
        diff, status = self.checks.get((case.shape, case.causal, case.impl), (None, "ok"))
        m = Measurement.of(case, time_ms, diff, status, gpu_time_ms, host_ms)
        self.measurements.append(m)
        self.sink.write(m.csv_row(self.env, self.args.dtype))
        return m

    def run(self, cases: Sequence[Case]) -> None:
        import torch

        groups: "OrderedDict[Tuple[Shape, str], List[Case]]" = OrderedDict()
        for c in cases:
            groups.setdefault((c.shape, c.pass_name), []).append(c)
        t0 = time.monotonic()
        for (shape, pass_name), group in groups.items():
            if self.context_lost is not None:
                for c in group:
                    self.progress.finished(c, f"not run (CUDA context lost: {self.context_lost})")
                continue
            if self.args.time_budget_s is not None and time.monotonic() - t0 > self.args.time_budget_s:
                self.stopped_for_time = True
                for c in group:
                    self.progress.finished(c, f"not run (--time-budget-s {self.args.time_budget_s:g} spent)")
                continue
            try:
                self.run_group(shape, pass_name, group)
            except torch.OutOfMemoryError as e:
                # the input sets themselves did not fit
                self.note(f"{shape.describe()} {pass_name}: out of memory for the inputs ({short_reason(e)})")
                for c in group:
                    self.progress.finished(c, "skipped: out of memory for the inputs")
            except Exception as e:  # noqa: BLE001 (the inputs could not be made: report, go on if we can)
                reason = short_reason(e)
                if self.device.type == "cuda" and not cuda_usable():
                    self.context_lost = f"{shape.describe()} {pass_name} (making the inputs): {reason}"
                    self.note(f"CUDA context unusable after {self.context_lost}; the remaining measurements did "
                              f"not run")
                else:
                    self.note(f"{shape.describe()} {pass_name}: the inputs could not be made ({reason})")
                for c in group:
                    self.progress.finished(c, f"not run ({reason})")
            finally:
                if self.device.type == "cuda" and self.context_lost is None:
                    torch.cuda.empty_cache()

    def run_group(self, shape: Shape, pass_name: str, group: Sequence[Case]) -> None:
        """The cases of one (shape, pass): the same input sets for every implementation and flag."""
        import torch

        set_bytes = input_set_bytes(shape, pass_name, self.elem_size)
        n_sets = 3 if set_bytes < 2 * self.l2_bytes else 1
        torch.manual_seed(shape.head_dim * 1_000_003 + shape.seqlen * 7 + PASSES.index(pass_name))
        sets = make_input_sets(shape, n_sets, self.dtype, self.device, requires_grad=pass_name != "fwd")
        references: Dict[bool, object] = {}
        for case in group:
            if self.context_lost is not None:
                self.progress.finished(case, f"not run (CUDA context lost: {self.context_lost})")
                continue
            place = f"D={shape.head_dim} L={shape.seqlen} {causal_label(case.causal)} {pass_name}"
            try:
                m = self.measure(case, sets, references)
                outcome = f"{m.time_ms:.3f} ms, {m.tflops:.1f} TFLOPS"
                if m.check_diff is not None:
                    outcome += f", check {m.check_diff:.2e}"
                if m.status != "ok":
                    outcome += f" [{m.status}]"
            except Skip as e:
                self.skips.add(case.impl, place, str(e))
                outcome = f"skipped: {short_text(str(e))} (reason in full in the notes)"
            except ContextLost as e:
                self.context_lost = f"{case.describe()}: {e}"
                self.note(f"CUDA context unusable after {self.context_lost}; the remaining measurements did "
                          f"not run")
                outcome = f"FAILED, CUDA context lost: {e}"
            except torch.OutOfMemoryError as e:
                self.skips.add(case.impl, place, f"out of GPU memory ({short_reason(e)})")
                outcome = "skipped: out of memory"
            except Exception as e:  # noqa: BLE001 (one failing measurement never stops the sweep)
                if self.device.type == "cuda" and not cuda_usable():
                    self.context_lost = f"{case.describe()}: {short_reason(e)}"
                    self.note(f"CUDA context unusable after {self.context_lost}; the remaining measurements "
                              f"did not run")
                    outcome = f"FAILED, CUDA context lost: {short_reason(e)}"
                else:
                    self.skips.add(case.impl, place, short_reason(e), verb="failed")
                    outcome = f"failed: {short_text(short_reason(e))}"
            self.progress.finished(case, outcome)
            if outcome.startswith("skipped: out of memory") and self.device.type == "cuda":
                torch.cuda.empty_cache()  # here, once the exception (and the tensors its frames held) is gone
        del sets, references

    def measure(self, case: Case, sets, references: Dict[bool, object]) -> Measurement:
        import torch

        from benchmark_grouped_attention import time_calls, time_calls_queued

        runner = make_runner(case.impl, case.shape, case.causal, self.device, self.module_cache)
        calls = first_call(runner, case.pass_name, sets, self.device)
        gpu_ms = None
        host_ms: List[float] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            time_ms = time_calls(calls, self.args.num_runs, max(0, self.args.warmup - 1), runner.context,
                                 self.device, host_ms)
            if self.device.type == "cuda" and not self.args.no_gpu_time:
                if host_ms[0] < 0.5 * time_ms:
                    gpu_ms = time_ms  # the host queued ahead already: the events spanned the kernels alone
                else:
                    gpu_ms, idle_ms = time_calls_queued(calls, self.args.num_runs, host_ms[0], runner.context)
                    if idle_ms > 0.01 * gpu_ms * self.args.num_runs:
                        self.note(f"{case.describe()}: the GPU still waited {idle_ms:.3f} ms for the host in "
                                  f"the queued-ahead timing (its gpu_time_ms includes that)")
        del calls
        key = (case.shape, case.causal, case.impl)
        if not self.args.no_check and key not in self.checks:
            try:
                self.checks[key] = self.check(case, runner, sets[0], references)
            except torch.OutOfMemoryError as e:  # keep the time; say why there is no check
                self.checks[key] = (None, f"unchecked: {short_reason(e, 120)}")
            except Exception as e:  # noqa: BLE001
                if self.device.type == "cuda" and not cuda_usable():
                    raise
                self.checks[key] = (None, f"unchecked: {short_reason(e, 120)}")
        return self.record(case, time_ms, gpu_ms, host_ms[0] if host_ms else None)  # host_ms: CUDA only

    def check(self, case: Case, runner: Runner, inputs, references: Dict[bool, object]) -> Tuple[float, str]:
        """One forward call on the first input set against the fp32 reference (computed once per
        causal flag and input set, on the first sequence and CHECK_HEADS heads)."""
        import torch

        q, k, v = (t.detach() for t in inputs)
        if case.causal not in references:
            h = min(CHECK_HEADS, case.shape.num_heads)
            L = case.shape.seqlen
            references[case.causal] = reference_attention(q[:L, :h].float(), k[:L, :h].float(), v[:L, :h].float(),
                                                          case.causal)
        with torch.no_grad(), runner.context():
            out = runner.to_varlen(runner.forward(q, k, v))
        return check_output(out, references[case.causal], case.shape, case.impl, CHECK_TOLERANCE[self.args.dtype])


# ---- reporting -----------------------------------------------------------------------------------


def report_tables(measurements: Sequence[Measurement], head_dims: Sequence[int], impls: Sequence[str],
                  variants: Sequence[Tuple[str, bool]], seqlens_of: Callable[[int], Sequence[int]],
                  table_time: str = "call") -> List[str]:
    """The tables' text, one per head dim, in the order given."""
    columns = table_impls(measurements, impls)
    if not columns:
        return ["(nothing measured)"]
    return [format_table(measurements, d, columns, variants, seqlens_of(d), table_time) for d in head_dims]


def host_bound_lines(measurements: Sequence[Measurement], table_time: str) -> List[str]:
    """The tables' footnote on host-bound calls (empty when none, or when no GPU time was taken)."""
    bound = [m for m in measurements if m.host_bound]
    if not bound:
        return []
    if table_time == "gpu":
        return [f"{len(bound)} of these calls were host-bound (their call time exceeds the kernels' by more than "
                f"{HOST_BOUND_RATIO:g}x): --table-time call shows what a caller sees"]
    per_impl = OrderedDict((i, sum(1 for m in bound if m.impl == i)) for i in IMPLS if any(m.impl == i for m in bound))
    return [f"h: host-bound call (its time exceeds the kernels' time alone by more than {HOST_BOUND_RATIO:g}x: "
            f"the host's work per call set the pace; " + ", ".join(f"{i} {n}" for i, n in per_impl.items())
            + "); --table-time gpu, or the CSV's gpu_tflops, gives the kernels' rate"]


def failure_lines(measurements: Sequence[Measurement]) -> List[str]:
    return [f"FAIL: {m.impl} D={m.head_dim} L={m.seqlen} {causal_label(m.causal)} {m.pass_name}: {m.status}"
            for m in measurements if m.failed]


def finish(measurements: List[Measurement], notes: Iterable[str], args, env: Dict[str, str], plot_path: Optional[str],
           head_dims: Sequence[int], seqlens_of: Callable[[int], Sequence[int]], passes: Sequence[str],
           causal_flags: Sequence[bool]) -> int:
    """Print the tables, notes and failures; draw the plot. Returns the exit status."""
    print()
    for text in report_tables(measurements, head_dims, args.impls, table_variants(passes, causal_flags), seqlens_of,
                              args.table_time):
        print(text)
        print()
    for line in host_bound_lines(measurements, args.table_time):
        print(line)
    notes = list(notes)
    if notes:
        print("Notes:")
        for n in notes:
            print(f"  {n}")
    checked = [m for m in measurements if m.check_diff is not None]
    if checked:
        worst: Dict[str, float] = {}
        for m in checked:
            d = m.check_diff if math.isfinite(m.check_diff) else float("inf")
            worst[m.impl] = max(worst.get(m.impl, 0.0), d)
        print("Correctness (max |out - fp32 reference|, first sequence, first heads): "
              + ", ".join(f"{i} {worst[i]:.2e}" for i in IMPLS if i in worst))
    failures = failure_lines(measurements)
    for line in failures:
        print(line)
    if plot_path:
        title = (f"{env.get('gpu', '?')}, {env.get('dtype', args.dtype)}, {args.tokens} tokens per batch, hidden "
                 f"{args.hidden}")
        why_not = save_plot(measurements, plot_path, title)
        print(f"Plot: {plot_path}" if why_not is None else f"Plot: not written ({why_not})")
    return EXIT_FAILURES if failures else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    causal_flags = CAUSAL_CHOICES[args.causal]

    if args.from_csv:
        measurements, env = read_csv(args.from_csv)
        if args.impls is None:
            args.impls = list(IMPLS)
        head_dims = sorted({m.head_dim for m in measurements})
        if env.get("dtype"):
            args.dtype = env["dtype"]
        tokens = {m.batch * m.seqlen for m in measurements}
        if len(tokens) == 1:
            args.tokens = tokens.pop()
        hidden = {m.head_dim * m.num_heads for m in measurements if m.num_heads}
        if len(hidden) == 1:
            args.hidden = hidden.pop()
        print(f"Tables of {args.from_csv} ({len(measurements)} rows; GPU {env.get('gpu', '?')}, torch "
              f"{env.get('torch', '?')}, CUDA {env.get('cuda', '?')})")
        plot = args.plot if args.plot is not None else os.path.splitext(args.from_csv)[0] + ".png"
        return finish(measurements, [], args, env, plot or None, head_dims,
                      lambda d: sorted({m.seqlen for m in measurements if m.head_dim == d}),
                      [p for p in PASSES if any(m.pass_name == p for m in measurements)],
                      [c for c in (True, False) if any(m.causal == c for m in measurements)])

    if args.impls is None:
        args.impls = list(DEFAULT_IMPLS)
    shapes = build_shapes(args.head_dims, args.seqlens, args.tokens, args.hidden)
    cases = build_cases(shapes, causal_flags, args.passes, args.impls)

    torch = None
    if not args.dry_run:
        torch = import_torch_for(args.device, "to measure ({error}); --dry-run needs none",
                                 ". --dry-run exercises the script without one; --help lists the options.")
        if torch is None:
            return EXIT_NO_GPU

    if args.dry_run:
        try:
            import torch as _torch

            torch_version, cuda_version = _torch.__version__, str(_torch.version.cuda)
        except ImportError:
            torch_version, cuda_version = "n/a", "n/a"
        env = {"gpu": "dry-run", "torch": torch_version, "cuda": cuda_version, "library": "n/a", "sms": "?",
               "l2_mb": "?", "driver": "n/a"}
        device = None
    else:
        from benchmark_grouped_attention import environment

        device = (torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda"
                  else torch.device("cpu"))
        env = environment(device)
    env["dtype"] = args.dtype

    stamp = f"{datetime.datetime.now():%Y%m%d-%H%M%S}"
    default_csv, default_png = default_paths(args.output_dir, env["gpu"], stamp)
    csv_path = default_csv if args.csv is None else (args.csv or None)
    if args.plot is not None:
        plot_path = args.plot or None
    else:
        plot_path = (os.path.splitext(csv_path)[0] + ".png") if csv_path else default_png

    argv_list = list(sys.argv[1:] if argv is None else argv)
    print("FlashAttention-3 sweep: attention TFLOPS per implementation")
    print("=" * 60)
    if args.dry_run:
        print("DRY RUN: fake times, no measurement (the shapes, FLOPs, table, CSV and plot code run)")
    print(f"GPU: {env['gpu']} ({env.get('sms', '?')} SMs, L2 {env.get('l2_mb', '?')} MB), driver "
          f"{env.get('driver', '?')}")
    print(f"torch {env['torch']}, CUDA {env['cuda']}, libringattn {env['library']}")
    print("Command: python " + " ".join(shlex.quote(a) for a in ["benchmark/benchmark_fa3_sweep.py"] + argv_list))
    print(f"Date: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}")
    print(f"Shapes: head dims {', '.join(map(str, args.head_dims))}; L {', '.join(map(str, args.seqlens))}; "
          f"{args.tokens} tokens per batch (B = {args.tokens} / L), hidden {args.hidden} (H = {args.hidden} / D, "
          f"MHA); {args.dtype}; {' and '.join(causal_label(c) for c in causal_flags)}; passes "
          f"{', '.join(args.passes)}")
    timer = "CUDA events" if args.device == "cuda" else "host timer (--device cpu: the numbers mean nothing)"
    gpu_time = args.device == "cuda" and not args.no_gpu_time
    print(f"Timing: {timer}, {args.warmup} untimed warm-up calls (the first call among them), median of "
          f"{args.num_runs}; FLOPs on unmasked pairs (fwd 4*D*H*pairs, fwd+bwd 3.5x)"
          + ("; where the host's time per call is over half the call's, timed again with the host queued "
             "ahead (the kernels' time alone: gpu_time_ms)" if gpu_time else ""))
    print(f"Measurements: {len(cases)}; estimated time on an H200: "
          f"{format_duration(estimate_seconds(cases, args.num_runs, args.warmup, not args.no_check, gpu_time))}")
    print(f"CSV: {csv_path or 'none'}; plot: {plot_path or 'none'}")
    sys.stdout.flush()

    sink = CsvSink(csv_path)
    progress = Progress(cases)
    notes: List[str] = []
    measurements: List[Measurement] = []
    interrupted = None

    def on_sigterm(signum, frame):  # `timeout` sends SIGTERM: report what was measured
        raise KeyboardInterrupt(f"signal {signum}")

    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        if args.dry_run:
            skips = SkipLog()
            for c in cases:
                if c.impl == "fa3":  # the path an unavailable implementation takes in a real run
                    skips.add(c.impl, f"D={c.shape.head_dim} L={c.shape.seqlen} {causal_label(c.causal)} "
                                      f"{c.pass_name}", "dry run: fa3 gets no fake times")
                    progress.finished(c, "skipped: dry run")
                    continue
                gpu_ms = fake_time_ms(c)
                m = Measurement.of(c, max(gpu_ms, FAKE_HOST_MS[c.pass_name]), gpu_time_ms=gpu_ms,
                                   host_ms=FAKE_HOST_MS[c.pass_name])
                measurements.append(m)
                sink.write(m.csv_row(env, args.dtype))
                progress.finished(c, f"{m.time_ms:.3f} ms, {m.tflops:.1f} TFLOPS (fake)")
            notes = skips.lines()
        else:
            sweep = Sweep(args, device, env, sink, progress)
            measurements = sweep.measurements
            try:
                sweep.run(cases)
            finally:
                notes = sweep.skips.lines() + list(sweep.notes)
                if sweep.stopped_for_time:
                    notes.append(f"--time-budget-s {args.time_budget_s:g} spent: later measurements did not run")
    except KeyboardInterrupt as e:
        interrupted = str(e) or "KeyboardInterrupt"
    finally:
        sink.close()
        signal.signal(signal.SIGTERM, previous_handler)
    progress.note(f"done: {progress.done}/{progress.total} measurements in {format_duration(progress.elapsed())}")
    if interrupted:
        notes.append(f"interrupted ({interrupted}) after {progress.done} of {progress.total} measurements")
    if csv_path:
        notes.append(f"CSV: {sink.rows} rows written to {csv_path}")
    status = finish(measurements, notes, args, env, plot_path, args.head_dims, lambda d: args.seqlens, args.passes,
                    causal_flags)
    if interrupted and status == 0:
        status = 130
    return status


if __name__ == "__main__":
    sys.exit(main())
