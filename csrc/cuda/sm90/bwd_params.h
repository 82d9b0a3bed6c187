// Parameters of the tier-2 (sm90a) backward dK/dV kernel: the tier-1 parameters plus TMA tensor
// maps of Q, dO, the fp32 dq_accum and the LSE/Di rows (one per group), K and V (tma_host.h). About 8 KB: kernel parameters above
// 4 KB need CUDA 12.1+ and a matching driver (up to 32 KB), which this library requires anyway.
#pragma once

#include <cuda.h>

#include "common/mask.h"
#include "cuda/bwd_params.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

// The operand maps both backward kernels read, with boxes of their own tile shape.
struct BwdOperandMaps {
  CUtensorMap tma_q[RINGATTN_MAX_GROUPS];   // boxes of 64 x 1 x kBlockM rows
  CUtensorMap tma_do[RINGATTN_MAX_GROUPS];  // likewise
  CUtensorMap tma_k;                        // boxes of 64 x 1 x kBlockN rows
  CUtensorMap tma_v;
};

struct BwdKernelParams {
  cuda::BwdKernelParams base;
  BwdOperandMaps maps;
  CUtensorMap tma_dq[RINGATTN_MAX_GROUPS];  // fp32 dq_accum (TMA reduce-add), boxes of 32 x 1 x kBlockM rows
  // The group's lse_log2 and di (bwd_params.h: one array of 2 Hq rows of total_q values, LSE's
  // rows then Di's, stat_row_stride apart), boxes of bwd_stat_box_cols(kBlockM) tokens x 1 row
  // (bwd_stat_rows.h); coordinates (token, row): head h's LSE at row h, its Di at row Hq + h; the
  // token a multiple of 4 (bwd_stat_box_start: TMA needs 16-byte aligned box starts).
  CUtensorMap tma_stats[RINGATTN_MAX_GROUPS];
  // The optional features (window, diagonal shifts, softcap; the sinks are in the forward's LSE),
  // read by the kLocal kernels only. Last, so every field before it keeps its offset.
  FeatureParams features;
};
static_assert(sizeof(BwdKernelParams) <= 32764, "kernel parameters fit the 32 KB parameter space");

// The deterministic mode's dQ kernel (bwd_dq_kernel.cuh): the tier-1 parameters (its work list
// in q_items / q_count) plus its own tensor maps, whose boxes follow its tile shape.
struct BwdDqKernelParams {
  cuda::BwdKernelParams base;
  BwdOperandMaps maps;
  FeatureParams features;  // as in BwdKernelParams
};
static_assert(sizeof(BwdDqKernelParams) <= 32764, "kernel parameters fit the 32 KB parameter space");

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
