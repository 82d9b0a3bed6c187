// Host-side filling of the fields that the forward and backward kernel parameters share, from the
// validated call parameters (ringattn_fwd_params / ringattn_bwd_params and their groups).
#pragma once

#include <cstdint>

#include "cuda/device_support.h"
#include "cuda/fwd_params.h"
#include "cuda/kernel_registry.h"
#include "ringattn/ringattn.h"

namespace ringattn {
namespace cuda {

// A query group's own query views and sizes: q, its strides, cu_seqlens_q, seqused_k, total_q.
template <typename KernelGroup, typename CallGroup>
void fill_query_group(KernelGroup& dst, const CallGroup& src) {
  dst.q = src.q;
  dst.cu_seqlens_q = src.cu_seqlens_q;
  dst.seqused_k = src.seqused_k;
  dst.q_row_stride = src.q_row_stride;
  dst.q_head_stride = src.q_head_stride;
  dst.total_q = static_cast<int32_t>(src.total_q);
}

// The key/value views and the problem-wide sizes and softmax scale (natural and log2 units).
template <typename KernelParams, typename CallParams>
void fill_keys_and_problem(KernelParams& kp, const CallParams& p) {
  const ringattn_problem& pr = p.problem;
  kp.k = p.k;
  kp.v = p.v;
  kp.k_row_stride = p.k_row_stride;
  kp.k_head_stride = p.k_head_stride;
  kp.v_row_stride = p.v_row_stride;
  kp.v_head_stride = p.v_head_stride;
  kp.cu_seqlens_k = pr.cu_seqlens_k;
  kp.total_k = static_cast<int32_t>(pr.total_k);
  kp.num_groups = pr.num_groups;
  kp.batch_size = pr.batch_size;
  kp.num_heads_q = pr.num_heads_q;
  kp.q_heads_per_kv_head = pr.num_heads_q / pr.num_heads_k;
  kp.softmax_scale = resolved_softmax_scale(pr);
  kp.softmax_scale_log2 = kp.softmax_scale * 1.4426950408889634f;
}

// The optional features of a forward or backward call (window, diagonal shifts, sinks, softcap),
// which the kLocal kernels read.
template <typename CallParams>
void fill_features(FeatureParams& f, const CallParams& p) {
  const ringattn_problem& pr = p.problem;
  f.window = call_window(pr);
  for (int g = 0; g < pr.num_groups; ++g) f.diagonal_shift[g] = call_diagonal_shift(p, g);
  f.sinks = pr.sinks;
  if (pr.softcap > 0.0f) {
    f.softcap_scale = resolved_softmax_scale(pr) / pr.softcap;
    f.softcap = pr.softcap;
    f.softcap_log2 = pr.softcap * 1.4426950408889634f;
  }
}

// The backward's dK/dV outputs and their strides.
template <typename KernelParams>
void fill_key_grads(KernelParams& kp, const ringattn_bwd_params& p) {
  kp.dk = p.dk;
  kp.dv = p.dv;
  kp.dk_row_stride = p.dk_row_stride;
  kp.dk_head_stride = p.dk_head_stride;
  kp.dv_row_stride = p.dv_row_stride;
  kp.dv_head_stride = p.dv_head_stride;
}

}  // namespace cuda
}  // namespace ringattn
