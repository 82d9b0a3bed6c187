// Tile shapes of the tier-1 forward kernel (its QueryTileTraits shared with the deterministic dQ
// kernel), the swizzled shared-memory addressing of every tier-1 kernel, and the one
// configuration chosen per (dtype, head dim). Host dispatch reads kBlockM/kBlockN from here to
// build the work list.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/mask.h"
#include "cuda/fwd_params.h"

namespace ringattn {
namespace cuda {
namespace sm80 {

// The shape of the query-tile kernels (the forward and the deterministic dQ kernel): a CTA owns
// kBlockM query rows, kMTiles m16 tiles per warp, and streams K/V blocks of kBlockN keys.
template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct QueryTileTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kMTiles = kBlockM / (16 * kNWarps);  // m16 tiles per warp
  static constexpr int kNTiles = kBlockN / 8;               // n8 tiles of S per warp
  static constexpr int kDTiles = kHeadDim / 8;              // n8 tiles of O (or dQ) per warp
  static constexpr int kChunks = kHeadDim / 8;              // 16-byte chunks per row
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole m16 tiles");
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "mma k/n granularity");
  static_assert(kHeadDim >= 64, "the 8-way XOR swizzle needs >= 8 chunks per row");
};

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kMinBlocksPerSm_,
          int kStages_ = 1>
struct FwdTraits : QueryTileTraits<Element_, kHeadDim_, kBlockM_, kBlockN_, kNWarps_> {
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  // K/V shared-memory stages: 1 = one K and one V buffer (K(n-1) loads during P*V(n), V(n)
  // during Q*K(n)^T, two barriers per block); 2 = double-buffered K and V (the next block loads
  // during the whole current one, one barrier per block).
  static constexpr int kStages = kStages_;
  static constexpr int kKVTileElems = kBlockN_ * kHeadDim_;
  static constexpr int kSmemElems = kBlockM_ * kHeadDim_ + 2 * kStages * kKVTileElems;
  static constexpr int kSmemBytes = kSmemElems * static_cast<int>(sizeof(Element_));
};

// Element offset of (row, 16-byte chunk) in a swizzled [rows, kHeadDim] tile.
template <int kHeadDim>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

// ldmatrix row address of one thread in a swizzled tile, computed once per kernel.
// A thread reads chunk 2*j + lane_chunk of rows `row + 8*i` (offsets that keep row & 7). The
// swizzle only flips the chunk bits of the byte offset, and the tile rows are aligned to their
// size (the tiles sit at multiples of kHeadDim*2*8 bytes from a 1024-byte-aligned base), so
// every fragment address is base ^ (2j << 4) plus a compile-time row offset: one register per
// operand and no per-iteration address arithmetic beyond one LOP3.
template <int kHeadDim>
struct SwizzledRows {
  uint32_t base;
  __device__ __forceinline__ SwizzledRows(uint32_t tile_addr, int row, int lane_chunk)
      : base(tile_addr + static_cast<uint32_t>(row * kHeadDim * 2 + ((lane_chunk ^ (row & 7)) << 4))) {}
  // Byte address of chunk 2*j + lane_chunk in row `row + row_offset` (j, row_offset compile-time).
  // The same rows `bytes` further on (a multiple of the tile's row size * 8, e.g. another stage).
  __device__ __forceinline__ SwizzledRows shifted(uint32_t bytes) const {
    SwizzledRows r = *this;
    r.base += bytes;
    return r;
  }
  __device__ __forceinline__ uint32_t operator()(int j, int row_offset) const {
    return (base ^ static_cast<uint32_t>((2 * j) << 4)) + static_cast<uint32_t>(row_offset * kHeadDim * 2);
  }
};

// The configuration used for each head dim (see docs/perf-log.md for why).
template <typename Element, int kHeadDim>
struct FwdConfig;
template <typename Element>
struct FwdConfig<Element, 64> {
  using Traits = FwdTraits<Element, 64, 128, 64, 4, 1>;
};
template <typename Element>
struct FwdConfig<Element, 128> {
  using Traits = FwdTraits<Element, 128, 128, 32, 4, 1>;
};
template <typename Element>
struct FwdConfig<Element, 256> {
  using Traits = FwdTraits<Element, 256, 128, 32, 8, 1>;
};

}  // namespace sm80
}  // namespace cuda
}  // namespace ringattn
