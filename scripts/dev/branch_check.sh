#!/usr/bin/env bash
# Checks kernel branches waiting for a GPU, in ONE device call (device time is scarce and H200
# clocks move between calls, so each branch is timed against the current tree in the same run).
#
# Here, before the call: export each pending change's tree (scripts/dev/pending.sh export NAME:
# main's files with pending/NAME.patch applied, in .device/branches/NAME; it travels as an ignored
# folder, named in the call's carry list with .device/googletest):
#   bash scripts/dev/pending.sh export head-run window-mask
# There:
#   BRANCHES="head-run window-mask" bash scripts/dev/branch_check.sh
#
# Per branch, within BRANCH_DEADLINE_S seconds each (default 420): its build (archs of the card),
# the GPU tests (`-m "gpu and not stress"`, the files in BRANCH_TESTS_<name with - as _> or
# BRANCH_TESTS, default the single-device GPU suites; at each $RING_FLASH_ATTN_TIER of
# BRANCH_TIERS_<name> or BRANCH_TIERS, default "auto": tier 2 wherever it has a kernel on an
# H100/H200; "auto sm80" runs tier 1 too), and
# scripts/dev/ab_compare.sh of the branch (new) against the current tree (old) with the branch's
# own rows: AB_ROWS_<name> / AB_BENCH_<name> / AB_SWEEP_<name> when set (ab_compare.sh says what they mean), and
# BRANCH_EXTRA_<name>, a command run in the branch's tree with its library (a sanitizer run, say)
# after its tests. The current tree is built once
# (build/device, as device_run.sh builds it). One summary line per step, last.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="${OUT:-$root/build/branch-out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
deadline="${BRANCH_DEADLINE_S:-420}"
default_tests="test/test_grouped_flash_attention.py test/test_gpu_window_softcap_sinks.py test/test_metadata_errors_gpu.py"
summary=()
note() { summary+=("$1"); echo "== $1"; }

cc=$("$py" -c 'import torch; p=torch.cuda.get_device_capability(); print(f"{p[0]}{p[1]}")' 2>/dev/null || echo "")
case "$cc" in 90) archs="90a" ;; 80|86|89) archs="$cc" ;; *) archs="80;90a" ;; esac
build() {  # src build_dir log
  local gt=()
  [ -d "$root/.device/googletest" ] && gt=(-DRINGATTN_GTEST_SOURCE_DIR="$root/.device/googletest")
  cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release -DRINGATTN_CUDA_ARCHS="$archs" \
    -DRINGATTN_PTXAS_VERBOSE=ON -DRINGATTN_BUILD_TESTS=OFF "${gt[@]}" >"$3" 2>&1 &&
    cmake --build "$2" -j16 >>"$3" 2>&1
}
if [ -f build/device/libringattn.so ] || build "$root" "$root/build/device" "$out/current_build.log"; then
  note "current tree: built"
else
  tail -20 "$out/current_build.log"; note "current tree: build FAILED"; printf '%s\n' "${summary[@]}"; exit 1
fi

for b in ${BRANCHES:-}; do
  src="$root/.device/branches/$b"
  key="${b//-/_}"
  if [ ! -d "$src" ]; then note "$b: no tree at .device/branches/$b (scripts/dev/pending.sh export $b here first)"; continue; fi
  t0=$(date +%s)
  if ! build "$src" "$src/build/device" "$out/${b}_build.log"; then
    tail -20 "$out/${b}_build.log"; note "$b: build FAILED"; continue
  fi
  spills=$(grep -E '[1-9][0-9]* bytes spill stores' "$out/${b}_build.log" | wc -l)
  note "$b: built in $(( $(date +%s) - t0 )) s, $spills kernels with spills"
  tests_var="BRANCH_TESTS_$key"
  tests="${!tests_var:-${BRANCH_TESTS:-$default_tests}}"
  tiers_var="BRANCH_TIERS_$key"
  rc=0
  for tier in ${!tiers_var:-${BRANCH_TIERS:-auto}}; do
    left=$(( deadline - ($(date +%s) - t0) ))
    (cd "$src" && RING_FLASH_ATTN_TIER="$tier" RING_FLASH_ATTN_LIBRARY="$src/build/device/libringattn.so" \
       PYTHONPATH="$src/python" timeout $(( left > 60 ? left / 2 : 30 )) "$py" -m pytest -q -x -p no:cacheprovider \
       -m "gpu and not stress" $tests) >"$out/${b}_tests_$tier.log" 2>&1
    rc=$?
    note "$b: GPU tests (tier $tier) rc=$rc: $(tail -1 "$out/${b}_tests_$tier.log")"
    [ $rc -ne 0 ] && break
  done
  [ $rc -ne 0 ] && continue  # no timing of a branch that fails its tests
  extra_var="BRANCH_EXTRA_$key"
  if [ -n "${!extra_var:-}" ]; then
    (cd "$src" && RING_FLASH_ATTN_LIBRARY="$src/build/device/libringattn.so" PYTHONPATH="$src/python" \
       timeout 240 bash -c "${!extra_var}") >"$out/${b}_extra.log" 2>&1
    note "$b: extra command rc=$?: $(tail -1 "$out/${b}_extra.log")"
  fi
  rows_var="AB_ROWS_$key"; bench_var="AB_BENCH_$key"; sweep_var="AB_SWEEP_$key"
  left=$(( deadline - ($(date +%s) - t0) ))
  (cd "$src" && OUT="$out/ab_$b" AB_ROWS="${!rows_var:-${AB_ROWS:-}}" AB_BENCH="${!bench_var:-}" AB_SWEEP="${!sweep_var:-}" \
     timeout $(( left > 30 ? left : 30 )) bash scripts/dev/ab_compare.sh "$root") >"$out/${b}_ab.log" 2>&1
  note "$b: A/B rc=$? (table in ${b}_ab.log)"
  tail -25 "$out/${b}_ab.log"
done
echo
printf '%s\n' "${summary[@]}"
