#!/usr/bin/env python3
"""Side-by-side table of the metrics in several Nsight Compute text reports (`ncu` run without
--csv, one profiled launch each): one row per metric of the first report, one column per report.

    python3 scripts/dev/ncu_table.py old=build/ncu-out/ncu_fwd_old.txt new=build/ncu-out/ncu_fwd_new.txt

Each argument is LABEL=PATH (or a bare PATH, labelled by its file name). A report's metric is the
first line of the form `    <name>  <unit>  <value>` with that name (the first launch's value when
a report holds several). Metrics missing from a report print as "-".
"""
from __future__ import annotations

import os
import re
import sys
from typing import Dict, List, Tuple

_METRIC = re.compile(r"\s{4}(\S.*?\S)\s{2,}(\S+)\s{2,}([\d.,]+)\s*$")


def metrics(path: str) -> Dict[str, Tuple[str, str]]:
    """Metric name -> (unit, value) of the first occurrence in an ncu text report."""
    found: Dict[str, Tuple[str, str]] = {}
    with open(path, errors="replace") as f:
        for line in f:
            m = _METRIC.match(line)
            if m and m.group(1) not in found:
                found[m.group(1)] = (m.group(2), m.group(3))
    return found


def table(reports: List[Tuple[str, Dict[str, Tuple[str, str]]]]) -> str:
    """The table text: metric, unit, then each report's value."""
    head = f"{'metric':48s} {'unit':10s} " + " ".join(f"{label[:14]:>14s}" for label, _ in reports)
    lines = [head]
    first = reports[0][1]
    for name, (unit, _) in first.items():
        values = " ".join(f"{r.get(name, ('', '-'))[1]:>14s}" for _, r in reports)
        lines.append(f"{name[:48]:48s} {unit[:10]:10s} {values}")
    return "\n".join(lines)


def main(argv: List[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    reports = []
    for arg in argv:
        label, sep, path = arg.partition("=")
        if not sep:
            label, path = os.path.basename(arg), arg
        if not os.path.exists(path):
            print(f"ncu_table: no report at {path}", file=sys.stderr)
            return 1
        reports.append((label, metrics(path)))
    if not reports[0][1]:
        print(f"ncu_table: no metric lines in {argv[0]} (did ncu profile a launch?)", file=sys.stderr)
        return 1
    print(table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
