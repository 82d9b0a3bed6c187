// The logit softcap in the tier-2 kernels compiled with it (kSoftcap, MaskMode::kLocal only); the
// convention and the tanh are features.cuh's, shared with tier 1.
//
// The kernels keep t = tanh(s * softcap_scale) (s the raw q.k, softcap_scale = softmax_scale /
// softcap) in the score accumulator, so the softmax runs on t with the scale softcap (natural
// units) / softcap_log2 instead of softmax_scale / softmax_scale_log2 (FeatureParams,
// cuda/fwd_params.h). The backward recomputes t the same way and multiplies dS by 1 - t^2.
#pragma once

#include "cuda/features.cuh"

namespace ringattn {
namespace cuda {
namespace sm90 {

// s -> tanh(s * softcap_scale), in place, over a wgmma score accumulator.
template <int kNTiles>
__device__ __forceinline__ void softcap_scores(float (&s)[kNTiles][4], float softcap_scale) {
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c) s[nt][c] = tanh_approx(s[nt][c] * softcap_scale);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
