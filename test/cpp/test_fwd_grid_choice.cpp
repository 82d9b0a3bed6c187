// The tier-2 forward's grid choice (csrc/cuda/fwd_grid_choice.h): which calls take the persistent
// kernel, by the keys a query tile's rows see together. The tile's keys are checked against the
// mask policy (common/mask.h), the threshold at its edges.
#include <gtest/gtest.h>

#include <cstdint>

#include "common/mask.h"
#include "cuda/fwd_grid_choice.h"

namespace ratest {
namespace {

using ringattn::MaskPolicy;
using ringattn::MaskWindow;
using ringattn::cuda::fwd_tile_keys;
using ringattn::cuda::fwd_tiles_are_short;
using ringattn::cuda::kPersistentFwdMaxTileKeys;

constexpr int kBlockM = 128;  // the tier-2 forward's query tile

TEST(FwdGridChoice, ThresholdIs33KeyBlocks) { EXPECT_EQ(kPersistentFwdMaxTileKeys, 33 * 128); }

// Without a window bounded on both sides a tile may see every key: max_seqlen_k decides.
TEST(FwdGridChoice, UnboundedWindowsGoByMaxSeqlenK) {
  const MaskWindow none{-1, -1}, causal{-1, 0}, left_only{4096, -1};
  for (const MaskWindow& w : {none, causal, left_only}) {
    EXPECT_EQ(fwd_tile_keys(5000, w, kBlockM), 5000);
    EXPECT_TRUE(fwd_tiles_are_short(512, w, kBlockM));
    EXPECT_TRUE(fwd_tiles_are_short(4096, w, kBlockM));
    EXPECT_TRUE(fwd_tiles_are_short(33 * 128, w, kBlockM));
    EXPECT_FALSE(fwd_tiles_are_short(33 * 128 + 1, w, kBlockM));
    EXPECT_FALSE(fwd_tiles_are_short(8192, w, kBlockM));
    EXPECT_FALSE(fwd_tiles_are_short(65536, w, kBlockM));
  }
}

// A window bounded on both sides: left + right + block_m keys per tile (the benchmark's window
// row, (4096, 0), is 4224: 33 blocks, persistent), whatever the sequence length.
TEST(FwdGridChoice, TwoSidedWindowsGoByTheTilesSpan) {
  EXPECT_EQ(fwd_tile_keys(65536, MaskWindow{4096, 0}, kBlockM), 4096 + 128);
  EXPECT_TRUE(fwd_tiles_are_short(65536, MaskWindow{4096, 0}, kBlockM));
  EXPECT_TRUE(fwd_tiles_are_short(65536, MaskWindow{4095, 1}, kBlockM));
  EXPECT_TRUE(fwd_tiles_are_short(65536, MaskWindow{2048, 2048}, kBlockM));
  EXPECT_FALSE(fwd_tiles_are_short(65536, MaskWindow{4096, 1}, kBlockM));
  EXPECT_FALSE(fwd_tiles_are_short(65536, MaskWindow{8192, 0}, kBlockM));
  EXPECT_TRUE(fwd_tiles_are_short(65536, MaskWindow{0, 0}, kBlockM));
  // A wide window over short sequences: max_seqlen_k, the smaller bound, decides.
  EXPECT_EQ(fwd_tile_keys(1000, MaskWindow{8192, 8192}, kBlockM), 1000);
  EXPECT_TRUE(fwd_tiles_are_short(1000, MaskWindow{8192, 8192}, kBlockM));
  // Sides at the 2^30 the kernels' window is clamped to (call_window): no overflow.
  EXPECT_EQ(fwd_tile_keys(int64_t{1} << 40, MaskWindow{1 << 30, 1 << 30}, kBlockM), (int64_t{1} << 31) + kBlockM);
  EXPECT_FALSE(fwd_tiles_are_short(int64_t{1} << 40, MaskWindow{1 << 30, 1 << 30}, kBlockM));
}

// fwd_tile_keys bounds the keys any tile's rows see together (from the first row's first key to
// the last row's last), with equality for tiles inside a long sequence.
TEST(FwdGridChoice, TileKeysMatchTheMaskPolicy) {
  const int lq = 4000, lk = 4000;
  for (const MaskWindow& w : {MaskWindow{0, 0}, MaskWindow{300, 0}, MaskWindow{129, 17}, MaskWindow{5, 700}})
    for (int shift : {0, -77, 130}) {
      const MaskPolicy<MaskWindow> mask(lq, lk, w, shift);
      const int64_t bound = fwd_tile_keys(lk, w, kBlockM);
      int64_t widest = 0;
      for (int m = 0; m * kBlockM < lq; ++m) {
        const int64_t keys = static_cast<int64_t>(mask.key_end((m + 1) * kBlockM - 1)) - mask.key_begin(m * kBlockM);
        EXPECT_LE(keys, bound) << "window (" << w.left << ", " << w.right << ") shift " << shift << " tile " << m;
        widest = keys > widest ? keys : widest;
      }
      EXPECT_EQ(widest, bound) << "window (" << w.left << ", " << w.right << ") shift " << shift;
    }
}

}  // namespace
}  // namespace ratest
