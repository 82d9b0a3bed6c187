// The work list of the dK/dV backward kernel, built on the device (the sequence lengths live
// there; reading them on the host would synchronise).
//
// Work item = (sequence, K/V block). Every block of every sequence is an item, also blocks no
// query sees: their CTA writes dK = dV = 0. Cost = query tiles (over all groups) that see the
// block (the tiles of the rows [row_begin, row_end) of the mask policy, as the dK/dV kernels'
// query-tile cursor walks them); items are sorted by cost, largest first (for causal, the first blocks of the longest
// sequences start in the first wave).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cuda/bwd_params.h"
#include "common/mask.h"
#include "ringattn/ringattn.h"

namespace ringattn {
namespace cuda {

struct BwdSchedulerArgs {
  const int32_t* cu_seqlens_q[RINGATTN_MAX_GROUPS];
  const int32_t* seqused_k[RINGATTN_MAX_GROUPS];
  // Per group, the diagonal shift of each sequence ([B]) or nullptr (0); nullptr when the window
  // bounds no side.
  const int32_t* diagonal_shift[RINGATTN_MAX_GROUPS];
  int32_t total_q[RINGATTN_MAX_GROUPS];
  const int32_t* cu_seqlens_k;
  int32_t total_k;
  int32_t num_groups;
  int32_t batch_size;
  int32_t block_m;  // query rows per inner step of the dK/dV kernel (cost unit)
  int32_t block_n;  // keys per item
  MaskWindow window;  // the kernels' mask (common/mask.h): (-1, -1) none, (-1, 0) causal
  int32_t capacity;  // upper bound on the number of items (host-computed)
  uint32_t* metadata_errors;  // ringattn_exec.metadata_errors (NULL: no report)
  // workspace
  int32_t* block_offsets;    // [B + 1]
  int32_t* costs;            // [capacity]
  BwdKvWorkItem* unsorted;   // [capacity]
  BwdKvWorkItem* sorted;     // [capacity] (output)
  int32_t* count;            // [1] (output)
};

// Upper bound on the number of items: each sequence adds at most one partial block.
int64_t bwd_kv_capacity(int64_t total_k, int batch_size, int block_n);

size_t bwd_scheduler_workspace_bytes(int batch_size, int64_t capacity);
void carve_bwd_scheduler_workspace(void* workspace, int batch_size, int64_t capacity, BwdSchedulerArgs* args);

cudaError_t launch_build_bwd_work_list(const BwdSchedulerArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace ringattn
