#!/usr/bin/env python
"""Plot the CSV of benchmark/benchmark_grouped_attention.py (--csv): TFLOPS vs sequence length.

    python benchmark/plot_results.py benchmark/results/2026-11-25_h100_tier1_fwd/bench.csv
    python benchmark/plot_results.py build/sweep-out/sweep.csv -o sweep.png
    python benchmark/plot_results.py a.csv b.csv --metric time_ms -o times.png

One panel per (pass, model config, workload), where the workload is "G groups" (the default
split of one causal sequence into G query groups; --world-size 1 is the same workload with 2
groups) or "N=8, rank 0" (the zigzag per-rank workload): TFLOPS only compare along a line when the
workload is the same. One line per implementation, with the same colour and marker in every
panel; x: the sequence length L on a log2 axis. Points that repeat (same panel, implementation and
L, e.g. from two runs appended to one CSV) are averaged. The title names the GPU(s) of the CSV.

Needs matplotlib, a tool dependency only (not one of ring_flash_attn's): pip install matplotlib.
Without it the script says so and exits with status 2. The CSV reading and grouping below import
without it (tested by test/test_benchmark_cpu.py).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from benchmark_grouped_attention import CONFIGS, CSV_COLUMNS, DISPLAY_NAMES, IMPLS, PASSES  # noqa: E402

METRICS = {  # CSV column -> (axis label, log y axis)
    "tflops": ("TFLOPS", False),
    "time_ms": ("time (ms)", True),
    "hbm_mb": ("HBM / K/V MB", True),
}
REQUIRED = ("gpu", "config", "seqlen", "world_size", "rank", "num_groups", "impl", "pass")
EXIT_NO_MATPLOTLIB = 2

Series = Dict[str, List[Tuple[int, float]]]  # impl -> sorted [(seqlen, value)]


def read_rows(paths: Sequence[str]) -> List[Dict[str, str]]:
    """All rows of the CSVs; ValueError when a file lacks the benchmark's columns."""
    rows: List[Dict[str, str]] = []
    for path in paths:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: not a benchmark CSV (missing columns {', '.join(missing)}; "
                                 f"expected {','.join(CSV_COLUMNS)})")
            rows.extend(reader)
    return rows


def workload_key(row: Dict[str, str]) -> Tuple[tuple, str]:
    """(sort key, label) of a row's workload; --world-size 1 is the default 2-group workload."""
    ws = row.get("world_size", "").strip()
    if ws in ("", "1"):
        g = int(row["num_groups"])
        return (0, g, 0), f"{g} groups"
    n, r = int(ws), int(row.get("rank") or 0)
    return (1, n, r), f"N={n}, rank {r}"


def _pass_config_key(pass_name: str, config: str) -> tuple:
    p = PASSES.index(pass_name) if pass_name in PASSES else len(PASSES)
    c = list(CONFIGS).index(config) if config in CONFIGS else len(CONFIGS)
    return p, c, pass_name, config


def collect(rows: Sequence[Dict[str, str]], metric: str = "tflops"):
    """Group the rows into panels: returns (panel rows, panel columns, data), where data maps
    ((pass, config), workload label) to impl -> sorted [(seqlen, mean of metric)]; panel rows are
    the (pass, config) pairs and columns the workload labels present, both in display order."""
    sums: Dict[tuple, Dict[str, Dict[int, List[float]]]] = {}
    row_keys, col_keys = {}, {}
    for r in rows:
        value = r.get(metric, "").strip()
        if not value:
            continue
        (wkey, wlabel) = workload_key(r)
        rc = (r["pass"], r["config"])
        row_keys[rc] = _pass_config_key(*rc)
        col_keys[wlabel] = wkey
        sums.setdefault((rc, wlabel), {}).setdefault(r["impl"], {}).setdefault(int(r["seqlen"]), []).append(
            float(value))
    data: Dict[tuple, Series] = {}
    for panel, by_impl in sums.items():
        data[panel] = {impl: sorted((L, sum(v) / len(v)) for L, v in pts.items()) for impl, pts in by_impl.items()}
    prow = sorted(row_keys, key=row_keys.get)
    pcol = sorted(col_keys, key=col_keys.get)
    return prow, pcol, data


def seqlen_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def impl_order(rows: Sequence[Dict[str, str]]) -> List[str]:
    present = list(dict.fromkeys(r["impl"] for r in rows))
    return [i for i in IMPLS if i in present] + [i for i in present if i not in IMPLS]


def title_text(rows: Sequence[Dict[str, str]], metric: str, paths: Sequence[str]) -> str:
    gpus = list(dict.fromkeys(r["gpu"] for r in rows)) or ["unknown GPU"]
    soft = list(dict.fromkeys(f"torch {r.get('torch', '?')}, CUDA {r.get('cuda', '?')}" for r in rows))
    return (f"Grouped attention: {METRICS[metric][0]} vs sequence length on {' / '.join(gpus)}\n"
            f"{'; '.join(soft)}; {len(rows)} rows from {', '.join(os.path.basename(p) for p in paths)}")


def plot(rows: Sequence[Dict[str, str]], output: str, metric: str = "tflops",
         paths: Sequence[str] = ()) -> Tuple[int, int]:
    """Write the PNG; returns (panels drawn, grid cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prow, pcol, data = collect(rows, metric)
    if not data:
        raise ValueError(f"no rows with a {metric} value")
    impls = impl_order(rows)
    colors = plt.get_cmap("tab10").colors
    markers = "osD^vP*Xh<>"
    style = {impl: (colors[i % len(colors)], markers[i % len(markers)]) for i, impl in enumerate(impls)}
    nrows, ncols = len(prow), len(pcol)
    fig, axes = plt.subplots(nrows, ncols, figsize=(0.9 + 3.8 * ncols, 1.75 + 3.0 * nrows), squeeze=False)
    label, log_y = METRICS[metric]
    drawn = 0
    for i, rc in enumerate(prow):
        for j, wl in enumerate(pcol):
            ax = axes[i][j]
            series = data.get((rc, wl))
            if not series:
                ax.set_visible(False)
                continue
            drawn += 1
            xs = set()
            for impl in impls:
                pts = series.get(impl)
                if not pts:
                    continue
                color, marker = style[impl]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, markersize=5,
                        linewidth=1.6, label=DISPLAY_NAMES.get(impl, impl))
                xs.update(p[0] for p in pts)
            ax.set_xscale("log", base=2)
            ticks = sorted(xs)
            ax.set_xticks(ticks)
            ax.set_xticklabels([seqlen_label(t) for t in ticks])
            ax.minorticks_off()
            if len(ticks) == 1:
                ax.set_xlim(ticks[0] / 1.5, ticks[0] * 1.5)
            else:
                ax.set_xlim(ticks[0] / 1.25, ticks[-1] * 1.25)
            if log_y:
                ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"{rc[0]} | {rc[1]} | {wl}", fontsize=10)
            ax.set_xlabel("sequence length L", fontsize=9)
            if j == 0 or not axes[i][j - 1].get_visible():
                ax.set_ylabel(label, fontsize=9)
            ax.tick_params(labelsize=8)
    handles = [plt.Line2D([], [], color=style[i][0], marker=style[i][1], linewidth=1.6,
                          label=DISPLAY_NAMES.get(i, i)) for i in impls]
    width, height = fig.get_size_inches()
    # fixed margins in inches: title (2 lines) and legend above the panels, axis labels around them
    fig.suptitle(title_text(rows, metric, paths), fontsize=12, y=1 - 0.08 / height, va="top")
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 7), fontsize=9, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.55 / height))
    fig.subplots_adjust(left=0.7 / width, right=1 - 0.2 / width, top=1 - 1.2 / height, bottom=0.55 / height,
                        wspace=0.75 / 3.0, hspace=0.85 / 2.2)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return drawn, nrows * ncols


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Plot benchmark CSVs: one panel per (pass, config, workload), "
                                            "one line per implementation, log2 sequence-length axis.")
    p.add_argument("csv", nargs="+", help="CSV file(s) written by benchmark_grouped_attention.py --csv")
    p.add_argument("-o", "--output", default=None,
                   help="PNG to write (default: the first CSV's path with .png, or _<metric>.png for other metrics)")
    p.add_argument("--metric", choices=sorted(METRICS), default="tflops", help="y axis (default: %(default)s)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        rows = read_rows(args.csv)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not rows:
        print(f"error: no rows in {', '.join(args.csv)}", file=sys.stderr)
        return 1
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plot_results.py needs matplotlib, which is not installed here. It is a tool "
              "dependency of the benchmark scripts, not a dependency of ring_flash_attn: "
              "`python -m pip install matplotlib`.", file=sys.stderr)
        return EXIT_NO_MATPLOTLIB
    output = args.output or (os.path.splitext(args.csv[0])[0]
                             + (".png" if args.metric == "tflops" else f"_{args.metric}.png"))
    try:
        drawn, cells = plot(rows, output, args.metric, args.csv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {output}: {drawn} panels, {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
