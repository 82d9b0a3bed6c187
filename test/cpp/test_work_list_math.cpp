// The work-list builders' integer arithmetic (csrc/cuda/work_list_math.h, header only) at sizes
// near and past 2^31, on the host: the pieces the device kernels (tile_scheduler.cu,
// bwd_scheduler.cu) call, and a host walk of both builders' indexing over malformed, overlapping
// sequences whose tiles add up to 2^34.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "common/mask.h"
#include "cuda/work_list_math.h"

namespace {

using ringattn::MaskPolicy;
using ringattn::MaskWindow;
namespace wl = ringattn::cuda::work_list;

constexpr int64_t kI32Max = INT32_MAX;

int64_t ceil_div64(int64_t a, int64_t b) { return a <= 0 ? 0 : (a + b - 1) / b; }

TEST(WorkListMath, BlocksOfDoesNotWrapNearInt32Max) {
  for (int32_t block : {64, 128}) {
    for (int64_t count : {int64_t{0}, int64_t{1}, int64_t{63}, int64_t{64}, int64_t{65}, kI32Max - 128, kI32Max - 64,
                          kI32Max - 63, kI32Max - 1, kI32Max}) {
      EXPECT_EQ(wl::blocks_of(static_cast<int32_t>(count), block), ceil_div64(count, block))
          << "count " << count << " block " << block;
    }
    // The formula it replaces needed count + block - 1, past INT32_MAX here.
    EXPECT_GT(kI32Max + block - 1, kI32Max);
  }
  EXPECT_EQ(wl::blocks_of(-5, 64), 0);
  EXPECT_EQ(wl::blocks_of(kI32Max, 64), int64_t{1} << 25);
}

TEST(WorkListMath, OffsetsAndCapacitySaturate) {
  for (int32_t cap : {0, 1000, INT32_MAX - 1, INT32_MAX}) {
    for (int64_t offset : {int64_t{0}, int64_t{999}, int64_t{1000}, kI32Max - 1, kI32Max, kI32Max + 1,
                           int64_t{1} << 32, (int64_t{1} << 32) + 5, int64_t{1} << 40}) {
      const int64_t want = offset < cap ? offset : cap;
      EXPECT_EQ(wl::saturated_offset(offset, cap), want) << "offset " << offset << " cap " << cap;
    }
  }
  EXPECT_EQ(wl::capacity_i32(-1), 0);
  EXPECT_EQ(wl::capacity_i32(12345), 12345);
  EXPECT_EQ(wl::capacity_i32(kI32Max), INT32_MAX);
  EXPECT_EQ(wl::capacity_i32(kI32Max + 1), INT32_MAX);  // a truncating cast gave INT32_MIN
  EXPECT_EQ(wl::capacity_i32(int64_t{1} << 33), INT32_MAX);  // and 0
  EXPECT_EQ(wl::items_below(0, 10, 100), 10);
  EXPECT_EQ(wl::items_below(95, 10, 100), 5);
  EXPECT_EQ(wl::items_below(100, 10, 100), 0);
  // first + count would pass INT32_MAX.
  EXPECT_EQ(wl::items_below(INT32_MAX - 3, 1 << 25, INT32_MAX), 3);
}

TEST(WorkListMath, BinarySearchOverTwoToThe31Sequences) {
  // One item per sequence over INT32_MAX sequences (offsets b), without materialising them:
  // (lo + hi + 1) >> 1 wraps here once lo + hi passes INT32_MAX.
  const int32_t n = INT32_MAX;
  const auto identity = [](int32_t b) { return static_cast<int64_t>(b); };
  for (int64_t i : {int64_t{0}, int64_t{1}, int64_t{1} << 30, (int64_t{1} << 30) + 7, kI32Max - 2, kI32Max - 1}) {
    EXPECT_EQ(wl::last_at_or_below(identity, n, i), i);
  }
  // Empty sequences share their successor's offset: sequences 3k and 3k + 1 are empty, 3k + 2
  // holds items [3k, 3k + 3); item i belongs to 3 (i / 3) + 2.
  const auto shared = [](int32_t b) { return static_cast<int64_t>(b) / 3 * 3; };
  for (int64_t i : {int64_t{0}, int64_t{4}, int64_t{1} << 30, kI32Max - 10, kI32Max - 4}) {
    EXPECT_EQ(wl::last_at_or_below(shared, n, i), i / 3 * 3 + 2) << "item " << i;
  }
  // The last sequence, and a single one.
  EXPECT_EQ(wl::last_at_or_below(shared, n, kI32Max - 1), n - 1);
  EXPECT_EQ(wl::last_at_or_below(identity, 1, 0), 0);
}

TEST(WorkListMath, CostsOfTilesAndBlocksNearTwoToThe31) {
  // A causal sequence of INT32_MAX queries and keys: the last 64-row tile's rows end at 2^31,
  // past INT32_MAX in the mask's int32 arithmetic; it reads every key block.
  const MaskPolicy<MaskWindow, int64_t> causal(kI32Max, kI32Max, MaskWindow{-1, 0});
  const int32_t last_tile = wl::blocks_of(INT32_MAX, 64) - 1;
  EXPECT_EQ(wl::query_tile_cost(causal, last_tile, 64, 128), ceil_div64(kI32Max, 128));
  EXPECT_EQ(wl::query_tile_cost(causal, 0, 64, 128), 1);
  // The last key block (key0 + 128 passes INT32_MAX): rows [key0, INT32_MAX) see it.
  const int64_t key0 = (kI32Max - 1) / 128 * 128;
  EXPECT_GT(key0 + 128, kI32Max);
  EXPECT_EQ(wl::key_block_tiles(causal, key0, 128, 64), ceil_div64(kI32Max, 64) - key0 / 64);
  // Key block 0 is seen by every row.
  EXPECT_EQ(wl::key_block_tiles(causal, 0, 128, 64), ceil_div64(kI32Max, 64));
  // Past the keys in use, or no rows: nothing.
  EXPECT_EQ(wl::key_block_tiles(causal, kI32Max, 128, 64), 0);
  const MaskPolicy<MaskWindow, int64_t> no_rows(0, 1000, MaskWindow{-1, -1});
  EXPECT_EQ(wl::key_block_tiles(no_rows, 0, 128, 64), 0);
  // A window of (4096, 0) near the end: the block's rows [key0, key0 + 127 + 4097) and their tiles.
  const MaskPolicy<MaskWindow, int64_t> window(kI32Max, kI32Max, MaskWindow{4096, 0});
  const int64_t key1 = key0 - 128 * 1000;
  const int64_t rows_end = key1 + 127 + 4096 + 1;
  EXPECT_EQ(wl::key_block_tiles(window, key1, 128, 64), ceil_div64(rows_end, 64) - key1 / 64);
}

TEST(WorkListMath, Int32AndInt64MasksAgreeWhereInt32Fits) {
  // The forward's builder takes the int32 mask below 2^30 rows and keys (mask_fits_int32), the
  // int64 one past it: the same costs where both apply, at lengths up to 2^30 - 1.
  const MaskWindow windows[] = {{-1, -1}, {-1, 0}, {4096, 0}, {100, 37}, {0, 0}, {-1, 5000}, {1 << 29, 1 << 29}};
  const int32_t lengths[] = {1, 63, 64, 1000, 65536, (1 << 30) - 1};
  const int32_t shifts[] = {0, -3, 70000};
  int checked = 0;
  for (const MaskWindow& w : windows)
    for (int32_t lq : lengths)
      for (int32_t lk : lengths)
        for (int32_t shift : shifts) {
          ASSERT_TRUE(wl::mask_fits_int32(lq, lk));
          const MaskPolicy<MaskWindow> m32(lq, lk, w, shift);
          const MaskPolicy<MaskWindow, int64_t> m64(lq, lk, w, shift);
          const int32_t tiles = wl::blocks_of(lq, 128);
          for (int32_t m : {0, 1, tiles / 2, tiles - 2, tiles - 1}) {
            if (m < 0 || m >= tiles) continue;
            ASSERT_EQ(wl::query_tile_cost(m32, m, 128, 128), wl::query_tile_cost(m64, m, 128, 128))
                << "lq " << lq << " lk " << lk << " window (" << w.left << ", " << w.right << ") shift " << shift
                << " tile " << m;
            ++checked;
          }
        }
  EXPECT_GT(checked, 1000);
  EXPECT_FALSE(wl::mask_fits_int32(1 << 30, 5));
  EXPECT_FALSE(wl::mask_fits_int32(5, INT32_MAX));
}

// Sequence b's clamped length, as the builders clamp cu_seqlens to [0, total].
int32_t clamped_length(const std::vector<int32_t>& cu, int b, int32_t total) {
  const auto clamp = [](int32_t x, int32_t lo, int32_t hi) { return x < lo ? lo : (x > hi ? hi : x); };
  const int32_t start = clamp(cu[b], 0, total);
  return clamp(cu[b + 1], start, total) - start;
}

// Malformed cu_seqlens [0, T, 0, T, ..., T]: every other sequence spans the whole tensor (the
// others are empty once clamped), 2^20 of them of 2^14 tiles each: 2^34 tiles in all, which an
// int32 sum wraps to exactly 0 (and negative offsets in between). The host's capacity is what
// well-formed metadata could need (tiles of total_q, plus one per sequence).
struct Overlapping {
  static constexpr int32_t kTokens = 1 << 20;
  static constexpr int32_t kBlock = 64;
  static constexpr int32_t kFull = 1 << 20;  // sequences spanning the tensor
  std::vector<int32_t> cu;
  int32_t batch = 0;
  int32_t capacity = 0;
  std::vector<int32_t> offsets;  // what block_exclusive_offsets stores
  int64_t total = 0;             // and returns

  Overlapping() {
    cu.push_back(0);
    for (int s = 0; s < kFull - 1; ++s) {
      cu.push_back(kTokens);
      cu.push_back(0);
    }
    cu.push_back(kTokens);
    batch = static_cast<int32_t>(cu.size()) - 1;
    capacity = wl::capacity_i32(ceil_div64(kTokens, kBlock) + batch);
    offsets.resize(static_cast<size_t>(batch) + 1);
    for (int b = 0; b < batch; ++b) {
      offsets[b] = wl::saturated_offset(total, capacity);
      total += wl::blocks_of(clamped_length(cu, b, kTokens), kBlock);
    }
    offsets[batch] = wl::saturated_offset(total, capacity);
  }
};

TEST(WorkListMath, OverlappingSequencesPastTwoToThe32Tiles) {
  const Overlapping o;
  ASSERT_EQ(o.total, int64_t{1} << 34);
  ASSERT_EQ(static_cast<int32_t>(static_cast<uint32_t>(o.total)), 0) << "an int32 sum would wrap to 0";
  const int32_t total_items = wl::saturated_offset(o.total, o.capacity);
  ASSERT_EQ(total_items, o.capacity);
  for (size_t b = 1; b < o.offsets.size(); ++b) ASSERT_LE(o.offsets[b - 1], o.offsets[b]);
  ASSERT_EQ(o.offsets.back(), o.capacity);

  // The forward builder's step 2: sequence b's tiles go to [first, first + items_below(...));
  // every index in [0, total_items) is written exactly once, none outside.
  std::vector<uint8_t> written(static_cast<size_t>(total_items), 0);
  for (int b = 0; b < o.batch; ++b) {
    const int32_t first = o.offsets[b];
    ASSERT_LE(first, total_items);
    const int32_t tiles = wl::items_below(first, wl::blocks_of(clamped_length(o.cu, b, o.kTokens), o.kBlock), total_items);
    for (int32_t m = 0; m < tiles; ++m) {
      const int64_t idx = static_cast<int64_t>(first) + m;
      ASSERT_GE(idx, 0);
      ASSERT_LT(idx, total_items);
      ASSERT_EQ(written[idx]++, 0) << "item " << idx << " written twice";
    }
  }
  for (int32_t i = 0; i < total_items; ++i) ASSERT_EQ(written[i], 1) << "item " << i << " never written";

  // The dK/dV builder's step 2: item i's sequence by binary search over the saturated offsets,
  // and its block n inside that sequence.
  const auto offset = [&o](int32_t b) { return static_cast<int64_t>(o.offsets[b]); };
  for (int32_t i = 0; i < total_items; i += 97) {
    const int32_t b = wl::last_at_or_below(offset, o.batch, i);
    const int32_t n = i - o.offsets[b];
    ASSERT_EQ(b % 2, 0) << "item " << i << " in an empty sequence";
    ASSERT_GE(n, 0);
    ASSERT_LT(n, wl::blocks_of(clamped_length(o.cu, b, o.kTokens), o.kBlock));
    ASSERT_EQ(static_cast<int64_t>(b / 2) * (o.kTokens / o.kBlock) + n, i);
  }
}

}  // namespace
