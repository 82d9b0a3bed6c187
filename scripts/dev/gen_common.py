"""Command line shared by the source generators (gen_instantiations.py, gen_wgmma.py): write the
generated files into the repository, under another folder, or check the committed ones.

A generator describes its output as a mapping {path relative to the repository root: text} and
the glob patterns of the files it owns entirely (a file matching one that the generator no longer
produces is stale and is removed or reported).

    python3 scripts/dev/<generator>.py              write the files into the repository
    python3 scripts/dev/<generator>.py --out DIR    write them under DIR instead (same relative paths)
    python3 scripts/dev/<generator>.py --check      regenerate into a temporary folder and compare
                                                    with the repository; exit 1 listing every file
                                                    that differs, is missing or is left over
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, Sequence

ROOT = Path(__file__).resolve().parents[2]


def write_tree(files: Dict[str, str], root: Path, owned: Sequence[str]) -> None:
    """Writes every file under `root` and removes files of the owned patterns it did not write."""
    for pattern in owned:
        for old in root.glob(pattern):
            if old.relative_to(root).as_posix() not in files:
                old.unlink()
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def stale_files(generated: Path, committed: Path, owned: Sequence[str]) -> list[str]:
    """Differences between a freshly generated tree and the committed one, one line each."""
    problems = []
    fresh = {p.relative_to(generated).as_posix() for p in generated.rglob("*") if p.is_file()}
    for rel in sorted(fresh):
        target = committed / rel
        if not target.is_file():
            problems.append(f"missing: {rel}")
        elif target.read_bytes() != (generated / rel).read_bytes():
            problems.append(f"differs: {rel}")
    for pattern in owned:
        for path in sorted(committed.glob(pattern)):
            rel = path.relative_to(committed).as_posix()
            if rel not in fresh:
                problems.append(f"left over: {rel}")
    return problems


def main(name: str, generate: Callable[[], Dict[str, str]], owned: Sequence[str] = (),
         argv: Sequence[str] | None = None) -> int:
    """Runs a generator's command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(prog=name, description=sys.modules["__main__"].__doc__)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, help="write the generated files under this folder instead")
    where.add_argument("--check", action="store_true",
                       help="compare the committed files with freshly generated ones; exit 1 when stale")
    args = parser.parse_args(argv)
    files = generate()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            write_tree(files, Path(tmp), owned)
            problems = stale_files(Path(tmp), ROOT, owned)
        for line in problems:
            print(f"{name}: {line}")
        if problems:
            print(f"{name}: generated files are stale; run python3 scripts/dev/{name} and commit the result")
            return 1
        print(f"{name}: {len(files)} generated files up to date")
        return 0
    root = args.out if args.out is not None else ROOT
    write_tree(files, root, owned)
    print(f"{name}: wrote {len(files)} files under {root}")
    return 0
