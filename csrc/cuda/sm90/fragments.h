// Register-fragment helpers shared by the tier-2 kernels: a wgmma accumulator (m64nN, fp32,
// [N / 8][4] per thread) fenced after a wait, converted into the A-operand fragments of the next
// wgmma (the accumulator layout of m64nN is the A layout of m64nXk16 over k = N), and zeroed where
// a mask says so. pack_a_fragment (one k-step) is in cuda/mma_fragment.h.
#pragma once

#include <cstdint>

#include "cuda/mma_fragment.h"
#include "cuda/ptx.h"
#include "cuda/sm90/ptx_sm90.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

// Makes the accumulator's registers visible as written by the wgmma just waited for (no
// instruction: keeps the compiler from moving reads above the wait).
template <int kNTiles>
__device__ __forceinline__ void fence_accumulator(float (&a)[kNTiles][4]) {
#pragma unroll
  for (int i = 0; i < kNTiles; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) ptx::fence_operand(a[i][c]);
}

// The whole accumulator as A-operand fragments, one per k-step of 16 columns.
template <typename Element, int kNTiles>
__device__ __forceinline__ void pack_a_fragments(const float (&acc)[kNTiles][4], uint32_t (&frags)[kNTiles / 2][4]) {
#pragma unroll
  for (int kk = 0; kk < kNTiles / 2; ++kk) pack_a_fragment<Element>(acc, kk, frags[kk]);
}

// acc[nt][c] = 0 where masked(nt, c).
template <int kNTiles, typename Masked>
__device__ __forceinline__ void zero_masked(float (&acc)[kNTiles][4], const Masked& masked) {
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int c = 0; c < 4; ++c)
      if (masked(nt, c)) acc[nt][c] = 0.f;
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
