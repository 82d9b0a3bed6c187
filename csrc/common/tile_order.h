// The order in which the query-tile kernels (forward and deterministic dQ, both GPU tiers) walk
// their longest-first work list: which (item, head) a tile index names, and how many items each
// head takes in a row. Host and device (the mapping and the choice are unit-tested on the host:
// test/cpp/test_tile_order.cpp).
//
// The list is walked in runs of `head_run` consecutive items; inside a run every head takes the
// run's items before the next head starts, and the runs follow one another in list order:
//   tile = run * (head_run * num_heads_q) + head * items_in_run + (item - run * head_run)
// (items_in_run = head_run but in the last run, which holds what is left). head_run = 1 is the
// order of one item for all heads, then the next item (tile = item * num_heads_q + head): the CTAs
// that run at once then span every head, and with long keys their K/V (every head's) no longer
// fits in L2, so each wave of CTAs reads all of it from DRAM again. A longer run keeps the CTAs in
// flight on fewer heads; the list stays longest-first at the granularity of a run.
#pragma once

#include <cstdint>

#include "common/mask.h"  // RINGATTN_HOST_DEVICE

namespace ringattn {

// (item index, head) of tile `tile` < count * num_heads_q; head_run >= 1, count >= 1.
RINGATTN_HOST_DEVICE inline void split_query_tile(unsigned tile, int count, int num_heads_q, int head_run,
                                                  int* item_index, int* head) {
  const unsigned run_tiles = static_cast<unsigned>(head_run) * static_cast<unsigned>(num_heads_q);
  const unsigned run = tile / run_tiles;
  const unsigned in_run = tile - run * run_tiles;
  const int first = static_cast<int>(run) * head_run;
  const int left = count - first;
  const unsigned items_in_run = static_cast<unsigned>(left < head_run ? left : head_run);
  const unsigned h = in_run / items_in_run;
  *head = static_cast<int>(h);
  *item_index = first + static_cast<int>(in_run - h * items_in_run);
}

// The run length for a call: long enough that the CTAs in flight (about one per SM) cover only as
// many K/V heads as fit in half the L2 (kv_bytes_per_head: one K/V head's keys and values over
// the longest sequence); 1 where every head's K/V fits already (short rows keep today's order).
inline int choose_tile_head_run(int sm_count, int64_t l2_bytes, int64_t kv_bytes_per_head, int num_heads_q,
                                int q_heads_per_kv_head, int64_t items_capacity) {
  if (sm_count <= 0 || l2_bytes <= 0 || kv_bytes_per_head <= 0 || num_heads_q <= 1 || items_capacity <= 1) return 1;
  int64_t kv_heads_fit = (l2_bytes / 2) / kv_bytes_per_head;
  if (kv_heads_fit < 1) kv_heads_fit = 1;
  const int64_t heads_fit = kv_heads_fit * (q_heads_per_kv_head > 0 ? q_heads_per_kv_head : 1);
  if (heads_fit >= num_heads_q) return 1;
  int64_t run = (sm_count + heads_fit - 1) / heads_fit;
  if (run > items_capacity) run = items_capacity;
  return run < 1 ? 1 : static_cast<int>(run);
}

}  // namespace ringattn
