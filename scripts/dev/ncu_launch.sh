# Sourced by the ncu scripts of this folder (features_ncu.sh, fwd_ncu_ab.sh, sweep_ncu.sh): the
# one ncu invocation they share.
#   ncu_one_launch KERNEL_REGEX SKIP REPORT COMMAND...
# profiles launch SKIP (0-based) of the kernels whose names match KERNEL_REGEX while COMMAND runs,
# with the sections the side-by-side tables read (ncu_table.py), clocks at ncu's default (base),
# within 240 s; ncu's output and COMMAND's go to REPORT; returns ncu's exit status.
# Also sets, for a script run from the repository root: ncu_out, the folder the reports go to
# ($OUT or build/ncu-out; created), and ncu_lib, the library to profile ($RING_FLASH_ATTN_LIBRARY or
# build/device/libringattn.so, what scripts/device_run.sh builds).
ncu_out="${OUT:-build/ncu-out}"
mkdir -p "$ncu_out"
ncu_lib="${RING_FLASH_ATTN_LIBRARY:-$PWD/build/device/libringattn.so}"
NCU_SECTIONS=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats
  --section SchedulerStats --section Occupancy --section LaunchStats --section InstructionStats
  --section MemoryWorkloadAnalysis)
ncu_one_launch() {
  local kernel="$1" skip="$2" report="$3"
  shift 3
  timeout 240 ncu --kernel-name "$kernel" --launch-skip "$skip" --launch-count 1 "${NCU_SECTIONS[@]}" "$@" \
    >"$report" 2>&1
}
