// The query-tile order (csrc/common/tile_order.h): a tile index names each (item, head) of the
// list exactly once, head_run = 1 is the order of one item for all heads, runs keep list order,
// and the run-length choice keeps the K/V of the heads in flight within half the L2.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "common/tile_order.h"

namespace {

using ringattn::choose_tile_head_run;
using ringattn::split_query_tile;

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

}  // namespace
