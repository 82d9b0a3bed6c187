#!/usr/bin/env bash
# Tuning experiment: builds the head-dim-128 forward with several tiles (only hdim 128, this
# card's arch) and times each with scripts/bench_probe.py. Usage: bash scripts/tune_d128.sh BM_BN_W_MB[_STAGES] ...
set -uo pipefail
cc=$(python3 -c 'import torch; p=torch.cuda.get_device_capability(); print(f"{p[0]}{p[1]}")')
arch=$([ "$cc" = 90 ] && echo 90a || echo "$cc")
for tile in "$@"; do
  dir="build/tune_$tile"
  (cmake -S . -B "$dir" -G Ninja -DRINGATTN_CUDA_ARCHS="$arch" -DRINGATTN_HEAD_DIMS=128 -DRINGATTN_BUILD_TESTS=OFF \
     -DRINGATTN_PTXAS_VERBOSE=ON "-DRINGATTN_D128_TILE=$tile" >/dev/null && cmake --build "$dir" -j16 >"$dir.log" 2>&1) &
done
wait
for tile in "$@"; do
  dir="build/tune_$tile"
  echo "== tile $tile: $(grep -A1 'grouped_fwd_kernel.*Lb1E' "$dir.log" | grep -oE '[0-9]+ bytes spill stores' | head -1), $(grep -oE 'Used [0-9]+ registers' "$dir.log" | sort -u | tr '\n' ' ')"
  RING_FLASH_ATTN_LIBRARY="$PWD/$dir/libringattn.so" PYTHONPATH="$PWD/python" python3 scripts/bench_probe.py --fused-only
done
