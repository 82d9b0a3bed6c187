#!/usr/bin/env bash
# Checks that need tools of the GPU machine, after scripts/device_run.sh has built build/device:
# compute-sanitizer memcheck and racecheck on small GPU cases, and ncu's DRAM bytes / L2 hit rate
# of the fused kernel vs the baseline's two launches on the per-rank zigzag workload.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
out="${OUT:-$root/build/device-out}"
mkdir -p "$out"
export RING_FLASH_ATTN_LIBRARY="$root/build/device/libringattn.so" PYTHONPATH="$root/python"
tests=build/device/test/cpp/ringattn_tests
filter="${SANITIZER_FILTER:-GpuForward.ManyGroupsAndEmptyRows}"
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" --error-exitcode 9 "$tests" --gtest_filter="$filter" >"$out/sanitizer_$tool.log" 2>&1
  echo "== compute-sanitizer $tool ($filter): rc=$? $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tr '\n' ' ')"
done
ncu --clock-control none --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sector_hit_rate.pct \
  -k regex:grouped_fwd_kernel python3 scripts/dev/hbm_probe.py 65536 8 0 >"$out/ncu_hbm.log" 2>&1
echo "== ncu (L=65536 N=8 r=0; launch 1 = fused, 2-3 = baseline): rc=$?"
grep -E "analytic|grouped_fwd_kernel|dram__bytes|lts__t_sector_hit" "$out/ncu_hbm.log" | sed 's/  */ /g' | cut -c1-160
if [ -n "${OUT:-}" ]; then
  (cd "$out" && files=$(ls | grep -E '^(sanitizer_|ncu_).*\.log$') && [ -n "$files" ] && tar czf checks.tgz $files && rm -f $files)
fi
