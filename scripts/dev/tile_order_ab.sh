#!/usr/bin/env bash
# The query-tile order (csrc/common/tile_order.h) timed at several run lengths with ONE build in
# ONE device call: RING_FLASH_ATTN_TILE_HEAD_RUN=N forces runs of N items per head (1 is the order
# before runs existed: one item for all heads, then the next), `auto` leaves the library's choice.
# Rows: FlashAttention-3-sweep cells (ours, D=128, L=8K and 16K, causal and not, forward) and the
# per-rank zigzag rows (L=64K, N=8, ranks 0 and 7, fused forward); cuDNN's sweep cells once, in the
# same call, for reference. Each run length in its own process (the library reads the variable
# once), alternated over TILE_ROUNDS rounds; a table of TFLOPS per row and run length, last.
#   bash scripts/dev/tile_order_ab.sh               # after device_run.sh / branch_check.sh built build/device
#   TILE_RUNS="1 auto 32" TILE_ROUNDS=1 bash scripts/dev/tile_order_ab.sh
# The dK/dV kernel's K/V-block order instead: TILE_ENV=RING_FLASH_ATTN_KV_HEAD_RUN TILE_PASSES=fwd_bwd.
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-build/tile-order-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/python" RING_FLASH_ATTN_LIBRARY="${RING_FLASH_ATTN_LIBRARY:-$PWD/build/device/libringattn.so}"
runs="${TILE_RUNS:-1 auto 16 64}"
var="${TILE_ENV:-RING_FLASH_ATTN_TILE_HEAD_RUN}"
passes="${TILE_PASSES:-fwd}"
rounds="${TILE_ROUNDS:-2}"
sweep_args=(--head-dims 128 --seqlens 8192 16384 --causal both --passes $passes --num-runs 10 --warmup 3 --plot '')
python3 benchmark/benchmark_fa3_sweep.py --impls sdpa_cudnn "${sweep_args[@]}" --no-check \
  --csv "$out/sweep_cudnn.csv" >"$out/sweep_cudnn.log" 2>&1 || echo "cuDNN sweep rows failed (see sweep_cudnn.log)"
for round in $(seq 1 "$rounds"); do
  for r in $runs; do
    if [ "$r" = auto ]; then unset "$var"; else export "$var=$r"; fi
    python3 benchmark/benchmark_fa3_sweep.py --impls ours "${sweep_args[@]}" --csv "$out/sweep_${r}_${round}.csv" \
      >"$out/sweep_${r}_${round}.log" 2>&1 || echo "run $r round $round: sweep rows failed (see sweep_${r}_${round}.log)"
    python3 benchmark/benchmark_grouped_attention.py --seqlens 65536 --world-size 8 --rank 0 7 --passes $passes \
      --impls fused --num-runs 10 --warmup 2 --csv "$out/rank_${r}_${round}.csv" --output-dir "$out" \
      >"$out/rank_${r}_${round}.log" 2>&1 || echo "run $r round $round: per-rank rows failed (see rank_${r}_${round}.log)"
    echo "run $r round $round done"
  done
done
unset "$var"
python3 - "$out" $runs <<'PYEOF'
import csv, glob, os, statistics, sys
out, runs = sys.argv[1], sys.argv[2:]
def rows(path):
    return list(csv.DictReader(open(path))) if os.path.exists(path) else []
table = {}  # row key -> run -> [tflops]
for r in runs + ["cudnn"]:
    files = glob.glob(os.path.join(out, f"sweep_{r}_*.csv" if r != "cudnn" else "sweep_cudnn.csv"))
    files += glob.glob(os.path.join(out, f"rank_{r}_*.csv"))
    for f in files:
        for row in rows(f):
            if "head_dim" in row:
                key = f"sweep D={row['head_dim']} L={row['seqlen']} causal={row['causal']} {row['pass']}"
            else:
                key = f"per-rank L={row['seqlen']} N={row['world_size']} r={row['rank']} {row['pass']}"
            try:
                table.setdefault(key, {}).setdefault(r, []).append(float(row["tflops"]))
            except (KeyError, ValueError):
                pass
cols = runs + ["cudnn"]
print(f"{'row (TFLOPS, median over rounds)':44s}" + "".join(f"{'run ' + c if c not in ('auto', 'cudnn') else c:>10s}" for c in cols))
for key in sorted(table):
    cells = [f"{statistics.median(table[key][c]):10.1f}" if c in table[key] else f"{'-':>10s}" for c in cols]
    print(f"{key:44s}" + "".join(cells))
PYEOF
