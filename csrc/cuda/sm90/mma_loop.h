// One warpgroup product over the k dimension: kSteps wgmma instructions of k = 16 each into one
// fp32 accumulator d ([N / 8][4] per thread, N = 8 * kNTiles). The operand tiles of k-step kk
// come from callables (the shared-memory descriptor of a tile advanced to step kk) or, for the
// register A operand, from the fragment array. Issue between ptx::wgmma_fence() and
// ptx::wgmma_commit_group(); several products may share one commit group.
#pragma once

#include <cstdint>

#include "cuda/sm90/ptx_sm90.h"
#include "cuda/sm90/wgmma.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

// Descriptor of k-step kk (16 elements of k) of a tile stored as TMA writes it with the 128-byte
// swizzle, from the descriptor desc0 of the tile (ptx::smem_desc_sw128).
//   K-major (k along a row): 64-element (128-byte) column blocks kColBlockBytes apart; step kk is
//   32 bytes into column block kk / 4.
template <uint32_t kColBlockBytes>
struct KMajorSteps {
  uint64_t desc0;
  __device__ __forceinline__ uint64_t operator()(int kk) const {
    return ptx::desc_advance(desc0, (kk / 4) * kColBlockBytes + (kk % 4) * 32);
  }
};
//   MN-major (k along the rows, the operand read transposed): step kk is 16 rows, two 8-row
//   groups of 1024 bytes.
struct MnMajorSteps {
  uint64_t desc0;
  __device__ __forceinline__ uint64_t operator()(int kk) const { return ptx::desc_advance(desc0, kk * 2048); }
};

// Whether the first k-step overwrites d (d = A B) or adds to it (d += A B); later steps add.
enum class MmaInit { kOverwrite, kAccumulate };

template <MmaInit kInit>
__device__ __forceinline__ constexpr int mma_scale_d(int kk) {
  return (kInit == MmaInit::kAccumulate || kk > 0) ? 1 : 0;
}

// A and B from shared memory, both K-major: a_desc(kk), b_desc(kk) are the step's descriptors.
template <typename Element, int kSteps, MmaInit kInit, int kNTiles, typename ADesc, typename BDesc>
__device__ __forceinline__ void mma_ss(float (&d)[kNTiles][4], const ADesc& a_desc, const BDesc& b_desc) {
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk)
    ptx::Wgmma<Element, kNTiles * 8>::ss(d, a_desc(kk), b_desc(kk), mma_scale_d<kInit>(kk));
}

// A and B from shared memory, both MN-major (transposed).
template <typename Element, int kSteps, MmaInit kInit, int kNTiles, typename ADesc, typename BDesc>
__device__ __forceinline__ void mma_ss_tt(float (&d)[kNTiles][4], const ADesc& a_desc, const BDesc& b_desc) {
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk)
    ptx::Wgmma<Element, kNTiles * 8>::ss_tt(d, a_desc(kk), b_desc(kk), mma_scale_d<kInit>(kk));
}

// A and B from shared memory, A K-major, B MN-major (transposed).
template <typename Element, int kSteps, MmaInit kInit, int kNTiles, typename ADesc, typename BDesc>
__device__ __forceinline__ void mma_ss_tb(float (&d)[kNTiles][4], const ADesc& a_desc, const BDesc& b_desc) {
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk)
    ptx::Wgmma<Element, kNTiles * 8>::ss_tb(d, a_desc(kk), b_desc(kk), mma_scale_d<kInit>(kk));
}

// A from registers (a[kk]: the 16-bit A fragment of step kk), B from shared memory, MN-major.
template <typename Element, MmaInit kInit, int kNTiles, int kSteps, typename BDesc>
__device__ __forceinline__ void mma_rs_tb(float (&d)[kNTiles][4], const uint32_t (&a)[kSteps][4], const BDesc& b_desc) {
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk)
    ptx::Wgmma<Element, kNTiles * 8>::rs_tb(d, a[kk], b_desc(kk), mma_scale_d<kInit>(kk));
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
