#!/usr/bin/env bash
# Kernel development: build the tier-2 backward with each dQ scheduling variant
# (RINGATTN_SM90_BWD_DQ_MODE, see csrc/cuda/sm90/bwd_kernel.cuh) and, for each, run the tier-2
# smoke test (correctness, under a timeout: a barrier bug hangs), the per-kernel backward times and
# the fwd+bwd benchmark row at L=64K N=8 rank 0. Run on the device:
#   MODES="0 1 2" bash scripts/bwd_dq_modes.sh
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root" || exit 1
out="${OUT:-$root/build/dq-modes-out}"
mkdir -p "$out"
modes="${MODES:-0 1 2}"
t0=$SECONDS
for m in $modes; do
  (cmake -S . -B "build/dqmode$m" -G Ninja -DCMAKE_BUILD_TYPE=Release -DRINGATTN_CUDA_ARCHS=90a -DRINGATTN_BUILD_TESTS=OFF \
     -DCMAKE_CUDA_FLAGS="-DRINGATTN_SM90_BWD_DQ_MODE=$m" >"$out/build_mode$m.log" 2>&1 &&
   cmake --build "build/dqmode$m" -j16 >>"$out/build_mode$m.log" 2>&1; echo "mode $m build rc=$?") &
done
wait
echo "builds took $((SECONDS - t0)) s"
export PYTHONPATH="$root/python:$root/scripts" PYTHONUNBUFFERED=1
summary=()
for m in $modes; do
  export RING_FLASH_ATTN_LIBRARY="$root/build/dqmode$m/libringattn.so"
  [ -f "$RING_FLASH_ATTN_LIBRARY" ] || { summary+=("mode $m: no library"); continue; }
  timeout 120 python3 scripts/tier2_smoke.py >"$out/smoke_mode$m.log" 2>&1
  rc=$?
  line="mode $m: smoke rc=$rc ($(grep -c '^ok' "$out/smoke_mode$m.log") ok, $(grep -c '^FAIL' "$out/smoke_mode$m.log") FAIL)"
  if [ $rc -eq 0 ]; then
    timeout 100 python3 scripts/bwd_kernel_times.py >"$out/times_mode$m.log" 2>&1
    line+="; $(grep -m1 'deterministic=0' "$out/times_mode$m.log")"
    timeout 120 python3 benchmark/benchmark_grouped_attention.py --seqlens 65536 --world-size 8 --rank 0 \
      --passes fwd_bwd --impls fused --num-runs 10 --warmup 2 --csv "$out/bench_mode$m.csv" --output-dir "$out" \
      >"$out/bench_mode$m.log" 2>&1
    line+="; fwd+bwd $(python3 -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1]))); print(' '.join(f\"{x['time_ms']} ms {float(x['tflops']):.1f} TF\" for x in r))" "$out/bench_mode$m.csv" 2>/dev/null)"
  else
    grep -E '^FAIL' "$out/smoke_mode$m.log" | head -5
  fi
  summary+=("$line")
done
printf '%s\n' "${summary[@]}"
