// Host-side code the forward and backward dispatch share: the choice of the tier that runs a call,
// and the filling of the fields that the forward and backward kernel parameters share, from the
// validated call parameters (ringattn_fwd_params / ringattn_bwd_params and their groups).
#pragma once

#include <cstdint>
#include <utility>

#include "cuda/device_support.h"
#include "cuda/fwd_params.h"
#include "cuda/kernel_registry.h"
#include "ringattn/ringattn.h"

namespace ringattn {
namespace cuda {

#ifdef RINGATTN_SM90_TIER
// Tier 2's kernel for a forward call, or its dK/dV kernel for a backward call: nullptr when none
// is compiled for the call's dtype, head dim and kernel variant.
inline const Sm90FwdKernelEntry* find_tier2_kernel(const ringattn_fwd_params& p) {
  return find_sm90_fwd_kernel(p.problem.dtype, p.problem.head_dim, kernel_variant(p, /*forward=*/true));
}
inline const Sm90BwdKernelEntry* find_tier2_kernel(const ringattn_bwd_params& p) {
  return find_sm90_bwd_kernel(p.problem.dtype, p.problem.head_dim, kernel_variant(p, /*forward=*/false));
}
#else
// A build without the sm90a kernels has no tier-2 kernel.
template <typename CallParams>
const void* find_tier2_kernel(const CallParams&) {
  return nullptr;
}
#endif

// The pointer to a call's tier-2 kernel (find_tier2_kernel).
template <typename CallParams>
using Tier2Kernel = decltype(find_tier2_kernel(std::declval<const CallParams&>()));

// The tier that runs call `p` (choose_tier, for the compute capability of the call's GPU): *tier2
// gets the tier-2 kernel that runs it, or nullptr when tier 1 does. `call` names the call in
// choose_tier's refusal.
template <typename CallParams>
ringattn_status choose_call_tier(const CallParams& p, const char* call, Tier2Kernel<CallParams>* tier2) {
  *tier2 = nullptr;
  int cc = 0;
  ringattn_status s = check_device(p.exec.device_index, &cc);
  if (s != RINGATTN_STATUS_OK) return s;
  const Tier2Kernel<CallParams> kernel = find_tier2_kernel(p);
  Tier tier = Tier::kSm80;
  if ((s = choose_tier(p.exec, cc, kernel != nullptr, p.problem.total_k, call, &tier)) != RINGATTN_STATUS_OK) return s;
  if (tier == Tier::kSm90) *tier2 = kernel;
  return RINGATTN_STATUS_OK;
}

// Copies the strided [rows, heads, head_dim] view `name` from `src` to `dst`, whose fields share
// the call parameters' names: the pointer `name`, `name`_row_stride and `name`_head_stride.
#define RINGATTN_COPY_VIEW(dst, src, name)                  \
  do {                                                      \
    (dst).name = (src).name;                                \
    (dst).name##_row_stride = (src).name##_row_stride;      \
    (dst).name##_head_stride = (src).name##_head_stride;    \
  } while (0)

// A query group's own query views and sizes: q, its strides, cu_seqlens_q, seqused_k, total_q.
template <typename KernelGroup, typename CallGroup>
void fill_query_group(KernelGroup& dst, const CallGroup& src) {
  RINGATTN_COPY_VIEW(dst, src, q);
  dst.cu_seqlens_q = src.cu_seqlens_q;
  dst.seqused_k = src.seqused_k;
  dst.total_q = static_cast<int32_t>(src.total_q);
}

// The problem-wide sizes and the softmax scale (natural units) that the kernel parameters and the
// backward's pre/postprocess parameters share.
template <typename Dst>
void fill_problem_sizes(Dst& dst, const ringattn_problem& pr) {
  dst.cu_seqlens_k = pr.cu_seqlens_k;
  dst.total_k = static_cast<int32_t>(pr.total_k);
  dst.num_groups = pr.num_groups;
  dst.batch_size = pr.batch_size;
  dst.num_heads_q = pr.num_heads_q;
  dst.softmax_scale = resolved_softmax_scale(pr);
}

// The key/value views and the problem-wide sizes and softmax scale (natural and log2 units).
template <typename KernelParams, typename CallParams>
void fill_keys_and_problem(KernelParams& kp, const CallParams& p) {
  const ringattn_problem& pr = p.problem;
  RINGATTN_COPY_VIEW(kp, p.kv, k);
  RINGATTN_COPY_VIEW(kp, p.kv, v);
  fill_problem_sizes(kp, pr);
  kp.q_heads_per_kv_head = pr.num_heads_q / pr.num_heads_k;
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
  RINGATTN_COPY_VIEW(kp, p, dk);
  RINGATTN_COPY_VIEW(kp, p, dv);
}

}  // namespace cuda
}  // namespace ringattn
