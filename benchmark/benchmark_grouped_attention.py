#!/usr/bin/env python
"""Grouped attention benchmark: G query groups over one shared K/V stream, several implementations.

Usage (one GPU):

    python benchmark/benchmark_grouped_attention.py                        # defaults, ~1 min on an H100
    python benchmark/benchmark_grouped_attention.py --seqlens 8192 --num-runs 100
    python benchmark/benchmark_grouped_attention.py --num-groups 2 4 8
    python benchmark/benchmark_grouped_attention.py --config llama3-70b
    python benchmark/benchmark_grouped_attention.py --seqlens 65536 --world-size 8 --rank 0 7
    python benchmark/benchmark_grouped_attention.py --passes fwd fwd_bwd --csv benchmark/results/runs.csv
    python benchmark/benchmark_grouped_attention.py --seqlens 65536 --world-size 8 --measure-hbm  # ncu bytes

Workloads (every sequence of the batch is the same; causal masks are bottom-right aligned: query i
of Lq attends key j < Lk iff j <= i + Lk - Lq):

* Default (no --world-size): the sequence of L tokens is cut into G equal query chunks of L/G
  tokens; chunk i is group i and attends keys [0, (i+1) L/G) of one shared K/V of L keys. This is
  the zigzag-like split of one full causal sequence into G groups (together the groups do exactly
  the work of one full causal attention over L tokens); it needs L % G == 0.
* --world-size N --rank r: the per-rank workload of zigzag llama3 context parallelism. The sequence
  is cut into 2N chunks of c = L / 2N tokens; rank r holds chunk r ("early", group 0: c queries over
  keys [0, (r+1)c)) and chunk 2N-1-r ("late", group 1: c queries over keys [0, (2N-r)c)). The
  shared K/V is the prefix of (2N-r)c keys that the late chunk needs. Always 2 groups;
  --world-size 1 gives 2 groups of L/2 queries over L keys (the default workload with G = 2).

Implementations (--impls; names as in the CSV):

  baseline        one ring_flash_attn.flash_attn_varlen_func call per group, each on its own K/V
                  prefix (a view when --batch 1; a gathered copy made outside the timed region
                  otherwise, or inside the autograd graph for the backward passes)
  grouped_python  ring_flash_attn.grouped_python._flash_attn_varlen_forward_grouped: the groups
                  rewritten as ONE plain varlen call over G*B sequences (Q concatenated, K/V
                  duplicated per group, all inside the timed region)
  fused           one ring_flash_attn.grouped_flash_attn_varlen_func call (the fused kernel; on
                  sm90 cards tier 2, TMA + wgmma, forward and backward)
  fused_sm80      the same call with RING_FLASH_ATTN_TIER=sm80: the tier-1 (mma.sync) kernels,
                  for comparison (identical to fused on cards other than sm90)
  sdpa_flash      torch SDPA, FLASH_ATTENTION backend, one call per group on [B, H, L, D] views
  sdpa_cudnn      torch SDPA, CUDNN_ATTENTION backend, likewise
  varlen_attn     torch.nn.attention.varlen.varlen_attn, one call per group (if importable)
  flash_attn      flash_attn.flash_attn_varlen_func, one call per group (if installed)

SDPA: GQA through enable_gqa=True; if a backend refuses it the K/V heads are repeat_interleave'd
outside the timed region (the table says so). Lq == Lk uses is_causal=True, otherwise
torch.nn.attention.bias.causal_lower_right(Lq, Lk). A backend that refuses a shape is reported
with PyTorch's reason and its row is skipped.

Timing: CUDA events around every call, --warmup untimed calls first (the first call, which
surfaces errors, and the peak-memory call count among them), the median of --num-runs. When one
input set is smaller than twice the L2 cache, the calls rotate through 3 input sets (so L2 does
not hold the inputs between calls). Inputs are torch.randn (never zeros).

Metrics: FLOPs counted the FlashAttention way, on unmasked (q, k) pairs: fwd = 4 * D * Hq * pairs,
bwd = 2.5 * fwd, fwd_bwd = 3.5 * fwd; TFLOPS = FLOPs / median time. "KV MB (analytic)" is the K/V
bytes the implementation must read from HBM, computed (10^6 bytes): per-group implementations read
each group's K/V prefix; fused reads the shared prefix once (the longest group's); grouped_python
reads K/V once and writes G copies to build its input, then reads each group's prefix from them.
With the SDPA repeat_interleave fallback the repeated heads count. Backward passes read K/V once
more per pass (fwd_bwd counts both passes).

--measure-hbm: "HBM MB (ncu)" instead: each forward call of baseline, grouped_python, fused and
fused_sm80 runs once more under Nsight Compute, and the cell holds the DRAM bytes its attention
kernels read (benchmark/ncu_hbm.py, which describes the measurement; analytic bytes with a note
where ncu is missing or fails).

Passes: fwd, fwd_bwd, bwd (backward only, from a graph built outside the timed region; gradients
w.r.t. the shared q/k/v leaves, so per-group implementations pay for summing dK/dV over groups).
When libringattn has no GPU backward (NotImplementedError) its rows are skipped with a note.

Output: a header (GPU, torch, CUDA, library versions, the exact command), one box table per
(workload, pass), a correctness check (fused and grouped_python vs baseline, max |diff|; FAIL if
above 2e-2 for bf16, 1e-2 for fp16; other implementations are listed for information), and
progress on stderr: one line per (workload, pass) step, "[i/n] workload | pass (elapsed 1m05s)",
or a tqdm bar when tqdm imports and stderr is a terminal. --csv appends one row per (workload,
impl, pass); the report text is also saved under --output-dir. benchmark/plot_results.py plots a
CSV (TFLOPS vs sequence length); scripts/dev/sweep.sh runs the full sweep on one GPU.

The pure-Python parts (build_workload, count_pairs, attention_flops, kv_bytes_read, CSV helpers,
the progress lines) import without torch and are tested by test/test_benchmark_cpu.py.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

# ---- constants -----------------------------------------------------------------------------------

IMPLS = ("baseline", "grouped_python", "fused", "fused_sm80", "sdpa_flash", "sdpa_cudnn", "varlen_attn",
         "flash_attn")
OUR_IMPLS = ("baseline", "grouped_python", "fused", "fused_sm80")
CHECKED_IMPLS = ("grouped_python", "fused", "fused_sm80")  # a FAIL line when these differ from baseline
DISPLAY_NAMES = {
    "baseline": "Baseline (separate)",
    "grouped_python": "Python grouped",
    "fused": "Fused grouped (CUDA)",
    "fused_sm80": "Fused grouped (tier 1)",
    "sdpa_flash": "SDPA flash",
    "sdpa_cudnn": "SDPA cuDNN",
    "varlen_attn": "torch varlen_attn",
    "flash_attn": "flash-attn",
}
PASSES = ("fwd", "fwd_bwd", "bwd")
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
PASS_KV_READS = {"fwd": 1, "bwd": 1, "fwd_bwd": 2}
CSV_COLUMNS = ("gpu", "torch", "cuda", "config", "seqlen", "world_size", "rank", "num_groups", "impl",
               "pass", "time_ms", "tflops", "hbm_mb")
DTYPE_NAMES = ("bf16", "fp16")
CHECK_TOLERANCE = {"bf16": 2e-2, "fp16": 1e-2}
DEFAULT_SEQLENS = (4096, 8192, 16384, 32768)
EXIT_NO_GPU = 2


@dataclass(frozen=True)
class ModelConfig:
    name: str
    label: str
    num_heads_q: int
    num_heads_k: int
    head_dim: int


CONFIGS = {
    "llama3-8b": ModelConfig("llama3-8b", "Llama3-8B", 32, 8, 128),
    "llama3-70b": ModelConfig("llama3-70b", "Llama3-70B", 64, 8, 128),
}


# ---- workloads (pure Python) ---------------------------------------------------------------------


@dataclass(frozen=True)
class GroupSpec:
    """One query group, per sequence: q_len queries at positions [q_start, q_start + q_len) of
    the sequence, attending keys [0, k_len) (causal, bottom-right: q_start + q_len == k_len)."""

    q_start: int
    q_len: int
    k_len: int


@dataclass(frozen=True)
class Workload:
    """A batch of `batch` identical sequences; every group reads the first k_len of kv_len keys."""

    seqlen: int
    batch: int
    kv_len: int
    groups: Tuple[GroupSpec, ...]
    world_size: Optional[int] = None
    rank: Optional[int] = None

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    def total_q(self, g: int) -> int:
        """Query rows of group g ([total_q, Hq, D])."""
        return self.batch * self.groups[g].q_len

    @property
    def total_k(self) -> int:
        """Rows of the shared K and V ([total_k, Hk, D])."""
        return self.batch * self.kv_len

    def describe(self) -> str:
        parts = ", ".join(f"{g.q_len} q x {g.k_len} k" for g in self.groups)
        if self.world_size is not None:
            c = self.seqlen // (2 * self.world_size)
            head = (f"seqlen={self.seqlen}, world_size={self.world_size}, rank={self.rank} "
                    f"(chunks {self.rank} and {2 * self.world_size - 1 - self.rank} of {c} tokens)")
        else:
            head = f"seqlen={self.seqlen}, {self.num_groups} groups"
        return f"{head}: {parts}, batch {self.batch}"


def build_workload(seqlen: int, num_groups: int = 2, world_size: Optional[int] = None, rank: int = 0,
                   batch: int = 1) -> Workload:
    """The benchmark's workload (see the module docstring). ValueError for impossible shapes."""
    if seqlen < 1:
        raise ValueError(f"seqlen: expected >= 1, got {seqlen}")
    if batch < 1:
        raise ValueError(f"batch: expected >= 1, got {batch}")
    if world_size is not None:
        if world_size < 1:
            raise ValueError(f"world_size: expected >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size ({world_size}), got {rank}")
        if num_groups != 2:
            raise ValueError(f"num_groups: the zigzag per-rank workload has 2 groups, got {num_groups}")
        if seqlen % (2 * world_size):
            raise ValueError(f"seqlen: expected a multiple of 2 * world_size ({2 * world_size}), got {seqlen}")
        c = seqlen // (2 * world_size)
        early = GroupSpec(q_start=rank * c, q_len=c, k_len=(rank + 1) * c)
        late_chunk = 2 * world_size - 1 - rank
        late = GroupSpec(q_start=late_chunk * c, q_len=c, k_len=(late_chunk + 1) * c)
        return Workload(seqlen, batch, late.k_len, (early, late), world_size, rank)
    if num_groups < 1:
        raise ValueError(f"num_groups: expected >= 1, got {num_groups}")
    if seqlen % num_groups:
        raise ValueError(f"seqlen: expected a multiple of num_groups ({num_groups}), got {seqlen}")
    chunk = seqlen // num_groups
    groups = tuple(GroupSpec(q_start=i * chunk, q_len=chunk, k_len=(i + 1) * chunk) for i in range(num_groups))
    return Workload(seqlen, batch, seqlen, groups)


def count_pairs(q_len: int, k_len: int, causal: bool = True) -> int:
    """Unmasked (query, key) pairs of one sequence: Lq * Lk, or with the bottom-right causal mask
    sum over i < Lq of clamp(i + Lk - Lq + 1, 0, Lk)."""
    if q_len <= 0 or k_len <= 0:
        return 0
    if not causal:
        return q_len * k_len
    d = k_len - q_len
    if d >= 0:  # every row sees i + d + 1 <= Lk keys
        return q_len * (d + 1) + q_len * (q_len - 1) // 2
    return k_len * (k_len + 1) // 2  # the first -d rows see nothing, then 1 .. Lk keys


def workload_pairs(w: Workload, causal: bool = True) -> int:
    return w.batch * sum(count_pairs(g.q_len, g.k_len, causal) for g in w.groups)


def attention_flops(pairs: int, num_heads_q: int, head_dim: int, pass_name: str = "fwd") -> float:
    """FlashAttention's count: fwd = 4 * D * Hq * pairs, bwd = 2.5 * fwd, fwd_bwd = 3.5 * fwd."""
    return 4.0 * head_dim * num_heads_q * pairs * PASS_FLOP_FACTOR[pass_name]


def kv_bytes_read(w: Workload, impl: str, num_heads_k: int, head_dim: int, elem_size: int,
                  pass_name: str = "fwd", head_repeat: int = 1) -> int:
    """Analytic K+V bytes an implementation reads (see the module docstring).

    head_repeat: KV heads are repeated this many times (SDPA's repeat_interleave fallback)."""
    row = 2 * num_heads_k * head_dim * elem_size * head_repeat  # one K row plus one V row
    per_group = w.batch * sum(g.k_len for g in w.groups)
    if impl in ("fused", "fused_sm80"):
        rows = w.batch * max(g.k_len for g in w.groups)
    elif impl == "grouped_python":
        # build: read K/V once, write G copies; then the attention reads each group's prefix
        rows = w.batch * w.kv_len * (1 + w.num_groups) + per_group
    else:
        rows = per_group
    return rows * row * PASS_KV_READS[pass_name]


# ---- CSV and tables (pure Python) ----------------------------------------------------------------


def csv_row(gpu: str, torch_version: str, cuda_version: str, config: str, w: Workload, impl: str,
            pass_name: str, time_ms: float, tflops: float, hbm_mb: float) -> Dict[str, str]:
    return {
        "gpu": gpu,
        "torch": torch_version,
        "cuda": cuda_version,
        "config": config,
        "seqlen": str(w.seqlen),
        "world_size": "" if w.world_size is None else str(w.world_size),
        "rank": "" if w.rank is None else str(w.rank),
        "num_groups": str(w.num_groups),
        "impl": impl,
        "pass": pass_name,
        "time_ms": f"{time_ms:.4f}",
        "tflops": f"{tflops:.2f}",
        "hbm_mb": f"{hbm_mb:.1f}",
    }


def append_csv(path: str, rows: Sequence[Dict[str, str]], columns: Sequence[str] = CSV_COLUMNS) -> None:
    """Append rows (dicts keyed by `columns`, this benchmark's by default); write the header first
    when the file is new or empty."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow(r)


def box_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> str:
    """A box-drawn table. align: 'l', 'r' or 'c' per column."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def cell(text, i):
        w = widths[i]
        return {"l": text.ljust(w), "r": text.rjust(w), "c": text.center(w)}[align[i]]

    def line(left, mid, right):
        return left + mid.join("─" * (w + 2) for w in widths) + right

    out = [line("┌", "┬", "┐"),
           "│" + "│".join(" " + h.ljust(widths[i]) + " " for i, h in enumerate(headers)) + "│",
           line("├", "┼", "┤")]
    for r in rows:
        out.append("│" + "│".join(" " + cell(r[i], i) + " " for i in range(len(headers))) + "│")
    out.append(line("└", "┴", "┘"))
    return "\n".join(out)


# ---- progress (pure Python) ----------------------------------------------------------------------


def format_elapsed(seconds: float) -> str:
    """45s, 3m07s, 1h02m03s."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s"


class Progress:
    """Progress over the run's steps (one per workload and pass) on stderr.

    A tqdm bar when tqdm imports and the stream is a terminal; otherwise (a log file, CI, no
    tqdm) one plain line per step, `[i/n] what (elapsed 1m05s)`, which reads well in a log."""

    def __init__(self, total: int, stream=None, use_bar: Optional[bool] = None,
                 clock: Optional[Callable[[], float]] = None):
        self.total = total
        self.index = 0
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock or time.monotonic
        self.t0 = self.clock()
        self.bar = None
        if use_bar is None:
            isatty = getattr(self.stream, "isatty", None)
            use_bar = bool(isatty and isatty())
        if use_bar:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, file=self.stream, unit="step", dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def start(self, what: str) -> None:
        """Step index+1 of total begins (the previous one, if any, is done)."""
        self.index += 1
        if self.bar is not None:
            self.bar.update(max(0, self.index - 1 - self.bar.n))  # the steps before this one are done
            self.bar.set_postfix_str(what[:80])
        else:
            self._line(f"[{self.index}/{self.total}] {what} (elapsed {format_elapsed(self.elapsed())})")

    def note(self, text: str) -> None:
        """A message line that leaves the bar intact."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self._line(text)

    def print_stdout(self, text: str) -> None:
        """Print to stdout without breaking the bar (when both go to the same terminal)."""
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def advance_to(self, index: int) -> None:
        """Skip to step `index` (the rest of a workload that ran out of memory)."""
        self.index = max(self.index, min(index, self.total))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(self.total - self.bar.n)
            self.bar.close()
            self.bar = None
        self._line(f"done: {self.index}/{self.total} steps in {format_elapsed(self.elapsed())}")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


# ---- arguments -----------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark grouped attention (G query groups over one K/V stream): one call per "
                    "group, the Python-grouped rewrite, the fused kernel, PyTorch SDPA and friends.",
        epilog="Workloads, implementations, timing and metrics are described in the docstring at the "
               "top of benchmark/benchmark_grouped_attention.py. Needs a CUDA GPU (exits with code 2 "
               "without one).",
    )
    p.add_argument("--seqlens", type=int, nargs="+", default=list(DEFAULT_SEQLENS),
                   help="sequence lengths L (default: %(default)s)")
    p.add_argument("--num-groups", type=int, nargs="+", default=[2],
                   help="query groups G without --world-size: G equal chunks of the sequence, chunk i "
                        "over keys [0, (i+1)L/G) (default: %(default)s)")
    p.add_argument("--config", choices=sorted(CONFIGS), default="llama3-8b",
                   help="head layout: llama3-8b = 32 Q / 8 KV heads, llama3-70b = 64 / 8; D = 128 "
                        "(default: %(default)s)")
    p.add_argument("--world-size", type=int, default=None,
                   help="benchmark one rank of zigzag llama3 context parallelism over N ranks: 2 groups "
                        "(chunks r and 2N-1-r of L/2N tokens)")
    p.add_argument("--rank", type=int, nargs="+", default=[0],
                   help="rank(s) r for --world-size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="sequences per call (default: %(default)s)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="bf16", help="default: %(default)s")
    p.add_argument("--passes", nargs="+", choices=PASSES, default=["fwd"],
                   help="passes to time (default: %(default)s)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS),
                   help="implementations to run (default: all; unavailable ones are skipped with a note)")
    p.add_argument("--num-runs", type=int, default=50, help="timed calls, median reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first (default: %(default)s)")
    p.add_argument("--csv", metavar="PATH", default=None,
                   help="append one row per (workload, impl, pass) to this CSV (header written if new)")
    p.add_argument("--output-dir", default=os.path.join("benchmark", "results"),
                   help="where the report text is saved; '' to not save (default: %(default)s)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness check")
    p.add_argument("--measure-hbm", action="store_true",
                   help="measure the HBM column with Nsight Compute: each forward call of our "
                        "implementations runs once more under `ncu` (in a subprocess) and the column holds "
                        "the DRAM bytes its attention kernels read; falls back to the analytic K/V bytes, "
                        "with a note, if ncu is missing or fails (benchmark/ncu_hbm.py; ncu: $NCU, PATH, "
                        "$CUDA_HOME/bin, /usr/local/cuda/bin)")
    # Smoke-testing the script's own code paths on a machine without a GPU (tiny shapes only;
    # host timers, meaningless numbers). Not a benchmark mode, hence hidden.
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.world_size is not None:
        if args.num_groups != [2]:
            p.error("--world-size gives the zigzag per-rank workload, which has exactly 2 groups; drop --num-groups")
        for r in args.rank:
            if not 0 <= r < args.world_size:
                p.error(f"--rank {r}: expected 0 <= rank < --world-size ({args.world_size})")
    if args.num_runs < 1:
        p.error(f"--num-runs: expected >= 1, got {args.num_runs}")
    if args.warmup < 0:
        p.error(f"--warmup: expected >= 0, got {args.warmup}")
    try:
        for L in args.seqlens:
            for G in args.num_groups:
                for r in (args.rank if args.world_size is not None else [0]):
                    build_workload(L, G, args.world_size, r, args.batch)
    except ValueError as e:
        p.error(str(e))
    return args


def workloads_from_args(args: argparse.Namespace) -> List[Workload]:
    out = []
    for L in args.seqlens:
        if args.world_size is not None:
            out.extend(build_workload(L, 2, args.world_size, r, args.batch) for r in args.rank)
        else:
            out.extend(build_workload(L, G, None, 0, args.batch) for G in args.num_groups)
    return out


# ---- everything below needs torch and a GPU ------------------------------------------------------


class Report:
    """Prints to stdout (through `printer` when set: the progress bar's, which keeps the bar
    intact) and keeps the lines for the saved copy."""

    def __init__(self, printer: Optional[Callable[[str], None]] = None):
        self.lines: List[str] = []
        self.printer = printer

    def __call__(self, text: str = "") -> None:
        if self.printer is None:
            print(text, flush=True)
        else:
            self.printer(text)
        self.lines.append(text)


def first_line(e: BaseException, limit: int = 240) -> str:
    """`Type: first line of the message`, cut to `limit` characters."""
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0] if text else ''}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


@dataclass
class Meta:
    """Metadata shared by all input sets of one workload (int32, on the device)."""

    cu_q: list            # [G] of [B+1]
    cu_k: object          # [B+1], the shared K/V
    cu_k_group: list      # [G] of [B+1], each group's own K/V prefix
    seqused: list         # [G] of [B] or None (None: the group reads all kv_len keys)
    max_q: list
    max_k: int
    kv_index: list        # [G] of row indices of the group's K/V prefix in k (batch > 1), else None


def make_meta(w: Workload, device):
    import torch

    B = w.batch
    ar = torch.arange(B + 1, device=device, dtype=torch.int32)
    cu_q = [ar * g.q_len for g in w.groups]
    cu_k = ar * w.kv_len
    cu_k_group = [ar * g.k_len for g in w.groups]
    seqused = [None if g.k_len == w.kv_len else torch.full((B,), g.k_len, dtype=torch.int32, device=device)
               for g in w.groups]
    kv_index = []
    for g in w.groups:
        if B == 1:
            kv_index.append(None)
        else:
            idx = (torch.arange(B, device=device)[:, None] * w.kv_len
                   + torch.arange(g.k_len, device=device)[None, :]).reshape(-1)
            kv_index.append(idx)
    return Meta(cu_q, cu_k, cu_k_group, seqused, [g.q_len for g in w.groups], w.kv_len, kv_index)


def make_input_set(w: Workload, cfg: ModelConfig, dtype, device, requires_grad: bool):
    import torch

    Hq, Hk, D = cfg.num_heads_q, cfg.num_heads_k, cfg.head_dim
    q_list = [torch.randn(w.total_q(g), Hq, D, device=device, dtype=dtype, requires_grad=requires_grad)
              for g in range(w.num_groups)]
    k = torch.randn(w.total_k, Hk, D, device=device, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(w.total_k, Hk, D, device=device, dtype=dtype, requires_grad=requires_grad)
    return q_list, k, v


def group_kv(t, w: Workload, meta: Meta, g: int):
    """Group g's K (or V) prefix as [B * k_len, Hk, D]: a view for batch 1, a gather otherwise."""
    if meta.kv_index[g] is None:
        return t[: w.groups[g].k_len]
    return t.index_select(0, meta.kv_index[g])


@dataclass
class Impl:
    """prepare(q_list, k, v) -> state (untimed for fwd; inside the graph for backward passes);
    run(state) -> outputs; to_varlen(outputs) -> [G] of [total_q_g, Hq, D] (for the check)."""

    name: str
    prepare: Callable
    run: Callable
    to_varlen: Callable
    context: Callable = contextlib.nullcontext
    note: str = ""
    head_repeat: int = 1


def _identity_list(outs):
    return list(outs)


def _per_group_varlen_impl(name: str, varlen_func: Callable, w: Workload, meta: Meta, **call_kwargs) -> Impl:
    """One plain varlen call per group over that group's own K/V, gathered in the preparation:
    varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **call_kwargs)."""
    G = w.num_groups

    def prep(q_list, k, v):
        return q_list, [group_kv(k, w, meta, g) for g in range(G)], [group_kv(v, w, meta, g) for g in range(G)]

    def run(state):
        q_list, ks, vs = state
        return [varlen_func(q_list[g], ks[g], vs[g], meta.cu_q[g], meta.cu_k_group[g], meta.max_q[g],
                            w.groups[g].k_len, **call_kwargs)
                for g in range(G)]

    return Impl(name, prep, run, _identity_list)


def make_impls(names: Sequence[str], w: Workload, cfg: ModelConfig, meta: Meta, report: Report,
               notes: Dict[str, str]) -> Dict[str, Impl]:
    """The requested implementations that can be constructed here (others noted and dropped)."""
    impls: Dict[str, Impl] = {}
    G = w.num_groups
    need_ours = [n for n in names if n in OUR_IMPLS]
    rfa = None
    if need_ours:
        try:
            import ring_flash_attn as rfa
            from ring_flash_attn import _lib

            _lib.get()
        except Exception as e:  # noqa: BLE001 (any import/load failure means: skip ours)
            key = "ring_flash_attn"
            if key not in notes:
                notes[key] = f"ring_flash_attn unavailable ({first_line(e)}): skipping {', '.join(need_ours)}"
                report(f"note: {notes[key]}")
            rfa = None

    if rfa is not None and "baseline" in names:
        impls["baseline"] = _per_group_varlen_impl("baseline", rfa.flash_attn_varlen_func, w, meta, causal=True)

    if rfa is not None and "grouped_python" in names:
        from ring_flash_attn.grouped_python import _flash_attn_varlen_forward_grouped

        def run_grouped_python(state):
            q_list, k, v = state
            outs, _ = _flash_attn_varlen_forward_grouped(q_list, k, v, meta.cu_q, meta.cu_k, meta.max_q,
                                                         meta.max_k, seqused_k_list=meta.seqused, causal=True)
            return outs

        impls["grouped_python"] = Impl("grouped_python", lambda q, k, v: (q, k, v), run_grouped_python,
                                       _identity_list)

    def run_fused(state):
        q_list, k, v = state
        return rfa.grouped_flash_attn_varlen_func(q_list, k, v, meta.cu_q, meta.cu_k, meta.max_q, meta.max_k,
                                                  seqused_k_list=meta.seqused, causal=True)

    if rfa is not None and "fused" in names:
        impls["fused"] = Impl("fused", lambda q, k, v: (q, k, v), run_fused, _identity_list)

    if rfa is not None and "fused_sm80" in names:
        @contextlib.contextmanager
        def tier1():
            # The op reads RING_FLASH_ATTN_TIER at every forward and backward call.
            previous = os.environ.get("RING_FLASH_ATTN_TIER")
            os.environ["RING_FLASH_ATTN_TIER"] = "sm80"
            try:
                yield
            finally:
                if previous is None:
                    os.environ.pop("RING_FLASH_ATTN_TIER", None)
                else:
                    os.environ["RING_FLASH_ATTN_TIER"] = previous

        def run_fused_sm80(state):
            with tier1():
                return run_fused(state)

        # run: the forward on tier 1 wherever it is called; context: the timed region, so the
        # backward of the fwd_bwd / bwd passes runs on tier 1 too.
        impls["fused_sm80"] = Impl("fused_sm80", lambda q, k, v: (q, k, v), run_fused_sm80, _identity_list,
                                   context=tier1)

    for name in ("sdpa_flash", "sdpa_cudnn"):
        if name in names:
            impls[name] = _make_sdpa_impl(name, w, cfg, head_repeat=1)

    if "varlen_attn" in names:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError as e:
            if "varlen_attn" not in notes:
                notes["varlen_attn"] = (f"torch.nn.attention.varlen.varlen_attn is not importable "
                                        f"({first_line(e)}): skipping varlen_attn")
                report(f"note: {notes['varlen_attn']}")
        else:
            impls["varlen_attn"] = _per_group_varlen_impl("varlen_attn", varlen_attn, w, meta, window_size=(-1, 0))

    if "flash_attn" in names:
        try:
            import flash_attn
        except ImportError as e:
            if "flash_attn" not in notes:
                notes["flash_attn"] = f"flash-attn is not installed ({first_line(e)}): skipping flash_attn"
                report(f"note: {notes['flash_attn']}")
        else:
            impls["flash_attn"] = _per_group_varlen_impl("flash_attn", flash_attn.flash_attn_varlen_func, w, meta,
                                                         causal=True)
    return impls


def _make_sdpa_impl(name: str, w: Workload, cfg: ModelConfig, head_repeat: int) -> Impl:
    """SDPA on [B, H, L, D] transposed views of the varlen tensors, one call per group."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    backend = SDPBackend.FLASH_ATTENTION if name == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION
    G, B = w.num_groups, w.batch
    Hq, Hk, D = cfg.num_heads_q, cfg.num_heads_k, cfg.head_dim
    masks = [None if g.q_len == g.k_len else causal_lower_right(g.q_len, g.k_len) for g in w.groups]

    def prep(q_list, k, v):
        qs, ks, vs = [], [], []
        k4 = k.view(B, w.kv_len, Hk, D)
        v4 = v.view(B, w.kv_len, Hk, D)
        for g, spec in enumerate(w.groups):
            qs.append(q_list[g].view(B, spec.q_len, Hq, D).transpose(1, 2))
            kg = k4[:, : spec.k_len].transpose(1, 2)
            vg = v4[:, : spec.k_len].transpose(1, 2)
            if head_repeat > 1:
                kg = kg.repeat_interleave(head_repeat, dim=1)
                vg = vg.repeat_interleave(head_repeat, dim=1)
            ks.append(kg)
            vs.append(vg)
        return qs, ks, vs

    gqa = head_repeat == 1 and Hq != Hk

    def run(state):
        qs, ks, vs = state
        outs = []
        for g in range(G):
            if masks[g] is None:
                outs.append(F.scaled_dot_product_attention(qs[g], ks[g], vs[g], is_causal=True, enable_gqa=gqa))
            else:
                outs.append(F.scaled_dot_product_attention(qs[g], ks[g], vs[g], attn_mask=masks[g], enable_gqa=gqa))
        return outs

    def to_varlen(outs):
        return [o.transpose(1, 2).reshape(B * w.groups[g].q_len, Hq, D) for g, o in enumerate(outs)]

    notes = []
    if head_repeat > 1:
        notes.append(f"GQA by repeat_interleave x{head_repeat} (outside the timed region for fwd)")
    if name == "sdpa_cudnn" and any(m is not None for m in masks):
        # CausalBias's lower-right dispatch tries only the flash and efficient kernels (both
        # disabled here), then materialises the mask; cuDNN then runs with a dense boolean mask
        notes.append("groups with Lq != Lk run causal_lower_right as a dense mask that PyTorch "
                     "materializes in every call (it has no bottom-right causal for cuDNN); timed as is")
    note = "; ".join(notes)
    return Impl(name, prep, run, to_varlen, context=lambda: sdpa_kernel([backend]), note=note,
                head_repeat=head_repeat)


def make_pass_fn(impl: Impl, pass_name: str, inputs, w: Workload):
    """A zero-argument callable that runs one timed call of `pass_name` on one input set."""
    import torch

    q_list, k, v = inputs
    if pass_name == "fwd":
        with torch.no_grad():
            state = impl.prepare(q_list, k, v)

        def fwd():
            with torch.no_grad():
                return impl.run(state)

        return fwd
    leaves = [*q_list, k, v]
    gen = torch.Generator(device=k.device).manual_seed(1234)
    if pass_name == "fwd_bwd":
        # the output gradients are drawn once, outside the timed region (shaped like the outputs)
        with torch.no_grad():
            douts = [torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=gen)
                     for o in impl.run(impl.prepare(q_list, k, v))]

        def fwd_bwd():
            outs = impl.run(impl.prepare(q_list, k, v))
            return torch.autograd.grad(outs, leaves, douts)

        return fwd_bwd
    # bwd: the graph is built once, outside the timed region
    outs = impl.run(impl.prepare(q_list, k, v))
    douts = [torch.randn(o.shape, dtype=o.dtype, device=o.device, generator=gen) for o in outs]

    def bwd():
        return torch.autograd.grad(outs, leaves, douts, retain_graph=True)

    bwd()  # surfaces errors here
    return bwd


def median_call_ms(fn: Callable[[], object], runs: int, device) -> float:
    """Median milliseconds of `runs` calls of fn, each timed alone: CUDA events around the call,
    waited for before the next one, on a CUDA `device`; the host timer otherwise."""
    import torch

    times: List[float] = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_calls(fns: Sequence[Callable], num_runs: int, warmup: int, context: Callable, device=None,
               host_ms: Optional[List[float]] = None) -> float:
    """Median milliseconds of num_runs calls, rotating over fns, CUDA events around each call.
    host_ms: a list that receives the host's mean time per call of the timed loop (on CUDA, when
    it is well below the median, the GPU set the pace and the events span the kernels alone)."""
    import torch

    with context():
        for i in range(warmup):
            fns[i % len(fns)]()
        if device is not None and device.type == "cpu":  # --device cpu smoke tests only
            times = []
            for i in range(num_runs):
                t = time.perf_counter()
                fns[i % len(fns)]()
                times.append((time.perf_counter() - t) * 1e3)
            return statistics.median(times)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        starts, ends = _evented_calls(fns, num_runs)
        if host_ms is not None:
            host_ms.append((time.perf_counter() - t0) * 1e3 / num_runs)
        torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _evented_calls(fns: Sequence[Callable], num_runs: int):
    """num_runs calls rotating over fns, each between two recorded CUDA events: (starts, ends)."""
    import torch

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(num_runs)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(num_runs)]
    for i in range(num_runs):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    return starts, ends


_SLEEP_CYCLES_PER_MS: Dict[int, float] = {}


def sleep_cycles_per_ms() -> float:
    """GPU clock cycles torch.cuda._sleep spins per millisecond on the current device, measured
    once per device with CUDA events (the clock of the moment: H200s cap it under load)."""
    import torch

    device = torch.cuda.current_device()
    if device not in _SLEEP_CYCLES_PER_MS:
        cycles = 2_000_000
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _SLEEP_CYCLES_PER_MS[device] = cycles / max(start.elapsed_time(end), 1e-3)
    return _SLEEP_CYCLES_PER_MS[device]


def time_calls_queued(fns: Sequence[Callable], num_runs: int, host_ms_per_call: float,
                      context: Callable) -> Tuple[float, float]:
    """The GPU's time per call with the host's time taken out: (median milliseconds between the
    CUDA events around each call, milliseconds the GPU waited for the host in between).

    time_calls measures what a caller sees: a call whose host work takes longer than its kernels
    keeps the GPU waiting, and the events then span the host's time. Here the stream is first
    held busy (torch.cuda._sleep) for longer than the host needs to queue all num_runs calls, so
    that every call is queued before the GPU reaches it, and the events span only the kernels. The
    hold is sized from host_ms_per_call (what time_calls measured for the same calls, already
    warmed up); if the GPU still waited between two calls (the second value, normally ~0), the
    hold is doubled and the timing repeated once."""
    import torch

    with context():
        hold_ms = 1.5 * host_ms_per_call * num_runs + 2.0
        for _ in range(2):
            torch.cuda._sleep(int(sleep_cycles_per_ms() * hold_ms))
            starts, ends = _evented_calls(fns, num_runs)
            torch.cuda.synchronize()
            idle_ms = sum(max(0.0, ends[i].elapsed_time(starts[i + 1])) for i in range(num_runs - 1))
            per_call = statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
            if idle_ms <= 0.01 * per_call * num_runs:
                break
            hold_ms *= 2.0
    return per_call, idle_ms


def _try_first_call(impl: Impl, inputs, pass_name: str, w: Workload):
    """Build the pass callable and run it once; returns (fn, None) or (None, reason)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with impl.context():
                fn = make_pass_fn(impl, pass_name, inputs, w)
                fn()
            if inputs[1].is_cuda:
                torch.cuda.synchronize()
            return fn, None
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
            reasons = [str(c.message).strip().splitlines()[0][:200] for c in caught
                       if issubclass(c.category, UserWarning) and str(c.message).strip()]
            reason = first_line(e)
            if reasons:
                reason += " | " + " | ".join(dict.fromkeys(reasons))
            return None, (e, reason)


def _extra_peak_mb(fn, impl: Impl, device) -> Optional[float]:
    """Peak device memory one call allocates beyond what was allocated before it (MB)."""
    import torch

    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with impl.context():
        fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e6


def _format_mb(mb: float) -> str:
    return f"{mb:.0f}" if mb >= 10 else f"{mb:.2f}"


@dataclass
class Timed:
    """One table row: median time, TFLOPS, the HBM cell (MB; measured by ncu or analytic), the
    extra peak memory of one call (None off the GPU) and the analytic K/V MB."""

    ms: float
    tflops: float
    hbm_mb: float
    peak_mb: Optional[float]
    measured: bool
    analytic_mb: float


def run_workload(w: Workload, cfg: ModelConfig, args, dtype, device, env: Dict[str, str], report: Report,
                 notes: Dict[str, str], csv_rows: List[Dict[str, str]], failures: List[str],
                 prog: Optional[Progress] = None, hbm=None) -> None:
    """Time every requested pass of every implementation on workload `w` and report the tables.
    hbm: an ncu_hbm.HbmProbe (--measure-hbm) or None."""
    import torch

    prog = prog or Progress(len(args.passes), use_bar=False)
    meta = make_meta(w, device)
    impls = make_impls(args.impls, w, cfg, meta, report, notes)
    elem = torch.tensor([], dtype=dtype).element_size()
    set_bytes = (sum(w.total_q(g) for g in range(w.num_groups)) * cfg.num_heads_q * 2  # q and out
                 + 2 * w.total_k * cfg.num_heads_k) * cfg.head_dim * elem
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 32 << 20
    n_sets = 3 if set_bytes < 2 * l2 else 1
    pairs = workload_pairs(w)
    # _try_first_call and _extra_peak_mb each make one untimed call: they count as warm-up calls
    untimed_before = 2 if device.type == "cuda" else 1
    warmup = max(0, args.warmup - untimed_before)

    report()
    report(f"Results for {w.describe()}")
    report(f"  ({pairs:,} unmasked (q,k) pairs per head; {n_sets} rotating input set(s) of "
           f"{set_bytes / 1e6:.1f} MB; L2 {l2 / 1e6:.1f} MB)")

    outputs_for_check: Dict[str, list] = {}
    for pass_name in args.passes:
        prog.start(f"{w.describe()} | {pass_name}")
        need_grad = pass_name != "fwd"
        sets = [make_input_set(w, cfg, dtype, device, need_grad) for _ in range(n_sets)]
        results: Dict[str, Timed] = {}
        row_notes = {}
        hbm_details: Dict[str, str] = {}  # impl -> ncu launches, or why it was not measured
        no_gpu_bwd = []  # our implementations skipped because libringattn has no GPU backward
        no_gpu_bwd_reason = ""
        for name in args.impls:
            impl = impls.get(name)
            if impl is None:
                continue
            fn0, err = _try_first_call(impl, sets[0], pass_name, w)
            if err is not None and name in ("sdpa_flash", "sdpa_cudnn") and cfg.num_heads_q != cfg.num_heads_k \
                    and impl.head_repeat == 1:
                # the backend may refuse enable_gqa: repeat the KV heads instead (outside the timed region)
                alt = _make_sdpa_impl(name, w, cfg, head_repeat=cfg.num_heads_q // cfg.num_heads_k)
                fn_alt, err_alt = _try_first_call(alt, sets[0], pass_name, w)
                if err_alt is None:
                    report(f"note: {name}: enable_gqa refused ({err[1]}); {alt.note}")
                    impl, fn0, err = alt, fn_alt, None
                    impls[name] = alt
                else:
                    err = err_alt
            if err is not None:
                exc, reason = err
                if isinstance(exc, NotImplementedError) and name in OUR_IMPLS and need_grad:
                    no_gpu_bwd.append(name)
                    no_gpu_bwd_reason = reason
                else:
                    report(f"note: {name} ({pass_name}) skipped: {reason}")
                continue
            peak_mb = _extra_peak_mb(fn0, impl, device)
            fns = [fn0] + [make_pass_fn(impl, pass_name, s, w) for s in sets[1:]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ms = time_calls(fns, args.num_runs, warmup, impl.context, device)
            flops = attention_flops(pairs, cfg.num_heads_q, cfg.head_dim, pass_name)
            tflops = flops / (ms * 1e-3) / 1e12
            analytic_mb = kv_bytes_read(w, name, cfg.num_heads_k, cfg.head_dim, elem, pass_name,
                                        impl.head_repeat) / 1e6
            hbm_mb, measured = analytic_mb, False
            if hbm is not None and hbm.wants(name, pass_name):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()  # the measurement runs on the same GPU
                measured_bytes, hbm_details[name] = hbm.measure(name, w, prog.note)
                if measured_bytes is not None:
                    hbm_mb, measured = measured_bytes / 1e6, True
            results[name] = Timed(ms, tflops, hbm_mb, peak_mb, measured, analytic_mb)
            if impl.note:
                row_notes[name] = impl.note
            csv_rows.append(csv_row(env["gpu"], env["torch"], env["cuda"], cfg.name, w, name, pass_name, ms, tflops,
                                    hbm_mb))
            if pass_name == "fwd" and not args.no_check and name not in outputs_for_check:
                with torch.no_grad(), impl.context():
                    outs = impl.run(impl.prepare(*sets[0]))
                    outputs_for_check[name] = [o.float() for o in impl.to_varlen(outs)]
            del fns, fn0
        del sets
        if no_gpu_bwd and "ringattn-bwd" not in notes:
            notes["ringattn-bwd"] = (f"libringattn has no backward on this device ({no_gpu_bwd_reason}): "
                                     f"skipping the {'/'.join(p for p in args.passes if p != 'fwd')} rows of "
                                     f"{', '.join(no_gpu_bwd)}")
            report(f"note: {notes['ringattn-bwd']}")

        if results:
            if hbm is None:
                hbm_header, hbm_lines = "KV MB (analytic)", []
            else:
                hbm_header, hbm_lines = hbm.column({n: r.measured for n, r in results.items()}, hbm_details)
            _report_pass_table(report, pass_name, results, row_notes, hbm_header, hbm_lines)

    if not args.no_check and "fwd" in args.passes:
        _correctness_check(w, cfg, args, dtype, device, meta, impls, outputs_for_check, report, notes, failures)


def _report_pass_table(report: Report, pass_name: str, results: Dict[str, Timed], row_notes: Dict[str, str],
                       hbm_header: str, hbm_lines: Sequence[str]) -> None:
    """One pass's box table, rows in the order of `results`; hbm_header heads the HBM column and
    hbm_lines go under the table (what ncu measured, or why not). Unmeasured cells are marked
    "(a)" (analytic) when other rows of the column were measured."""
    any_measured = any(r.measured for r in results.values())
    base = results.get("baseline")
    rows = []
    for name, r in results.items():
        speedup = f"{base.ms / r.ms:.2f}x" if base else "n/a"
        label = DISPLAY_NAMES[name] + (" *" if name in row_notes else "")
        cell = _format_mb(r.hbm_mb) + ("" if r.measured or not any_measured else " (a)")
        peak = "n/a" if r.peak_mb is None else f"{r.peak_mb:.0f}"
        rows.append([label, f"{r.ms:.3f}", speedup, f"{r.tflops:.1f}", cell, peak])
    report(f"{pass_name}:")
    report(box_table(["Implementation", "Time (ms)", "Speedup vs baseline", "TFLOPS", hbm_header, "Peak MB (extra)"],
                     rows, ["l", "r", "c", "r", "r", "r"]))
    for name, note in row_notes.items():
        report(f"  * {DISPLAY_NAMES[name]}: {note}")
    for line in hbm_lines:
        report(line)
    if base and "fused" in results:
        fused = results["fused"]
        line = (f"  fused vs baseline: {base.ms / fused.ms:.2f}x time, "
                f"{100 * (1 - fused.analytic_mb / base.analytic_mb):.0f}% fewer K/V bytes (analytic)")
        if fused.measured and base.measured:
            line += f", {100 * (1 - fused.hbm_mb / base.hbm_mb):.0f}% fewer DRAM bytes read (ncu)"
        report(line)


def _correctness_check(w, cfg, args, dtype, device, meta, impls, outputs, report, notes, failures) -> None:
    import torch

    if "baseline" not in outputs:
        # baseline not requested (or it failed): compute it here, untimed, for the check
        base_impls = make_impls(["baseline"], w, cfg, meta, report, notes)
        if "baseline" not in base_impls:
            report("Correctness: skipped (no baseline)")
            return
        # outputs were computed on a set we no longer hold: recompute everything on a fresh set
        torch.manual_seed(0)
        inputs = make_input_set(w, cfg, dtype, device, False)
        outputs = {}
        for name, impl in {**impls, **base_impls}.items():
            try:
                with torch.no_grad(), impl.context():
                    outputs[name] = [o.float() for o in impl.to_varlen(impl.run(impl.prepare(*inputs)))]
            except (RuntimeError, NotImplementedError, ValueError):
                pass
    base = outputs.get("baseline")
    if base is None:
        report("Correctness: skipped (baseline did not run)")
        return
    tol = CHECK_TOLERANCE[args.dtype]
    parts = []
    for name in args.impls:
        if name == "baseline" or name not in outputs:
            continue
        diff = max((o - b).abs().max().item() if o.numel() else 0.0 for o, b in zip(outputs[name], base))
        parts.append(f"{name} {diff:.2e}")
        if name in CHECKED_IMPLS and not (diff <= tol):
            msg = f"FAIL: {name} differs from baseline by {diff:.3e} (> {tol:g}) at {w.describe()}"
            failures.append(msg)
            report(msg)
    report(f"Correctness (max |out - baseline|, fwd): {', '.join(parts) if parts else 'nothing to compare'}")


def finish_distributed(status: int) -> None:
    """The end of a torchrun-launched benchmark: every rank waits at a barrier, destroys the process
    group, flushes its output and leaves with `status` through os._exit, skipping interpreter
    finalisation. A gloo group's worker threads can still hold collective handles then, and tearing
    them down while the interpreter finalises aborts the process ("terminate called without an
    active exception", SIGABRT: a known PyTorch/gloo shutdown race, seen here under CPU load after
    the benchmark had written its results)."""
    import torch.distributed as dist

    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def finish_distributed_run(run: "DistributedRun", status: int, csv_path: Optional[str], rows: Sequence[Dict[str, str]],
                           columns: Sequence[str]) -> None:
    """The end of a torchrun-launched benchmark: rank 0 appends `rows` (keyed by `columns`) to
    csv_path when one is given and there are rows, and says so; then finish_distributed(status),
    which does not return."""
    if run.rank == 0 and csv_path and rows:
        append_csv(csv_path, rows, columns)
        run.say(f"\nwrote {len(rows)} rows to {csv_path}")
    finish_distributed(status)


def distributed_on_gpu(device: Optional[str]) -> Optional[bool]:
    """Whether a distributed benchmark runs on the GPU: --device cuda, or no --device and a CUDA GPU
    available; None after an error line on stderr when --device cuda finds no CUDA GPU."""
    import torch

    on_gpu = device == "cuda" or (device is None and torch.cuda.is_available())
    if on_gpu and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return None
    return on_gpu


def rank0_printer(rank: int) -> Callable[..., None]:
    """print(text, flush=True) on rank 0 only (a distributed benchmark's report)."""
    def say(text: str = "") -> None:
        if rank == 0:
            print(text, flush=True)
    return say


def distributed_environment(device, on_gpu: bool) -> Dict[str, str]:
    """The device name ("cpu" off the GPU), torch version and process-group backend of a run."""
    import torch
    import torch.distributed as dist

    return {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "torch": torch.__version__,
            "backend": dist.get_backend()}


def init_distributed(on_gpu: bool, master_port: str, cpu_threads: Optional[int] = None):
    """Join the process group of a torchrun-launched benchmark (a plain ``python`` run becomes rank
    0 of 1 on `master_port`): NCCL on the LOCAL_RANK GPU, or gloo on the CPU with `cpu_threads`
    torch threads (None: the CPU's cores shared among the ranks). Returns the device."""
    import torch
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=master_port)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        if cpu_threads is None:
            cpu_threads = max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"]))
        torch.set_num_threads(cpu_threads)
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


class DistributedRun(NamedTuple):
    """What a torchrun-launched benchmark knows once its process group is up."""

    on_gpu: bool
    device: object  # torch.device
    rank: int
    world_size: int
    dtype: object  # the torch dtype of --dtype
    env: Dict[str, str]  # distributed_environment()
    say: Callable[..., None]  # rank0_printer()


def start_distributed(args, prepare: Callable, master_port: str,
                      cpu_threads: Optional[int] = None) -> Optional[DistributedRun]:
    """The start of a torchrun-launched benchmark: the GPU or the CPU from args.device
    (distributed_on_gpu; None, after its error line, when --device cuda finds no GPU: the caller
    exits with EXIT_NO_GPU), prepare(args, on_gpu) (defaults and checks before any process group),
    the process group (init_distributed), and the torch dtype of args.dtype (bf16, fp16 or
    fp32)."""
    import torch
    import torch.distributed as dist

    on_gpu = distributed_on_gpu(args.device)
    if on_gpu is None:
        return None
    prepare(args, on_gpu)
    device = init_distributed(on_gpu, master_port=master_port, cpu_threads=cpu_threads)
    rank = dist.get_rank()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    return DistributedRun(on_gpu, device, rank, dist.get_world_size(), dtype, distributed_environment(device, on_gpu),
                          rank0_printer(rank))


def say_command(say: Callable[..., None], script: str, world_size: int, argv: Optional[Sequence[str]]) -> None:
    """The "Command:" line (the torchrun command that reproduces the run of `script`, a path from
    the repository root, with `argv` or this process's arguments) and the "Date:" line."""
    argv_list = list(sys.argv[1:] if argv is None else argv)
    say(f"Command: torchrun --nproc_per_node={world_size} "
        + " ".join(shlex.quote(a) for a in [script] + argv_list))
    say(f"Date: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}")


def environment(device) -> Dict[str, str]:
    import torch

    env = {"gpu": "cpu", "torch": torch.__version__, "cuda": str(torch.version.cuda), "sms": "0",
           "l2_mb": "0", "driver": "n/a", "library": "unavailable"}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, sms=str(props.multi_processor_count), l2_mb=f"{props.L2_cache_size / 1e6:.1f}",
                   driver="unknown")
    try:
        import subprocess

        if device.type != "cuda":
            raise OSError("no GPU")
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"-i={device.index or 0}"],
                           capture_output=True, text=True, timeout=10)
        if r.returncode == 0 and r.stdout.strip():
            env["driver"] = r.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import ring_flash_attn

        env["library"] = ring_flash_attn.library_version()
    except Exception as e:  # noqa: BLE001
        env["library"] = f"unavailable ({first_line(e)})"
    return env


def import_torch_for(device: str, need_torch: str, no_gpu_tail: str):
    """torch, or None after an error line on stderr: PyTorch does not import ("error: PyTorch is
    required " + need_torch, with {error} the import error), or device is "cuda" and no CUDA GPU
    is available (the line ends with no_gpu_tail)."""
    try:
        import torch
    except ImportError as e:
        print("error: PyTorch is required " + need_torch.format(error=e), file=sys.stderr)
        return None
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA GPU is available (torch.cuda.is_available() is False); this benchmark times GPU "
              "kernels" + no_gpu_tail, file=sys.stderr)
        return None
    return torch


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    torch = import_torch_for(args.device, "to run the benchmark ({error})",
                             " and needs one. `--help` lists the options.")
    if torch is None:
        return EXIT_NO_GPU

    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = CONFIGS[args.config]
    env = environment(device)
    workloads = workloads_from_args(args)
    prog = Progress(len(workloads) * len(args.passes))
    report = Report(printer=prog.print_stdout if prog.bar is not None else None)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0] if argv is None else
                                                            "benchmark/benchmark_grouped_attention.py"] + argv_list)

    report("Grouped Flash Attention Performance Benchmark")
    report("============================================")
    report(f"GPU: {env['gpu']} ({env['sms']} SMs, L2 {env['l2_mb']} MB), driver {env['driver']}")
    report(f"torch {env['torch']}, CUDA {env['cuda']}, libringattn {env['library']}")
    report(f"Command: {command}")
    report(f"Date: {datetime.datetime.now():%Y-%m-%d %H:%M:%S}")
    report()
    report(f"Configuration: {cfg.label} style ({cfg.num_heads_q} Q heads, {cfg.num_heads_k} KV heads, "
           f"{cfg.head_dim} head_dim), {args.dtype}, causal (bottom-right), batch {args.batch}")
    timer = "CUDA events" if device.type == "cuda" else "host timer (--device cpu smoke test: numbers mean nothing)"
    report(f"Timing: {timer}, {args.warmup} untimed warm-up calls (the first call and the peak-memory "
           f"call among them), median of {args.num_runs}; FLOPs on unmasked pairs (fwd 4*D*Hq*pairs, bwd 2.5x)")
    hbm = None
    if args.measure_hbm:
        import ncu_hbm  # this folder: the Nsight Compute measurement

        hbm = ncu_hbm.HbmProbe(ncu_hbm.find_ncu(), args.config, args.dtype,
                               extra=["--device", "cpu"] if device.type == "cpu" else [])
        report(hbm.describe(args.impls))
    else:
        report("HBM: analytic K/V bytes (--measure-hbm measures DRAM reads with Nsight Compute)")

    torch.manual_seed(0)
    notes: Dict[str, str] = {}
    csv_rows: List[Dict[str, str]] = []
    failures: List[str] = []
    for i, w in enumerate(workloads):
        try:
            run_workload(w, cfg, args, dtype, device, env, report, notes, csv_rows, failures, prog, hbm)
        except torch.OutOfMemoryError as e:
            report(f"note: {w.describe()}: out of GPU memory ({first_line(e)}); skipped")
            prog.advance_to((i + 1) * len(args.passes))
        if device.type == "cuda":
            torch.cuda.empty_cache()

    report()
    if failures:
        report(f"{len(failures)} correctness FAILURE(S):")
        for f in failures:
            report(f"  {f}")
    elif not args.no_check and "fwd" in args.passes:
        report("Correctness: all checked outputs within tolerance of the baseline")
    prog.close()

    if args.csv:
        append_csv(args.csv, csv_rows)
        report(f"CSV: appended {len(csv_rows)} rows to {args.csv}")
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
        gpu_tag = "".join(ch if ch.isalnum() else "_" for ch in env["gpu"]).strip("_")
        path = os.path.join(args.output_dir,
                            f"grouped_attention_{cfg.name}_{gpu_tag}_{datetime.datetime.now():%Y%m%d-%H%M%S}.txt")
        report(f"Report saved to {path}")
        with open(path, "w") as f:
            f.write("\n".join(report.lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
