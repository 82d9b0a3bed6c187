#!/usr/bin/env bash
# Kernel development: ncu of ONE tier-2 forward launch per row of benchmark/benchmark_features.py
# (plain causal, the sliding window, the softcap by default), side by side, to see where a feature
# row loses against causal (tensor-pipe share, MUFU / issue-slot use, stall reasons, L2 traffic).
# ncu locks the clocks at base (its default), so the durations compare. Needs build/device
# (bash scripts/device_run.sh builds it) or RING_FLASH_ATTN_LIBRARY.
#   bash scripts/dev/features_ncu.sh
#   NCU_VARIANTS="causal window_4096" NCU_SEQLEN=16384 bash scripts/dev/features_ncu.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/dev/ncu_launch.sh
source scripts/dev/ncu_launch.sh
variants="${NCU_VARIANTS:-causal window_4096 softcap_50}"
seqlen="${NCU_SEQLEN:-65536}"
columns=()
for variant in $variants; do
  report="$ncu_out/ncu_features_${variant}.txt"
  # Launch 0 of the kernel is the row's spot-check forward, 1 its warm-up: profile the second.
  RING_FLASH_ATTN_LIBRARY="$ncu_lib" PYTHONPATH="$PWD/python" \
    ncu_one_launch 'regex:grouped_fwd_(persistent_)?kernel' 1 "$report" \
    python3 benchmark/benchmark_features.py --tiers sm90 --passes fwd --seqlens "$seqlen" \
    --variants "$variant" --warmup 1 --num-runs 1
  echo "== ncu $variant rc=$? ($report)"
  columns+=("$variant=$report")
done
python3 scripts/dev/ncu_table.py "${columns[@]}"
