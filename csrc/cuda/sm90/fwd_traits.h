// Tile shapes and shared-memory plan of the tier-2 (sm90a) forward kernel.
//
// A CTA is three warpgroups: warpgroup 0 is the producer (one thread issues the TMA loads),
// warpgroups 1 and 2 are consumers, each owning 64 of the tile's kBlockM = 128 query rows.
// Q, K and V tiles are stored as TMA writes them with the 128-byte swizzle: column blocks of 64
// elements ([D/64][rows][64]), each 1024-byte aligned, which is also the wgmma operand layout.
#pragma once

#include <cstdint>

#include "cuda/sm90/warp_specialization.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

// kQStages_: stages of the Q ring (fwd_kernel.cuh): 1 for one tile per CTA; the persistent grid
// takes PersistentFwdTraits below.
template <typename Element_, int kHeadDim_, int kBlockN_, int kStages_, int kQStages_ = 1>
struct FwdTraits : WarpSpecialization {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kStages = kStages_;
  static constexpr int kColBlocks = kHeadDim / 64;  // 64-element (128-byte) column blocks
  // The two consumer warpgroups take turns issuing their wgmma products (IssueOrder in
  // fwd_kernel.cuh); false lets them issue independently (docs/perf-log.md has the measurement).
  static constexpr bool kPingPong = true;

  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);  // one K or V stage
  static constexpr uint32_t kQColBlockBytes = kBlockM * 128;
  static constexpr uint32_t kKVColBlockBytes = kBlockN * 128;
  static constexpr int kQStages = kQStages_;
  // Offsets from the 1024-byte aligned base.
  static constexpr uint32_t kOffQ = 0;
  static constexpr uint32_t kOffK = kOffQ + kQStages * kQBytes;
  static constexpr uint32_t kOffV = kOffK + kStages * kKVBytes;
  static constexpr uint32_t kOffBarriers = kOffV + kStages * kKVBytes;
  // Q full (kQStages), full/empty of K and V (kStages each), Q empty (kQStages)
  static constexpr int kNumBarriers = 2 * kQStages + 4 * kStages;
  // The producer's description of a tile for the consumers, one per Q stage (FwdTileSlot).
  static constexpr uint32_t kOffTileSlots = kOffBarriers + 8 * kNumBarriers;
  static constexpr int kTileSlotBytes = 64;
  static constexpr int kSmemBytes = 1024 /* alignment slack */ + kOffTileSlots + kQStages * kTileSlotBytes;

  static_assert(sizeof(Element) == 2, "16-bit elements");
  static_assert(kHeadDim % 64 == 0, "head dim in 64-element column blocks");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "wgmma N");
  static_assert(kQBytes % 1024 == 0 && kKVBytes % 1024 == 0, "1024-byte aligned tiles");
  static_assert(kSmemBytes <= 227 * 1024, "fits an H100's shared memory");
};

// The persistent grid's traits (fwd_kernel.cuh): two Q stages where they fit next to the K/V stages
// (D 64 and 128), so the next tile's Q loads while this tile still runs; one at D 256. A stage
// also holds its tile's O for the TMA store once the tile's last S is done (no shared memory of
// its own: fwd_kernel.cuh, store_o_by_tma), which is why that kernel needs the second stage.
template <typename T>
using PersistentFwdTraits =
    FwdTraits<typename T::Element, T::kHeadDim, T::kBlockN, T::kStages,
              2 * T::kQBytes + 2 * T::kStages * T::kKVBytes + 4096 <= 227 * 1024 ? 2 : 1>;

// Head dims with a persistent forward kernel: 64 and 128. At 256 the consumers' registers are
// full with one tile (its persistent loop spilled) and Q has one stage, so it keeps one CTA per
// tile. The host asks for it (a tile counter) only where this holds (fwd_dispatch.cu).
constexpr bool has_persistent_fwd(int head_dim) { return head_dim <= 128; }

// The configuration used per (dtype, head dim).
template <typename Element, int kHeadDim>
struct FwdConfig;
template <typename Element>
struct FwdConfig<Element, 64> {
  using Traits = FwdTraits<Element, 64, 128, 2>;
};
template <typename Element>
struct FwdConfig<Element, 128> {
  using Traits = FwdTraits<Element, 128, 128, 2>;
};
// Head dim 256: 64-key blocks (the 64 x 256 output accumulator of a warpgroup is 128 registers).
template <typename Element>
struct FwdConfig<Element, 256> {
  using Traits = FwdTraits<Element, 256, 64, 2>;
};

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
