// The workspace of the CUDA backend's calls: the query-tile work list (the forward kernel's, and
// the backward dQ kernel's) and where everything of a backward call lives. Sized for tier 1's
// tiles, which tier 2's are not smaller than, so either tier fits the same workspace.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda/kernel_registry.h"
#include "cuda/tile_scheduler.h"
#include "cuda/work_list_math.h"
#include "ringattn/ringattn.h"

namespace ringattn {
namespace cuda {

// Upper bound on the query-tile work items of a forward or backward call's groups.
template <typename Params>
int64_t query_tile_capacity(const Params& p, int block_m) {
  int64_t total_q[RINGATTN_MAX_GROUPS];  // num_groups <= RINGATTN_MAX_GROUPS (validated)
  for (int g = 0; g < p.problem.num_groups; ++g) total_q[g] = p.groups[g].total_q;
  return work_capacity(total_q, p.problem.num_groups, p.problem.batch_size, block_m);
}

// What a work list (SchedulerArgs, BwdSchedulerArgs) takes from a forward or backward call: its
// groups' sequence metadata, its mask (window and diagonal shifts: every kernel variant applies
// the call's), the kernel's block sizes and the item capacity (the workspace pointers are carved
// separately).
template <typename Params>
void set_work_list_args(const Params& p, int block_m, int block_n, int64_t capacity, WorkListInputs* args) {
  const ringattn_problem& pr = p.problem;
  for (int g = 0; g < pr.num_groups; ++g) {
    args->cu_seqlens_q[g] = p.groups[g].cu_seqlens_q;
    args->seqused_k[g] = p.groups[g].seqused_k;
    args->diagonal_shift[g] = call_diagonal_shift(p, g);
    args->total_q[g] = static_cast<int32_t>(p.groups[g].total_q);
  }
  args->cu_seqlens_k = pr.cu_seqlens_k;
  args->total_k = static_cast<int32_t>(pr.total_k);
  args->num_groups = pr.num_groups;
  args->batch_size = pr.batch_size;
  args->block_m = block_m;
  args->block_n = block_n;
  args->window = call_window(pr);
  // Callers refuse a grid past INT32_MAX CTAs first (capacity x heads), so this saturation never
  // bites; it replaces a truncating cast.
  args->capacity = work_list::capacity_i32(capacity);
  args->metadata_errors = p.exec.metadata_errors;
}

// The query-tile work list's arguments (forward kernel, and the backward's dQ kernel) for the
// groups of a forward or backward call, carved out of `workspace`.
template <typename Params>
SchedulerArgs query_tile_scheduler(const Params& p, int block_m, int block_n, int64_t capacity, void* workspace) {
  SchedulerArgs sched{};
  set_work_list_args(p, block_m, block_n, capacity, &sched);
  carve_scheduler_workspace(workspace, p.problem.num_groups, p.problem.batch_size, capacity, &sched);
  return sched;
}

// Where everything of one backward call lives in its workspace (byte offsets, 256-aligned).
struct BwdWorkspaceLayout {
  size_t lse_log2[RINGATTN_MAX_GROUPS];  // [Hq, stat_row_stride] fp32 (bwd_params.h: BwdGroupWorkspace)
  size_t di[RINGATTN_MAX_GROUPS];        // [Hq, stat_row_stride] fp32, right after lse_log2's rows
  size_t dq_accum[RINGATTN_MAX_GROUPS];  // [total_q, Hq, D] fp32
  size_t kv_scheduler;                   // dK/dV work list
  size_t q_scheduler;                    // deterministic dQ work list (the forward's)
  size_t total;
  int64_t kv_capacity;
  int64_t q_capacity;  // 0 unless the dQ kernel runs
};

// Whether dQ goes through the separate dQ kernel (plain stores, fixed order) on tier 1, instead of
// fp32 atomics from the dK/dV kernel.
bool use_dq_kernel(const ringattn_bwd_params& p);

// The workspace layout of a backward call whose tier-1 kernels are `e`.
BwdWorkspaceLayout bwd_layout(const ringattn_bwd_params& p, const Sm80BwdKernelEntry& e);

// The tier-1 forward / backward kernels of a call: every call has them (they size the workspace;
// the backward's pre/postprocess run on both tiers). nullptr, with RINGATTN_STATUS_UNSUPPORTED
// reported, when none is compiled for the call's dtype, head dim and variant (kernel_variant).
const Sm80FwdKernelEntry* sm80_fwd_kernel_or_fail(const ringattn_fwd_params& p);
const Sm80BwdKernelEntry* sm80_bwd_kernel_or_fail(const ringattn_bwd_params& p);

}  // namespace cuda
}  // namespace ringattn
