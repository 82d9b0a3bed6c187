// The query tile a CTA of a query-tile kernel owns (the forward and deterministic dQ kernels of
// both tiers): CTA blockIdx.x = item * num_heads_q + head over the longest-first work list
// (tile_scheduler.cu), each item a (group, m_block, batch) with group_and_mblock = (m_block << 4) | group.
#pragma once

#include <cstdint>

#include "cuda/fwd_params.h"

namespace ringattn {
namespace cuda {

struct QueryTileWork {
  int head;
  WorkItem item;

  // Entry `tile` of the list, tile = item * num_heads_q + head (below the list's length times
  // num_heads_q).
  static __device__ __forceinline__ QueryTileWork at(const WorkItem* items, unsigned tile, int num_heads_q) {
    return {static_cast<int>(tile % num_heads_q), items[static_cast<int>(tile / num_heads_q)]};
  }
  // This CTA's entry (blockIdx.x); false for a CTA past the list's current length (the grid is
  // sized for its capacity).
  __device__ __forceinline__ bool decode(const WorkItem* items, const int32_t* count, int num_heads_q) {
    const int item_index = blockIdx.x / num_heads_q;
    if (item_index >= *count) return false;
    *this = at(items, blockIdx.x, num_heads_q);
    return true;
  }
  __device__ __forceinline__ int group() const { return item.group_and_mblock & 15; }
  __device__ __forceinline__ int m_block() const { return item.group_and_mblock >> 4; }
  __device__ __forceinline__ int batch() const { return item.batch; }
};

}  // namespace cuda
}  // namespace ringattn
