// Workspace sizing of the CUDA backend (ringattn_*_workspace_size) and the backward's layout.
#include <cstddef>

#include "common/backends.h"
#include "common/error.h"
#include "cuda/bwd_params.h"
#include "cuda/bwd_scheduler.h"
#include "cuda/kernel_registry.h"
#include "cuda/tile_scheduler.h"
#include "cuda/workspace.h"

namespace ringattn {
namespace cuda {
namespace {

size_t align256(size_t x) { return (x + 255) & ~size_t{255}; }

}  // namespace

const Sm80FwdKernelEntry* sm80_fwd_kernel_or_fail(const ringattn_fwd_params& p) {
  const ringattn_problem& pr = p.problem;
  const KernelVariant v = kernel_variant(p, /*forward=*/true);
  const Sm80FwdKernelEntry* e = find_sm80_fwd_kernel(pr.dtype, pr.head_dim, v);
  if (e == nullptr)
    failf(RINGATTN_STATUS_UNSUPPORTED, "no GPU forward kernel compiled for dtype %d, head_dim %d, mask mode %d, softcap %d",
          pr.dtype, pr.head_dim, static_cast<int>(v.mask), v.softcap ? 1 : 0);
  return e;
}

const Sm80BwdKernelEntry* sm80_bwd_kernel_or_fail(const ringattn_bwd_params& p) {
  const ringattn_problem& pr = p.problem;
  const KernelVariant v = kernel_variant(p, /*forward=*/false);
  const Sm80BwdKernelEntry* e = find_sm80_bwd_kernel(pr.dtype, pr.head_dim, v);
  if (e == nullptr)
    failf(RINGATTN_STATUS_UNSUPPORTED,
          "no GPU backward kernel compiled for dtype %d, head_dim %d, mask mode %d, softcap %d", pr.dtype, pr.head_dim,
          static_cast<int>(v.mask), v.softcap ? 1 : 0);
  return e;
}

// Always in deterministic mode; also the default at head dim 128, where it measured as fast or
// faster on an H100 (zigzag rank 0, L=65536, N=8: 56.0 vs 61.8 ms for the fused call; L=16384,
// N=2: 14.4 vs 14.6 ms) while the atomics win at 64 and 256 (docs/perf-log.md).
bool use_dq_kernel(const ringattn_bwd_params& p) { return p.deterministic != 0 || p.problem.head_dim == 128; }

BwdWorkspaceLayout bwd_layout(const ringattn_bwd_params& p, const Sm80BwdKernelEntry& e) {
  const ringattn_problem& pr = p.problem;
  BwdWorkspaceLayout l{};
  size_t at = 0;
  for (int g = 0; g < pr.num_groups; ++g) {
    const size_t rows = static_cast<size_t>(p.groups[g].total_q) * static_cast<size_t>(pr.num_heads_q);
    // LSE and Di rows padded to bwd_stat_row_stride, Di's right after LSE's (one array, bwd_params.h).
    const size_t stat_elems = static_cast<size_t>(bwd_stat_row_stride(p.groups[g].total_q)) * pr.num_heads_q;
    l.lse_log2[g] = at;
    l.di[g] = at + stat_elems * sizeof(float);
    at += align256(2 * stat_elems * sizeof(float));
    l.dq_accum[g] = at;
    at += align256(rows * static_cast<size_t>(pr.head_dim) * sizeof(float));
  }
  l.kv_capacity = bwd_kv_capacity(pr.total_k, pr.batch_size, e.block_n);
  l.kv_scheduler = at;
  at += align256(bwd_scheduler_workspace_bytes(pr.batch_size, l.kv_capacity));
  l.q_scheduler = at;
  if (use_dq_kernel(p)) {
    l.q_capacity = query_tile_capacity(p, e.dq_block_m);
    at += align256(scheduler_workspace_bytes(pr.num_groups, pr.batch_size, l.q_capacity));
  }
  l.total = at;
  return l;
}

ringattn_status fwd_workspace_size(const ringattn_fwd_params& p, size_t* bytes) {
  const Sm80FwdKernelEntry* e = sm80_fwd_kernel_or_fail(p);
  if (e == nullptr) return RINGATTN_STATUS_UNSUPPORTED;
  int block_m = e->block_m;
#ifdef RINGATTN_SM90_TIER
  // Either tier may run the call: size the work list for the smaller query tile.
  if (const Sm90FwdKernelEntry* e90 =
          find_sm90_fwd_kernel(p.problem.dtype, p.problem.head_dim, kernel_variant(p, /*forward=*/true)))
    block_m = e90->block_m < block_m ? e90->block_m : block_m;
#endif
  *bytes = scheduler_workspace_bytes(p.problem.num_groups, p.problem.batch_size, query_tile_capacity(p, block_m));
  return RINGATTN_STATUS_OK;
}

ringattn_status bwd_workspace_size(const ringattn_bwd_params& p, size_t* bytes) {
  const Sm80BwdKernelEntry* e = sm80_bwd_kernel_or_fail(p);
  if (e == nullptr) return RINGATTN_STATUS_UNSUPPORTED;
  *bytes = bwd_layout(p, *e).total;
  return RINGATTN_STATUS_OK;
}

}  // namespace cuda
}  // namespace ringattn
