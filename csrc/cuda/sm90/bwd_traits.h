// Tile shapes and shared-memory plan of the tier-2 (sm90a) backward dK/dV kernel.
//
// A CTA owns kBlockN = 128 keys of one (sequence, KV head) and walks kBlockM = 64-row query
// tiles. Warpgroup 0 is the producer; consumer warpgroup w (1 or 2) owns keys [64 (w-1), +64).
// K, V, Q and dO tiles are stored as TMA writes them (128-byte swizzle, [D/64][rows][64]).
// dS^T goes to shared memory as [keys][64 queries] rows of 128 bytes with the same swizzle,
// double-buffered (tile t in buffer t & 1), where the dQ product reads it as an M-major operand.
#pragma once

#include <cstdint>

#include "cuda/sm90/bwd_params.h"
#include "cuda/sm90/warp_specialization.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

template <typename Element_, int kHeadDim_>
struct BwdTraits : WarpSpecialization {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;   // query rows per step (one 128-byte row of dS^T)
  static constexpr int kBlockN = 128;  // keys per CTA, 64 per consumer warpgroup
  // Q/dO/LSE/Di stages. RINGATTN_SM90_BWD_STAGES overrides it at build time (kernel development:
  // scripts/bwd_variants.sh); 2 is what was measured.
#ifdef RINGATTN_SM90_BWD_STAGES
  static constexpr int kStages = RINGATTN_SM90_BWD_STAGES;
#else
  static constexpr int kStages = 2;
#endif
  static constexpr int kColBlocks = kHeadDim / 64;

  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);  // one Q or dO stage
  static constexpr uint32_t kKVColBlockBytes = kBlockN * 128;
  static constexpr uint32_t kQColBlockBytes = kBlockM * 128;
  static constexpr uint32_t kDsBytes = kBlockN * kBlockM * sizeof(Element);
  static constexpr uint32_t kStatBytes = 2 * kBlockM * sizeof(float);  // LSE (log2) and Di of a stage
  static constexpr uint32_t kOffK = 0;
  static constexpr uint32_t kOffV = kOffK + kKVBytes;
  static constexpr uint32_t kOffQ = kOffV + kKVBytes;
  static constexpr uint32_t kOffDo = kOffQ + kStages * kQBytes;
  static constexpr uint32_t kOffDs = kOffDo + kStages * kQBytes;
  static constexpr uint32_t kOffStats = kOffDs + 2 * kDsBytes;
  // dQ: per consumer warpgroup, its dQ tile in fp32 as kHeadDim / 32 boxes of [kBlockM rows][32
  // floats] with the 128-byte swizzle, what the TMA reduce-add into dq_accum reads.
  static constexpr uint32_t kDqBoxBytes = kBlockM * 128;
  static constexpr uint32_t kDqStageBytes = (kHeadDim / 32) * kDqBoxBytes;
  static constexpr uint32_t kOffDqStage = (kOffStats + kStages * kStatBytes + 1023) / 1024 * 1024;
  static constexpr uint32_t kOffBarriers = kOffDqStage + kNumConsumerWarpgroups * kDqStageBytes;
  static constexpr int kNumBarriers = 1 + 2 * kStages;  // K/V, full/empty per Q stage
  static constexpr int kSmemBytes = 1024 + kOffBarriers + 8 * kNumBarriers;

  static_assert(sizeof(Element) == 2, "16-bit elements");
  static_assert(kHeadDim == 64 || kHeadDim == 128,
                "the dQ product splits the head dim into 64-column halves of K's column blocks (64 or 128 only)");
  static_assert(kBlockM * sizeof(Element) == 128, "one dS^T row is one 128-byte swizzle row");
  static_assert(kSmemBytes <= 227 * 1024, "fits an H100's shared memory");
  static_assert(kOffDqStage % 1024 == 0, "swizzled dQ staging boxes start 1024-byte aligned");
};

template <typename Element, int kHeadDim>
struct BwdConfig {
  using Traits = BwdTraits<Element, kHeadDim>;
};

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
