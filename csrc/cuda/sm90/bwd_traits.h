// Tile shapes and shared-memory plans of the tier-2 (sm90a) backward dK/dV kernel, one per main
// loop (bwd_kernel.cuh): BwdTraits (key split, head dims 64 and 128) and BwdHeadSplitTraits
// (head split, head dim 256); BwdConfig picks by head dim.
//
// BwdTraits: a CTA owns kBlockN = 128 keys of one (sequence, KV head) and walks kBlockM = 64-row
// query tiles. Warpgroup 0 is the producer; consumer warpgroup w (1 or 2) owns keys [64 (w-1), +64).
// K, V, Q and dO tiles are stored as TMA writes them (128-byte swizzle, [D/64][rows][64]).
// dS^T goes to shared memory as [keys][64 queries] rows of 128 bytes with the same swizzle,
// double-buffered (tile t in buffer t & 1), where the dQ product reads it as an M-major operand.
#pragma once

#include <cstdint>

#include "cuda/bwd_stat_rows.h"
#include "cuda/sm90/bwd_params.h"
#include "cuda/sm90/warp_specialization.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

// LSE (log2) and Di of one Q/dO stage of a tile of kStatBlockM query rows (bwd_stat_rows.h): one
// TMA box each of kStatBox tokens from the tile's first token rounded down to 16 bytes (the tile's
// row starts bwd_stat_box_shift floats in), each in a 128-byte aligned slot (a TMA destination),
// Di's slot after LSE's. Shared by both traits below; each places the stages (kOffStats) itself.
template <int kStatBlockM_>
struct BwdStatStage {
  static constexpr int kStatBlockM = kStatBlockM_;
  static constexpr int kStatBox = bwd_stat_box_cols(kStatBlockM);
  static constexpr uint32_t kStatSlotBytes = (kStatBox * sizeof(float) + 127) / 128 * 128;
  static constexpr uint32_t kStatBytes = 2 * kStatSlotBytes;              // one stage
  static constexpr uint32_t kStatTxBytes = 2 * kStatBox * sizeof(float);  // its TMA bytes

  static_assert(kStatSlotBytes % 128 == 0, "every LSE / Di slot (a TMA destination) is a multiple of 128 bytes");
  static_assert(kStatBox <= 256 && (kStatBox * sizeof(float)) % 16 == 0 &&
                    kStatBox >= kStatBlockM + kStatAlignFloats - 1 && kStatBox * sizeof(float) <= kStatSlotBytes &&
                    kStatBlockM % kStatAlignFloats == 0,
                "an LSE / Di row of a tile, shifted by up to 3 floats (q_start % 4: kBlockM is a multiple of 4), "
                "is one TMA box (at most 256 elements, a multiple of 16 bytes) that fits its slot");
};

template <typename Element_, int kHeadDim_>
struct BwdTraits : WarpSpecialization, BwdStatStage<64> {
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
  static constexpr bool kHeadSplit = false;  // the key-split main loop (bwd_mainloop_keysplit.cuh)

  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);  // one Q or dO stage
  static constexpr uint32_t kKVColBlockBytes = kBlockN * 128;
  static constexpr uint32_t kQColBlockBytes = kBlockM * 128;
  static constexpr uint32_t kDsBytes = kBlockN * kBlockM * sizeof(Element);
  static constexpr uint32_t kOffK = 0;
  static constexpr uint32_t kOffV = kOffK + kKVBytes;
  static constexpr uint32_t kOffQ = kOffV + kKVBytes;
  static constexpr uint32_t kOffDo = kOffQ + kStages * kQBytes;
  static constexpr uint32_t kOffDs = kOffDo + kStages * kQBytes;
  // dQ: per consumer warpgroup, its dQ tile in fp32 as kHeadDim / 32 boxes of [kBlockM rows][32
  // floats] with the 128-byte swizzle, what the TMA reduce-add into dq_accum reads.
  static constexpr uint32_t kDqBoxBytes = kBlockM * 128;
  static constexpr uint32_t kDqStageBytes = (kHeadDim / 32) * kDqBoxBytes;
  static constexpr uint32_t kOffDqStage = (kOffDs + 2 * kDsBytes + 1023) / 1024 * 1024;
  // The LSE/Di stages after the dQ staging (they need 128-byte alignment only, which would cost
  // the 1024-byte rounding of kOffDqStage a whole 1 KB before it: D=128 would not fit).
  static constexpr uint32_t kOffStats = kOffDqStage + kNumConsumerWarpgroups * kDqStageBytes;
  static constexpr uint32_t kOffBarriers = kOffStats + kStages * kStatBytes;
  static constexpr int kNumBarriers = 1 + 2 * kStages;  // K/V, full/empty per Q stage
  static constexpr int kSmemBytes = 1024 + kOffBarriers + 8 * kNumBarriers;

  static_assert(sizeof(Element) == 2, "16-bit elements");
  static_assert(kHeadDim == 64 || kHeadDim == 128,
                "the key-split loop: head dims 64 and 128 (dQ is one m64n<kHeadDim> chain over K's column blocks)");
  static_assert(kBlockM * sizeof(Element) == 128, "one dS^T row is one 128-byte swizzle row");
  static_assert(kSmemBytes <= 227 * 1024, "fits an H100's shared memory");
  static_assert(kOffDqStage % 1024 == 0, "swizzled dQ staging boxes start 1024-byte aligned");
  static_assert(kOffStats % 128 == 0, "every LSE / Di slot (a TMA destination) starts 128-byte aligned");
  static_assert(kStatBlockM == kBlockM, "the LSE / Di boxes are sized for this tile's query rows");
};

// BwdHeadSplitTraits (bwd_mainloop_headsplit.cuh): a CTA owns kBlockN = 64 keys and walks
// kBlockM = 64-row query tiles. Consumer warpgroup w (0 or 1 below) computes S^T and dP^T of all
// 64 keys and queries [32 w, +32) of the tile, writes its part of P^T and dS^T ([keys][64
// queries], 128-byte swizzle, double-buffered by tile t & 1) to shared memory, and after a
// barrier between the two computes head-dim columns [128 w, +128) of dV, dK (registers: 2 x 64
// per thread) and dQ. Q/dO have two stages; a warpgroup stages its fp32 dQ for the TMA
// reduce-add in the Q and dO column blocks of the stage it has just finished reading (columns
// [128 w, +128) of both: 32 KB, its 64 x 128 fp32 dQ), so no separate staging buffer is needed.
template <typename Element_, int kHeadDim_>
struct BwdHeadSplitTraits : WarpSpecialization, BwdStatStage<64> {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;  // query rows per step (one 128-byte row of P^T / dS^T)
  static constexpr int kBlockN = 64;  // keys per CTA
  static constexpr int kStages = 2;   // Q/dO/LSE/Di stages
  static constexpr int kColBlocks = kHeadDim / 64;
  static constexpr bool kHeadSplit = true;
  static constexpr int kQueriesPerWarpgroup = kBlockM / kNumConsumerWarpgroups;       // S^T / dP^T columns
  static constexpr int kColsPerWarpgroup = kHeadDim / kNumConsumerWarpgroups;         // dK / dV / dQ columns
  static constexpr int kColBlocksPerWarpgroup = kColsPerWarpgroup / 64;

  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Element);
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Element);  // one Q or dO stage
  static constexpr uint32_t kKVColBlockBytes = kBlockN * 128;
  static constexpr uint32_t kQColBlockBytes = kBlockM * 128;
  static constexpr uint32_t kDsBytes = kBlockN * kBlockM * sizeof(Element);  // one P^T or dS^T buffer
  static constexpr uint32_t kOffK = 0;
  static constexpr uint32_t kOffV = kOffK + kKVBytes;
  static constexpr uint32_t kOffQ = kOffV + kKVBytes;
  static constexpr uint32_t kOffDo = kOffQ + kStages * kQBytes;
  static constexpr uint32_t kOffPt = kOffDo + kStages * kQBytes;
  static constexpr uint32_t kOffDs = kOffPt + 2 * kDsBytes;
  static constexpr uint32_t kOffStats = kOffDs + 2 * kDsBytes;
  // dQ staging: box j of warpgroup w ([kBlockM rows][32 floats], 128-byte swizzle, columns
  // kColsPerWarpgroup * w + 32 j) in the stage's Q column block kColBlocksPerWarpgroup * w + j
  // (j < kDqBoxesInQ), else in its dO column block kColBlocksPerWarpgroup * w + j - kDqBoxesInQ.
  static constexpr uint32_t kDqBoxBytes = kBlockM * 128;
  static constexpr int kDqBoxes = kColsPerWarpgroup / 32;
  static constexpr int kDqBoxesInQ = kColBlocksPerWarpgroup;
  static constexpr uint32_t kOffBarriers = kOffStats + kStages * kStatBytes;
  static constexpr int kNumBarriers = 1 + 2 * kStages;  // K/V, full/empty per Q stage
  static constexpr int kSmemBytes = 1024 + kOffBarriers + 8 * kNumBarriers;

  static_assert(sizeof(Element) == 2, "16-bit elements");
  static_assert(kHeadDim == 256, "the head-split loop is laid out for head dim 256");
  static_assert(kBlockM * sizeof(Element) == 128, "one P^T / dS^T row is one 128-byte swizzle row");
  static_assert(kDqBoxBytes == kQColBlockBytes && kDqBoxes == 2 * kColBlocksPerWarpgroup,
                "a warpgroup's dQ boxes fill its Q and dO column blocks of a stage exactly");
  static_assert(kQBytes % 1024 == 0 && kOffPt % 1024 == 0 && kOffDs % 1024 == 0 && kDsBytes % 1024 == 0,
                "swizzled tiles start 1024-byte aligned");
  static_assert(kSmemBytes <= 227 * 1024, "fits an H100's shared memory");
  static_assert(kOffStats % 128 == 0, "every LSE / Di slot (a TMA destination) starts 128-byte aligned");
  static_assert(kStatBlockM == kBlockM, "the LSE / Di boxes are sized for this tile's query rows");
};

template <typename Element, int kHeadDim>
struct BwdConfig {
  using Traits = BwdTraits<Element, kHeadDim>;
};
template <typename Element>
struct BwdConfig<Element, 256> {
  using Traits = BwdHeadSplitTraits<Element, 256>;
};

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
