// Tile shapes and shared-memory plan of the tier-2 (sm90a) backward dQ kernel (deterministic
// mode).
//
// A CTA owns kBlockM = 128 query rows of one (group, sequence, query head), like the forward:
// warpgroup 0 is the producer, consumer warpgroup w (1 or 2) owns rows [64 (w-1), +64). It
// streams the K/V blocks the tile sees (kBlockN = 64 keys; 32 at head dim 256, where a consumer
// thread holds 128 dQ accumulator registers and Q and dO take 128 KB of shared memory) in a fixed
// order. Q, dO, K and V are stored as TMA writes them (128-byte swizzle, [D/64][rows][64]), the
// wgmma operand layout.
#pragma once

#include <cstdint>

#include "cuda/sm90/warp_specialization.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

template <typename Element_, int kHeadDim_>
struct BwdDqTraits : WarpSpecialization {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;  // query rows per CTA, 64 per consumer warpgroup
  static constexpr int kBlockN = kHeadDim == 256 ? 32 : 64;  // keys per K/V block
  static constexpr int kStages = 3;    // K/V stages (K and V of a block share one)
  static constexpr int kColBlocks = kHeadDim / 64;

  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);  // Q or dO
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);  // K or V of one stage
  static constexpr uint32_t kQColBlockBytes = kBlockM * 128;
  static constexpr uint32_t kKVColBlockBytes = kBlockN * 128;
  static constexpr uint32_t kOffQ = 0;
  static constexpr uint32_t kOffDo = kOffQ + kQBytes;
  static constexpr uint32_t kOffK = kOffDo + kQBytes;
  static constexpr uint32_t kOffV = kOffK + kStages * kKVBytes;
  static constexpr uint32_t kOffBarriers = kOffV + kStages * kKVBytes;
  static constexpr int kNumBarriers = 1 + 2 * kStages;  // Q and dO; full/empty per K/V stage
  static constexpr int kSmemBytes = 1024 /* alignment slack */ + kOffBarriers + 8 * kNumBarriers;

  static_assert(sizeof(Element) == 2, "16-bit elements");
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256,
                "the 64 x kHeadDim dQ accumulator of a warpgroup fits its registers");
  static_assert(kQBytes % 1024 == 0 && kKVBytes % 1024 == 0, "1024-byte aligned tiles");
  static_assert(kSmemBytes <= 227 * 1024, "fits an H100's shared memory");
};

template <typename Element, int kHeadDim>
struct BwdDqConfig {
  using Traits = BwdDqTraits<Element, kHeadDim>;
};

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
