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
#include "cuda/work_list_inputs.h"

namespace ringattn {
namespace cuda {

// The K/V-block work list: offsets has B + 1 entries (per sequence).
using BwdSchedulerArgs = WorkListArgs<BwdKvWorkItem>;

// Upper bound on the number of items: each sequence adds at most one partial block.
int64_t bwd_kv_capacity(int64_t total_k, int batch_size, int block_n);

size_t bwd_scheduler_workspace_bytes(int batch_size, int64_t capacity);
void carve_bwd_scheduler_workspace(void* workspace, int batch_size, int64_t capacity, BwdSchedulerArgs* args);

cudaError_t launch_build_bwd_work_list(const BwdSchedulerArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace ringattn
