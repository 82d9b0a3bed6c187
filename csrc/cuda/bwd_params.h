// Parameters of the GPU backward kernels, passed by value (kernel params space). Built by the
// host dispatch (bwd_dispatch.cu) from validated ringattn_bwd_params.
//
// The backward runs as up to five launches on the caller's stream:
//   1. preprocess  (bwd_prepost.cu): Di = rowsum(dO * O), the LSE in log2 units, dq_accum = 0,
//                  dK = dV = 0 on key rows that belong to no sequence;
//   2. the dK/dV work list (bwd_scheduler.cu): one item per (sequence, K/V block), longest first;
//   3. dK/dV kernel (sm80/bwd_kernel.cuh; tier 2: sm90/bwd_kernel.cuh): one CTA per (K/V block,
//                  sequence, KV head), walking every query tile of every group that sees the
//                  block; adds dQ into dq_accum (tier 1: fp32 atomics, tier 2: TMA reduce-add)
//                  unless the dQ kernel runs;
//   4. deterministic mode (and tier 1 at head dim 128): dQ kernel (sm80/bwd_dq_kernel.cuh; tier 2:
//                  sm90/bwd_dq_kernel.cuh), one CTA per query tile, writes dq_accum with plain
//                  stores (fixed K/V order, bit-identical runs);
//   5. postprocess (bwd_prepost.cu): dQ = scale * dq_accum, converted to the dtype.
#pragma once

#include <cstdint>

#include "cuda/bwd_stat_rows.h"  // bwd_stat_row_stride, the tier-2 kernel's LSE/Di boxes
#include "cuda/fwd_params.h"
#include "ringattn/ringattn.h"

namespace ringattn {
namespace cuda {

// Per-group workspace arrays (fp32), carved by the host dispatch. lse_log2 and di are one
// [2][Hq][stat_row_stride] array (di = lse_log2 + Hq * stat_row_stride): head h's row of either
// holds total_q values, then padding up to stat_row_stride (bwd_stat_row_stride, bwd_stat_rows.h),
// which the tier-2 dK/dV kernel's TMA needs (16-byte aligned rows: one 2-D tensor map over both).
struct BwdGroupWorkspace {
  float* lse_log2;  // [Hq, stat_row_stride]: LSE * log2(e); +inf for a row that sees no key (P = 0)
  float* di;        // [Hq, stat_row_stride]: rowsum(dO * O)
  float* dq_accum;  // [total_q, Hq, D]: unscaled sum_j dS_ij K_j
};

struct BwdGroupArgs {
  const void* q;
  const void* dout;
  const float* lse_log2;
  const float* di;
  float* dq_accum;
  const int32_t* cu_seqlens_q;  // [B+1]
  const int32_t* seqused_k;     // [B] or nullptr
  int64_t q_row_stride, q_head_stride;
  int64_t dout_row_stride, dout_head_stride;
  int32_t total_q;
  int32_t pad;
  // Of lse_log2 and di (BwdGroupWorkspace): token t of head h at h * stat_row_stride() + t.
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE int64_t stat_row_stride() const { return bwd_stat_row_stride(total_q); }
  // h * stat_row_stride() for a head h >= 0 (bwd_stat_row: one 32 x 32 -> 64-bit product).
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE int64_t stat_row(int h) const { return bwd_stat_row(total_q, h); }
};

// One unit of work of the dK/dV kernel: a K/V block of one sequence. KV heads are spread over
// blockIdx like the forward's query heads.
struct BwdKvWorkItem {
  int32_t n_block;
  int32_t batch;
};

struct BwdKernelParams {
  BwdGroupArgs groups[RINGATTN_MAX_GROUPS];
  const void* k;
  const void* v;
  void* dk;
  void* dv;
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  int64_t dk_row_stride, dk_head_stride;
  int64_t dv_row_stride, dv_head_stride;
  const int32_t* cu_seqlens_k;
  int32_t total_k;
  int32_t num_groups;
  int32_t batch_size;
  int32_t num_heads_q;
  int32_t num_heads_k;
  int32_t q_heads_per_kv_head;
  float softmax_scale;       // natural units
  float softmax_scale_log2;  // softmax_scale * log2(e)
  int32_t accumulate_dq;     // dK/dV kernel adds dQ into dq_accum (0 in deterministic mode)
  int32_t dq_tile_head_run;  // deterministic dQ kernel: items per head run of q_items (query_tile_work.h)
  int32_t kv_tile_head_run;  // dK/dV kernel: K/V blocks per K/V-head run of kv_items (common/tile_order.h)
  int32_t pad;
  const BwdKvWorkItem* kv_items;  // dK/dV kernel: sorted, most work first
  const int32_t* kv_count;
  const WorkItem* q_items;  // deterministic dQ kernel (the forward's query-tile work list)
  const int32_t* q_count;
};

namespace sm80 {

// Tier 1's backward kernel parameters: the shared ones, then the features (fwd_params.h; the
// backward reads the window, the diagonal shifts and the softcap, never the sinks: the forward's
// LSE holds them).
struct BwdKernelParams : cuda::BwdKernelParams {
  FeatureParams features;
};

}  // namespace sm80

// Pre- and postprocess (elementwise over [total_q, Hq] rows of every group).
struct BwdPrepGroupArgs {
  const void* out;
  const void* dout;
  const float* lse;  // [Hq, total_q], from the forward
  void* dq;
  BwdGroupWorkspace ws;
  int64_t out_row_stride, out_head_stride;
  int64_t dout_row_stride, dout_head_stride;
  int64_t dq_row_stride, dq_head_stride;
  int32_t total_q;
  int32_t pad;
  // Of ws.lse_log2 and ws.di: token t of head h at h * stat_row_stride() + t.
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE int64_t stat_row_stride() const { return bwd_stat_row_stride(total_q); }
  // h * stat_row_stride() for a head h >= 0 (bwd_stat_row: one 32 x 32 -> 64-bit product).
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE int64_t stat_row(int h) const { return bwd_stat_row(total_q, h); }
};

struct BwdPrepParams {
  BwdPrepGroupArgs groups[RINGATTN_MAX_GROUPS];
  // dK/dV rows after the last sequence (cu_seqlens_k[B] .. total_k) belong to no CTA of the
  // dK/dV kernel: the preprocess zeroes them.
  void* dk;
  void* dv;
  int64_t dk_row_stride, dk_head_stride;
  int64_t dv_row_stride, dv_head_stride;
  const int32_t* cu_seqlens_k;
  int32_t total_k;
  int32_t batch_size;
  int32_t num_groups;
  int32_t num_heads_q;
  int32_t num_heads_k;
  int32_t head_dim;
  float softmax_scale;
  int32_t pad;
};

}  // namespace cuda
}  // namespace ringattn
