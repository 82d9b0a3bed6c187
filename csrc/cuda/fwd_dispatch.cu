// Forward dispatch of the CUDA backend: the tier that runs the call, its kernel parameters, the
// work-list launch, then the forward kernel (tier 2 with its TMA tensor maps, or tier 1).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "common/backends.h"
#include "common/error.h"
#include "cuda/device_support.h"
#include "cuda/fwd_grid_choice.h"
#include "cuda/fwd_params.h"
#include "cuda/kernel_params_fill.h"
#include "cuda/kernel_registry.h"
#include "cuda/tile_scheduler.h"
#include "cuda/workspace.h"
#ifdef RINGATTN_SM90_TIER
#include "cuda/sm90/fwd_params.h"
#include "cuda/sm90/fwd_traits.h"
#include "cuda/sm90/tma_host.h"
#endif

namespace ringattn {
namespace cuda {
namespace {

// The kernel parameters both tiers share of a forward call (tier 1 adds the features, tier 2 its
// tensor maps).
FwdKernelParams fwd_kernel_params(const ringattn_fwd_params& p, const SchedulerArgs& sched) {
  const ringattn_problem& pr = p.problem;
  FwdKernelParams kp{};
  for (int g = 0; g < pr.num_groups; ++g) {
    const ringattn_fwd_group& src = p.groups[g];
    FwdGroupArgs& dst = kp.groups[g];
    fill_query_group(dst, src);
    RINGATTN_COPY_VIEW(dst, src, out);
    dst.softmax_lse = src.softmax_lse;
  }
  fill_keys_and_problem(kp, p);
  kp.work_items = sched.sorted;
  kp.work_count = sched.count;
  return kp;
}

// Builds the kernel parameters of a forward with block_m x block_n tiles and launches its
// work-list kernel; *num_ctas gets the forward kernel's grid: a CTA per possible tile, or
// `persistent_ctas` where that is positive and fewer. In the persistent case the list is longest
// first per L2 section (fwd_tile_list_sections, common/tile_order.h) and *tile_counter (required
// then) gets the counter the persistent kernel takes tiles by; else it stays nullptr.
ringattn_status launch_fwd_work_list(const ringattn_fwd_params& p, int block_m, int block_n, cudaStream_t stream,
                                     FwdKernelParams* kp, int64_t* num_ctas, int persistent_ctas = 0,
                                     int32_t** tile_counter = nullptr) {
  const ringattn_problem& pr = p.problem;
  const int64_t capacity = query_tile_capacity(p, block_m);
  *num_ctas = capacity * pr.num_heads_q;
  if (*num_ctas > INT32_MAX)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "total_q: %lld query tiles x %d heads exceed the grid limit of %d CTAs",
                 static_cast<long long>(capacity), pr.num_heads_q, INT32_MAX);
  const bool persistent = persistent_ctas > 0 && *num_ctas > persistent_ctas;
  SchedulerArgs sched = query_tile_scheduler(p, block_m, block_n, capacity, p.workspace);
  if (persistent) sched.sections = fwd_tile_list_sections(pr, p.exec.device_index, block_m, block_n);
  *kp = fwd_kernel_params(p, sched);
  kp->tile_head_run = tile_head_run(pr, p.exec.device_index, capacity);
  const cudaError_t err = launch_build_work_list(sched, stream);
  if (err != cudaSuccess) return cuda_fail(err, "launching the work-list kernel");
  if (persistent) {
    *num_ctas = persistent_ctas;
    *tile_counter = sched.count + 1;  // zeroed by the work-list kernel
  }
  return RINGATTN_STATUS_OK;
}

#ifdef RINGATTN_SM90_TIER
// Tensor maps of a tier-2 forward call; false (with the reason) when TMA cannot address an operand.
bool encode_fwd_tensor_maps(const ringattn_fwd_params& p, const Sm90FwdKernelEntry& e, sm90::FwdKernelParams* kp,
                            std::string* why) {
  const ringattn_problem& pr = p.problem;
  for (int g = 0; g < pr.num_groups; ++g) {
    const ringattn_fwd_group& src = p.groups[g];
    if (src.total_q == 0) continue;  // no tiles read this map
    if (!sm90::encode_operand_map(&kp->tma_q[g], "q", g, src.q, pr, src.total_q, pr.num_heads_q, src.q_row_stride,
                                  src.q_head_stride, e.block_m, why))
      return false;
  }
  return sm90::encode_kv_maps(p.kv, pr, e.block_n, &kp->tma_k, &kp->tma_v, why);
}

// The persistent kernel's O maps (sm90/fwd_params.h: tma_o), boxes of 64 rows (one consumer
// warpgroup's). A group whose output TMA cannot address keeps the kernel's per-thread stores (its
// bit of tma_o_groups stays clear): a slower path, not an error.
void encode_fwd_output_maps(const ringattn_fwd_params& p, sm90::FwdKernelParams* kp) {
  const ringattn_problem& pr = p.problem;
  std::string ignored;
  kp->tma_o_groups = 0;
  for (int g = 0; g < pr.num_groups; ++g) {
    const ringattn_fwd_group& dst = p.groups[g];
    if (dst.total_q == 0) continue;
    if (sm90::encode_operand_map(&kp->tma_o[g], "out", g, dst.out, pr, dst.total_q, pr.num_heads_q,
                                 dst.out_row_stride, dst.out_head_stride, /*box_rows=*/64, &ignored))
      kp->tma_o_groups |= 1u << g;
  }
}

// The forward on tier 2.
ringattn_status run_sm90_fwd(const ringattn_fwd_params& p, const Sm90FwdKernelEntry& e, cudaStream_t stream) {
  sm90::FwdKernelParams kp{};
  // Every operand the API accepts on a GPU is TMA-addressable (16-byte aligned, strides in
  // multiples of 8 elements), so a refused tensor map is an error, not a reason to run tier 1.
  std::string why;
  if (!encode_fwd_tensor_maps(p, e, &kp, &why))
    return failf(RINGATTN_STATUS_CUDA_ERROR, "tier 2 forward: encoding a TMA tensor map failed: %s", why.c_str());
  // The persistent kernel where tiles are short, their fixed cost then a large share, and there
  // are more tiles than SMs: one CTA per SM (its registers allow no second), each taking tiles from
  // the list until none is left (sm90/fwd_kernel.cuh); the kernel knows it by the tile counter.
  // Short: a tile's rows see at most kPersistentFwdMaxTileKeys = 33 blocks of 128 keys together
  // (max_seqlen_k, a hint, or the window's span plus the tile's rows); fwd_grid_choice.h has the
  // H200 measurements behind that number. Longer tiles keep the one-CTA-per-tile kernel. Its list
  // is longest first per L2 section of sequences (fwd_tile_list_sections: causal and window calls),
  // so the tiles of one sequence, whose costs differ, run close enough to share its K/V in L2.
  const ringattn_problem& pr = p.problem;
  const MaskWindow window = call_window(pr);  // causal as a right side of 0
  int sms = 0;
  if (fwd_tiles_are_short(pr.max_seqlen_k, window, e.block_m) && sm90::has_persistent_fwd(pr.head_dim))
    sms = device_sm_count(p.exec.device_index);
  int64_t num_ctas = 0;
  int32_t* tile_counter = nullptr;  // set where the grid is persistent
  const ringattn_status s =
      launch_fwd_work_list(p, e.block_m, e.block_n, stream, &kp.base, &num_ctas, sms, &tile_counter);
  if (s != RINGATTN_STATUS_OK) return s;
  fill_features(kp.features, p);
  if (tile_counter != nullptr) {
    kp.tile_counter = tile_counter;
    encode_fwd_output_maps(p, &kp);
  }
  const cudaError_t err = e.launch(kp, static_cast<int>(num_ctas), stream);
  if (err != cudaSuccess) return cuda_fail(err, "launching the grouped forward kernel (tier 2, sm90a)");
  return RINGATTN_STATUS_OK;
}
#endif

}  // namespace

ringattn_status grouped_fwd(const ringattn_fwd_params& p) {
  const ringattn_problem& pr = p.problem;
  ringattn_status s = check_support(p.exec.device_index, pr.dtype, pr.head_dim);
  if (s != RINGATTN_STATUS_OK) return s;
  DeviceGuard guard(p.exec.device_index);
  if (guard.error() != cudaSuccess) return cuda_fail(guard.error(), "cudaSetDevice");
  cudaStream_t stream = static_cast<cudaStream_t>(p.exec.stream);

  Tier2Kernel<ringattn_fwd_params> e90 = nullptr;
  if ((s = choose_call_tier(p, "this call", &e90)) != RINGATTN_STATUS_OK) return s;
#ifdef RINGATTN_SM90_TIER
  if (e90 != nullptr) return run_sm90_fwd(p, *e90, stream);
#endif

  const Sm80FwdKernelEntry* e = sm80_fwd_kernel_or_fail(p);
  if (e == nullptr) return RINGATTN_STATUS_UNSUPPORTED;
  sm80::FwdKernelParams kp{};
  int64_t num_ctas = 0;
  if ((s = launch_fwd_work_list(p, e->block_m, e->block_n, stream, &kp, &num_ctas)) != RINGATTN_STATUS_OK) return s;
  fill_features(kp.features, p);
  const cudaError_t err = e->launch(kp, static_cast<int>(num_ctas), stream);
  if (err != cudaSuccess) return cuda_fail(err, "launching the grouped forward kernel");
  return RINGATTN_STATUS_OK;
}

}  // namespace cuda
}  // namespace ringattn
