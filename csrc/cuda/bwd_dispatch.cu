// Backward dispatch of the CUDA backend. A call is planned in full before anything is launched,
// so that a refused argument or tensor map writes nothing:
//   plan_bwd_workspace    tier 1's kernels (they size the workspace), the layout, the grid limits
//   build_bwd_params      the pre/postprocess and kernel parameters
//   choose_bwd_kernels    the tier (choose_call_tier, as the forward) and tier 2's kernels
//   build_bwd_work_lists  the dK/dV work list, and the dQ kernel's, for the chosen kernels' blocks
//   encode_bwd_maps       tier 2's TMA tensor maps
//   launch_bwd            the launches, in the order bwd_params.h lists
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "common/backends.h"
#include "common/error.h"
#include "cuda/bwd_params.h"
#include "cuda/bwd_scheduler.h"
#include "cuda/device_support.h"
#include "cuda/kernel_params_fill.h"
#include "cuda/kernel_registry.h"
#include "cuda/tile_scheduler.h"
#include "cuda/workspace.h"
#ifdef RINGATTN_SM90_TIER
#include "cuda/sm80/bwd_traits.h"
#include "cuda/sm90/bwd_dq_traits.h"
#include "cuda/sm90/bwd_params.h"
#include "cuda/sm90/bwd_traits.h"
#include "cuda/sm90/tma_host.h"
#endif

namespace ringattn {
namespace cuda {
namespace {

// Everything one backward call launches.
struct BwdPlan {
  const Sm80BwdKernelEntry* e = nullptr;  // tier 1's kernels; the pre/postprocess of both tiers
  BwdWorkspaceLayout layout{};
  BwdPrepParams prep{};
  sm80::BwdKernelParams kp{};  // tier 2's kernels take its shared part (kp90.base)
  bool dq_kernel = false;       // dQ through a dQ kernel (else from the dK/dV kernel: atomics, TMA reduce-add)
  BwdSchedulerArgs kv_sched{};  // the dK/dV kernel's work list
  SchedulerArgs q_sched{};      // the dQ kernel's, when it runs
  int64_t dkdv_ctas = 0;
  int64_t dq_ctas = 0;
#ifdef RINGATTN_SM90_TIER
  const Sm90BwdKernelEntry* e90 = nullptr;       // tier 2's dK/dV kernel when tier 2 runs
  const Sm90BwdDqKernelEntry* e90_dq = nullptr;  // and its dQ kernel in deterministic mode
  sm90::BwdKernelParams kp90{};
  sm90::BwdDqKernelParams kp90_dq{};
#endif
};

ringattn_status plan_bwd_workspace(const ringattn_bwd_params& p, BwdPlan* plan) {
  const ringattn_problem& pr = p.problem;
  plan->e = sm80_bwd_kernel_or_fail(p);
  if (plan->e == nullptr) return RINGATTN_STATUS_UNSUPPORTED;
  plan->layout = bwd_layout(p, *plan->e);
  const BwdWorkspaceLayout& layout = plan->layout;
  // Tier 2's kernels have no more CTAs than tier 1's (their blocks are not smaller).
  const int64_t kv_ctas = layout.kv_capacity * pr.num_heads_k;
  const int64_t q_ctas = layout.q_capacity * pr.num_heads_q;
  if (kv_ctas > INT32_MAX || q_ctas > INT32_MAX)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                 "total_k / total_q: %lld key blocks x %d KV heads or %lld query tiles x %d heads exceed the grid "
                 "limit of %d CTAs",
                 static_cast<long long>(layout.kv_capacity), pr.num_heads_k, static_cast<long long>(layout.q_capacity),
                 pr.num_heads_q, INT32_MAX);
  if (reinterpret_cast<uintptr_t>(p.workspace) % 16 != 0)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "workspace: expected a 16-byte aligned pointer, got %p",
                 p.workspace);
  return RINGATTN_STATUS_OK;
}

ringattn_status check_bwd_shared_memory(const ringattn_bwd_params& p, const Sm80BwdKernelEntry& e) {
  int max_smem = 0;
  const cudaError_t err =
      cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, p.exec.device_index);
  if (err != cudaSuccess) return cuda_fail(err, "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  if (max_smem < e.smem_bytes)
    return failf(RINGATTN_STATUS_UNSUPPORTED,
                 "the GPU backward kernel for head_dim %d needs %d bytes of shared memory per block; GPU %d allows %d",
                 p.problem.head_dim, e.smem_bytes, p.exec.device_index, max_smem);
  return RINGATTN_STATUS_OK;
}

// The pre/postprocess parameters and the tier-1 kernel parameters, whose per-group workspace
// (LSE in log2 units, Di, dq_accum) the layout places; the work lists come later.
void build_bwd_params(const ringattn_bwd_params& p, BwdPlan* plan) {
  const ringattn_problem& pr = p.problem;
  char* ws = static_cast<char*>(p.workspace);

  BwdPrepParams& prep = plan->prep;
  for (int g = 0; g < pr.num_groups; ++g) {
    const ringattn_bwd_group& src = p.groups[g];
    BwdPrepGroupArgs& dst = prep.groups[g];
    RINGATTN_COPY_VIEW(dst, src, out);
    RINGATTN_COPY_VIEW(dst, src, dout);
    RINGATTN_COPY_VIEW(dst, src, dq);
    dst.lse = src.softmax_lse;
    dst.ws.lse_log2 = reinterpret_cast<float*>(ws + plan->layout.lse_log2[g]);
    dst.ws.di = reinterpret_cast<float*>(ws + plan->layout.di[g]);
    dst.ws.dq_accum = reinterpret_cast<float*>(ws + plan->layout.dq_accum[g]);
    dst.total_q = static_cast<int32_t>(src.total_q);
  }
  fill_key_grads(prep, p);
  fill_problem_sizes(prep, pr);
  prep.num_heads_k = pr.num_heads_k;
  prep.head_dim = pr.head_dim;

  sm80::BwdKernelParams& kp = plan->kp;
  for (int g = 0; g < pr.num_groups; ++g) {
    const ringattn_bwd_group& src = p.groups[g];
    BwdGroupArgs& dst = kp.groups[g];
    fill_query_group(dst, src);
    RINGATTN_COPY_VIEW(dst, src, dout);
    dst.lse_log2 = prep.groups[g].ws.lse_log2;
    dst.di = prep.groups[g].ws.di;
    dst.dq_accum = prep.groups[g].ws.dq_accum;
  }
  fill_keys_and_problem(kp, p);
  fill_key_grads(kp, p);
  fill_features(kp.features, p);
  kp.num_heads_k = pr.num_heads_k;
  plan->dq_kernel = use_dq_kernel(p);
}

// The tier (see ringattn_tier) and, on tier 2, its dK/dV kernel and (deterministic mode) dQ
// kernel. Tier 2 computes dQ with a TMA reduce-add from the dK/dV kernel unless deterministic.
ringattn_status choose_bwd_kernels(const ringattn_bwd_params& p, BwdPlan* plan) {
  Tier2Kernel<ringattn_bwd_params> e90 = nullptr;
  const ringattn_status s = choose_call_tier(p, "this backward", &e90);
  if (s != RINGATTN_STATUS_OK) return s;
#ifdef RINGATTN_SM90_TIER
  if (e90 != nullptr) {
    const ringattn_problem& pr = p.problem;
    plan->e90 = e90;
    plan->dq_kernel = p.deterministic != 0;
    if (p.deterministic != 0) {
      plan->e90_dq = find_sm90_bwd_dq_kernel(pr.dtype, pr.head_dim, kernel_variant(p, /*forward=*/false));
      if (plan->e90_dq == nullptr)
        return failf(RINGATTN_STATUS_UNSUPPORTED, "tier 2 backward: no deterministic dQ kernel compiled for head_dim %d",
                     pr.head_dim);
    }
  }
#else
  (void)plan;
#endif
  return RINGATTN_STATUS_OK;
}

#ifdef RINGATTN_SM90_TIER
// Whether tier 2's backward tiles at head dim kHeadDim are not smaller than tier 1's: its dK/dV
// kernel's K/V blocks and its dQ kernel's query tiles (the work lists are sized for tier 1's).
template <int kHeadDim>
constexpr bool tier2_bwd_tiles_fit() {
  return sm90::BwdConfig<__half, kHeadDim>::Traits::kBlockN >= sm80::BwdConfig<__half, kHeadDim>::Traits::kBlockN &&
         sm90::BwdDqConfig<__half, kHeadDim>::Traits::kBlockM >= sm80::BwdConfig<__half, kHeadDim>::DqTraits::kBlockM;
}
#endif

// The work lists, carved out of the workspace (bwd_layout sized them for tier 1's blocks; tier 2's
// are not smaller, so its shorter lists fit).
void build_bwd_work_lists(const ringattn_bwd_params& p, BwdPlan* plan) {
  const ringattn_problem& pr = p.problem;
  char* ws = static_cast<char*>(p.workspace);
  const Sm80BwdKernelEntry& e = *plan->e;
  int block_m = e.block_m, block_n = e.block_n;
  int64_t kv_capacity = plan->layout.kv_capacity;
  int dq_block_m = e.dq_block_m, dq_block_n = e.dq_block_n;
  int64_t dq_capacity = plan->layout.q_capacity;
#ifdef RINGATTN_SM90_TIER
  static_assert(tier2_bwd_tiles_fit<64>() && tier2_bwd_tiles_fit<128>() && tier2_bwd_tiles_fit<256>(),
                "tier 2's K/V blocks and dQ query tiles fit the work lists sized for tier 1's");
  if (plan->e90 != nullptr) {
    block_m = plan->e90->block_m;
    block_n = plan->e90->block_n;
    kv_capacity = bwd_kv_capacity(pr.total_k, pr.batch_size, block_n);
  }
  if (plan->e90_dq != nullptr) {
    dq_block_m = plan->e90_dq->block_m;
    dq_block_n = plan->e90_dq->block_n;
    dq_capacity = query_tile_capacity(p, dq_block_m);
  }
#endif

  BwdSchedulerArgs& kv = plan->kv_sched;
  set_work_list_args(p, block_m, block_n, kv_capacity, &kv);
  carve_bwd_scheduler_workspace(ws + plan->layout.kv_scheduler, pr.batch_size, kv_capacity, &kv);
  plan->dkdv_ctas = kv_capacity * pr.num_heads_k;
  plan->kp.accumulate_dq = plan->dq_kernel ? 0 : 1;
  plan->kp.kv_items = kv.sorted;
  plan->kp.kv_count = kv.count;
  int64_t q_rows = 0;  // the query rows one K/V block can see: every group's, over its longest sequence
  for (int g = 0; g < pr.num_groups; ++g)
    q_rows += p.groups[g].max_seqlen_q > 0 ? p.groups[g].max_seqlen_q : p.groups[g].total_q;
  plan->kp.kv_tile_head_run = kv_block_head_run(pr, q_rows, p.exec.device_index, kv_capacity);

  if (plan->dq_kernel) {
    plan->q_sched = query_tile_scheduler(p, dq_block_m, dq_block_n, dq_capacity, ws + plan->layout.q_scheduler);
    plan->dq_ctas = dq_capacity * pr.num_heads_q;
    plan->kp.q_items = plan->q_sched.sorted;
    plan->kp.q_count = plan->q_sched.count;
    plan->kp.dq_tile_head_run = tile_head_run(pr, p.exec.device_index, dq_capacity);
  }
}

#ifdef RINGATTN_SM90_TIER
// Q, dO, K and V tensor maps of a tier-2 backward kernel (the dK/dV or the dQ kernel), with boxes
// of block_m query rows and block_n keys; false (with the reason) when TMA cannot address an operand.
bool encode_bwd_tensor_maps(const ringattn_bwd_params& p, int block_m, int block_n, sm90::BwdOperandMaps* kp,
                            std::string* why) {
  const ringattn_problem& pr = p.problem;
  for (int g = 0; g < pr.num_groups; ++g) {
    const ringattn_bwd_group& src = p.groups[g];
    if (src.total_q == 0) continue;
    if (!sm90::encode_operand_map(&kp->tma_q[g], "q", g, src.q, pr, src.total_q, pr.num_heads_q, src.q_row_stride,
                                  src.q_head_stride, block_m, why) ||
        !sm90::encode_operand_map(&kp->tma_do[g], "dout", g, src.dout, pr, src.total_q, pr.num_heads_q,
                                  src.dout_row_stride, src.dout_head_stride, block_m, why))
      return false;
  }
  return sm90::encode_kv_maps(p.kv, pr, block_n, &kp->tma_k, &kp->tma_v, why);
}
#endif

// Tier 2's tensor maps: the operands of its dK/dV kernel and of its dQ kernel, the LSE/Di rows
// the dK/dV kernel loads, and the dq_accum maps of the reduce-add; then its kernels' parameters
// (tier 1's, which are final here, and the maps). As in the forward, a refused tensor map is an
// error, not a reason to run tier 1.
ringattn_status encode_bwd_maps(const ringattn_bwd_params& p, BwdPlan* plan) {
#ifdef RINGATTN_SM90_TIER
  if (plan->e90 == nullptr) return RINGATTN_STATUS_OK;
  const ringattn_problem& pr = p.problem;
  std::string why;
  if (!encode_bwd_tensor_maps(p, plan->e90->block_m, plan->e90->block_n, &plan->kp90.maps, &why))
    return failf(RINGATTN_STATUS_CUDA_ERROR, "tier 2 backward: encoding a TMA tensor map failed: %s", why.c_str());
  if (plan->e90_dq != nullptr &&
      !encode_bwd_tensor_maps(p, plan->e90_dq->block_m, plan->e90_dq->block_n, &plan->kp90_dq.maps, &why))
    return failf(RINGATTN_STATUS_CUDA_ERROR, "tier 2 backward: encoding a TMA tensor map of the dQ kernel failed: %s",
                 why.c_str());
  for (int g = 0; g < pr.num_groups; ++g) {
    const BwdGroupArgs& kg = plan->kp.groups[g];
    if (p.groups[g].total_q > 0 &&
        !sm90::encode_rows_map(&plan->kp90.tma_stats[g], kg.lse_log2, p.groups[g].total_q, 2 * int64_t{pr.num_heads_q},
                               kg.stat_row_stride(), bwd_stat_box_cols(plan->e90->block_m), &why))
      return failf(RINGATTN_STATUS_CUDA_ERROR, "tier 2 backward: encoding the LSE/Di tensor map of group %d failed: %s",
                   g, why.c_str());
  }
  if (plan->kp.accumulate_dq) {
    for (int g = 0; g < pr.num_groups; ++g) {
      if (p.groups[g].total_q > 0 &&
          !sm90::encode_accum_map(&plan->kp90.tma_dq[g], plan->kp.groups[g].dq_accum, pr.head_dim,
                                  p.groups[g].total_q, pr.num_heads_q, plan->e90->block_m, &why))
        return failf(RINGATTN_STATUS_CUDA_ERROR,
                     "tier 2 backward: encoding the dq_accum tensor map of group %d failed: %s", g, why.c_str());
    }
  }
  plan->kp90.base = plan->kp;
  plan->kp90.features = plan->kp.features;
  plan->kp90_dq.base = plan->kp;
  plan->kp90_dq.features = plan->kp.features;
#else
  (void)p;
  (void)plan;
#endif
  return RINGATTN_STATUS_OK;
}

// The dK/dV kernel, then, when the plan has a dQ kernel, the dQ work list and the dQ kernel, of
// one tier: `launch_dkdv` and `launch_dq` launch its kernels, `tier` (" (tier 2, sm90a)" or "")
// follows the kernel's name in an error.
template <typename LaunchDkdv, typename LaunchDq>
ringattn_status launch_bwd_kernels(const BwdPlan& plan, const char* tier, LaunchDkdv&& launch_dkdv, LaunchDq&& launch_dq,
                                   cudaStream_t stream) {
  auto failed = [tier](cudaError_t err, const char* kernel) {
    const std::string what = std::string("launching the grouped backward ") + kernel + " kernel" + tier;
    return cuda_fail(err, what.c_str());
  };
  cudaError_t err;
  if ((err = launch_dkdv()) != cudaSuccess) return failed(err, "dK/dV");
  if (!plan.dq_kernel) return RINGATTN_STATUS_OK;
  if ((err = launch_build_work_list(plan.q_sched, stream)) != cudaSuccess)
    return cuda_fail(err, "launching the backward dQ work-list kernel");
  if ((err = launch_dq()) != cudaSuccess) return failed(err, "dQ");
  return RINGATTN_STATUS_OK;
}

ringattn_status launch_bwd(const BwdPlan& plan, cudaStream_t stream) {
  const Sm80BwdKernelEntry& e = *plan.e;
  const int dkdv_ctas = static_cast<int>(plan.dkdv_ctas), dq_ctas = static_cast<int>(plan.dq_ctas);
  cudaError_t err;
  if ((err = e.preprocess(plan.prep, stream)) != cudaSuccess) return cuda_fail(err, "launching the backward preprocess");
  if ((err = launch_build_bwd_work_list(plan.kv_sched, stream)) != cudaSuccess)
    return cuda_fail(err, "launching the backward work-list kernel");
  ringattn_status s;
#ifdef RINGATTN_SM90_TIER
  // Tier 2's dQ kernel runs exactly when the plan has one (choose_bwd_kernels: deterministic mode).
  if (plan.e90 != nullptr)
    s = launch_bwd_kernels(
        plan, " (tier 2, sm90a)", [&] { return plan.e90->launch(plan.kp90, dkdv_ctas, stream); },
        [&] { return plan.e90_dq->launch(plan.kp90_dq, dq_ctas, stream); }, stream);
  else
#endif
    s = launch_bwd_kernels(
        plan, "", [&] { return e.dkdv(plan.kp, dkdv_ctas, stream); }, [&] { return e.dq(plan.kp, dq_ctas, stream); },
        stream);
  if (s != RINGATTN_STATUS_OK) return s;
  if ((err = e.postprocess(plan.prep, stream)) != cudaSuccess)
    return cuda_fail(err, "launching the backward postprocess");
  return RINGATTN_STATUS_OK;
}

}  // namespace

ringattn_status grouped_bwd(const ringattn_bwd_params& p) {
  ringattn_status s = check_support(p.exec.device_index, p.problem.dtype, p.problem.head_dim);
  if (s != RINGATTN_STATUS_OK) return s;
  BwdPlan plan;
  if ((s = plan_bwd_workspace(p, &plan)) != RINGATTN_STATUS_OK) return s;
  DeviceGuard guard(p.exec.device_index);
  if (guard.error() != cudaSuccess) return cuda_fail(guard.error(), "cudaSetDevice");
  if ((s = check_bwd_shared_memory(p, *plan.e)) != RINGATTN_STATUS_OK) return s;
  build_bwd_params(p, &plan);
  if ((s = choose_bwd_kernels(p, &plan)) != RINGATTN_STATUS_OK) return s;
  build_bwd_work_lists(p, &plan);
  if ((s = encode_bwd_maps(p, &plan)) != RINGATTN_STATUS_OK) return s;
  return launch_bwd(plan, static_cast<cudaStream_t>(p.exec.stream));
}

}  // namespace cuda
}  // namespace ringattn
