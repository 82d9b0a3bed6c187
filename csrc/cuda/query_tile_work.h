// The query tile a CTA of a query-tile kernel owns (the forward and deterministic dQ kernels of
// both tiers), over the longest-first work list (tile_scheduler.cu), each item a (group, m_block,
// batch) with group_and_mblock = (m_block << 4) | group; the tile index names an item and a head
// as common/tile_order.h says.
#pragma once

#include <cstdint>

#include "common/tile_order.h"
#include "cuda/fwd_params.h"
#include "cuda/seqlen_info.h"

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

// The query tile of a decoded entry (QueryTileWork) in the terms a query-tile kernel uses: its
// head, group, batch index and m_block, the group's arguments, the offsets and lengths of its
// sequence (SeqLenInfo) and its rows. Params: the kernel's FwdKernelParams or BwdKernelParams;
// GroupArgs: their FwdGroupArgs or BwdGroupArgs. has_rows is false for a tile that starts at or
// after the end of its sequence (nothing to do). The order of the members' initialisation is
// that of the kernels' prologues before (and their machine code with it). The key-block range
// stays in the kernels: for kNone / kCausal their n_block_min is a const int set to the constant
// 0 (common/mask.h), which the loops use as a compile-time bound; returned by a member function it
// is no constant expression, and the machine code changed (tried: sm80 forward D=128 causal).
template <typename GroupArgs, int kBlockM>
struct QueryTile {
  int head, group, m_block, batch;
  const GroupArgs& g;  // params.groups[group]
  SeqLenInfo seq;
  int row0;  // first query row of the tile, within the sequence
  bool has_rows;

  template <typename Params>
  __device__ __forceinline__ QueryTile(const Params& params, const QueryTileWork& work)
      : head(work.head),
        group(work.group()),
        m_block(work.m_block()),
        batch(work.batch()),
        g(params.groups[group]),
        seq(g.cu_seqlens_q, g.total_q, params.cu_seqlens_k, params.total_k, g.seqused_k, batch),
        row0(m_block * kBlockM),
        has_rows(row0 < seq.seqlen_q) {}
  // Rows of the tile in the sequence (kBlockM but for the sequence's last tile); for a tile with
  // rows.
  __device__ __forceinline__ int rows_valid() const { return min(kBlockM, seq.seqlen_q - row0); }
};

}  // namespace cuda
}  // namespace ringattn
