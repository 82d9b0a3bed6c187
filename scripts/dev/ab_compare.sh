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
#     (also rows of benchmark_fa3_sweep.py, our kernels only, for short and non-causal shapes)
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
    $AB_SWEEP --impls ours --num-runs 10 --warmup 3 --csv "$out/sweep_$1_$4.csv" >"$out/sweep_$1_$4.log" 2>&1
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
if [ -n "${AB_SWEEP:-}" ]; then
  "$py" - "$out"/sweep_old_[12].csv -- "$out"/sweep_new_[12].csv <<'PYEOF'
import csv, sys, statistics
def load(paths):  # every round's rows; a row whose status is not ok is reported, not measured
    d = {}
    for p in paths:
        for r in csv.DictReader(open(p)):
            key = (int(r["head_dim"]), int(r["seqlen"]), r["causal"], r["pass"])
            if r.get("status", "ok") != "ok":
                print(f"{p}: {key} status {r['status']}")
                continue
            d.setdefault(key, []).append(float(r["tflops"]))
    return d
cut = sys.argv.index("--")
old, new = load(sys.argv[1:cut]), load(sys.argv[cut + 1:])
print(f"{'D':>4} {'L':>6} {'causal':>6} {'pass':8} {'old TFLOPS':>11} {'new TFLOPS':>11} {'new/old':>7}")
for k in sorted(old):
    if k in new:
        o, n = statistics.median(old[k]), statistics.median(new[k])
        print(f"{k[0]:>4} {k[1]:>6} {k[2]:>6} {k[3]:8} {o:11.1f} {n:11.1f} {n / o:7.3f}")
PYEOF
fi
if [ "$bench" = features ]; then
  "$py" - "$out" <<'PYEOF'
import csv, glob, os, sys, statistics
def load(side):
    d = {}
    for p in sorted(glob.glob(os.path.join(sys.argv[1], f"ab_{side}_*.csv"))):
        for r in csv.DictReader(open(p)):
            if r["status"] != "ok":
                continue
            d.setdefault((int(r["seqlen"]), r["tier"], r["variant"], r["pass"]), []).append(float(r["time_ms"]))
    return d
old, new = load("old"), load("new")
print(f"{'L':>6} {'tier':5} {'variant':14} {'pass':7} {'old ms (runs)':>26} {'new ms (runs)':>26} {'old/new':>7}")
for k in sorted(old):
    if k not in new: continue
    o, n = old[k], new[k]
    print(f"{k[0]:>6} {k[1]:5} {k[2]:14} {k[3]:7} {statistics.median(o):8.3f} {str([round(x, 3) for x in o]):>17} "
          f"{statistics.median(n):8.3f} {str([round(x, 3) for x in n]):>17} {statistics.median(o)/statistics.median(n):7.3f}")
PYEOF
  exit 0
fi
"$py" - "$out/ab_old.csv" "$out/ab_new.csv" <<'PYEOF'
import csv, sys, statistics
def load(p):
    d = {}
    for r in csv.DictReader(open(p)):
        k = (r["seqlen"], r["world_size"], r["rank"], r["num_groups"], r["impl"], r["pass"])
        d.setdefault(k, []).append(float(r["tflops"]))
    return d
old, new = load(sys.argv[1]), load(sys.argv[2])
print(f"{'L':>6} {'N':>2} {'r':>2} {'G':>2} {'impl':12} {'pass':8} {'old TFLOPS (runs)':>22} {'new TFLOPS (runs)':>22} {'new/old':>7}")
for k in sorted(old, key=lambda k: (int(k[0]), k[4], k[5], k[2])):
    if k not in new: continue
    o, n = old[k], new[k]
    print(f"{k[0]:>6} {k[1]:>2} {k[2]:>2} {k[3]:>2} {k[4]:12} {k[5]:8} {statistics.median(o):8.1f} {str([round(x) for x in o]):>13} "
          f"{statistics.median(n):8.1f} {str([round(x) for x in n]):>13} {statistics.median(n)/statistics.median(o):7.3f}")
PYEOF
