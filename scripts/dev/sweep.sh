#!/usr/bin/env bash
# The full benchmark sweep on one GPU, sized for ~8 minutes on an H100 (the device tool allows 10
# per command): every implementation of benchmark/benchmark_grouped_attention.py, passes fwd and
# fwd_bwd, Llama3-8B and Llama3-70B heads, sequence lengths 4K-128K, 2/4/8 groups, and the zigzag
# per-rank workloads of N=2 (ranks 0, 1) and N=8 (ranks 0, 7) at L = 64K and 128K.
#
#   bash scripts/dev/sweep.sh
#
# Output, under $OUT (the device tool's return folder) or build/sweep-out:
#   sweep.csv          every row of every step (the benchmark's CSV columns)
#   sweep.png          benchmark/plot_results.py of it (TFLOPS vs L; skipped if matplotlib is missing)
#   sweep_logs.tar.gz  each step's log and report (.log, .txt): the device tool returns at most 8 files
# and on stdout each step's seconds, the skipped steps, the benchmark's notes and a TFLOPS table.
#
# Library: $RING_FLASH_ATTN_LIBRARY if set, else build/device/libringattn.so (left by
# scripts/device_run.sh on a machine still warm), else a build of its own in build/sweep (head dim
# 128 only, this card's arch, no tests, -j16), whose minutes count against the time budget below.
#
# Time: measured once, on one H100 with the tier-1 kernels (benchmark/results/2026-11-25_h100_sweep):
# steps 1-9 fitted a 330 s budget, 10-13 (Llama3-70B at L >= 32K) did not; not re-measured with the
# tier-2 kernels (faster for the fused rows only). The summary gives each step's seconds. A step starts only
# while less than $SWEEP_BUDGET_S seconds (default 420) have passed since the script started; the
# steps after that are listed as skipped. The steps run in order of importance (Llama3-8B first,
# then Llama3-70B), and the longest (8B, L=128K, N=2, fwd_bwd) comes early, so a late step that
# starts just before the budget ends is one of the short ones. $SWEEP_HBM=0 skips the ncu HBM
# measurement (--measure-hbm) of step 1.
#
# Runs (--num-runs timed calls, median; --warmup untimed calls, of which the first call and the
# peak-memory call are two): L <= 16K: 10 runs, 3 warm-up; 32K and 64K: 5, 2; 128K: 3, 2. A call at
# 128K takes ~0.05-2 s, so 3 runs give a stable median.
#
# Skipped on purpose (each would cost minutes and show nothing the sweep does not already show):
# * The default G-group workloads at L = 64K and 128K, except G = 2, fwd, Llama3-8B: G does not
#   change the FLOPs, the per-rank workloads are what context parallelism runs at these lengths,
#   and one fwd_bwd call of a full 128K causal attention takes ~2.5 s (~5 s for 70B) per
#   implementation.
# * Llama3-70B at L >= 64K except per-rank N=8 fwd and fwd_bwd at 64K, per-rank N=2 fwd at 64K and
#   per-rank N=8 fwd at 128K: the same kernels as 8B with twice the query heads (GQA 8 instead of
#   4), so twice the time for what the 70B rows up to 32K and at 64K already show.
# * Per-rank workloads below 64K (benchmark/results/2026-11-25_h100_tier1_fwd has L=16K N=2 and
#   L=8K N=1) and the middle ranks: rank 0 and rank N-1 bound the per-rank shapes (the longest and
#   the shortest shared K/V prefix); N=2 has only ranks 0 and 1.
# * The bwd-only pass (fwd_bwd minus fwd gives it) and fp16 (bf16 only).
# * flash_attn where the flash-attn package is not installed (the benchmark skips it with a note).
set -uo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root" || exit 1
out="${OUT:-$root/build/sweep-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
budget="${SWEEP_BUDGET_S:-420}"
hbm_flag=(--measure-hbm)
hbm_label=" (+ncu HBM)"
if [ "${SWEEP_HBM:-1}" = 0 ]; then hbm_flag=(); hbm_label=""; fi
csv="$out/sweep.csv"
t_start=$(date +%s)
elapsed() { echo $(( $(date +%s) - t_start )); }
summary=()
note() { summary+=("$1"); echo "== $1"; }

gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)
note "GPU: ${gpu:-unknown}; budget ${budget} s; output $out"

# ---- the library ----------------------------------------------------------------------------------
if [ -n "${RING_FLASH_ATTN_LIBRARY:-}" ]; then
  lib="$RING_FLASH_ATTN_LIBRARY"
elif [ -f build/device/libringattn.so ]; then
  lib="$root/build/device/libringattn.so"
else
  cc=$("$py" -c 'import torch; p=torch.cuda.get_device_capability(); print(f"{p[0]}{p[1]}")' 2>/dev/null || echo "")
  case "$cc" in 90) archs="90a" ;; 80|86|89) archs="$cc" ;; *) archs="80;90a" ;; esac
  t0=$(date +%s)
  if cmake -S . -B build/sweep -G Ninja -DCMAKE_BUILD_TYPE=Release -DRINGATTN_CUDA_ARCHS="$archs" \
       -DRINGATTN_HEAD_DIMS=128 -DRINGATTN_BUILD_TESTS=OFF >"$out/sweep_configure.log" 2>&1 &&
     cmake --build build/sweep -j16 >"$out/sweep_build.log" 2>&1; then
    note "build (sm_${cc:-?}, head dim 128): ok in $(( $(date +%s) - t0 )) s"
  else
    tail -30 "$out/sweep_configure.log" "$out/sweep_build.log"
    note "build: FAILED (see sweep_build.log)"
    printf '%s\n' "${summary[@]}"
    exit 1
  fi
  lib="$root/build/sweep/libringattn.so"
fi
export RING_FLASH_ATTN_LIBRARY="$lib"
export PYTHONPATH="$root/python${PYTHONPATH:+:$PYTHONPATH}"
note "library: $lib"

# ---- the steps ------------------------------------------------------------------------------------
n_step=0
skipped=()
# step LABEL BENCHMARK-ARGS...: one benchmark invocation appending to sweep.csv, unless over budget
step() {
  local label="$1"; shift
  n_step=$((n_step + 1))
  local tag; tag=$(printf 'step%02d' "$n_step")
  if [ "$(elapsed)" -ge "$budget" ]; then
    skipped+=("$tag $label")
    return
  fi
  local t0 rows0 rows1 rc
  t0=$(date +%s)
  rows0=$( [ -f "$csv" ] && tail -n +2 "$csv" | wc -l || echo 0)
  "$py" benchmark/benchmark_grouped_attention.py "$@" --csv "$csv" --output-dir "$out" >"$out/$tag.log" 2>&1
  rc=$?
  rows1=$( [ -f "$csv" ] && tail -n +2 "$csv" | wc -l || echo 0)
  note "$tag $label: rc=$rc, $((rows1 - rows0)) rows, $(( $(date +%s) - t0 )) s (at $(elapsed) s)"
  if [ $rc -ne 0 ]; then
    grep -E "FAIL|Error|error:|Traceback" "$out/$tag.log" | head -5
  fi
}
short=(--num-runs 10 --warmup 3)   # L <= 16K
mid=(--num-runs 5 --warmup 2)      # 32K and 64K
long=(--num-runs 3 --warmup 2)     # 128K
both=(--passes fwd fwd_bwd)

# Llama3-8B
step "8b  L=64K  N=8 r=0 fwd+fwd_bwd$hbm_label" --config llama3-8b --seqlens 65536 --world-size 8 --rank 0 "${both[@]}" "${mid[@]}" ${hbm_flag[@]+"${hbm_flag[@]}"}
step "8b  L=64K  N=8 r=7 fwd+fwd_bwd"           --config llama3-8b --seqlens 65536 --world-size 8 --rank 7 "${both[@]}" "${mid[@]}"
step "8b  L=64K  N=2 r=0,1 fwd+fwd_bwd"         --config llama3-8b --seqlens 65536 --world-size 2 --rank 0 1 "${both[@]}" "${mid[@]}"
step "8b  L=4K-16K G=2,4,8 fwd+fwd_bwd"         --config llama3-8b --seqlens 4096 8192 16384 --num-groups 2 4 8 "${both[@]}" "${short[@]}"
step "8b  L=32K G=2,4,8 fwd+fwd_bwd"            --config llama3-8b --seqlens 32768 --num-groups 2 4 8 "${both[@]}" "${mid[@]}"
step "8b  L=128K N=8 r=0,7 fwd+fwd_bwd"         --config llama3-8b --seqlens 131072 --world-size 8 --rank 0 7 "${both[@]}" "${long[@]}"
step "8b  L=128K N=2 r=0,1 fwd+fwd_bwd"         --config llama3-8b --seqlens 131072 --world-size 2 --rank 0 1 "${both[@]}" "${long[@]}"
step "8b  L=64K,128K G=2 fwd"                   --config llama3-8b --seqlens 65536 131072 --num-groups 2 --passes fwd "${long[@]}"
# Llama3-70B
step "70b L=4K-16K G=2,4,8 fwd+fwd_bwd"         --config llama3-70b --seqlens 4096 8192 16384 --num-groups 2 4 8 "${both[@]}" "${short[@]}"
step "70b L=32K G=2,4,8 fwd+fwd_bwd"            --config llama3-70b --seqlens 32768 --num-groups 2 4 8 "${both[@]}" "${mid[@]}"
step "70b L=64K  N=8 r=0,7 fwd+fwd_bwd"         --config llama3-70b --seqlens 65536 --world-size 8 --rank 0 7 "${both[@]}" "${mid[@]}"
step "70b L=64K  N=2 r=0,1 fwd"                 --config llama3-70b --seqlens 65536 --world-size 2 --rank 0 1 --passes fwd "${mid[@]}"
step "70b L=128K N=8 r=0,7 fwd"                 --config llama3-70b --seqlens 131072 --world-size 8 --rank 0 7 --passes fwd "${long[@]}"

for s in ${skipped[@]+"${skipped[@]}"}; do note "skipped (over the ${budget} s budget): $s"; done
# the benchmark's notes (skipped implementations, ncu), each once, with the number of steps
echo "== notes of the steps (count, note):"
grep -hE "^note:|^HBM: --measure-hbm|^ *ncu: .* not measured|^ *HBM: not measured|^ *HBM MB \(ncu\)" \
  "$out"/step*.log 2>/dev/null | sed 's/^ *//' | cut -c1-220 | sort | uniq -c | sort -rn | head -20

# ---- plot, compact table, archive -----------------------------------------------------------------
if [ -f "$csv" ]; then
  if "$py" benchmark/plot_results.py "$csv" -o "$out/sweep.png" >"$out/plot.log" 2>&1; then
    note "plot: $(tail -1 "$out/plot.log")"
  else
    note "plot: failed ($(tail -1 "$out/plot.log"))"
  fi
  # TFLOPS per workload and pass, one column per implementation (the last run of a repeated row)
  "$py" - "$csv" <<'PYEOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
cols = [("baseline", "base"), ("grouped_python", "gpy"), ("fused", "fused"), ("sdpa_flash", "sdpaF"),
        ("sdpa_cudnn", "cudnn"), ("varlen_attn", "varlen"), ("flash_attn", "fa2")]
table = {}
for r in rows:
    L = int(r["seqlen"])
    w = (f"{r['config'][7:]:>3s} L={f'{L // 1024}K' if L % 1024 == 0 else L:>4} "
         + (f"G={r['num_groups']}" if not r["world_size"] else f"N={r['world_size']} r={r['rank']}"))
    table.setdefault((w, r["pass"]), {})[r["impl"]] = float(r["tflops"])
print(f"{'TFLOPS':24s} {'pass':7s} " + " ".join(f"{c:>6s}" for _, c in cols) + "  fused/base")
for (w, p), d in table.items():
    cells = " ".join(f"{d[i]:6.0f}" if i in d else f"{'-':>6s}" for i, _ in cols)
    ratio = f"{d['fused'] / d['baseline']:.3f}" if "fused" in d and "baseline" in d else "-"
    print(f"{w:24s} {p:7s} {cells}  {ratio}")
PYEOF
fi
(
  cd "$out" || exit
  shopt -s nullglob
  files=(*.log *.txt)
  if [ ${#files[@]} -gt 0 ] && tar czf sweep_logs.tar.gz "${files[@]}" && [ -n "${OUT:-}" ]; then
    rm -f "${files[@]}"  # packed: the device tool returns at most 8 files
  fi
)

echo
echo "================ summary ================"
printf '%s\n' "${summary[@]}"
shopt -s nullglob
left=("$out"/*)
echo "total: $(elapsed) s; files: ${left[*]##*/}"
