#!/usr/bin/env bash
# Kernel changes waiting for a GPU, kept on main as patches (scripts/dev/pending/<name>.patch, one
# `git diff` against main each, with <name>.md beside it: what it changes, what was checked here,
# the prediction and the device command). Not as branches: a branch that is not on main is gone
# when the session's machine goes back (2026-12-05: nine compile-checked kernel branches were lost
# that way). A patch changes nothing that builds or runs until it is applied.
#
#   bash scripts/dev/pending.sh save BRANCH [NAME]   # git diff main...BRANCH -> pending/NAME.patch
#                                                    # (its pending/NAME.md copied, its perf-log
#                                                    # entry left to land on main by hand)
#   bash scripts/dev/pending.sh check [NAME ...]     # each patch applies to this tree (CI runs it)
#   bash scripts/dev/pending.sh export [NAME ...]    # .device/branches/NAME: this tree's tracked
#                                                    # files with the patch applied, the folder that
#                                                    # scripts/dev/branch_check.sh builds on the device
#   bash scripts/dev/pending.sh combine NAME P1 P2 ... # .device/branches/NAME: this tree with patches
#                                                    # P1, P2, ... applied in that order (one build
#                                                    # and one GPU test run for several changes)
#   bash scripts/dev/pending.sh branch NAME [BASE]   # a local branch NAME from BASE (default main)
#                                                    # with the patch committed (to work on it; save
#                                                    # it again after). A patch that no longer
#                                                    # applies to main: BASE = the commit that saved
#                                                    # it (git log -1 --format=%h -- its .patch), then
#                                                    # git rebase main, then save again
# NAME defaults to every patch in the folder.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dir="${RFA_PENDING_DIR:-$root/scripts/dev/pending}"  # RFA_PENDING_DIR: for the tests
cd "$root"
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
names() {
  if [ $# -gt 0 ]; then printf '%s\n' "$@"; return; fi
  for p in "$dir"/*.patch; do [ -e "$p" ] && basename "$p" .patch; done
}
need_patch() {
  [ -f "$dir/$1.patch" ] || { echo "pending.sh: no patch named '$1' (expected $dir/$1.patch)" >&2; exit 2; }
}
# .device/branches/NAME: this tree's tracked files with patches P1, P2, ... applied in order.
export_tree() {  # NAME P1 [P2 ...]
  local name="$1" n
  shift
  for n in "$@"; do need_patch "$n"; done
  local dst="$root/.device/branches/$name"
  rm -rf "$dst"; mkdir -p "$dst"
  git archive HEAD | tar -x -C "$dst"
  local before=""
  for n in "$@"; do
    # From the repository root with --directory: git apply run inside a subfolder of a work tree
    # skips, silently, every path outside that subfolder.
    git apply --directory=".device/branches/$name" "$dir/$n.patch" ||
      { echo "pending.sh: $n does not apply to this tree${before:+ after$before}" >&2; exit 1; }
    before="$before $n"
  done
  echo "exported .device/branches/$name ($*)"
}
cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  save)
    [ $# -ge 1 ] || { echo "pending.sh save: expected BRANCH [NAME]" >&2; exit 2; }
    branch="$1"; name="${2:-$1}"
    git rev-parse --verify -q "$branch^{commit}" >/dev/null ||
      { echo "pending.sh save: branch '$branch' does not exist" >&2; exit 2; }
    mkdir -p "$dir"
    # The branch's own notes (pending/NAME.md) come over as a file and its perf-log entry lands on
    # main by hand: neither goes into the patch, which would stop applying whenever they change.
    git diff --binary "main...$branch" -- . ':(exclude)scripts/dev/pending' ':(exclude)docs/perf-log.md' \
      >"$dir/$name.patch"
    [ -s "$dir/$name.patch" ] || { rm -f "$dir/$name.patch"; echo "pending.sh save: $branch has no changes against main" >&2; exit 2; }
    git show "$branch:scripts/dev/pending/$name.md" >"$dir/$name.md" 2>/dev/null || true
    [ -s "$dir/$name.md" ] || { rm -f "$dir/$name.md"; echo "pending.sh save: write $dir/$name.md too (what, checked here, prediction, device command)" >&2; }
    git diff --quiet "main...$branch" -- docs/perf-log.md ||
      echo "pending.sh save: $branch changes docs/perf-log.md: land that entry on main by hand" >&2
    echo "saved $dir/$name.patch ($(grep -c '^diff --git' "$dir/$name.patch") files)"
    ;;
  check)
    rc=0
    [ -n "$(names "$@")" ] || echo "no pending patches in $dir"
    for n in $(names "$@"); do
      need_patch "$n"
      if [ ! -f "$dir/$n.md" ]; then echo "FAIL $n: no $n.md beside the patch"; rc=1; continue; fi
      if out=$(git apply --check "$dir/$n.patch" 2>&1); then echo "ok   $n"; else echo "FAIL $n: $out"; rc=1; fi
    done
    exit $rc
    ;;
  export)
    for n in $(names "$@"); do export_tree "$n" "$n"; done
    ;;
  combine)
    [ $# -ge 2 ] || { echo "pending.sh combine: expected NAME P1 [P2 ...]" >&2; exit 2; }
    export_tree "$@"
    ;;
  branch)
    [ $# -ge 1 ] && [ $# -le 2 ] || { echo "pending.sh branch: expected NAME [BASE]" >&2; exit 2; }
    need_patch "$1"
    tmp=$(mktemp)  # the patch as it is in this checkout, whatever BASE holds
    cp "$dir/$1.patch" "$tmp"
    git switch -c "$1" "${2:-main}"
    git apply --index "$tmp"
    rm -f "$tmp"
    git commit -q -m "$1 (from scripts/dev/pending/$1.patch)"
    echo "on branch $1"
    ;;
  -h|--help|"") usage; [ -n "$cmd" ] ;;
  *) echo "pending.sh: unknown command '$cmd' (expected save, check, export, combine or branch)" >&2; exit 2 ;;
esac
