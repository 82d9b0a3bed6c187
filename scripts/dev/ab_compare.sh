#!/usr/bin/env bash
# A/B timing of two source trees in ONE device call (H200 clocks move between calls, so a
# before/after comparison must come from the same machine and run): builds the other tree
# (default .device/old_src, a `git archive` of the commit to compare against) next to the current
# one, then runs the same benchmark rows with each tree's own package and library, alternating
# old/new twice. Prints one table per round and writes the CSVs to $OUT (or build/ab-out).
#
#   git archive <commit> | (mkdir -p .device/old_src && tar -x -C .device/old_src)   # here
#   bash scripts/dev/ab_compare.sh [OLD_SRC]                                          # there
#   AB_ROWS="--seqlens 65536 --world-size 8 --rank 0 --passes fwd" bash scripts/dev/ab_compare.sh
#   AB_BENCH=features AB_ROWS="--tiers sm90 --seqlens 16384 --passes fwd" bash scripts/dev/ab_compare.sh
# AB_BENCH: grouped (default; benchmark_grouped_attention.py, --impls from AB_IMPLS) or features
# (benchmark_features.py: window / softcap / sinks rows). The old tree's build/device library is
# reused when it is there (branch_check.sh builds it once for all branches).
#   AB_SWEEP="--head-dims 64 128 --seqlens 512 2048 8192 --passes fwd" bash scripts/dev/ab_compare.sh
#     (also rows of benchmark_fa3_sweep.py, our kernels only, for short and non-causal shapes;
#     AB_SWEEP_IMPLS="ours ours_deterministic" adds the deterministic backward; both trees' sweep
#     scripts must know every name in it: ours_deterministic exists from commit f4473d8 on)
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
old="${1:-$root/.device/old_src}"
out="${OUT:-$root/build/ab-out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
archs="${AB_ARCHS:-90a}"
build() {  # src build_dir
  cmake -S "$1" -B "$2" -G Ninja -DCMAKE_BUILD_TYPE=Release -DRINGATTN_CUDA_ARCHS="$archs" \
    -DRINGATTN_BUILD_TESTS=OFF >"$out/$(basename "$2")_configure.log" 2>&1 &&
    cmake --build "$2" -j16 >"$out/$(basename "$2")_build.log" 2>&1
}
t0=$(date +%s)
old_lib="$old/build/device/libringattn.so"
if [ ! -f "$old_lib" ]; then
  build "$old" "$root/build/ab-old" || { tail -20 "$out/ab-old_build.log"; exit 1; }
  old_lib="$root/build/ab-old/libringattn.so"
fi
[ -f build/device/libringattn.so ] || build "$root" "$root/build/device" || { tail -20 "$out/device_build.log"; exit 1; }
echo "== builds: $(( $(date +%s) - t0 )) s"
rows_default="--seqlens 65536 --world-size 8 --rank 0 7 --passes fwd fwd_bwd --num-runs 10 --warmup 2"
bench="${AB_BENCH:-grouped}"
side() {  # name src lib round
  if [ "$bench" = features ]; then
    RING_FLASH_ATTN_LIBRARY="$3" PYTHONPATH="$2/python" "$py" "$2/benchmark/benchmark_features.py" \
      ${AB_ROWS:---tiers sm90 --seqlens 16384 --passes fwd} --csv "$out/ab_$1_$4.csv" >"$out/ab_$1_$4.log" 2>&1
  else
    RING_FLASH_ATTN_LIBRARY="$3" PYTHONPATH="$2/python" "$py" "$2/benchmark/benchmark_grouped_attention.py" \
      ${AB_ROWS:-$rows_default} --impls ${AB_IMPLS:-fused fused_sm80} --csv "$out/ab_$1.csv" \
      >"$out/ab_$1_$4.log" 2>&1
  fi
  echo "== $1 round $4: rc=$?"
}
sweep_side() {  # name src lib round
  RING_FLASH_ATTN_LIBRARY="$3" PYTHONPATH="$2/python" "$py" "$2/benchmark/benchmark_fa3_sweep.py" \
    $AB_SWEEP --impls ${AB_SWEEP_IMPLS:-ours} --num-runs 10 --warmup 3 --csv "$out/sweep_$1_$4.csv" \
    >"$out/sweep_$1_$4.log" 2>&1
  echo "== sweep $1 round $4: rc=$?"
}
for round in 1 2; do
  side old "$old" "$old_lib" $round
  side new "$root" "$root/build/device/libringattn.so" $round
  if [ -n "${AB_SWEEP:-}" ]; then
    sweep_side old "$old" "$old_lib" $round
    sweep_side new "$root" "$root/build/device/libringattn.so" $round
  fi
done
# The tables (scripts/dev/ab_table.py: medians of both rounds, speed-up > 1 when new is faster).
table="$root/scripts/dev/ab_table.py"
if [ -n "${AB_SWEEP:-}" ]; then
  "$py" "$table" --keys head_dim,seqlen,causal,pass,impl --metric tflops "$out"/sweep_old_[12].csv -- "$out"/sweep_new_[12].csv
fi
if [ "$bench" = features ]; then
  "$py" "$table" --keys seqlen,tier,variant,pass --metric time_ms --lower-is-better \
    "$out"/ab_old_[12].csv -- "$out"/ab_new_[12].csv
else
  "$py" "$table" --keys seqlen,world_size,rank,num_groups,impl,pass --metric tflops \
    "$out/ab_old.csv" -- "$out/ab_new.csv"
fi
