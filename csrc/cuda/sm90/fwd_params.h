// Parameters of the tier-2 (sm90a) forward kernel: the parameters both tiers share plus TMA
// tensor maps of Q (one per group), K and V, encoded on the host (tma_host.h), the call's optional
// features, and for the persistent kernel tensor maps of O (one per group). Passed by value as a
// __grid_constant__ kernel parameter, so the tensor maps live in the parameter space TMA reads.
#pragma once

#include <cuda.h>

#include "cuda/fwd_params.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

struct FwdKernelParams {
  cuda::FwdKernelParams base;
  // Tensor maps over [tokens][heads][head_dim] (dims innermost first: D, heads, tokens), boxes
  // of 64 x 1 x block rows with the 128-byte swizzle (tma_host.h).
  CUtensorMap tma_q[RINGATTN_MAX_GROUPS];
  CUtensorMap tma_k;
  CUtensorMap tma_v;
  // The optional features (window, diagonal shifts, sinks, softcap), read by the kLocal kernels
  // only.
  FeatureParams features;
  // The persistent grid's tile counter (zeroed by the work-list kernel): a CTA's tiles after its
  // first (blockIdx.x) are gridDim.x + the values it takes from here.
  int32_t* tile_counter;
  // The persistent kernel's O stores (fwd_kernel.cuh, store_o): maps over each group's output
  // [tokens][heads][head_dim] as tma_q's, boxes of 64 x 1 x 64 rows (a consumer warpgroup's rows);
  // bit g of tma_o_groups says tma_o[g] is encoded (else that group's O goes out by per-thread
  // stores). About 6 KB in all: kernel parameters above 4 KB need CUDA 12.1+ and a matching
  // driver (up to 32 KB), as the backward's do already (bwd_params.h).
  uint32_t tma_o_groups;
  CUtensorMap tma_o[RINGATTN_MAX_GROUPS];
};
static_assert(sizeof(FwdKernelParams) <= 32764, "kernel parameters fit the 32 KB parameter space");
static_assert(RINGATTN_MAX_GROUPS <= 32, "tma_o_groups holds one bit per group");

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
