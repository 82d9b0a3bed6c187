#!/usr/bin/env bash
# GPU checks and benchmark of the ring variants (ring / zigzag_ring / stripe, their varlen forms)
# and llama3, on the GPU machine, with a library already built there:
#
#   bash scripts/device_ring_variants.sh                  # NPROC=1 (default): one GPU
#   NPROC=8 bash scripts/device_ring_variants.sh          # the correctness run on 8 GPUs too
#
# The library: $RING_FLASH_ATTN_LIBRARY, else build/device/libringattn.so (what
# `bash scripts/device_run.sh tests` builds). Runs
#   torchrun --nproc_per_node=$NPROC test/test_ring_variants_gpu.py
#   torchrun --nproc_per_node=1 benchmark/benchmark_ring_variants.py        (fwd+bwd, then --fwd-only)
#   and, when NPROC > 1, the fwd+bwd benchmark on NPROC GPUs as well;
# logs and CSVs go to $OUT (the device tool's return folder) or build/device-out; a short summary
# is printed last. Exit status: 1 if the correctness run or a benchmark failed.
set -uo pipefail
case "${1:-}" in
  "") ;;
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "device_ring_variants.sh: takes no arguments (NPROC=N in the environment; --help), got '$1'" >&2; exit 2 ;;
esac
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${OUT:-$root/build/device-out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
nproc="${NPROC:-1}"
lib="${RING_FLASH_ATTN_LIBRARY:-$root/build/device/libringattn.so}"
if [ ! -f "$lib" ]; then
  echo "device_ring_variants.sh: no library at $lib; build it first (bash scripts/device_run.sh tests)" \
       "or set RING_FLASH_ATTN_LIBRARY" >&2
  exit 2
fi
export RING_FLASH_ATTN_LIBRARY="$lib" PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
summary=()
status=0
note() { summary+=("$1"); echo "== $1"; }
run_torchrun() { "$py" -m torch.distributed.run --standalone --nproc_per_node="$1" "${@:2}"; }

t0=$(date +%s)
run_torchrun "$nproc" test/test_ring_variants_gpu.py >"$out/ring_variants_gpu.log" 2>&1
rc=$?
[ $rc -ne 0 ] && status=1
final=$(grep -E '^[0-9]+ PASS / [0-9]+ FAIL' "$out/ring_variants_gpu.log" || echo "no final line: $(grep -m1 -E 'needs CUDA|Error' "$out/ring_variants_gpu.log" | cut -c1-160)")
note "torchrun --nproc_per_node=$nproc test/test_ring_variants_gpu.py: rc=$rc in $(( $(date +%s) - t0 )) s, $final"
grep -E '^FAIL' "$out/ring_variants_gpu.log" | head -20 | cut -c1-220

bench() {  # bench NPROC LOGNAME ARGS...
  local n="$1" log="$2"
  shift 2
  t0=$(date +%s)
  run_torchrun "$n" benchmark/benchmark_ring_variants.py --device cuda "$@" >"$out/$log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && status=1
  note "benchmark_ring_variants.py N=$n $*: rc=$rc in $(( $(date +%s) - t0 )) s (log $log)"
}
bench 1 ring_variants_bench_n1.log --csv "$out/ring_variants_bench.csv"
bench 1 ring_variants_bench_n1_fwd.log --fwd-only --csv "$out/ring_variants_bench.csv"
if [ "$nproc" -gt 1 ]; then
  bench "$nproc" "ring_variants_bench_n$nproc.log" --csv "$out/ring_variants_bench.csv"
fi

echo
echo "================ ring variants: summary ================"
printf '%s\n' "${summary[@]}"
for log in "$out"/ring_variants_bench_n*.log; do
  [ -f "$log" ] || continue
  echo "-- $(basename "$log"): $(grep -m1 '^world_size' "$log" | cut -c1-200)"
  grep -E '^[│┌├└]' "$log" || tail -5 "$log"
done
exit $status
