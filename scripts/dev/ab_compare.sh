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
build "$old" "$root/build/ab-old" || { tail -20 "$out/ab-old_build.log"; exit 1; }
[ -f build/device/libringattn.so ] || build "$root" "$root/build/device" || { tail -20 "$out/device_build.log"; exit 1; }
echo "== builds: $(( $(date +%s) - t0 )) s"
rows_default="--seqlens 65536 --world-size 8 --rank 0 7 --passes fwd fwd_bwd --num-runs 10 --warmup 2"
side() {  # name src lib round
  RING_FLASH_ATTN_LIBRARY="$3" PYTHONPATH="$2/python" "$py" "$2/benchmark/benchmark_grouped_attention.py" \
    ${AB_ROWS:-$rows_default} --impls ${AB_IMPLS:-fused fused_sm80} --csv "$out/ab_$1.csv" \
    >"$out/ab_$1_$4.log" 2>&1
  echo "== $1 round $4: rc=$?"
}
for round in 1 2; do
  side old "$old" "$root/build/ab-old/libringattn.so" $round
  side new "$root" "$root/build/device/libringattn.so" $round
done
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
