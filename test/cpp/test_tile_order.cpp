// The query-tile order (csrc/common/tile_order.h): a tile index names each (item, head) of the
// list exactly once, head_run = 1 is the order of one item for all heads, runs keep list order,
// and the run-length choice keeps the K/V of the heads in flight within half the L2. The L2
// sections of the persistent forward's list: the sort keys put section before section and, inside
// one, the costlier tile first, within the sort's buckets; a causal batch's list built with them
// keeps every sequence's tiles together.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/mask.h"
#include "common/tile_order.h"
#include "cuda/work_list_math.h"

namespace {

using ringattn::choose_tile_head_run;
using ringattn::choose_tile_list_sections;
using ringattn::split_query_tile;
using ringattn::TileSortKey;
using ringattn::TileListSections;

TEST(TileOrder, EveryItemAndHeadExactlyOnce) {
  for (int count : {1, 2, 5, 31, 64, 129}) {
    for (int heads : {1, 3, 16, 32}) {
      for (int run : {1, 2, 7, 32, 33, 200}) {
        std::vector<int> seen(static_cast<size_t>(count) * heads, 0);
        int last_item_of_head0 = -1;
        for (unsigned t = 0; t < static_cast<unsigned>(count) * heads; ++t) {
          int item = -1, head = -1;
          split_query_tile(t, count, heads, run, &item, &head);
          ASSERT_GE(item, 0);
          ASSERT_LT(item, count);
          ASSERT_GE(head, 0);
          ASSERT_LT(head, heads);
          // The run of tile t: its items are those of run t / (run * heads), in list order.
          const int run_index = static_cast<int>(t / (static_cast<unsigned>(run) * heads));
          ASSERT_EQ(item / run, run_index) << "count " << count << " heads " << heads << " run " << run << " tile " << t;
          if (head == 0) {
            ASSERT_GT(item, last_item_of_head0) << "a head walks its items in list order";
            last_item_of_head0 = item;
          }
          ++seen[static_cast<size_t>(item) * heads + head];
        }
        for (size_t i = 0; i < seen.size(); ++i)
          ASSERT_EQ(seen[i], 1) << "count " << count << " heads " << heads << " run " << run << " pair " << i;
      }
    }
  }
}

TEST(TileOrder, RunOfOneIsItemMajorHeadMinor) {
  const int count = 9, heads = 5;
  for (unsigned t = 0; t < count * heads; ++t) {
    int item = -1, head = -1;
    split_query_tile(t, count, heads, 1, &item, &head);
    EXPECT_EQ(item, static_cast<int>(t / heads));
    EXPECT_EQ(head, static_cast<int>(t % heads));
  }
}

TEST(TileOrder, RunHoldsOneHeadsItemsBeforeTheNextHead) {
  // count 10, run 4: runs {0..3}, {4..7}, {8, 9}; two heads.
  const int expected[][2] = {{0, 0}, {1, 0}, {2, 0}, {3, 0}, {0, 1}, {1, 1}, {2, 1}, {3, 1},
                             {4, 0}, {5, 0}, {6, 0}, {7, 0}, {4, 1}, {5, 1}, {6, 1}, {7, 1},
                             {8, 0}, {9, 0}, {8, 1}, {9, 1}};
  for (unsigned t = 0; t < 20; ++t) {
    int item = -1, head = -1;
    split_query_tile(t, 10, 2, 4, &item, &head);
    EXPECT_EQ(item, expected[t][0]) << "tile " << t;
    EXPECT_EQ(head, expected[t][1]) << "tile " << t;
  }
}

TEST(TileOrder, ChoiceKeepsHeadsInFlightWithinHalfTheL2) {
  const int64_t mib = 1 << 20;
  // H100: 132 SMs, 50 MiB L2. 16K keys, D = 128, bf16: 8 MiB of K/V per head; 3 heads fit in 25 MiB.
  EXPECT_EQ(choose_tile_head_run(132, 50 * mib, 8 * mib, 16, 1, 1000), 44);
  // GQA 4 at 64K keys: 32 MiB per K/V head, more than half the L2: one K/V head (4 query heads) at a time.
  EXPECT_EQ(choose_tile_head_run(132, 50 * mib, 32 * mib, 32, 4, 1000), 33);
  // Every head's K/V fits: the order of one item for all heads.
  EXPECT_EQ(choose_tile_head_run(132, 50 * mib, 1 * mib, 16, 1, 1000), 1);
  EXPECT_EQ(choose_tile_head_run(132, 50 * mib, 2 * mib, 32, 4, 1000), 1);
  // Never longer than the list; nothing known: 1.
  EXPECT_EQ(choose_tile_head_run(132, 50 * mib, 8 * mib, 16, 1, 10), 10);
  EXPECT_EQ(choose_tile_head_run(0, 50 * mib, 8 * mib, 16, 1, 1000), 1);
  EXPECT_EQ(choose_tile_head_run(132, 0, 8 * mib, 16, 1, 1000), 1);
  EXPECT_EQ(choose_tile_head_run(132, 50 * mib, 8 * mib, 1, 1, 1000), 1);
}

constexpr int32_t kBuckets = 2048;  // the work-list sort's (cuda/work_list_sort.cuh)

TEST(TileListSections, ChoiceAndItsLimits) {
  // The sweep's D=128 L=512 causal call on an H100: a quarter of 50 MiB over 8 KiB of K/V per key
  // position (16 heads of 128, K and V, 2 bytes) = 1600 keys; tiles of at most 4 blocks (+ 1).
  TileListSections s = choose_tile_list_sections(1600, 16384, 5, kBuckets);
  EXPECT_EQ(s.keys, 1600);
  EXPECT_EQ(s.stride, 6);
  // Nothing to split: one section would hold every key, or nothing is known.
  EXPECT_EQ(choose_tile_list_sections(16384, 16384, 5, kBuckets).keys, 0);
  EXPECT_EQ(choose_tile_list_sections(20000, 16384, 5, kBuckets).keys, 0);
  EXPECT_EQ(choose_tile_list_sections(0, 16384, 5, kBuckets).keys, 0);
  EXPECT_EQ(choose_tile_list_sections(1600, 0, 5, kBuckets).keys, 0);
  // Fewer than two sections' keys fit the buckets: none.
  EXPECT_EQ(choose_tile_list_sections(100, 1 << 20, kBuckets, kBuckets).keys, 0);
  // Exactly two fit: each holds half the keys, whatever was wanted.
  EXPECT_EQ(choose_tile_list_sections(100, 1 << 20, kBuckets / 2 - 1, kBuckets).keys, (1 << 20) / 2 + 1);
  // Sections too many for the buckets grow until their keys fit.
  s = choose_tile_list_sections(1, int64_t{1} << 30, 35, kBuckets);
  ASSERT_GT(s.keys, 0);
  EXPECT_LE((int64_t{1} << 30) / s.keys + 1, kBuckets / 36);
  EXPECT_EQ(s.stride, 36);
}

TEST(TileListSections, SortKeysFitTheBucketsAndOrderSectionsThenCosts) {
  for (int64_t total_k : {int64_t{2}, int64_t{999}, int64_t{16384}, int64_t{1} << 24, int64_t{2147483647}}) {
    for (int64_t wanted : {int64_t{1}, int64_t{7}, int64_t{1600}, int64_t{1} << 20}) {
      for (int64_t max_cost : {1, 5, 35, 1000}) {
        const TileListSections s = choose_tile_list_sections(wanted, total_k, max_cost, kBuckets);
        if (s.keys == 0) continue;
        ASSERT_LT(s.keys, total_k);
        const int32_t tk = static_cast<int32_t>(total_k);
        const int64_t top = (total_k / s.keys + 1) * s.stride;
        ASSERT_LE(top, kBuckets) << "total_k " << total_k << " wanted " << wanted << " cost " << max_cost;
        // Key starts at the ends and around the section boundaries.
        std::vector<int32_t> starts = {0, 1, s.keys - 1, s.keys, s.keys + 1, tk / 2, tk - 1, tk};
        for (int32_t a : starts) {
          for (int32_t b : starts) {
            if (a < 0 || b < 0 || a > tk || b > tk) continue;
            for (int32_t ca : {0, 1, static_cast<int32_t>(max_cost), static_cast<int32_t>(max_cost) + 7}) {
              const int32_t ka = TileSortKey(s, a, tk)(ca);
              ASSERT_GE(ka, 0);
              ASSERT_LT(ka, top);
              for (int32_t cb : {0, 1, static_cast<int32_t>(max_cost)}) {
                const int32_t kb = TileSortKey(s, b, tk)(cb);
                if (a / s.keys < b / s.keys) {
                  ASSERT_GT(ka, kb) << "an earlier section sorts first";
                }
                if (a / s.keys == b / s.keys && std::min<int64_t>(ca, max_cost) > cb) {
                  ASSERT_GT(ka, kb) << "the costlier tile first inside a section";
                }
              }
            }
          }
        }
      }
    }
  }
  // Without sections the key is the cost.
  EXPECT_EQ(TileSortKey(TileListSections{}, 12345, 99999)(17), 17);
  EXPECT_EQ(TileSortKey(TileListSections{}, 0, 99999)(INT32_MAX), INT32_MAX);
}

// A causal batch of 32 sequences of 512 keys in 128 x 128 tiles (the sweep's L=512 call), sorted
// by the keys, largest first (ties in list order, as one of the orders the device's counting sort
// may give): without sections the tiles of a sequence lie a whole pass over the batch apart; with
// them every sequence's tiles lie within its section's, and each section holds its longest tiles
// first.
TEST(TileListSections, CausalBatchKeepsASequencesTilesTogether) {
  const int32_t batch = 32, len = 512, block = 128, total_k = batch * len;
  struct Tile {
    int32_t seq, cost, key;
  };
  auto sorted_list = [&](const TileListSections& s) {
    std::vector<Tile> tiles;
    for (int32_t b = 0; b < batch; ++b) {
      const ringattn::MaskPolicy<ringattn::MaskWindow> mask(len, len, ringattn::MaskWindow{-1, 0});
      for (int32_t m = 0; m < len / block; ++m) {
        const int32_t cost = ringattn::cuda::work_list::query_tile_cost(mask, m, block, block);
        tiles.push_back({b, cost, TileSortKey(s, b * len, total_k)(cost)});
      }
    }
    std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& x, const Tile& y) { return x.key > y.key; });
    return tiles;
  };
  auto widest_spread = [&](const std::vector<Tile>& tiles) {
    std::vector<int32_t> first(batch, -1), last(batch, -1);
    for (int32_t i = 0; i < static_cast<int32_t>(tiles.size()); ++i) {
      if (first[tiles[i].seq] < 0) first[tiles[i].seq] = i;
      last[tiles[i].seq] = i;
    }
    int32_t widest = 0;
    for (int32_t b = 0; b < batch; ++b) widest = std::max(widest, last[b] - first[b]);
    return widest;
  };
  const std::vector<Tile> plain = sorted_list(TileListSections{});
  EXPECT_EQ(widest_spread(plain), 3 * batch) << "longest first over the call: one tile of a sequence per pass";
  const TileListSections s = choose_tile_list_sections(1600, total_k, len / block + 1, kBuckets);
  ASSERT_EQ(s.keys, 1600);
  const std::vector<Tile> sectioned = sorted_list(s);
  ASSERT_EQ(sectioned.size(), plain.size());
  // 1600 keys: sections of 4 or 3 sequences (starts 0..1536, 2048..3072, ...), 16 or 12 tiles.
  EXPECT_LE(widest_spread(sectioned), 15);
  for (size_t i = 1; i < sectioned.size(); ++i) {
    const Tile &x = sectioned[i - 1], &y = sectioned[i];
    const int32_t sx = x.seq * len / s.keys, sy = y.seq * len / s.keys;
    ASSERT_LE(sx, sy) << "sections in key order";
    if (sx == sy) {
      ASSERT_GE(x.cost, y.cost) << "longest first inside a section";
    }
  }
  // The list still ends with cheap tiles: the last section's one-block tiles.
  EXPECT_EQ(sectioned.back().cost, 1);
}

}  // namespace
