// The logit softcap of the tier-2 kernels compiled with it (kSoftcap, MaskMode::kLocal only).
//
// A scaled score x = softmax_scale * q.k becomes softcap * tanh(x / softcap). The kernels keep
// t = tanh(s * softcap_scale) (s the raw q.k, softcap_scale = softmax_scale / softcap) in the score
// accumulator, so the softmax runs on t with the scale softcap (natural units) / softcap_log2
// instead of softmax_scale / softmax_scale_log2 (FeatureParams, cuda/fwd_params.h). The backward
// needs d(score)/dx = 1 - t^2 on top of the usual dS = P (dP - Di).
//
// tanh is the hardware approximation (one MUFU operation per score, like the exp2 of the
// softmax; relative error about 2^-11), the same in the forward and the backward, so the backward
// recomputes exactly the probabilities the forward normalised.
#pragma once

namespace ringattn {
namespace cuda {
namespace sm90 {

__device__ __forceinline__ float tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

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
