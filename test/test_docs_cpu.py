"""The user's and the team's pages name files that exist: README.md, docs/*.md, benchmark/README.md
and scripts/dev/README.md. A renamed or deleted file leaves a page pointing nowhere; this finds it.

Checked: relative Markdown links (the target file, from the page's folder), backticked paths from
the repository root (`csrc/...`, `scripts/...`, ...; a path with a placeholder or a wildcard is
skipped, a `:line` suffix dropped), which must be tracked files or folders (a file on disk that was
never added fails here as it would in a clean clone), and backticked bare file names of source and
script kinds (`bwd_kernel.cuh`), which must be some tracked file's name. Not checked: commands
with spaces and fenced code blocks. The dated logs (docs/perf-log.md, docs/changelog.md) are held
to their links only: they may name files that history removed. scripts/dev/PENDING.md is left
out: it names files of branches that are not merged yet."""

from __future__ import annotations

import os
import re
import subprocess
from typing import List, Set, Tuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md", "benchmark/README.md", "scripts/dev/README.md"] + sorted(
    os.path.join("docs", n) for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md"))
HISTORY_PAGES = {os.path.join("docs", "perf-log.md"), os.path.join("docs", "changelog.md")}
REPO_ROOTS = ("csrc/", "scripts/", "benchmark/", "test/", "python/", "docs/", "include/", "cmake/", ".ci/",
              "examples/")
PLACEHOLDER_CHARS = set("*<>{}$|[]")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
BACKTICKED = re.compile(r"`([^`\s]+)`")
BARE_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.(?:cuh|cu|h|cpp|py|sh|cmake)$")


def tracked_files() -> List[str]:
    """The repository's files: git's list where this is a checkout, else every file under the root."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        files = out.split()
        if files:
            return files
    except (OSError, subprocess.CalledProcessError):
        pass
    found = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") or d == ".ci"]
        found += [os.path.relpath(os.path.join(folder, n), ROOT) for n in names]
    return found


def broken_references(page: str, text: str, names: Set[str], paths: Set[str],
                      links_only: bool = False) -> List[Tuple[str, str]]:
    """(kind, reference) of every reference in `text` (the page at repository path `page`) that
    names no existing file: `names` holds the tracked files' names, `paths` their paths and every
    folder above them; links_only checks the Markdown links alone."""
    bad = []
    folder = os.path.dirname(page)
    for m in LINK.finditer(text):
        target = m.group(1)
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        if not os.path.exists(os.path.join(ROOT, folder, target)):
            bad.append(("link", target))
    if links_only:
        return bad
    for m in BACKTICKED.finditer(text):
        ref = m.group(1).rstrip(".,;)")
        if PLACEHOLDER_CHARS & set(ref):
            continue
        if ref.startswith(REPO_ROOTS):
            path = ref.split(":")[0].rstrip("/")
            if path not in paths:
                bad.append(("path", ref))
        elif BARE_FILE.match(ref) and ref not in names:
            bad.append(("file name", ref))
    return bad


def path_set(files: List[str]) -> Set[str]:
    """The tracked files' paths and every folder above them."""
    paths = set()
    for f in files:
        parts = f.split("/")
        paths.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return paths


def test_checker_finds_what_is_missing():
    names = {"real.cuh", "launch.h"}
    paths = path_set(["csrc/cuda/launch.h"])
    text = ("[ok](api.md) [gone](nowhere.md#x) `csrc/cuda/launch.h` `csrc/cuda/` `csrc/cuda/no_such.h:12` "
            "`real.cuh` `gone.cuh` `benchmark/results/<date>_*` `https://x/y.py` [web](https://example.com/a.md)")
    assert broken_references("docs/page.md", text, names, paths) == [
        ("link", "nowhere.md"), ("path", "csrc/cuda/no_such.h:12"), ("file name", "gone.cuh")]
    assert broken_references("docs/page.md", text, names, paths, links_only=True) == [("link", "nowhere.md")]


@pytest.mark.parametrize("page", PAGES)
def test_page_names_files_that_exist(page):
    files = tracked_files()
    names = {os.path.basename(f) for f in files}
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        text = f.read()
    bad = broken_references(page, text, names, path_set(files), links_only=page in HISTORY_PAGES)
    assert not bad, f"{page} names files that do not exist (rename the reference or the file): {bad}"
