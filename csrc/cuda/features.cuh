// Device pieces of the optional features of a call (FeatureParams, fwd_params.h) that are not the
// mask: the logit softcap's tanh, and how the forward counts a sink logit.
//
// Softcap. A kernel compiled with it turns each raw score s = q.k into t = tanh(s * softcap_scale)
// (softcap_scale = softmax_scale / softcap) and runs the softmax on t with the scale `softcap`, so
// the logits are softcap * tanh(softmax_scale * s / softcap). Its backward recomputes t the same
// way and multiplies dS by dt/d(scaled s) = 1 - t^2 (the softmax scale is applied to dK and dQ
// afterwards, as without a softcap). The tanh is the hardware's approximate one (tanh.approx.f32,
// one MUFU op, relative error about 2^-11); the forward and the backward use the same one, so P
// recomputed in the backward matches the forward's LSE.
//
// Sinks. A sink logit z (natural units, -inf for none) adds exp(z) to the row's denominator, never
// to its output: LSE = log(exp(z) + sum_j exp(logit_j)), O = sum_j exp(logit_j - LSE) v_j. The
// forward counts it as one more key with value 0, present from the start of the online softmax
// (the running max starts at z, the running sum at exp(z - z) = 1), so a row that sees no key
// ends with O = 0 and LSE = z. The backward needs nothing: P = exp(logit - LSE) with the
// forward's LSE already holds the sink, and dS = P (dP - Di) with Di = rowsum(dO * O) is the
// softmax gradient over the keys (the sink's value is 0).
#pragma once

#include "cuda/ptx.h"

namespace ringattn {
namespace cuda {

// The softcap's tanh (ptx.h), for both tiers' kernels.
using ptx::tanh_approx;

}  // namespace cuda
}  // namespace ringattn
