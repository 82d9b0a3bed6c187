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
// flight on fewer heads; the list stays longest-first at the granularity of a run. The tier-2
// persistent forward's list may also be longest-first per L2 section of sequences
// (TileListSections below) instead of over the whole call.
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

// L2 sections of the query-tile list (the tier-2 persistent forward's). Sorting the whole list
// longest first puts every sequence's costliest tile into the first wave and its next one a whole
// pass over the batch later: with a causal mask and short sequences, the tiles of one (sequence,
// head) then have different costs and run far apart, and each one reads that head's keys and
// values from DRAM again (L=512-2048, 16 heads of 128: 2.5-7x the K/V bytes by an LRU model of the
// L2, and the H100's forward times match the DRAM's rate for those bytes). With sections, the sequences whose keys start in one run of
// `keys` key positions form a section; the list holds section after section, each longest first,
// so a sequence's tiles run within about one section's length of each other while its K/V are in
// L2, and the list still ends with the last section's cheapest tiles.
struct TileListSections {
  int32_t keys = 0;    // key positions per section, > 0; 0: no sections (one longest-first list)
  int32_t stride = 0;  // sort keys per section: the largest cost the sort tells apart, + 1
};

// The sections of a call: `keys_wanted` key positions per section (the caller sizes them from the
// L2 and the K/V bytes of one key position), at least enough that every section's sort keys fit
// the sort's `sort_buckets` (a section per run of `keys` positions over total_k keys, `stride` =
// max_tile_cost + 1 keys each), and none when one section would hold every key (nothing moves) or
// fewer than two sections fit the buckets.
inline TileListSections choose_tile_list_sections(int64_t keys_wanted, int64_t total_k, int64_t max_tile_cost,
                                                  int32_t sort_buckets) {
  const TileListSections none;
  if (keys_wanted <= 0 || total_k <= 0 || sort_buckets <= 0) return none;
  const int64_t stride = (max_tile_cost > 0 ? max_tile_cost : 0) + 1;
  const int64_t max_sections = sort_buckets / stride;
  if (max_sections < 2) return none;
  // total_k / keys + 1 sections (key starts 0 .. total_k): at most max_sections.
  const int64_t min_keys = total_k / max_sections + 1;
  const int64_t keys = keys_wanted > min_keys ? keys_wanted : min_keys;
  if (keys >= total_k) return none;
  TileListSections s;
  s.keys = static_cast<int32_t>(keys);  // < total_k <= INT32_MAX
  s.stride = static_cast<int32_t>(stride);
  return s;
}

// The sort keys (larger first) of the tiles of the sequence whose keys start at k_start
// (0 <= k_start <= total_k), made once per sequence: a tile's key is its cost without sections;
// with them, the sections in key order, each above the next, and inside one the cost (capped at
// stride - 1: a tile costlier than the call's hint said sorts as the costliest). Below
// (total_k / keys + 1) * stride with sections.
struct TileSortKey {
  int32_t base;  // the section's first key (0 without sections)
  int32_t top;   // the largest cost told apart
  RINGATTN_HOST_DEVICE TileSortKey(const TileListSections& s, int32_t k_start, int32_t total_k)
      : base(s.keys > 0 ? (total_k / s.keys - k_start / s.keys) * s.stride : 0),
        top(s.keys > 0 ? s.stride - 1 : INT32_MAX) {}
  RINGATTN_HOST_DEVICE int32_t operator()(int32_t cost) const { return base + (cost < top ? cost : top); }
};

}  // namespace ringattn
