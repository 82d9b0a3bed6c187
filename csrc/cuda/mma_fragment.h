// The register fragment conversion both tiers use: fp32 accumulator (C) fragments of two n8
// tiles become one 16-bit A-operand fragment of the next matrix multiply (mma.sync m16n8k16 on
// tier 1, wgmma on tier 2: their accumulator layouts match the A layout over 16 columns).
#pragma once

#include <cstdint>

#include "cuda/ptx.h"

namespace ringattn {
namespace cuda {

// The 16-bit A-operand fragment of k-step kk (16 columns = n8 tiles 2kk and 2kk + 1 of acc).
template <typename Element, int kNTiles>
__device__ __forceinline__ void pack_a_fragment(const float (&acc)[kNTiles][4], int kk, uint32_t (&frag)[4]) {
  frag[0] = ptx::pack2<Element>(acc[2 * kk][0], acc[2 * kk][1]);
  frag[1] = ptx::pack2<Element>(acc[2 * kk][2], acc[2 * kk][3]);
  frag[2] = ptx::pack2<Element>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  frag[3] = ptx::pack2<Element>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

}  // namespace cuda
}  // namespace ringattn
