// Warp-level mma.sync fragment helpers shared by the tier-1 kernels (forward, dK/dV, dQ).
//
// Fragments follow mma.m16n8k16: an A fragment is four 32-bit registers of a 16x16 tile, a C
// fragment four floats of a 16x8 tile (rows lane/4 and lane/4 + 8, columns 2*(lane%4) + {0,1}).
// One ldmatrix_x4 of a B operand gives two n8 tiles: (b0, b1) and (b2, b3).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/mma_fragment.h"
#include "cuda/ptx.h"
#include "cuda/sm80/fwd_traits.h"

namespace ringattn {
namespace cuda {
namespace sm80 {

// acc[...] = 0 for a [kTiles] or [kOuter][kTiles] array of C fragments.
template <int kTiles>
__device__ __forceinline__ void zero_fragments(float (&acc)[kTiles][4]) {
#pragma unroll
  for (int t = 0; t < kTiles; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
}
template <int kOuter, int kTiles>
__device__ __forceinline__ void zero_fragments(float (&acc)[kOuter][kTiles][4]) {
#pragma unroll
  for (int o = 0; o < kOuter; ++o) zero_fragments(acc[o]);
}

// acc[2j] += a * (b0, b1) and acc[2j + 1] += a * (b2, b3): one A fragment times the two n8 tiles
// of one ldmatrix_x4.
template <typename Element, int kTiles>
__device__ __forceinline__ void mma_tile_pair(float (&acc)[kTiles][4], int j, const uint32_t (&a)[4], uint32_t b0,
                                              uint32_t b1, uint32_t b2, uint32_t b3) {
  ptx::mma_16816<Element>(acc[2 * j], a, b0, b1);
  ptx::mma_16816<Element>(acc[2 * j + 1], a, b2, b3);
}

// The same for each of a warp's kMTiles m16 tiles (A fragment a[mt] into acc[mt]).
template <typename Element, int kMTiles, int kTiles>
__device__ __forceinline__ void mma_tile_pair(float (&acc)[kMTiles][kTiles][4], int j, const uint32_t (&a)[kMTiles][4],
                                              uint32_t b0, uint32_t b1, uint32_t b2, uint32_t b3) {
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) mma_tile_pair<Element>(acc[mt], j, a[mt], b0, b1, b2, b3);
}

// One k16 step kk of acc += C * B, for C fragments of [kMTiles x 16 rows, kNTiles x 8 columns]
// (the columns are the reduction index; tiles 2kk and 2kk + 1 become one A fragment in the
// element type, as P does in the forward) and B read transposed with ldmatrix from the
// shared-memory address b_addr(dt2, kk * 16), dt2 = pair of n8 output tiles.
template <typename Element, int kMTiles, int kNTiles, int kDTiles, typename BAddr>
__device__ __forceinline__ void mma_c_times_bt_step(float (&acc)[kMTiles][kDTiles][4],
                                                    const float (&c)[kMTiles][kNTiles][4], int kk, const BAddr& b_addr) {
  uint32_t a[kMTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) pack_a_fragment<Element>(c[mt], kk, a[mt]);
#pragma unroll
  for (int dt2 = 0; dt2 < kDTiles / 2; ++dt2) {
    uint32_t b0, b1, b2, b3;
    ptx::ldmatrix_x4_trans(b_addr(dt2, kk * 16), b0, b1, b2, b3);
    mma_tile_pair<Element>(acc, dt2, a, b0, b1, b2, b3);
  }
}

}  // namespace sm80
}  // namespace cuda
}  // namespace ringattn
