// Parameters of the tier-2 (sm90a) forward kernel: the parameters both tiers share plus TMA
// tensor maps of Q (one per group), K and V, encoded on the host (tma_host.h), and the call's
// optional features. Passed by value as a __grid_constant__ kernel parameter, so the tensor maps
// live in the parameter space TMA reads.
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
};
static_assert(sizeof(FwdKernelParams) <= 4096, "kernel parameters fit the 4 KB parameter space");

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
