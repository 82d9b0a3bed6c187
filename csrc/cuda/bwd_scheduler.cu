#include "cuda/bwd_scheduler.h"

#include "common/mask.h"
#include "cuda/metadata_errors.cuh"
#include "cuda/work_list_sort.cuh"

namespace ringattn {
namespace cuda {
namespace {

using metadata_errors::CuSeqlens;
using work_list::blocks_of;
using work_list::clamp_i;
using work_list::kThreads;

constexpr size_t kWorkListAlign = 256;  // bytes, of each buffer

// Query tiles (of all groups) that see keys [n*block_n, ...) of sequence b: at most
// G * (2^31 / block_m + 1), below 2^31; summed in 64 bits all the same.
__device__ int32_t block_cost(const BwdSchedulerArgs& args, int b, int32_t n) {
  const int32_t k_start = clamp_i(args.cu_seqlens_k[b], 0, args.total_k);
  const int32_t len_k = clamp_i(args.cu_seqlens_k[b + 1], k_start, args.total_k) - k_start;
  const int64_t key0 = static_cast<int64_t>(n) * args.block_n;
  int64_t cost = 0;
  for (int g = 0; g < args.num_groups; ++g) {
    const int32_t* cu = args.cu_seqlens_q[g];
    const int32_t q_start = clamp_i(cu[b], 0, args.total_q[g]);
    const int32_t len_q = clamp_i(cu[b + 1], q_start, args.total_q[g]) - q_start;
    const int32_t used = args.seqused_k[g] != nullptr ? clamp_i(args.seqused_k[g][b], 0, len_k) : len_k;
    // Rows [row_begin, row_end) of the block's keys (common/mask.h, 64-bit); their query tiles are
    // the ones the dK/dV kernels' cursor walks (query_tile_cursor.h).
    const int32_t* shifts = args.diagonal_shift[g];
    const MaskPolicy<MaskWindow, int64_t> mask(len_q, used, args.window, shifts != nullptr ? shifts[b] : 0);
    cost += work_list::key_block_tiles(mask, key0, args.block_n, args.block_m);
  }
  return cost < INT32_MAX ? static_cast<int32_t>(cost) : INT32_MAX;
}

__global__ void __launch_bounds__(kThreads) build_bwd_work_list_kernel(const __grid_constant__ BwdSchedulerArgs args) {
  __shared__ int64_t scan[kThreads];
  const int B = args.batch_size;

  // 1. K/V blocks per sequence, exclusive prefix sums into block_offsets (64-bit sums, saturated
  // at the capacity: malformed, overlapping sequences may add up past INT32_MAX).
  const int64_t blocks_total = work_list::block_exclusive_offsets(
      B,
      [&](int64_t b) {
        const int32_t start = clamp_i(args.cu_seqlens_k[b], 0, args.total_k);
        const int32_t end = clamp_i(args.cu_seqlens_k[b + 1], start, args.total_k);
        return blocks_of(end - start, args.block_n);
      },
      args.offsets, args.capacity, scan);
  const int32_t total_items = work_list::saturated_offset(blocks_total, args.capacity);
  __syncthreads();

  // 2. one item per block, with its cost. Item i belongs to the last sequence whose offset is
  // <= i (binary search; empty sequences share offsets; saturated offsets are past every item).
  const int32_t* offsets = args.offsets;
  for (int64_t item = threadIdx.x; item < total_items; item += kThreads) {
    const int32_t i = static_cast<int32_t>(item);
    const int32_t b = work_list::last_at_or_below([offsets](int32_t s) { return offsets[s]; }, B, i);
    const int32_t n = i - offsets[b];
    args.unsorted[i] = BwdKvWorkItem{n, b};
    args.costs[i] = block_cost(args, b, n);
  }
  // The metadata values of every (group, sequence) (block_cost reads those of sequences with a
  // K/V block): malformed ones are reported (metadata_errors.cuh); the costs clamp them.
  uint32_t errors = 0;
  const int64_t pairs = static_cast<int64_t>(args.num_groups) * B;  // past INT32_MAX for B past 2^27
  for (int64_t p = threadIdx.x; p < pairs; p += kThreads) {
    const int g = static_cast<int>(p / B);
    const int b = static_cast<int>(p % B);
    const int32_t* cu = args.cu_seqlens_q[g];
    const int32_t cu_k_b = args.cu_seqlens_k[b], cu_k_next = args.cu_seqlens_k[b + 1];
    errors |= metadata_errors::cu_seqlens_pair<CuSeqlens::kQuery>(cu[b], cu[b + 1], b, B, args.total_q[g]) |
              metadata_errors::cu_seqlens_pair<CuSeqlens::kKey>(cu_k_b, cu_k_next, b, B, args.total_k);
    if (args.seqused_k[g] != nullptr) errors |= metadata_errors::seqused_k_entry(args.seqused_k[g][b], cu_k_b, cu_k_next);
  }
  metadata_errors::report(args.metadata_errors, errors);
  __syncthreads();

  // 3. longest first (the order only affects scheduling, never results: every (block, KV head)
  // has exactly one CTA whichever slot it lands in).
  work_list::sort_by_cost_desc(args.unsorted, args.costs, total_items, args.sorted);
  if (threadIdx.x == 0) *args.count = total_items;
}

}  // namespace

int64_t bwd_kv_capacity(int64_t total_k, int batch_size, int block_n) {
  return (total_k + block_n - 1) / block_n + batch_size;
}

size_t bwd_scheduler_workspace_bytes(int batch_size, int64_t capacity) {
  return work_list_bytes<BwdKvWorkItem>(static_cast<size_t>(batch_size) + 1, static_cast<size_t>(capacity),
                                        kWorkListAlign);
}

void carve_bwd_scheduler_workspace(void* workspace, int batch_size, int64_t capacity, BwdSchedulerArgs* args) {
  carve_work_list<BwdKvWorkItem>(workspace, static_cast<size_t>(batch_size) + 1, static_cast<size_t>(capacity),
                                 kWorkListAlign, args);
}

cudaError_t launch_build_bwd_work_list(const BwdSchedulerArgs& args, cudaStream_t stream) {
  build_bwd_work_list_kernel<<<1, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ringattn
