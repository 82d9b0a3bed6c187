// Parameters of the GPU forward kernels, passed by value (kernel params space). Built by the
// host dispatch (fwd_dispatch.cu) from validated ringattn_fwd_params.
#pragma once

#include <cstdint>

#include "common/mask.h"
#include "ringattn/ringattn.h"

namespace ringattn {
namespace cuda {

struct FwdGroupArgs {
  const void* q;
  void* out;
  float* softmax_lse;          // [Hq, total_q]
  const int32_t* cu_seqlens_q;  // [B+1]
  const int32_t* seqused_k;     // [B] or nullptr
  int64_t q_row_stride, q_head_stride;
  int64_t out_row_stride, out_head_stride;
  int32_t total_q;
  int32_t pad;

  // Where a query tile (head `head`, rows from row0 of the sequence that starts at packed token
  // q_start) writes its output rows and their LSE.
  template <typename Element>
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE Element* out_tile(int q_start, int row0, int head) const {
    return static_cast<Element*>(out) + (q_start + row0) * out_row_stride + head * out_head_stride;
  }
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE float* lse_tile(int q_start, int row0, int head) const {
    return softmax_lse + static_cast<int64_t>(head) * total_q + q_start + row0;
  }
};

// One unit of work: a query tile of one (group, sequence). Heads are spread over blockIdx.
struct WorkItem {
  int32_t group_and_mblock;  // (m_block << 4) | group
  int32_t batch;
};

struct FwdKernelParams {
  FwdGroupArgs groups[RINGATTN_MAX_GROUPS];
  const void* k;
  const void* v;
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  const int32_t* cu_seqlens_k;
  int32_t total_k;
  int32_t num_groups;
  int32_t batch_size;
  int32_t num_heads_q;
  int32_t q_heads_per_kv_head;
  float softmax_scale;       // natural units
  float softmax_scale_log2;  // softmax_scale * log2(e)
  const WorkItem* work_items;  // sorted, longest first
  const int32_t* work_count;   // number of valid items
  int32_t tile_head_run;       // the list's items per head run (query_tile_work.h), >= 1
};

// The optional features of a call, read only by the kernels of MaskMode::kLocal (window, diagonal
// shift, sinks) and by those compiled with softcap; the kNone / kCausal kernels never read them.
// Filled by fill_features (kernel_params_fill.h), forward and backward alike.
struct FeatureParams {
  // Per group: the diagonal shift of each sequence ([B] int32 on the device), nullptr for none
  // (all 0). Also nullptr when the window bounds no side (the shift then changes nothing).
  const int32_t* diagonal_shift[RINGATTN_MAX_GROUPS];
  const float* sinks;  // [Hq] fp32 sink logits, or nullptr; the forward's finalisation reads them
  MaskWindow window;   // (left, right), -1 unbounded; causal is a right bound of 0
  // Softcap (kernels compiled with it): a score s becomes softcap * tanh(s * softcap_scale) with
  // softcap_scale = softmax_scale / softcap, so in these kernels the softmax runs on t =
  // tanh(s * softcap_scale) with the scale `softcap` (natural units) / `softcap_log2`.
  float softcap_scale;
  float softcap;
  float softcap_log2;  // softcap * log2(e)
  int32_t pad;
};

namespace sm80 {

// Tier 1's forward kernel parameters: the shared ones, then the features. Appending keeps every
// shared field at the offset it has in tier 2's parameters, which wrap cuda::FwdKernelParams.
struct FwdKernelParams : cuda::FwdKernelParams {
  FeatureParams features;
};

}  // namespace sm80

}  // namespace cuda
}  // namespace ringattn
