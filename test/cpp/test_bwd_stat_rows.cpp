// The backward workspace's LSE / Di rows and the tier-2 dK/dV kernel's TMA boxes over them
// (csrc/cuda/bwd_stat_rows.h): rows 16-byte strided, and every query tile's box starts 16-byte
// aligned in the innermost (token) dimension and holds the tile's rows. A box starting at the
// tile's own first token raised "illegal instruction" on an H100 for a varlen call whose
// sequences start at tokens 113, 114 and 414 (test_backward_varlen_groups[1-mha]).
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "cuda/bwd_stat_rows.h"

namespace {

using ringattn::cuda::bwd_stat_box_cols;
using ringattn::cuda::bwd_stat_box_shift;
using ringattn::cuda::bwd_stat_box_start;
using ringattn::cuda::bwd_stat_row;
using ringattn::cuda::bwd_stat_row_stride;

TEST(BwdStatRows, RowStrideIsSixteenByteAlignedAndTight) {
  for (int64_t total_q = 0; total_q < 2000; ++total_q) {
    const int64_t s = bwd_stat_row_stride(total_q);
    ASSERT_EQ((s * 4) % 16, 0) << total_q;
    ASSERT_GE(s, total_q);
    ASSERT_LT(s, total_q + 4);
  }
  EXPECT_EQ(bwd_stat_row_stride(478), 480);
  EXPECT_EQ(bwd_stat_row_stride(int64_t{INT32_MAX}), int64_t{INT32_MAX} + 1);
}

TEST(BwdStatRows, BoxIsAValidTmaBox) {
  for (int block_m : {1, 4, 16, 32, 61, 64, 128, 252}) {
    const int cols = bwd_stat_box_cols(block_m);
    EXPECT_EQ((cols * 4) % 16, 0) << block_m;  // inner box bytes: a multiple of 16
    EXPECT_LE(cols, 256) << block_m;           // at most 256 elements per box dimension
    EXPECT_GE(cols, block_m + 3) << block_m;   // the tile's rows at any shift 0 .. 3
    EXPECT_LT(cols, block_m + 7) << block_m;   // and no wider than that needs
  }
  EXPECT_EQ(bwd_stat_box_cols(64), 68);  // the tier-2 kernels' kBlockM
}

// Every tile of every sequence: the box starts at a multiple of 4 tokens (16 bytes), at or before
// the tile's first token, and ends at or after its last; the consumers' shift is q_start % 4.
void check_tiles(const std::vector<int32_t>& cu_seqlens_q, int block_m) {
  const int cols = bwd_stat_box_cols(block_m);
  for (size_t b = 0; b + 1 < cu_seqlens_q.size(); ++b) {
    const int32_t q_start = cu_seqlens_q[b], seqlen = cu_seqlens_q[b + 1] - q_start;
    for (int32_t row0 = 0; row0 < seqlen; row0 += block_m) {
      const int32_t token0 = q_start + row0;
      const int32_t start = bwd_stat_box_start(token0);
      const int shift = bwd_stat_box_shift(token0);
      ASSERT_EQ((int64_t{start} * 4) % 16, 0) << "sequence " << b << " token " << token0;
      ASSERT_EQ(start + shift, token0);
      ASSERT_GE(shift, 0);
      ASSERT_LT(shift, 4);
      ASSERT_LE(token0 + block_m, start + cols) << "sequence " << b << " token " << token0;
      if (block_m % 4 == 0) {
        ASSERT_EQ(shift, bwd_stat_box_shift(q_start)) << "the consumers shift by q_start % 4";
      }
    }
  }
}

TEST(BwdStatRows, EveryTileBoxStartsAlignedAndHoldsTheTile) {
  // test_backward_varlen_groups[1-mha]: query seqlens 113, 1, 300, 64 (total_q 478).
  check_tiles({0, 113, 114, 414, 478}, 64);
  // Its 3-group cases, and every q_start 0 .. 300 with sequences of 1 .. 200 tokens.
  check_tiles({0, 1, 2, 19, 148}, 64);
  check_tiles({0, 239, 240, 752, 753}, 64);
  for (int block_m : {61, 64, 128}) {
    for (int32_t q_start = 0; q_start <= 300; ++q_start)
      for (int32_t len : {1, 2, 3, 5, 63, 64, 65, 127, 200}) check_tiles({0, q_start, q_start + len}, block_m);
  }
}

TEST(BwdStatRows, RowOffsetIsHeadTimesPaddedStride) {
  // bwd_stat_row's 32 x 32 -> 64-bit product against the plain 64-bit formula, up to the largest
  // total_q (2^31 - 1, stride 2^31) and heads whose offsets pass 2^32.
  for (int64_t total_q : {int64_t{0}, int64_t{1}, int64_t{3}, int64_t{4}, int64_t{5}, int64_t{478},
                          int64_t{1} << 20, (int64_t{1} << 31) - 5, (int64_t{1} << 31) - 1}) {
    for (int h : {0, 1, 2, 7, 31, 255, 1023, 65535}) {
      ASSERT_EQ(bwd_stat_row(static_cast<int32_t>(total_q), h), h * bwd_stat_row_stride(total_q))
          << "total_q " << total_q << ", head " << h;
    }
  }
}

}  // namespace
