#!/usr/bin/env bash
# Kernel development: ncu of ONE tier-2 forward launch (the per-rank zigzag row by default) from
# two source trees, side by side. ncu locks the clocks at base (--clock-control base, its
# default), so the two durations compare without the H200's power-cap drift.
#   bash scripts/dev/fwd_ncu_ab.sh OLD_TREE NEW_TREE     # each with build/device/libringattn.so
#   NCU_ROWS="--seqlens 65536 --world-size 8 --rank 7" bash scripts/dev/fwd_ncu_ab.sh ...
set -uo pipefail
old="${1:?old tree}"; new="${2:?new tree}"
# shellcheck source=scripts/dev/ncu_launch.sh
source "$(dirname "$0")/ncu_launch.sh"
rows="${NCU_ROWS:---seqlens 65536 --world-size 8 --rank 7}"
for side in old new; do
  tree="${!side}"
  # shellcheck disable=SC2086  # NCU_ROWS: several words
  RING_FLASH_ATTN_LIBRARY="$tree/build/device/libringattn.so" PYTHONPATH="$tree/python" \
    ncu_one_launch 'regex:grouped_fwd_(persistent_)?kernel' 2 "$ncu_out/ncu_fwd_$side.txt" \
    python3 "$tree/benchmark/benchmark_grouped_attention.py" $rows --passes fwd --impls fused \
    --num-runs 2 --warmup 1 --no-check --output-dir "$ncu_out/bench_$side"
  echo "== ncu $side rc=$?"
done
python3 "$(dirname "$0")/ncu_table.py" old="$ncu_out/ncu_fwd_old.txt" new="$ncu_out/ncu_fwd_new.txt"
