#!/usr/bin/env python3
"""The old-vs-new table of ab_compare.sh: rows of benchmark CSVs grouped by key columns, the
median of each side's values (every round's), and their ratio as a speed-up (> 1: new is faster).

    python3 scripts/dev/ab_table.py --keys seqlen,rank,impl,pass --metric tflops OLD.csv ... -- NEW.csv ...
    python3 scripts/dev/ab_table.py --keys seqlen,tier,variant,pass --metric time_ms --lower-is-better ...

A row whose `status` column (when the CSV has one) is not "ok" is reported and left out.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from typing import Dict, List, Sequence, Tuple

Key = Tuple[str, ...]


def load(paths: Sequence[str], keys: Sequence[str], metric: str) -> Dict[Key, List[float]]:
    rows: Dict[Key, List[float]] = {}
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                key = tuple(r[k] for k in keys)
                if r.get("status", "ok") != "ok":
                    print(f"{path}: {key} status {r['status']}")
                    continue
                rows.setdefault(key, []).append(float(r[metric]))
    return rows


def sort_key(key: Key) -> tuple:
    """Numbers as numbers, so L = 2048 comes before 16384."""
    return tuple((0, float(v), "") if v.replace(".", "", 1).isdigit() else (1, 0.0, v) for v in key)


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    if "--" not in args:
        print("ab_table.py: expected OLD.csv ... -- NEW.csv ...", file=sys.stderr)
        return 2
    cut = args.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", required=True, help="comma-separated key columns")
    ap.add_argument("--metric", required=True, help="the measured column (tflops, time_ms, ...)")
    ap.add_argument("--lower-is-better", action="store_true", help="the metric is a time")
    ap.add_argument("old", nargs="+")
    opts = ap.parse_args(args[:cut])
    keys = opts.keys.split(",")
    old, new = load(opts.old, keys, opts.metric), load(args[cut + 1:], keys, opts.metric)
    digits = 3 if opts.lower_is_better else 1
    widths = [max([len(name)] + [len(key[i]) for key in old]) for i, name in enumerate(keys)]
    print(" ".join(f"{k:>{w}}" for k, w in zip(keys, widths))
          + f" {'old ' + opts.metric + ' (runs)':>28} {'new ' + opts.metric + ' (runs)':>28} {'speed-up':>8}")
    for key in sorted(old, key=sort_key):
        if key not in new:
            continue
        o, n = statistics.median(old[key]), statistics.median(new[key])
        speedup = o / n if opts.lower_is_better else n / o
        runs = lambda xs: str([round(x, digits) for x in xs])  # noqa: E731
        print(" ".join(f"{v:>{w}}" for v, w in zip(key, widths))
              + f" {o:10.{digits}f} {runs(old[key]):>17} {n:10.{digits}f} {runs(new[key]):>17} {speedup:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
