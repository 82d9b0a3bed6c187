// Tile shapes of the tier-1 backward kernels, and the one configuration chosen per
// (dtype, head dim). Host dispatch reads the block sizes from here to build the work lists.
//
// dK/dV kernel (BwdTraits): a CTA owns kBlockN keys and walks query tiles of kBlockM rows.
// Its warps take three layouts, one per GEMM phase of a query tile:
//   phase 1  S^T = K Q^T, dP^T = V dO^T    warps = kWarpsN (16 keys each) x kWarpsQ (query cols)
//   phase 2  dV += P^T dO, dK += dS^T Q    warps = kWarpsN (16 keys each) x kWarpsQ (head-dim cols)
//   phase 3  dQ  = dS K (fp32 atomics)     warps = kBlockM/16 (16 queries each) x the rest (head dim)
// P^T and dS^T pass from phase 1 to phases 2 and 3 through shared memory (dtype).
//
// dQ kernel (BwdDqTraits, deterministic mode): the forward's shape (QueryTileTraits, fwd_traits.h);
// a CTA owns kBlockM query rows (16 per warp) and streams K/V blocks of kBlockN keys.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/mask.h"
#include "cuda/bwd_params.h"
#include "cuda/sm80/fwd_traits.h"

namespace ringattn {
namespace cuda {
namespace sm80 {

template <typename Element_, int kHeadDim_, int kBlockN_, int kBlockM_, int kNWarps_, int kStages_,
          int kMinBlocksPerSm_>
struct BwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;  // keys per CTA
  static constexpr int kBlockM = kBlockM_;  // query rows per inner step
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kThreads = kNWarps * 32;
  static constexpr int kStages = kStages_;  // Q/dO/LSE/Di buffers (2: the next tile loads during this one)
  static constexpr int kMinBlocksPerSm = kMinBlocksPerSm_;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks per row

  // phases 1 and 2
  static constexpr int kWarpsN = kBlockN / 16;
  static constexpr int kWarpsQ = kNWarps / kWarpsN;
  static constexpr int kQCols = kBlockM / kWarpsQ;      // query columns of S^T per warp
  static constexpr int kSTiles = kQCols / 8;            // n8 tiles of S^T per warp
  static constexpr int kDCols2 = kHeadDim / kWarpsQ;    // dK/dV head-dim columns per warp
  static constexpr int kDTiles2 = kDCols2 / 8;
  // phase 3
  static constexpr int kWarpsM3 = kBlockM / 16;
  static constexpr int kWarpsD3 = kNWarps / kWarpsM3;
  static constexpr int kDCols3 = kHeadDim / kWarpsD3;                 // dQ columns per warp
  static constexpr int kDqChunk = kDCols3 < 64 ? kDCols3 : 64;        // columns per atomic pass

  // shared memory (elements): K, V | Q x stages | dO x stages | P^T | dS^T, then fp32 LSE, Di x stages
  static constexpr int kKvElems = kBlockN * kHeadDim;
  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kPElems = kBlockN * kBlockM;
  static constexpr int kSmemElems = 2 * kKvElems + 2 * kStages * kQElems + 2 * kPElems;
  static constexpr int kSmemBytes =
      kSmemElems * static_cast<int>(sizeof(Element)) + 2 * kStages * kBlockM * static_cast<int>(sizeof(float));

  static_assert(kBlockN % 16 == 0 && kNWarps % kWarpsN == 0, "each warp owns 16 keys in phases 1 and 2");
  static_assert(kQCols % 16 == 0 && kDCols2 % 16 == 0, "phase 1/2 warp columns in pairs of n8 tiles");
  static_assert(kBlockM % 16 == 0 && kNWarps % kWarpsM3 == 0 && kDCols3 % 16 == 0 && kDCols3 % kDqChunk == 0,
                "phase 3 warps own 16 query rows and whole pairs of n8 tiles");
  static_assert(kBlockM == 64 || kBlockM == 128,
                "P^T/dS^T rows of 128 or 256 bytes (8-way XOR swizzle with power-of-two rows)");
  static_assert(kHeadDim >= 64 && (kHeadDim & (kHeadDim - 1)) == 0, "power-of-two rows of >= 8 chunks");
  static_assert(kStages == 1 || kStages == 2, "one or two Q/dO buffers");
};

template <typename Element_, int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_>
struct BwdDqTraits : QueryTileTraits<Element_, kHeadDim_, kBlockM_, kBlockN_, kNWarps_> {
  // Q, dO, then K and V in two stages each.
  static constexpr int kSmemElems = 2 * kBlockM_ * kHeadDim_ + 4 * kBlockN_ * kHeadDim_;
  static constexpr int kSmemBytes = kSmemElems * static_cast<int>(sizeof(Element_));
};

// The configuration used for each head dim. Shared memory: D=64 65 KB, D=128 113 KB, D=256 145 KB
// (one Q/dO stage so it fits sm80's 163 KB); the dQ kernel 64/96/128 KB. D=64 and D=128 ask for
// two CTAs per SM (128 registers, no spills on sm_90a; two D=128 CTAs fit H100's 228 KB of
// shared memory exactly, on sm_80 the kernel asks for one, see bwd_min_blocks_per_sm).
template <typename Element, int kHeadDim>
struct BwdConfig;
template <typename Element>
struct BwdConfig<Element, 64> {
  using Traits = BwdTraits<Element, 64, 64, 64, 8, 2, 2>;
  using DqTraits = BwdDqTraits<Element, 64, 64, 64, 4>;
};
template <typename Element>
struct BwdConfig<Element, 128> {
  using Traits = BwdTraits<Element, 128, 64, 64, 8, 2, 2>;
  using DqTraits = BwdDqTraits<Element, 128, 64, 64, 4>;
};
template <typename Element>
struct BwdConfig<Element, 256> {
  using Traits = BwdTraits<Element, 256, 64, 64, 8, 1, 1>;
  using DqTraits = BwdDqTraits<Element, 256, 64, 32, 4>;
};

}  // namespace sm80
}  // namespace cuda
}  // namespace ringattn
