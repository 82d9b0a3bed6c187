"""The committed generated sources match their generators (scripts/dev/gen_*.py): a generated file
edited by hand, or a generator changed without regenerating and committing its output, fails here.
Each generator is re-run into a temporary folder (--out) and its files compared byte for byte with
the committed ones; --check also reports files the generator owns but no longer writes."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / "scripts" / "dev"
GENERATORS = sorted(p.name for p in DEV.glob("gen_*.py") if p.name != "gen_common.py")


def run_generator(name: str, *args: str) -> subprocess.CompletedProcess:
    """Runs scripts/dev/<name> with `args`; returns the finished process (stdout and stderr as text)."""
    return subprocess.run([sys.executable, str(DEV / name), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_every_generator_is_covered() -> None:
    assert {"gen_abi_mirror.py", "gen_cp_api.py", "gen_grouped_python.py", "gen_instantiations.py",
            "gen_wgmma.py"} <= set(GENERATORS), GENERATORS


@pytest.mark.parametrize("name", GENERATORS)
def test_committed_output_matches_generator(name: str, tmp_path: Path) -> None:
    done = run_generator(name, "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    generated = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert generated, f"{name} wrote nothing under {tmp_path}"
    stale = []
    for path in generated:
        rel = path.relative_to(tmp_path)
        committed = ROOT / rel
        if not committed.is_file():
            stale.append(f"missing: {rel}")
        elif committed.read_bytes() != path.read_bytes():
            stale.append(f"differs: {rel}")
    assert not stale, (f"committed output of scripts/dev/{name} is stale (run python3 scripts/dev/{name} and "
                       f"commit the result):\n" + "\n".join(stale))


@pytest.mark.parametrize("name", GENERATORS)
def test_check_mode_passes(name: str) -> None:
    done = run_generator(name, "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "up to date" in done.stdout


def test_staleness_is_detected(tmp_path: Path) -> None:
    """The comparison --check runs reports an edited file, a missing one and a left-over one."""
    sys.path.insert(0, str(DEV))
    try:
        import gen_common
    finally:
        sys.path.remove(str(DEV))
    fresh, committed = tmp_path / "fresh", tmp_path / "committed"
    owned = ("kernels/*.cu",)
    files = {"kernels/a.cu": "int a;\n", "kernels/b.cu": "int b;\n", "header.h": "#pragma once\n"}
    gen_common.write_tree(files, fresh, owned)
    gen_common.write_tree(files, committed, owned)
    assert gen_common.stale_files(fresh, committed, owned) == []
    (committed / "kernels" / "a.cu").write_text("int a = 1;\n")
    (committed / "header.h").unlink()
    (committed / "kernels" / "old.cu").write_text("int old;\n")
    (committed / "notes.txt").write_text("not owned by the generator\n")
    assert gen_common.stale_files(fresh, committed, owned) == [
        "missing: header.h", "differs: kernels/a.cu", "left over: kernels/old.cu"]
