#!/usr/bin/env bash
# Kernel development: where the tier-2 backward's time goes, on the device. Builds head dim 128
# for this card (-j16), prints the per-kernel times of one backward call (default dQ and
# deterministic) and ncu's throughput, warp-stall and memory sections of one dK/dV launch.
#   bash scripts/dev/bwd_profile.sh
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root" || exit 1
out="${OUT:-$root/build/profile-out}"
mkdir -p "$out"
cmake -S . -B build/profile -G Ninja -DCMAKE_BUILD_TYPE=Release -DRINGATTN_CUDA_ARCHS=90a -DRINGATTN_HEAD_DIMS=128 \
  -DRINGATTN_BUILD_TESTS=OFF >"$out/profile_build.log" 2>&1 && cmake --build build/profile -j16 >>"$out/profile_build.log" 2>&1 ||
  { tail -20 "$out/profile_build.log"; exit 1; }
export RING_FLASH_ATTN_LIBRARY="$root/build/profile/libringattn.so" PYTHONPATH="$root/python"
python3 scripts/dev/bwd_kernel_times.py
ncu --kernel-name regex:grouped_bwd_dkdv --launch-skip 1 --launch-count 1 \
  --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  --section WarpStateStats --section SchedulerStats --section Occupancy \
  python3 scripts/dev/bwd_kernel_times.py --once >"$out/ncu_bwd.txt" 2>&1
echo "ncu rc=$?"
grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|DRAM Throughput|Issue Slots Busy|No Eligible|Active Warps Per Scheduler|Eligible Warps|Warp Cycles Per Issued|Stall|Executed Ipc|Pipe|L1/TEX Hit|L2 Hit" "$out/ncu_bwd.txt" | head -60
