// Tier-2 grouped varlen attention forward for sm90a: TMA loads on an mbarrier pipeline, wgmma
// for both products, warp specialisation.
//
// One CTA computes one 128-row query tile of one (group, sequence, head), taken from the same
// longest-first work list as tier 1 (heads of one item are consecutive CTAs, so the query heads
// of one KV head read the same K/V from L2 at about the same time).
//   warpgroup 0 (producer, 24 registers): one thread loads Q once, then K and V block by block,
//     from the last block to the first, into kStages stages guarded by full/empty mbarriers.
//   warpgroups 1, 2 (consumers, 240 registers): 64 query rows each. S = Q K^T (wgmma, both
//     operands in shared memory), masking, online softmax in registers, O += P V (wgmma, P from
//     registers, V transposed from shared memory). The softmax of block n overlaps the P V
//     product of block n+1, which is issued right after S(n).
// Varlen through TMA: a tile may run past its sequence into the next one (or past the tensor,
// where TMA fills zeros); those key columns are masked to -inf and, in the block that holds
// the sequence's last key, the rows of V past it are zeroed in shared memory before P V reads
// them (0 * garbage could be NaN). Query rows past the sequence are computed and not stored.
// The tile reads the key blocks [n_block_min, n_block_max) of the mask policy (common/mask.h):
// with a left bound (MaskMode::kLocal) the walk stops before block 0, and a tile that sees no key
// block writes O = 0 and LSE = -inf (or the head's sink) without loading anything.
// MaskMode::kLocal kernels also apply the sinks (RowSoftmax::finalize_with_sink) and, compiled
// with kSoftcap, the logit softcap (softcap.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/launch.h"
#include "cuda/ptx.h"
#include "cuda/query_tile_work.h"
#include "cuda/seqlen_info.h"
#include "cuda/sm90/fragments.h"
#include "cuda/sm90/fwd_params.h"
#include "cuda/sm90/fwd_traits.h"
#include "cuda/sm90/mma_loop.h"
#include "cuda/sm90/named_barriers.h"
#include "cuda/sm90/pipeline.h"
#include "cuda/sm90/ptx_sm90.h"
#include "cuda/sm90/softcap.cuh"
#include "cuda/sm90/softmax.cuh"
#include "cuda/sm90/wgmma.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

// Ping-pong between the two consumer warpgroups: each waits for its turn before issuing a block's
// products and hands the turn over right after, so one warpgroup's softmax runs while the other's
// products keep the tensor cores busy. Warpgroup 1 gives warpgroup 0 the first turn and skips its
// last hand-over, so every bar.sync meets exactly one bar.arrive.
struct IssueOrder {
  bool enabled;
  int wg;
  __device__ __forceinline__ void wait_turn() const {
    if (enabled) ptx::named_barrier_sync(barrier_id(NamedBarrier::kFwdIssueWg0, wg), 256);
  }
  __device__ __forceinline__ void pass_turn(bool last) const {
    if (enabled && !(last && wg == 1)) ptx::named_barrier_arrive(barrier_id(NamedBarrier::kFwdIssueWg0, wg ^ 1), 256);
  }
  __device__ __forceinline__ void start() const {
    if (enabled && wg == 1) ptx::named_barrier_arrive(barrier_id(NamedBarrier::kFwdIssueWg0), 256);
  }
};

// K and V stream through two rings of kStages stages each (sm90/pipeline.h), so the P V product
// of one block reads its V stage while S of the next block reads the next K stage.
template <typename T>
struct SmemPlan {
  using Pipeline = MbarrierPipeline<T::kStages>;
  uint32_t q, k, v, bars;
  __device__ __forceinline__ explicit SmemPlan(uint32_t base)
      : q(base + T::kOffQ), k(base + T::kOffK), v(base + T::kOffV), bars(base + T::kOffBarriers) {}
  __device__ __forceinline__ uint32_t bar_q() const { return bars; }
  // Entry 0 is bar_q; then full K, empty K, full V, empty V, kStages entries each.
  __device__ __forceinline__ Pipeline k_pipe() const { return {bars, 1, 1 + T::kStages}; }
  __device__ __forceinline__ Pipeline v_pipe() const { return {bars, 1 + 2 * T::kStages, 1 + 3 * T::kStages}; }
  __device__ __forceinline__ uint32_t k_stage(int s) const { return k + s * T::kKVBytes; }
  __device__ __forceinline__ uint32_t v_stage(int s) const { return v + s * T::kKVBytes; }
};

// The producer: one thread. Block i of the tile's loop (key block n = n_block_max - 1 - i, down to
// n_block_min) goes to the stage of pipeline iteration i, once the consumers released that stage.
template <typename T>
__device__ __forceinline__ void produce(const FwdKernelParams& params, const SmemPlan<T>& sm, int group, int head,
                                        int kv_head, int q_token0, int k_token0, int n_block_min, int n_block_max) {
  const void* tma_q = &params.tma_q[group];
  ptx::mbarrier_arrive_expect_tx(sm.bar_q(), T::kQBytes);
#pragma unroll
  for (int cb = 0; cb < T::kColBlocks; ++cb)
    ptx::tma_load_3d(sm.q + cb * T::kQColBlockBytes, tma_q, sm.bar_q(), cb * 64, head, q_token0);
  const typename SmemPlan<T>::Pipeline k_pipe = sm.k_pipe(), v_pipe = sm.v_pipe();
  for (int i = 0; i < n_block_max - n_block_min; ++i) {
    const int n = n_block_max - 1 - i;
    const PipelineState<T::kStages> st(i);
    const int s = st.stage();
    const int token = k_token0 + n * T::kBlockN;
    k_pipe.producer_acquire(st);
    ptx::mbarrier_arrive_expect_tx(k_pipe.full(s), T::kKVBytes);
#pragma unroll
    for (int cb = 0; cb < T::kColBlocks; ++cb)
      ptx::tma_load_3d(sm.k_stage(s) + cb * T::kKVColBlockBytes, &params.tma_k, k_pipe.full(s), cb * 64, kv_head, token);
    v_pipe.producer_acquire(st);
    ptx::mbarrier_arrive_expect_tx(v_pipe.full(s), T::kKVBytes);
#pragma unroll
    for (int cb = 0; cb < T::kColBlocks; ++cb)
      ptx::tma_load_3d(sm.v_stage(s) + cb * T::kKVColBlockBytes, &params.tma_v, v_pipe.full(s), cb * 64, kv_head, token);
  }
}

// One consumer warpgroup's view of the tile: its 64 query rows and the wgmma operand descriptors.
template <typename T>
struct ConsumerTile {
  using Element = typename T::Element;
  static constexpr int kNTiles = T::kBlockN / 8;    // S accumulator: m16n8 fragments per warp
  static constexpr int kDTiles = T::kHeadDim / 8;   // O accumulator
  static constexpr int kPSteps = T::kBlockN / 16;   // k-steps of P V
  static constexpr int kQKSteps = T::kHeadDim / 16;  // k-steps of Q K^T

  const SmemPlan<T>& sm;
  int wg;  // consumer warpgroup 0 or 1

  // Operand descriptors per k step (mma_loop.h): the tile's base descriptor advanced by a
  // constant per step (one add, not a descriptor rebuilt from the address per k step).
  // Q rows [64 wg, 64 wg + 64) and K of stage s as K-major operands.
  __device__ __forceinline__ KMajorSteps<T::kQColBlockBytes> q_steps() const {
    return {ptx::smem_desc_sw128(sm.q + wg * 64 * 128, 16, 1024)};
  }
  __device__ __forceinline__ KMajorSteps<T::kKVColBlockBytes> k_steps(int s) const {
    return {ptx::smem_desc_sw128(sm.k_stage(s), 16, 1024)};
  }
  // V of stage s as the MN-major B operand of P V: k-step kk covers keys [16 kk, 16 kk + 16);
  // the 64-column blocks of the head dim are kKVColBlockBytes apart.
  __device__ __forceinline__ MnMajorSteps v_steps(int s) const {
    return {ptx::smem_desc_sw128(sm.v_stage(s), T::kKVColBlockBytes, 1024)};
  }

  __device__ __forceinline__ void issue_qk(float (&s)[kNTiles][4], int stage) const {
    ptx::wgmma_fence();
    mma_ss<Element, kQKSteps, MmaInit::kOverwrite>(s, q_steps(), k_steps(stage));
    ptx::wgmma_commit_group();
  }
  __device__ __forceinline__ void issue_pv(float (&o)[kDTiles][4], const uint32_t (&p)[kPSteps][4], int stage) const {
    ptx::wgmma_fence();
    mma_rs_tb<Element, MmaInit::kAccumulate>(o, p, v_steps(stage));
    ptx::wgmma_commit_group();
  }
};

template <typename T, MaskMode kMask, bool kSoftcap>
__global__ void __launch_bounds__(T::kThreads, 1) grouped_fwd_kernel(const __grid_constant__ FwdKernelParams params) {
  static_assert(!kSoftcap || kMask == MaskMode::kLocal, "the softcap is compiled into kLocal kernels only");
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr bool kLocal = kMask == MaskMode::kLocal;
  using Element = typename T::Element;
  using Tile = ConsumerTile<T>;
  constexpr int kBlockM = T::kBlockM;
  constexpr int kBlockN = T::kBlockN;
  constexpr int kNTiles = Tile::kNTiles;
  constexpr int kDTiles = Tile::kDTiles;
  constexpr int kPSteps = Tile::kPSteps;
  const cuda::FwdKernelParams& p = params.base;

  const int num_heads_q = p.num_heads_q;
  QueryTileWork work;
  if (!work.decode(p.work_items, p.work_count, num_heads_q)) return;
  const int head = work.head, group = work.group(), m_block = work.m_block();
  const FwdGroupArgs& g = p.groups[group];
  const SeqLenInfo seq(g.cu_seqlens_q, g.total_q, p.cu_seqlens_k, p.total_k, g.seqused_k, work.batch());
  const int row0 = m_block * kBlockM;
  if (row0 >= seq.seqlen_q) return;
  const int rows_valid = min(kBlockM, seq.seqlen_q - row0);
  const int kv_head = head / p.q_heads_per_kv_head;
  const int tid = threadIdx.x;

  Element* out_tile = static_cast<Element*>(g.out) + (seq.q_start + row0) * g.out_row_stride + head * g.out_head_stride;
  float* lse_tile = g.softmax_lse + static_cast<int64_t>(head) * g.total_q + seq.q_start + row0;

  const Mask<kMask> seq_mask = seq.mask<kMask>(params.features, group, work.batch());
  // Key blocks [n_block_min, n_block_max) of this tile. n_block_min is the constant 0 when no
  // row's keys can start past key 0 (kNone, kCausal), so the loops below are those of a walk
  // down to block 0.
  const int n_block_min = Mask<kMask>::kKeysStartAtZero ? 0 : seq_mask.n_block_min(m_block, kBlockM, kBlockN);
  const int n_block_max = seq_mask.n_block_max(m_block, kBlockM, kBlockN);
  if (n_block_max <= n_block_min) {  // no row of this tile sees a key: O = 0, LSE = -inf (or the sink)
    constexpr int kChunks = T::kHeadDim / 8;
    for (int i = tid; i < rows_valid * kChunks; i += T::kThreads)
      *reinterpret_cast<uint4*>(out_tile + (i / kChunks) * g.out_row_stride + (i % kChunks) * 8) = make_uint4(0, 0, 0, 0);
    float empty_lse = -INFINITY;
    if constexpr (kLocal) {
      if (params.features.sinks != nullptr) empty_lse = params.features.sinks[head];
    }
    for (int row = tid; row < rows_valid; row += T::kThreads) lse_tile[row] = empty_lse;
    return;
  }

  const SmemPlan<T> sm(aligned_dynamic_smem());
  const typename SmemPlan<T>::Pipeline k_pipe = sm.k_pipe(), v_pipe = sm.v_pipe();
  init_pipeline_barriers(sm.bar_q(), 1, T::kConsumerWarps, k_pipe, v_pipe);

  const int warpgroup = ptx::warpgroup_index();
  if (warpgroup == 0) {
    // ---------------- producer ----------------
    ptx::setmaxnreg_dec<T::kProducerRegs>();
    if (tid == 0) {
      ptx::prefetch_tensor_map(&params.tma_q[group]);
      ptx::prefetch_tensor_map(&params.tma_k);
      ptx::prefetch_tensor_map(&params.tma_v);
      produce<T>(params, sm, group, head, kv_head, seq.q_start + row0, seq.k_start, n_block_min, n_block_max);
    }
    return;
  }

  // ---------------- consumers ----------------
  ptx::setmaxnreg_inc<T::kConsumerRegs>();
  const int wg = warpgroup - 1;
  const int lane = tid & 31;
  const int warp_in_wg = (tid / 32) & 3;
  const bool arrive_lane = lane == 0;
  const Tile tile{sm, wg};
  // This thread's two query rows, within the sequence, and its first key column in a block.
  const int my_row = row0 + wg * 64 + warp_in_wg * 16 + (lane >> 2);
  const int my_col = (lane & 3) * 2;
  const int wg_row0 = row0 + wg * 64;

  float o[kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
    for (int c = 0; c < 4; ++c) o[dt][c] = 0.f;
  float s[kNTiles][4];
  uint32_t pfrag[kPSteps][4];
  RowSoftmax softmax;

  // Masks key columns past the sequence and outside each row's window (common/mask.h).
  auto mask = [&](int n) {
    const int col0 = n * kBlockN;
    if (!seq_mask.tile_needs_key_mask(wg_row0, 64, col0, kBlockN)) return;
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int row = my_row + ((c >> 1) << 3);
        const int col = col0 + nt * 8 + my_col + (c & 1);
        if (seq_mask.key_masked(row, col)) s[nt][c] = -INFINITY;
      }
  };
  // Softcap (kSoftcap): the scores become t = tanh(s * softcap_scale) before the mask, and the
  // softmax takes them with the softcap's scale (softcap.cuh).
  auto softcap = [&]() {
    if constexpr (kSoftcap) softcap_scores(s, params.features.softcap_scale);
  };
  float score_scale_log2 = p.softmax_scale_log2;
  if constexpr (kSoftcap) score_scale_log2 = params.features.softcap_log2;
  // P (fp32 in s) -> the register A operand of P V.
  auto convert_p = [&]() { pack_a_fragments<Element>(s, pfrag); };
  // In the block holding the sequence's last key, zero the V rows past it (both consumer
  // warpgroups share the work and meet at a barrier: each one's P V reads all of them), then
  // make them visible to wgmma. Both warpgroups reach this for the same blocks.
  auto zero_v_tail = [&](int n, int stage) {
    const int valid = seq.seqlen_k - n * kBlockN;
    if (valid >= kBlockN) return;
    ptx::zero_swizzled_rows(sm.v_stage(stage), T::kKVColBlockBytes, T::kColBlocks, valid < 0 ? 0 : valid, kBlockN,
                            tid - 128, 256);
    ptx::fence_proxy_async_shared();
    ptx::named_barrier_sync(barrier_id(NamedBarrier::kFwdVZeroed), 256);
  };

  const IssueOrder order{T::kPingPong, wg};
  order.start();
  ptx::mbarrier_wait_parity(sm.bar_q(), 0);

  // Block i of the loop is key block n = n_block_max - 1 - i, pipeline iteration i of both rings,
  // for i in [0, n_blocks).
  using State = PipelineState<T::kStages>;
  const int n_blocks = n_block_max - n_block_min;
  float correction[2];
  {
    const int n = n_block_max - 1;
    const State st(0);
    const int stage = st.stage();
    k_pipe.consumer_wait(st);
    order.wait_turn();
    tile.issue_qk(s, stage);
    order.pass_turn(false);
    ptx::wgmma_wait_group<0>();
    fence_accumulator(s);
    k_pipe.consumer_release(stage, arrive_lane);
    softcap();
    mask(n);
    softmax.update(s, score_scale_log2, correction);
    convert_p();
  }
  for (int i = 1; i < n_blocks; ++i) {
    const int n = n_block_max - 1 - i;
    const State st(i), prev = st.prev();  // S(n) reads K of st, P V(n+1) V of prev
    const int stage = st.stage(), prev_stage = prev.stage();
    consumer_wait(k_pipe, st, v_pipe, prev);
    zero_v_tail(n + 1, prev_stage);
    order.wait_turn();
    tile.issue_qk(s, stage);
    tile.issue_pv(o, pfrag, prev_stage);
    order.pass_turn(false);
    ptx::wgmma_wait_group<1>();  // S(n) is in; P V(n+1) may still run
    fence_accumulator(s);
    k_pipe.consumer_release(stage, arrive_lane);
    softcap();
    mask(n);
    softmax.update(s, score_scale_log2, correction);
    ptx::wgmma_wait_group<0>();
    fence_accumulator(o);
    v_pipe.consumer_release(prev_stage, arrive_lane);
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      o[dt][0] *= correction[0];
      o[dt][1] *= correction[0];
      o[dt][2] *= correction[1];
      o[dt][3] *= correction[1];
    }
    convert_p();
  }
  {
    const State st(n_block_max - 1 - n_block_min);  // the last block's (this form keeps kNone / kCausal's code)
    const int stage = st.stage();
    v_pipe.consumer_wait(st);
    zero_v_tail(n_block_min, stage);
    order.wait_turn();
    tile.issue_pv(o, pfrag, stage);
    order.pass_turn(true);
    ptx::wgmma_wait_group<0>();
    fence_accumulator(o);
    v_pipe.consumer_release(stage, arrive_lane);
  }

  // ---------------- epilogue: normalise, store O and the LSE ----------------
  float lse[2];
  if constexpr (kLocal) {
    const float sink = params.features.sinks != nullptr ? params.features.sinks[head] : -INFINITY;
    softmax.finalize_with_sink(o, kSoftcap ? params.features.softcap : p.softmax_scale, sink, lse);
  } else {
    softmax.finalize(o, p.softmax_scale, lse);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = my_row + r * 8 - row0;  // within the tile
    if (row < rows_valid) {
      Element* dst = out_tile + row * g.out_row_stride + my_col;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
        *reinterpret_cast<uint32_t*>(dst + dt * 8) = ptx::pack2<Element>(o[dt][2 * r], o[dt][2 * r + 1]);
      if ((lane & 3) == 0) lse_tile[row] = lse[r];
    }
  }
#endif
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
