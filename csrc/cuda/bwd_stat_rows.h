// The backward workspace's LSE (log2) / Di rows and the tier-2 dK/dV kernel's TMA boxes over
// them: pure arithmetic, no CUDA headers (GoogleTest checks it on the CPU:
// test/cpp/test_bwd_stat_rows.cpp).
//
// lse_log2 and di are one fp32 array [2][Hq][bwd_stat_row_stride(total_q)] (bwd_params.h): head
// h's LSE row, then (Hq rows later) its Di row, each total_q tokens then padding, so that every
// row starts 16 bytes aligned (TMA: global strides are multiples of 16 bytes).
//
// Hopper's TMA also requires the *start* of a box in the innermost dimension to be 16-byte
// aligned: a cp.async.bulk.tensor whose innermost coordinate times the element size is not a
// multiple of 16 raises cudaErrorIllegalInstruction (the device reports it; the encode cannot).
// A query tile's first token (the sequence's q_start + 64 m) is any integer in a varlen call, so
// the kernel loads the box from the token rounded down to a multiple of 4 (bwd_stat_box_start),
// kBlockM + 4 tokens wide (bwd_stat_box_cols), and its consumers read the tile's row at
// bwd_stat_box_shift(token0) = token0 % 4 floats into the box.
#pragma once

#include <cstdint>

#include "common/mask.h"  // RINGATTN_HOST_DEVICE, RINGATTN_FORCEINLINE

namespace ringattn {
namespace cuda {

// fp32 values per 16 bytes: the alignment unit of TMA's row strides and box starts.
constexpr int kStatAlignFloats = 4;

// Elements between two heads' rows of lse_log2 / di: total_q rounded up to a multiple of 4
// (16-byte row strides). The kernels derive it from total_q (BwdGroupArgs::stat_row) rather than
// read a 64-bit field: a 64 x 64-bit product there cost tier 1's D=128 kLocal softcap dK/dV
// kernel 12/20 bytes of spills on sm_90a.
RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE constexpr int64_t bwd_stat_row_stride(int64_t total_q) {
  return (total_q + (kStatAlignFloats - 1)) & ~int64_t{kStatAlignFloats - 1};
}

// h * bwd_stat_row_stride(total_q) for a head h >= 0 and 0 <= total_q < 2^31, as one unsigned
// 32 x 32 -> 64-bit product (the stride is below 2^32): the same instructions as the unpadded
// h * total_q of before.
RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE int64_t bwd_stat_row(int32_t total_q, int h) {
  constexpr uint32_t kRound = kStatAlignFloats - 1;  // bwd_stat_row_stride's rounding, in 32 bits
  const uint32_t stride = (static_cast<uint32_t>(total_q) + kRound) & ~kRound;
  return static_cast<int64_t>(static_cast<uint64_t>(static_cast<uint32_t>(h)) * stride);
}

// Width in tokens of the TMA box over one LSE or Di row of a query tile of block_m rows: every
// start shift 0 .. 3 leaves the tile's block_m tokens inside it (block_m + 3 rounded up to a
// multiple of 4, so box_cols * 4 bytes is a multiple of 16; block_m = 64: 68 tokens, 272 bytes).
RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE constexpr int bwd_stat_box_cols(int block_m) {
  return (block_m + 2 * kStatAlignFloats - 2) / kStatAlignFloats * kStatAlignFloats;
}

// The box's first token for a tile whose first token is token0 >= 0: 16-byte aligned.
RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE constexpr int32_t bwd_stat_box_start(int32_t token0) {
  return token0 & ~int32_t{kStatAlignFloats - 1};
}

// Where the tile's first token sits in its box, in floats (0 .. 3).
RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE constexpr int bwd_stat_box_shift(int32_t token0) {
  return token0 & (kStatAlignFloats - 1);
}

}  // namespace cuda
}  // namespace ringattn
