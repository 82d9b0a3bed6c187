// Named-barrier ids of the tier-2 (sm90a) kernels, for ptx::named_barrier_sync / _arrive
// (bar.sync / bar.arrive). A CTA has 16 hardware barriers, ids 0 to 15, and id 0 is the one
// __syncthreads uses. Each kernel runs in CTAs of its own, so ids of different kernels may
// coincide; within one kernel the ids it uses must be distinct. Some barriers come in families
// of consecutive ids (one per consumer warpgroup, one per dS buffer): barrier_id(first, index).
// The tables at the end list every id each kernel uses and check them at compile time.
#pragma once

#include <cstddef>

#include "cuda/sm90/warp_specialization.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

constexpr int kHardwareNamedBarriers = 16;  // ids 0 .. 15 per CTA
constexpr int kSyncthreadsBarrier = 0;      // taken by __syncthreads

enum class NamedBarrier : int {
  // ---- forward, fwd_kernel.cuh ----
  kFwdVZeroed = 1,    // both consumer warpgroups zeroed the V rows past the sequence
  kFwdIssueWg0 = 3,   // + consumer warpgroup: that warpgroup's turn to issue its products (ping-pong)
  kFwdOStaged0 = 5,   // + consumer warpgroup: its Q rows are free / its O rows are staged (TMA store)
  // ---- backward dK/dV, bwd_kernel.cuh ----
  kBwdKZeroed = 1,       // K rows past the keys in use zeroed
  kBwdQTailZeroed = 2,   // Q and dO rows past the sequence zeroed
  kBwdDsWritten0 = 3,    // + dS buffer (t & 1): the other warpgroup's dS^T half is written
  kBwdDsFree0 = 5,       // + dS buffer (t & 1): the dQ product has read the buffer
  kBwdDqStage0 = 7,      // + consumer warpgroup: its dQ staging boxes are written / free
  // ---- backward dK/dV, head-split main loop (head dim 256), bwd_mainloop_headsplit.cuh ----
  // (kBwdKZeroed and kBwdQTailZeroed as above)
  kBwdPdsWritten = 3,     // both warpgroups wrote their queries' P^T and dS^T of the tile
  kBwdHsDqStage0 = 4,     // + consumer warpgroup: its dQ staging boxes are written
  // ---- backward dQ (deterministic mode), bwd_dq_kernel.cuh ----
  kBwdDqKZeroed = 1,     // K rows past the sequence zeroed
};

// The id of barrier `first`, or of member `index` of the family of consecutive ids starting there.
__host__ __device__ __forceinline__ constexpr int barrier_id(NamedBarrier first, int index = 0) {
  return static_cast<int>(first) + index;
}

// ---- compile-time check of the ids each kernel uses ----
struct NamedBarrierRange {
  NamedBarrier first;
  int count;  // consecutive ids from `first` (index 0 .. count - 1 of barrier_id)
};

constexpr int kBwdDsBuffers = 2;  // the dK/dV kernel's dS^T double buffer, indexed by t & 1

constexpr NamedBarrierRange kFwdNamedBarriers[] = {
    {NamedBarrier::kFwdVZeroed, 1},
    {NamedBarrier::kFwdIssueWg0, WarpSpecialization::kNumConsumerWarpgroups},
    {NamedBarrier::kFwdOStaged0, WarpSpecialization::kNumConsumerWarpgroups},
};
constexpr NamedBarrierRange kBwdNamedBarriers[] = {
    {NamedBarrier::kBwdKZeroed, 1},
    {NamedBarrier::kBwdQTailZeroed, 1},
    {NamedBarrier::kBwdDsWritten0, kBwdDsBuffers},
    {NamedBarrier::kBwdDsFree0, kBwdDsBuffers},
    {NamedBarrier::kBwdDqStage0, WarpSpecialization::kNumConsumerWarpgroups},
};
constexpr NamedBarrierRange kBwdHeadSplitNamedBarriers[] = {
    {NamedBarrier::kBwdKZeroed, 1},
    {NamedBarrier::kBwdQTailZeroed, 1},
    {NamedBarrier::kBwdPdsWritten, 1},
    {NamedBarrier::kBwdHsDqStage0, WarpSpecialization::kNumConsumerWarpgroups},
};
constexpr NamedBarrierRange kBwdDqNamedBarriers[] = {
    {NamedBarrier::kBwdDqKZeroed, 1},
};

// True when every id of every range lies in [1, kHardwareNamedBarriers) (id 0 is
// __syncthreads') and no id belongs to two ranges.
template <std::size_t N>
constexpr bool named_barriers_valid(const NamedBarrierRange (&ranges)[N]) {
  for (std::size_t i = 0; i < N; ++i) {
    const int lo = static_cast<int>(ranges[i].first);
    const int hi = lo + ranges[i].count;  // one past the last id
    if (ranges[i].count < 1 || lo <= kSyncthreadsBarrier || hi > kHardwareNamedBarriers) return false;
    for (std::size_t j = 0; j < i; ++j) {
      const int other_lo = static_cast<int>(ranges[j].first);
      const int other_hi = other_lo + ranges[j].count;
      if (lo < other_hi && other_lo < hi) return false;
    }
  }
  return true;
}

static_assert(named_barriers_valid(kFwdNamedBarriers),
              "forward kernel: named-barrier ids must be distinct, above 0 (__syncthreads) and below 16");
static_assert(named_barriers_valid(kBwdNamedBarriers),
              "dK/dV kernel: named-barrier ids must be distinct, above 0 (__syncthreads) and below 16");
static_assert(named_barriers_valid(kBwdHeadSplitNamedBarriers),
              "dK/dV kernel, head-split loop: named-barrier ids must be distinct, above 0 (__syncthreads) and below 16");
static_assert(named_barriers_valid(kBwdDqNamedBarriers),
              "dQ kernel: named-barrier ids must be distinct, above 0 (__syncthreads) and below 16");

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
