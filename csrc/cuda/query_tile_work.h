// The query tile a CTA of a query-tile kernel owns (the forward and deterministic dQ kernels of
// both tiers), over the longest-first work list (tile_scheduler.cu), each item a (group, m_block,
// batch) with group_and_mblock = (m_block << 4) | group; the tile index names an item and a head
// as common/tile_order.h says.
#pragma once

#include <cstdint>

#include "common/tile_order.h"
#include "cuda/fwd_params.h"

namespace ringattn {
namespace cuda {

struct QueryTileWork {
  int head;
  WorkItem item;

  // Entry `tile` of a list of `count` items (tile below count * num_heads_q).
  static __device__ __forceinline__ QueryTileWork at(const WorkItem* items, unsigned tile, int count, int num_heads_q,
                                                     int head_run) {
    int item_index = 0, head = 0;
    split_query_tile(tile, count, num_heads_q, head_run, &item_index, &head);
    return {head, items[item_index]};
  }
  // This CTA's entry (blockIdx.x); false for a CTA past the list's current length (the grid is
  // sized for its capacity).
  __device__ __forceinline__ bool decode(const WorkItem* items, const int32_t* count_ptr, int num_heads_q,
                                         int head_run) {
    const int count = *count_ptr;
    if (blockIdx.x >= static_cast<unsigned>(count) * static_cast<unsigned>(num_heads_q)) return false;
    *this = at(items, blockIdx.x, count, num_heads_q, head_run);
    return true;
  }
  __device__ __forceinline__ int group() const { return item.group_and_mblock & 15; }
  __device__ __forceinline__ int m_block() const { return item.group_and_mblock >> 4; }
  __device__ __forceinline__ int batch() const { return item.batch; }
};

}  // namespace cuda
}  // namespace ringattn
