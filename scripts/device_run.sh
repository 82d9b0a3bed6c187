#!/usr/bin/env bash
# The one script sent to the GPU machine: build for the card found there (-j16), run the
# GoogleTest suite and the pytest `gpu` marker, run the benchmark, print a short table last.
#
#   bash scripts/device_run.sh [quick|full|tests|targets|multi|sweep|train|features|verify]
#     quick (default): tests + the headline per-rank workload; tests: no benchmark;
#     full: + stress tests, torchrun zigzag, the full benchmark set; targets: tests + the
#     headline workloads of docs/performance.md (fused vs fused_sm80 vs baselines); multi: build,
#     smoke, then only the runs over every GPU of the machine (torchrun zigzag test, distributed
#     benchmark at $ZIGZAG_SEQLENS, default the benchmark's own), no single-GPU pytest suites;
#     sweep: build, then only benchmark/benchmark_fa3_sweep.py ($SWEEP_ARGS); train: build, then
#     only benchmark/benchmark_training_step.py ($TRAIN_ARGS); features: tests (both tiers), then
#     benchmark/benchmark_features.py ($FEATURES_ARGS: window / softcap / sinks vs causal);
#     verify: tests (both tiers, no stress), every context-parallel GPU script under torchrun over
#     the machine's GPUs (zigzag llama3, ring variants, all-to-all/hybrid), the all-scheme
#     distributed benchmark (step vs kernels alone, $CP_BENCH_ARGS), the ops' C++ kernels on
#     CUDA (RING_FLASH_ATTN_TORCH_SHIM=1: their tests and host time), and the host time per call.
#
# Logs and CSVs go to $OUT (the device tool's return folder) or build/device-out.
# GoogleTest: the GPU machine has no GoogleTest package; this machine copies its sources to
# .device/googletest (git-ignored) and the device call carries that folder:
#   mkdir -p .device && cp -r /usr/src/googletest .device/
set -uo pipefail
mode="${1:-quick}"
case "$mode" in
  quick|full|tests|targets|multi|sweep|train|features|verify) ;;
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "device_run.sh: unknown mode '$mode' (expected quick, full, tests, targets, multi, sweep, train," \
          "features or verify; --help describes them)" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${OUT:-$root/build/device-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
summary=()
note() { summary+=("$1"); echo "== $1"; }

# Which card, which archs.
cc=$("$py" -c 'import torch; p=torch.cuda.get_device_capability(); print(f"{p[0]}{p[1]}")' 2>/dev/null || echo "")
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
case "$cc" in
  90) archs="90a" ;;
  80|86|89) archs="$cc" ;;
  *) archs="80;90a" ;;
esac
note "GPU: ${gpu:-unknown} (sm_${cc:-?}); building archs ${archs}"

gtest_arg=()
[ -d .device/googletest ] && gtest_arg=(-DRINGATTN_GTEST_SOURCE_DIR="$root/.device/googletest")
t0=$(date +%s)
if cmake -S . -B build/device -G Ninja -DCMAKE_BUILD_TYPE=Release -DRINGATTN_CUDA_ARCHS="$archs" \
     -DRINGATTN_PTXAS_VERBOSE=ON "${gtest_arg[@]}" >"$out/configure.log" 2>&1 &&
   cmake --build build/device -j16 >"$out/build.log" 2>&1; then
  note "build: ok in $(( $(date +%s) - t0 )) s; spills: $(grep -c 'bytes spill stores' "$out/build.log") reports, $(grep -E '[1-9][0-9]* bytes spill stores' "$out/build.log" | wc -l) non-zero"
else
  tail -30 "$out/configure.log" "$out/build.log"
  note "build: FAILED (see build.log)"
  printf '%s\n' "${summary[@]}"
  exit 1
fi
lib="$root/build/device/libringattn.so"

# Mode sweep: only the FlashAttention-3 paper's sweep (benchmark/benchmark_fa3_sweep.py, extra
# arguments in $SWEEP_ARGS), no tests. New measurements stop SWEEP_DEADLINE_S seconds after this
# script started (default 540, inside a 10-minute device call); the CSV is written row by row.
if [ "$mode" = sweep ]; then
  budget=$(( ${SWEEP_DEADLINE_S:-540} - SECONDS ))
  [ "$budget" -lt 30 ] && budget=30
  t0=$(date +%s)
  RING_FLASH_ATTN_LIBRARY="$lib" PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}" \
    timeout -k 10 $(( budget + 60 )) "$py" benchmark/benchmark_fa3_sweep.py --csv "$out/fa3_sweep.csv" \
    --plot "$out/fa3_sweep.png" --time-budget-s "$budget" ${SWEEP_ARGS:-} \
    >"$out/fa3_sweep.txt" 2>"$out/fa3_sweep_progress.log"
  rc=$?
  rows=$(( $(wc -l <"$out/fa3_sweep.csv" 2>/dev/null || echo 1) - 1 ))
  note "benchmark_fa3_sweep.py ${SWEEP_ARGS:-}: rc=$rc in $(( $(date +%s) - t0 )) s, $rows CSV rows"
  cat "$out/fa3_sweep.txt"
  tail -3 "$out/fa3_sweep_progress.log"
  [ -n "${OUT:-}" ] && (cd "$out" && tar czf logs.tgz ./*.log && rm -f ./*.log)
  printf '%s\n' "${summary[@]}"
  exit "$rc"
fi

# Mode train: only the end-to-end training-step benchmark (benchmark/benchmark_training_step.py,
# its default set on one GPU, about 4 minutes on an H200), extra arguments from $TRAIN_ARGS; rows
# that would start after TRAIN_DEADLINE_S (default 540) seconds of this script are skipped.
if [ "$mode" = train ]; then
  export RING_FLASH_ATTN_LIBRARY="$lib" PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}"
  t0=$(date +%s)
  # shellcheck disable=SC2086  # TRAIN_ARGS: several words
  "$py" benchmark/benchmark_training_step.py --csv "$out/training_step.csv" --plot "$out/training_step.png" \
    --deadline-s $(( ${TRAIN_DEADLINE_S:-540} - SECONDS )) ${TRAIN_ARGS:-} \
    >"$out/training_step.txt" 2>"$out/training_step.log"
  note "training step benchmark (${TRAIN_ARGS:-default set}): rc=$? in $(( $(date +%s) - t0 )) s"
  cat "$out/training_step.txt"
  grep -vE '^\[[0-9]+/[0-9]+\]' "$out/training_step.log" | tail -20
  echo; echo "================ summary ================"; printf '%s\n' "${summary[@]}"
  exit 0
fi

if [ -x build/device/test/cpp/ringattn_tests ]; then
  build/device/test/cpp/ringattn_tests --gtest_brief=1 >"$out/gtest.log" 2>&1
  rc=$?
  note "gtest: rc=$rc, $(grep -E '^\[  PASSED  \]|FAILED TEST|tests? ran|SKIPPED' "$out/gtest.log" | tr '\n' ' ' | cut -c1-200)"
  [ $rc -ne 0 ] && grep -E "Failure|error|Expected|Which is" "$out/gtest.log" | head -30
else
  note "gtest: not built (no GoogleTest found; carry .device/googletest)"
fi

export RING_FLASH_ATTN_LIBRARY="$lib"
export PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}"

# Tier 2 (sm90a): HGMMA in the SASS, then a smoke test under a timeout (a pipeline bug hangs).
tier2_ok=1
if [ "$cc" = 90 ]; then
  if command -v cuobjdump >/dev/null 2>&1; then
    cuobjdump -sass "$lib" 2>/dev/null | awk '/Function :/{f=$3} /HGMMA/{if (f ~ /sm90/) n++} /(LDL|STL)/{if (f ~ /sm90/) s++}
      END {print "sm90 kernels: " n+0 " HGMMA, " s+0 " LDL/STL"}' >"$out/sass_check.txt"
    note "SASS: $(cat "$out/sass_check.txt")"
  fi
  timeout 120 "$py" scripts/tier2_smoke.py >"$out/tier2_smoke.log" 2>&1
  rc=$?
  note "tier-2 smoke: rc=$rc ($(grep -c '^ok' "$out/tier2_smoke.log") ok, $(grep -c '^FAIL' "$out/tier2_smoke.log") FAIL)"
  cat "$out/tier2_smoke.log"
  [ $rc -ne 0 ] && tier2_ok=0
fi
# The GPU tests on the default tier (tier 2 on sm90 cards) and, on sm90 cards, again on tier 1
# (in targets mode after the benchmark).
pytest_tier() {
  RING_FLASH_ATTN_TIER=$1 timeout 300 "$py" -m pytest test -m "gpu and not stress" -q -p no:cacheprovider \
    >"$out/pytest_gpu_$1.log" 2>&1
  local rc=$?
  note "pytest -m 'gpu and not stress' (RING_FLASH_ATTN_TIER=$1): rc=$rc, $(tail -1 "$out/pytest_gpu_$1.log")"
  [ $rc -ne 0 ] && grep -E "Error|assert|FAILED" "$out/pytest_gpu_$1.log" | head -30
}
if [ "$mode" = multi ]; then
  :
elif [ "$tier2_ok" = 0 ]; then
  note "tier 2 failed its smoke test: GPU tests run on tier 1 only"
  pytest_tier sm80
else
  pytest_tier auto
  [ "$cc" = 90 ] && [ "$mode" != targets ] && pytest_tier sm80
fi
if [ "$mode" = full ] || [ "$mode" = tests ]; then
  "$py" -m pytest test -m "stress" -q -p no:cacheprovider >"$out/pytest_stress.log" 2>&1
  rc=$?
  note "pytest -m stress: rc=$rc, $(tail -1 "$out/pytest_stress.log")"
  [ $rc -ne 0 ] && grep -E "Error|assert|FAILED" "$out/pytest_stress.log" | head -30
fi

# Mode verify: the ops' C++ kernels (libringattn_torch) on CUDA, which are opt-in until this
# pass is green: their GPU tests and the suites that go through torch.ops, with them turned on.
if [ "$mode" = verify ]; then
  shim_tests=(test/test_torch_shim_gpu.py test/test_host_path_gpu.py test/test_gpu_window_softcap_sinks.py
              test/test_grouped_flash_attention.py test/test_metadata_errors_gpu.py)
  RING_FLASH_ATTN_TORCH_SHIM=1 timeout 300 "$py" -m pytest "${shim_tests[@]}" -m "gpu and not stress" -q \
    -p no:cacheprovider >"$out/pytest_gpu_torch_shim.log" 2>&1
  rc=$?
  note "pytest (C++ op kernels on CUDA, RING_FLASH_ATTN_TORCH_SHIM=1): rc=$rc, $(tail -1 "$out/pytest_gpu_torch_shim.log")"
  [ $rc -ne 0 ] && grep -E "Error|assert|FAILED" "$out/pytest_gpu_torch_shim.log" | head -30
  RING_FLASH_ATTN_TORCH_SHIM=1 timeout 60 "$py" scripts/host_overhead.py --calls 1000 --repeats 3 \
    >"$out/host_overhead_torch_shim.txt" 2>&1
  note "host time per call with the C++ op kernels on CUDA: see host_overhead_torch_shim.txt"
  cat "$out/host_overhead_torch_shim.txt"
fi

# Host time per call of each Python layer on a tiny problem (the per-call overhead, docs/performance.md).
if [ "$mode" != multi ]; then
  timeout 60 "$py" scripts/host_overhead.py --calls 1000 --repeats 3 >"$out/host_overhead.txt" 2>&1
  us_of() { grep -F "$1" "$out/host_overhead.txt" | sed -E 's/.* ([0-9.]+) us.*/\1/' | head -1; }
  note "host time per call (us): fwd_into $(us_of fwd_into), public no grad $(us_of 'public (no grad)'), public grad $(us_of 'public (grad)'), fwd+bwd $(us_of 'fwd+bwd')"
  cat "$out/host_overhead.txt"
fi

# Zigzag llama3 over the GPUs of this machine (torchrun, NCCL), and the distributed benchmark.
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
if { [ "$mode" = full ] || [ "$mode" = tests ] || [ "$mode" = multi ]; } && [ "${ngpu:-0}" -ge 1 ]; then
  t0=$(date +%s)
  torchrun --nproc_per_node="$ngpu" test/test_zigzag_llama3_grouped.py >"$out/zigzag_torchrun.log" 2>&1
  rc=$?
  note "torchrun --nproc_per_node=$ngpu test/test_zigzag_llama3_grouped.py: rc=$rc in $(( $(date +%s) - t0 )) s, $(grep -cE '\bPASS' "$out/zigzag_torchrun.log") PASS lines, $(grep -cE '\bFAIL' "$out/zigzag_torchrun.log") FAIL lines"
  [ $rc -ne 0 ] && grep -E "FAIL|Error" "$out/zigzag_torchrun.log" | head -20
  seqlen_arg=()
  [ -n "${ZIGZAG_SEQLENS:-}" ] && seqlen_arg=(--seqlens $ZIGZAG_SEQLENS)
  t0=$(date +%s)
  torchrun --nproc_per_node="$ngpu" benchmark/benchmark_zigzag_distributed.py --csv "$out/zigzag_bench.csv" \
    "${seqlen_arg[@]}" >"$out/zigzag_bench.log" 2>&1
  note "zigzag distributed benchmark ($ngpu GPU, ${ZIGZAG_SEQLENS:-default seqlens}): rc=$? in $(( $(date +%s) - t0 )) s"
  tail -15 "$out/zigzag_bench.log"
fi
# Mode verify: the other context-parallel GPU scripts, and the all-scheme distributed benchmark.
if [ "$mode" = verify ] && [ "${ngpu:-0}" -ge 1 ]; then
  t0=$(date +%s)
  timeout 150 torchrun --nproc_per_node="$ngpu" test/test_zigzag_llama3_grouped.py >"$out/zigzag_torchrun.log" 2>&1
  note "torchrun --nproc_per_node=$ngpu test/test_zigzag_llama3_grouped.py: rc=$? in $(( $(date +%s) - t0 )) s, $(grep -cE '\bPASS' "$out/zigzag_torchrun.log") PASS, $(grep -cE '\bFAIL' "$out/zigzag_torchrun.log") FAIL lines"
  for script in test/test_ring_variants_gpu.py test/test_all_to_all_gpu.py; do
    name=$(basename "$script" .py)
    t0=$(date +%s)
    timeout 150 torchrun --nproc_per_node="$ngpu" "$script" >"$out/$name.log" 2>&1
    rc=$?
    note "torchrun --nproc_per_node=$ngpu $script: rc=$rc in $(( $(date +%s) - t0 )) s, $(grep -cE '\bPASS' "$out/$name.log") PASS, $(grep -cE '\bFAIL' "$out/$name.log") FAIL lines"
    [ $rc -ne 0 ] && grep -E "FAIL|Error" "$out/$name.log" | head -20
  done
  t0=$(date +%s)
  # shellcheck disable=SC2086  # CP_BENCH_ARGS: several words
  cp_args=${CP_BENCH_ARGS:---seqlens 16384 65536 --passes fwd_bwd --num-runs 3 --warmup 1}
  timeout 200 torchrun --nproc_per_node="$ngpu" benchmark/benchmark_cp_distributed.py --csv "$out/cp_distributed.csv" \
    $cp_args >"$out/cp_distributed.txt" 2>"$out/cp_distributed_progress.log"
  note "benchmark_cp_distributed.py ($ngpu GPU, $cp_args): rc=$? in $(( $(date +%s) - t0 )) s"
  cat "$out/cp_distributed.txt"
fi

# Benchmark: quick = the headline per-rank workload; full = the per-rank workloads (L=64K N=8,
# L=16K N=2, L=8K N=1) and the benchmark's default sweep of L with 2 groups. Every run appends to
# one CSV; each run's report goes to $OUT.
bench() {
  "$py" benchmark/benchmark_grouped_attention.py "$@" --csv "$out/bench.csv" --output-dir "$out" \
    >>"$out/bench.log" 2>&1
  note "benchmark $*: rc=$?"
}
if [ "$mode" = full ]; then
  bench --seqlens 65536 --world-size 8 --rank 0 7 --passes fwd fwd_bwd bwd
  bench --seqlens 16384 --world-size 2 --rank 0 --passes fwd fwd_bwd bwd
  bench --seqlens 8192 --world-size 1 --rank 0 --passes fwd fwd_bwd
  bench --seqlens 4096 8192 16384 32768 --num-groups 2
elif [ "$mode" = quick ]; then
  bench --seqlens 65536 --world-size 8 --rank 0 --num-runs 20
elif [ "$mode" = targets ]; then
  # The headline workloads of docs/performance.md: tier 2 (fused) and tier 1 (fused_sm80) next to the baselines.
  impls=(--impls fused fused_sm80 baseline sdpa_flash sdpa_cudnn varlen_attn)
  bench --seqlens 65536 --world-size 8 --rank 0 7 --passes fwd fwd_bwd --num-runs 10 --warmup 2 "${impls[@]}"
  bench --seqlens 16384 --world-size 2 --rank 0 --passes fwd --num-runs 10 "${impls[@]}"
  bench --seqlens 16384 --num-groups 1 --passes fwd --num-runs 10 "${impls[@]}"
fi
if [ "$mode" = features ]; then
  t0=$(date +%s)
  # shellcheck disable=SC2086  # FEATURES_ARGS: several words
  timeout 300 "$py" benchmark/benchmark_features.py --csv "$out/features.csv" ${FEATURES_ARGS:-} \
    >"$out/features.txt" 2>"$out/features_progress.log"
  note "benchmark_features.py ${FEATURES_ARGS:-}: rc=$? in $(( $(date +%s) - t0 )) s"
  cat "$out/features.txt"
  tail -3 "$out/features_progress.log"
fi
[ "$mode" = targets ] && [ "$cc" = 90 ] && [ "$tier2_ok" = 1 ] && pytest_tier sm80
# compute-sanitizer on small tier-2 cases, while the time budget of the device call allows
# (SANITIZER_DEADLINE_S seconds since the script started, default 420).
if [ "$mode" != multi ] && [ "$cc" = 90 ] && [ "$tier2_ok" = 1 ] && command -v compute-sanitizer >/dev/null 2>&1; then
  for tool in memcheck racecheck synccheck; do
    if [ "$SECONDS" -gt "${SANITIZER_DEADLINE_S:-420}" ]; then note "compute-sanitizer --tool $tool: skipped (time)"; continue; fi
    timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 "$py" scripts/tier2_smoke.py --tiny \
      >"$out/sanitizer_$tool.log" 2>&1
    note "compute-sanitizer --tool $tool (tier 2, small cases): rc=$? ($(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/sanitizer_$tool.log" | tail -1))"
  done
fi
[ -f "$out/bench.csv" ] && "$py" - "$out/bench.csv" <<'PYEOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(f"{'workload':34s} {'impl':15s} {'pass':7s} {'ms':>8s} {'TFLOPS':>7s}")
for r in rows:
    w = f"{r['config']} L={r['seqlen']} N={r['world_size']} r={r['rank']} G={r['num_groups']}"
    print(f"{w:34s} {r['impl']:15s} {r['pass']:7s} {float(r['time_ms']):8.3f} {float(r['tflops']):7.1f}")
PYEOF

# The device tool returns at most 8 files: pack the logs and reports into one archive.
if [ -n "${OUT:-}" ]; then
  (cd "$out" && files=$(ls | grep -E '\.(log|txt)$') && [ -n "$files" ] && tar czf logs.tgz $files && rm -f $files)
fi

echo
echo "================ summary ================"
printf '%s\n' "${summary[@]}"
