// The producer/consumer rings of the tier-2 (sm90a) kernels: kStages shared-memory stages, each
// guarded by a "full" mbarrier (the producer's TMA bytes landed) and an "empty" mbarrier (every
// consumer warp is done reading the stage).
//
// Iteration i of a loop (the i-th tile loaded into the ring) uses stage i % kStages, in phase
// (i / kStages) & 1 of that stage's barriers. The consumers wait for the full barrier to complete
// that phase; the producer waits for the empty barrier to complete the opposite parity (the
// consumers' release of the stage's previous use), which a freshly initialised barrier reports
// complete, so the first kStages acquisitions do not wait.
//
//   producer (one thread, or one warp):            consumers (every consumer thread):
//     const PipelineState<S> st(i);                  const PipelineState<S> st(i);
//     const int s = st.stage();                      const int s = st.stage();
//     pipe.producer_acquire(st);                     pipe.consumer_wait(st);
//     arrive_expect_tx(pipe.full(s), bytes);         ... wgmma reading stage s ...
//     tma_load(..., pipe.full(s), ...);              pipe.consumer_release(s, lane == 0);
//
// The full barrier is initialised with the producer's arrival count (its TMA bytes complete the
// phase), the empty barrier with the number of consumer warps (one arrival per warp).
#pragma once

#include <cstdint>

#include "cuda/sm90/ptx_sm90.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

// Iteration `count` of a kStages-deep ring: its stage and the parities to wait for. A loop over i
// writes PipelineState<kStages>(i) (st.prev() for the iteration before, st.next() for the one
// after) instead of the modulo and parity arithmetic; stage and parities are computed where
// they are asked for.
template <int kStages>
struct PipelineState {
  static_assert(kStages >= 1, "a ring has at least one stage");
  int count;  // iterations since the start of the ring, >= 0

  __host__ __device__ __forceinline__ constexpr explicit PipelineState(int iteration) : count(iteration) {}
  __host__ __device__ __forceinline__ constexpr int stage() const { return count % kStages; }
  // Parity of the phase the consumers wait for on the stage's full barrier.
  __host__ __device__ __forceinline__ constexpr uint32_t phase() const { return (count / kStages) & 1; }
  // Parity the producer waits for on the stage's empty barrier.
  __host__ __device__ __forceinline__ constexpr uint32_t producer_phase() const { return phase() ^ 1; }
  __host__ __device__ __forceinline__ constexpr PipelineState prev() const { return PipelineState(count - 1); }
  __host__ __device__ __forceinline__ constexpr PipelineState next() const { return PipelineState(count + 1); }
};

static_assert(PipelineState<2>(0).stage() == 0 && PipelineState<2>(0).phase() == 0 &&
                  PipelineState<2>(0).producer_phase() == 1,
              "iteration 0: stage 0, consumers wait for phase 0, the producer passes the fresh empty barrier");
static_assert(PipelineState<2>(3).stage() == 1 && PipelineState<2>(3).phase() == 1 &&
                  PipelineState<2>(3).producer_phase() == 0,
              "iteration 3 of a 2-stage ring: stage 1, its second use");
static_assert(PipelineState<3>(7).prev().stage() == 0 && PipelineState<3>(7).prev().phase() == 0 &&
                  PipelineState<3>(5).next().stage() == 0 && PipelineState<3>(5).next().phase() == 0 &&
                  PipelineState<3>(2).next().stage() == 0 && PipelineState<3>(2).next().phase() == 1,
              "prev / next step one iteration, wrapping the stage and flipping the phase at the wrap");

// The full/empty mbarriers of one ring, entries of a kernel's array of 8-byte mbarriers at
// shared-memory address `bars`: stage s's full barrier is entry full_first + s, its empty
// barrier entry empty_first + s.
template <int kStages>
struct MbarrierPipeline {
  using State = PipelineState<kStages>;
  uint32_t bars;    // shared-memory address of the kernel's mbarrier array
  int full_first;   // entry of stage 0's full barrier
  int empty_first;  // entry of stage 0's empty barrier

  __device__ __forceinline__ uint32_t full(int stage) const { return bars + 8 * (full_first + stage); }
  __device__ __forceinline__ uint32_t empty(int stage) const { return bars + 8 * (empty_first + stage); }

  // Producer: wait until the consumers released the stage of `st` (no wait on its first use).
  __device__ __forceinline__ void producer_acquire(State st) const {
    ptx::mbarrier_wait_parity(empty(st.stage()), st.producer_phase());
  }
  // Consumer: wait until the producer's data for `st` landed in its stage.
  __device__ __forceinline__ void consumer_wait(State st) const {
    ptx::mbarrier_wait_parity(full(st.stage()), st.phase());
  }
  // Consumer: this warp is done reading `stage` (a release needs no phase); one lane
  // (arrive_lane) arrives for the warp once the whole warp has reached this point.
  __device__ __forceinline__ void consumer_release(int stage, bool arrive_lane) const {
    __syncwarp();
    if (arrive_lane) ptx::mbarrier_arrive(empty(stage));
  }
};

// The dynamic shared memory of a tier-2 kernel rounded up to 1024 bytes, the alignment of the
// 128-byte swizzle's tiles (each kernel's kSmemBytes holds 1024 bytes of slack for it).
__device__ __forceinline__ uint32_t aligned_dynamic_smem() {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  return (ptx::smem_addr(smem_raw) + 1023u) & ~1023u;
}

// The kernel's mbarriers, initialised by thread 0 before the whole CTA goes on: the barrier of the
// operands loaded once (`once`: one arrival, the producer's, plus its TMA bytes), then, stage by
// stage, the full barriers of every ring in `rings` (full_arrivals each) and their empty barriers
// (empty_arrivals each: one per consumer warp).
template <int kStages, typename... Rings>
__device__ __forceinline__ void init_pipeline_barriers(uint32_t once, int full_arrivals, int empty_arrivals,
                                                       const MbarrierPipeline<kStages>& ring, const Rings&... rings) {
  if (threadIdx.x == 0) {
    ptx::mbarrier_init(once, 1);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      ptx::mbarrier_init(ring.full(s), full_arrivals);
      (ptx::mbarrier_init(rings.full(s), full_arrivals), ...);
      ptx::mbarrier_init(ring.empty(s), empty_arrivals);
      (ptx::mbarrier_init(rings.empty(s), empty_arrivals), ...);
    }
    ptx::fence_mbarrier_init();
  }
  __syncthreads();
}

// Consumer: wait for iteration `a` of ring `pipe_a`, then for iteration `b` of ring `pipe_b`
// (a block whose products read two rings, e.g. K of one iteration and V of the one before).
// Both parities are computed before the first wait.
template <int kStages>
__device__ __forceinline__ void consumer_wait(const MbarrierPipeline<kStages>& pipe_a, PipelineState<kStages> a,
                                              const MbarrierPipeline<kStages>& pipe_b, PipelineState<kStages> b) {
  const uint32_t phase_a = a.phase(), phase_b = b.phase();
  ptx::mbarrier_wait_parity(pipe_a.full(a.stage()), phase_a);
  ptx::mbarrier_wait_parity(pipe_b.full(b.stage()), phase_b);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
