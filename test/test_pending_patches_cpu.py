"""Kernel changes waiting for a GPU are kept on main as patches (scripts/dev/pending/<name>.patch
with <name>.md beside it; scripts/dev/pending.sh). Each must still apply to the tree, or the device
call that is to test it cannot build it; a change on main that breaks one must update the patch."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "dev" / "pending.sh"


def run_pending(*args: str, pending_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if pending_dir is not None:
        env["RFA_PENDING_DIR"] = str(pending_dir)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, env=env)


def test_every_pending_patch_applies_and_has_its_notes() -> None:
    result = run_pending("check")
    assert result.returncode == 0, (
        f"scripts/dev/pending.sh check failed:\n{result.stdout}{result.stderr}\nTo bring a patch up to date: "
        "bash scripts/dev/pending.sh branch NAME $(git log -1 --format=%h -- scripts/dev/pending/NAME.patch), "
        "git rebase main, bash scripts/dev/pending.sh save NAME")
    patches = sorted(p.stem for p in (ROOT / "scripts" / "dev" / "pending").glob("*.patch"))
    reported = sorted(line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok "))
    assert reported == patches, f"checked {reported}, folder holds {patches}"


def test_check_fails_for_a_patch_that_does_not_apply(tmp_path: Path) -> None:
    (tmp_path / "stale.patch").write_text(
        "diff --git a/csrc/common/mask.h b/csrc/common/mask.h\n"
        "--- a/csrc/common/mask.h\n+++ b/csrc/common/mask.h\n"
        "@@ -1,1 +1,1 @@\n-this line is not in the file\n+replacement\n")
    (tmp_path / "stale.md").write_text("# stale\n")
    result = run_pending("check", pending_dir=tmp_path)
    assert result.returncode != 0
    assert "FAIL stale" in result.stdout


def test_check_fails_for_a_patch_without_notes(tmp_path: Path) -> None:
    (tmp_path / "bare.patch").write_text("")
    result = run_pending("check", pending_dir=tmp_path)
    assert result.returncode != 0
    assert "no bare.md" in result.stdout


def test_unknown_command_names_the_expected_ones() -> None:
    result = run_pending("bogus")
    assert result.returncode == 2
    assert "expected save, check, export, combine or branch" in result.stderr


def test_check_passes_and_says_so_when_nothing_is_pending(tmp_path: Path) -> None:
    result = run_pending("check", pending_dir=tmp_path / "absent")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no pending patches" in result.stdout
