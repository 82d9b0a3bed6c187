#!/usr/bin/env bash
# Kernel development on the device: build the library once per variant (a source tree and extra
# nvcc flags, e.g. a -D macro that a kernel under study reads) and, for each, run the tier-2 smoke
# test under a timeout (a pipeline or barrier bug hangs), the per-kernel backward times and the
# fwd+bwd benchmark row at L=64K N=8 rank 0; a summary line per variant comes last.
#   VARIANTS="base: try:-DMY_KERNEL_KNOB=1" bash scripts/dev/bwd_variants.sh
#   VARIANTS="prev@.device/prev: new:" ...   prev built from another source tree (e.g. an older
#       commit: mkdir -p .device/prev && git archive COMMIT | tar -x -C .device/prev; carry .device)
#   NCU=1 ...   also ncu's throughput / stall sections of one dK/dV launch per variant, and its
#       per-SASS-instruction source page (warp stall samples) as ncu_source_NAME.csv
# Variants are name[@source dir]:flags, separated by spaces (flags may not contain spaces; use
# commas inside one -D value if ever needed). Builds run in parallel (build/variant-NAME, -j16
# each). With $OUT set (the device tool), every log ends up in $OUT/variants.tgz.
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root" || exit 1
out="${OUT:-$root/build/variants-out}"
mkdir -p "$out"
variants="${VARIANTS:-base:}"
t0=$SECONDS
for v in $variants; do
  name="${v%%:*}" flags="${v#*:}" src=.
  case "$name" in *@*) src="${name#*@}" name="${name%%@*}" ;; esac
  (cmake -S "$src" -B "build/variant-$name" -G Ninja -DCMAKE_BUILD_TYPE=Release -DRINGATTN_CUDA_ARCHS=90a \
     -DRINGATTN_BUILD_TESTS=OFF -DRINGATTN_PTXAS_VERBOSE=ON -DCMAKE_CUDA_FLAGS="$flags" >"$out/build_$name.log" 2>&1 &&
   cmake --build "build/variant-$name" -j16 >>"$out/build_$name.log" 2>&1
   echo "variant $name ($flags): build rc=$?, $(grep -cE '[1-9][0-9]* bytes spill stores' "$out/build_$name.log") kernels with spills, $(grep -c C7512 "$out/build_$name.log") wgmma-serialized") &
done
wait
echo "builds took $((SECONDS - t0)) s"
export PYTHONPATH="$root/python" PYTHONUNBUFFERED=1
summary=()
for v in $variants; do
  name="${v%%:*}"
  name="${name%%@*}"
  export RING_FLASH_ATTN_LIBRARY="$root/build/variant-$name/libringattn.so"
  [ -f "$RING_FLASH_ATTN_LIBRARY" ] || { summary+=("$name: no library (see build_$name.log)"); continue; }
  timeout 120 python3 scripts/tier2_smoke.py >"$out/smoke_$name.log" 2>&1
  rc=$?
  line="$name: smoke rc=$rc ($(grep -c '^ok' "$out/smoke_$name.log") ok, $(grep -c '^FAIL' "$out/smoke_$name.log") FAIL)"
  if [ $rc -eq 0 ]; then
    timeout 100 python3 scripts/dev/bwd_kernel_times.py >"$out/times_$name.log" 2>&1
    line+="; $(grep -m1 'deterministic=0' "$out/times_$name.log")"
    timeout 120 python3 benchmark/benchmark_grouped_attention.py --seqlens 65536 --world-size 8 --rank 0 \
      --passes fwd_bwd --impls fused --num-runs 10 --warmup 2 --csv "$out/bench_$name.csv" --output-dir "$out" \
      >"$out/bench_$name.log" 2>&1
    line+="; fwd+bwd $(python3 -c "import csv,sys; r=list(csv.DictReader(open(sys.argv[1]))); print(' '.join(f\"{x['time_ms']} ms {float(x['tflops']):.1f} TF\" for x in r))" "$out/bench_$name.csv" 2>/dev/null)"
    if [ "${NCU:-0}" = 1 ]; then
      timeout 180 ncu --kernel-name regex:grouped_bwd_dkdv --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters \
        -o "$out/ncu_$name" python3 scripts/dev/bwd_kernel_times.py --once >"$out/ncu_run_$name.log" 2>&1
      ncu -i "$out/ncu_$name.ncu-rep" >"$out/ncu_$name.txt" 2>&1
      ncu -i "$out/ncu_$name.ncu-rep" --page source --csv --print-source sass >"$out/ncu_source_$name.csv" 2>&1
      line+="; ncu: $(grep -E 'Issue Slots Busy|Eligible Warps Per Scheduler|No Eligible|Compute \(SM\) Throughput' "$out/ncu_$name.txt" |
        sed -E 's/ +/ /g; s/^ //' | tr '\n' ';')"
    fi
  else
    grep -E '^FAIL' "$out/smoke_$name.log" | head -5
  fi
  summary+=("$line")
done
printf '%s\n' "${summary[@]}"
if [ -n "${OUT:-}" ] && [ "$out" != "$OUT" ]; then
  (cd "$out" && tar czf "$OUT/variants.tgz" --exclude='*.ncu-rep' . 2>/dev/null)
elif [ -n "${OUT:-}" ]; then
  (cd "$out" && tar czf variants.tgz --exclude='*.ncu-rep' --exclude=variants.tgz $(ls | grep -v variants.tgz) && ls | grep -v '^variants.tgz$' | xargs rm -f)
fi
