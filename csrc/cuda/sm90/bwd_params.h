// Parameters of the tier-2 (sm90a) backward dK/dV kernel: the tier-1 parameters plus TMA tensor
// maps of Q and dO (one per group), K and V (tma_host.h). About 6 KB: kernel parameters above
// 4 KB need CUDA 12.1+ and a matching driver (up to 32 KB), which this library requires anyway.
#pragma once

#include <cuda.h>

#include "cuda/bwd_params.h"

// Experimental (kernel development; default off, not yet measured): dQ tiles staged in shared
// memory and added to dq_accum by TMA reduce-add (one bulk operation per 32-column box) instead
// of per-thread vector atomics. Host and device code must see the same value (CMAKE_CUDA_FLAGS).
#ifndef RINGATTN_SM90_BWD_DQ_TMA
#define RINGATTN_SM90_BWD_DQ_TMA 0
#endif

namespace ringattn {
namespace cuda {
namespace sm90 {

struct BwdKernelParams {
  cuda::BwdKernelParams base;
  CUtensorMap tma_q[RINGATTN_MAX_GROUPS];   // boxes of 64 x 1 x kBlockM rows
  CUtensorMap tma_do[RINGATTN_MAX_GROUPS];  // likewise
  CUtensorMap tma_k;                        // boxes of 64 x 1 x kBlockN rows
  CUtensorMap tma_v;
#if RINGATTN_SM90_BWD_DQ_TMA
  CUtensorMap tma_dq[RINGATTN_MAX_GROUPS];  // fp32 dq_accum, boxes of 32 x 1 x kBlockM rows
#endif
};
static_assert(sizeof(BwdKernelParams) <= 32764, "kernel parameters fit the 32 KB parameter space");

template <typename T, bool kCausal>
cudaError_t launch_grouped_bwd_dkdv(const BwdKernelParams& params, int num_ctas, cudaStream_t stream);

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
