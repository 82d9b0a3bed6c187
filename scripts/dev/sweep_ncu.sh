#!/usr/bin/env bash
# Kernel development: ncu of ONE forward attention launch per cell of the FlashAttention-3 sweep
# (benchmark/benchmark_fa3_sweep.py), ours and cuDNN's side by side, for the shapes where we trail
# cuDNN (non-causal above all: 0.85x at D=128, L=16K, and our non-causal below our own causal per
# FLOP). ncu locks the clocks at base (its default), so the durations compare. Needs build/device
# (bash scripts/device_run.sh builds it) or RING_FLASH_ATTN_LIBRARY.
#   bash scripts/dev/sweep_ncu.sh
#   NCU_CELLS="ours:128:16384:no sdpa_cudnn:128:16384:no" bash scripts/dev/sweep_ncu.sh
# A cell is impl:head_dim:seqlen:causal (causal yes or no); impl ours or sdpa_cudnn.
set -uo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/dev/ncu_launch.sh
source scripts/dev/ncu_launch.sh
cells="${NCU_CELLS:-ours:128:16384:yes ours:128:16384:no sdpa_cudnn:128:16384:no}"
columns=()
for cell in $cells; do
  IFS=: read -r impl hdim seqlen causal <<<"$cell"
  case "$impl" in
    ours) kernel='regex:grouped_fwd_(persistent_)?kernel' ;;
    sdpa_cudnn) kernel='regex:(cudnn|sdpa|fmha|flash_fprop)' ;;
    *) echo "sweep_ncu.sh: cell $cell: impl must be ours or sdpa_cudnn" >&2; exit 2 ;;
  esac
  case "$causal" in yes|no) ;; *) echo "sweep_ncu.sh: cell $cell: causal must be yes or no" >&2; exit 2 ;; esac
  report="$ncu_out/ncu_sweep_${impl}_d${hdim}_l${seqlen}_causal_${causal}.txt"
  # --no-check: no spot-check call; launch 0 is the warm-up call, 1 the timed one: profile that.
  RING_FLASH_ATTN_LIBRARY="$ncu_lib" PYTHONPATH="$PWD/python" \
    ncu_one_launch "$kernel" 1 "$report" \
    python3 benchmark/benchmark_fa3_sweep.py --impls "$impl" --head-dims "$hdim" --seqlens "$seqlen" \
    --causal "$causal" --passes fwd --warmup 1 --num-runs 1 --no-check --no-gpu-time --csv "" --plot ""
  echo "== ncu $cell rc=$? ($report)"
  columns+=("${impl}_d${hdim}_${seqlen}_${causal}=$report")
done
python3 scripts/dev/ncu_table.py "${columns[@]}"
