#!/usr/bin/env python3
"""Normalised SASS of every CUDA object file in a build folder, for "did this refactor change the
machine code?" checks.

    python3 scripts/dev/sass_digest.py build/pip > /tmp/before.txt   # on the old commit
    python3 scripts/dev/sass_digest.py build/pip > /tmp/after.txt    # on the new one
    python3 scripts/dev/sass_digest.py --compare /tmp/before.txt /tmp/after.txt

One line per (object file, architecture, kernel index): a hash of its instructions with addresses,
encodings and symbol names removed (renaming a template argument changes the mangled name, not
the code). --compare prints the kernels whose instructions differ and exits 1 when any do.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

_ADDR = re.compile(r"/\*[0-9a-f]{4,}\*/")
_ENC = re.compile(r"/\* 0x[0-9a-f]+ \*/")
_SYM = re.compile(r"\b_Z\w+")


def _find_cuobjdump() -> str:
    """$CUOBJDUMP, the PATH, the CUDA toolkit, or the copy Triton's wheel ships (the toolkit on the
    development machine has nvcc but no cuobjdump)."""
    import glob

    found = [os.environ.get("CUOBJDUMP", ""), shutil.which("cuobjdump") or "",
             os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    found += sorted(glob.glob(os.path.expanduser(
        "~/.cache/ring-flash-attn/venv/lib/python3*/site-packages/triton/backends/nvidia/bin/cuobjdump")))
    for path in found:
        if path and os.access(path, os.X_OK):
            return path
    sys.exit("sass_digest: no cuobjdump found (set CUOBJDUMP=/path/to/cuobjdump)")


def digest_object(path: Path) -> list[str]:
    out = subprocess.run([_find_cuobjdump(), "-sass", str(path)], capture_output=True, text=True, check=False).stdout
    rows, arch, func, body = [], "?", None, []

    def flush() -> None:
        if func is not None:
            h = hashlib.sha1("\n".join(body).encode()).hexdigest()[:16]
            rows.append(f"{path.name} {arch} #{len(rows)} {h} {len(body)}")

    for line in out.splitlines():
        s = line.strip()
        if s.startswith("arch ="):
            flush()
            func, arch = None, s.split("=", 1)[1].strip()
        elif s.startswith("Function :"):
            flush()
            func, body = s, []
        elif func is not None and s and not s.startswith(".") and "....." not in s:
            s = _SYM.sub("SYM", _ENC.sub("", _ADDR.sub("", s))).strip()
            if s:
                body.append(s)
    flush()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build", nargs="?", help="build folder to scan for *.cu.o")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    a = ap.parse_args()
    if a.compare:
        before = {" ".join(r.split()[:3]): r for r in Path(a.compare[0]).read_text().splitlines()}
        after = {" ".join(r.split()[:3]): r for r in Path(a.compare[1]).read_text().splitlines()}
        diff = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        for k in diff:
            print(f"DIFF {k}: {before.get(k, '-').split()[3:]} -> {after.get(k, '-').split()[3:]}")
        print(f"{len(before)} kernels before, {len(after)} after, {len(diff)} differ")
        return 1 if diff else 0
    objs = sorted(Path(a.build).rglob("*.cu.o"))
    if not objs:
        print(f"no *.cu.o under {a.build}", file=sys.stderr)
        return 2
    for o in objs:
        for r in digest_object(o):
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
