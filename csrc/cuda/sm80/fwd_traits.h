// Tile shapes of the tier-1 forward kernel, and the one configuration chosen per
// (dtype, head dim). Host dispatch reads kBlockM/kBlockN from here to build the work list.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/fwd_params.h"

namespace ringattn {
namespace cuda {
namespace sm80 {

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kMinBlocksPerSm_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  static constexpr int kMTiles = kBlockM / (16 * kNWarps);  // m16 tiles per warp
  static constexpr int kNTiles = kBlockN / 8;               // n8 tiles of S per warp
  static constexpr int kDTiles = kHeadDim / 8;              // n8 tiles of O per warp
  static constexpr int kChunks = kHeadDim / 8;              // 16-byte chunks per row
  static constexpr int kSmemElems = (kBlockM + 2 * kBlockN) * kHeadDim;
  static constexpr int kSmemBytes = kSmemElems * static_cast<int>(sizeof(Element));
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole m16 tiles");
  static_assert(kBlockN % 16 == 0 && kHeadDim % 16 == 0, "mma k/n granularity");
  static_assert(kHeadDim >= 64, "the 8-way XOR swizzle needs >= 8 chunks per row");
};

// Element offset of (row, 16-byte chunk) in a swizzled [rows, kHeadDim] tile.
template <int kHeadDim>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

// The configuration used for each head dim (see docs/perf-notes.md for why).
template <typename Element, int kHeadDim>
struct FwdConfig;
template <typename Element>
struct FwdConfig<Element, 64> {
  using Traits = FwdTraits<Element, 64, 128, 64, 4, 1>;
};
template <typename Element>
struct FwdConfig<Element, 128> {
  using Traits = FwdTraits<Element, 128, 128, 64, 8, 1>;
};
template <typename Element>
struct FwdConfig<Element, 256> {
  using Traits = FwdTraits<Element, 256, 128, 32, 8, 1>;
};

// Defined in fwd_kernel.cuh, explicitly instantiated one per file under instantiations/.
template <typename T, bool kCausal>
cudaError_t launch_grouped_fwd(const FwdKernelParams& params, int num_ctas, cudaStream_t stream);

}  // namespace sm80
}  // namespace cuda
}  // namespace ringattn
