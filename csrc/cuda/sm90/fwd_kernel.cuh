// Tier-2 grouped varlen attention forward for sm90a: TMA loads on an mbarrier pipeline, wgmma
// for both products, warp specialisation.
//
// A CTA computes 128-row query tiles of (group, sequence, head), taken from the same longest-first
// work list as tier 1 (the heads of one item are consecutive entries, so the query heads of one
// KV head read the same K/V from L2 at about the same time). Two kernels share the consumers'
// body (consume_tile): grouped_fwd_kernel, one CTA per tile, and grouped_fwd_persistent_kernel,
// one CTA per SM taking tiles from the list until none is left (for short tiles; the host picks,
// launch_grouped_fwd at the end).
//   warpgroup 0 (producer, 24 registers): one thread loads each tile's Q, then K and V block by
//     block, from the last block to the first, into kStages stages guarded by full/empty mbarriers.
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
// products keep the tensor cores busy. Warpgroup 1 gives warpgroup 0 the first turn (start, once).
// One tile per CTA: warpgroup 1 skips its last hand-over (pass_turn(true)). Persistent grid: the
// turn circulates over all the CTA's tiles, every issue round ends with a hand-over
// (pass_turn(false)) and warpgroup 0 takes the last one after its last tile (finish). Either way
// every bar.sync meets exactly one bar.arrive; tiles without key blocks take no turn.
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
  __device__ __forceinline__ void finish() const {
    if (enabled && wg == 0) wait_turn();
  }
};

// K and V stream through two rings of kStages stages each (sm90/pipeline.h), so the P V product
// of one block reads its V stage while S of the next block reads the next K stage.
template <typename T>
struct SmemPlan {
  using Pipeline = MbarrierPipeline<T::kStages>;
  using QPipeline = MbarrierPipeline<T::kQStages>;
  uint32_t q, k, v, bars, tile_slots;
  __device__ __forceinline__ explicit SmemPlan(uint32_t base)
      : q(base + T::kOffQ),
        k(base + T::kOffK),
        v(base + T::kOffV),
        bars(base + T::kOffBarriers),
        tile_slots(base + T::kOffTileSlots) {}
  // Barrier entries: Q full (kQStages), then full K, empty K, full V, empty V (kStages each), then
  // Q empty (kQStages).
  __device__ __forceinline__ Pipeline k_pipe() const { return {bars, T::kQStages, T::kQStages + T::kStages}; }
  __device__ __forceinline__ Pipeline v_pipe() const {
    return {bars, T::kQStages + 2 * T::kStages, T::kQStages + 3 * T::kStages};
  }
  // Q: a ring of kQStages stages, one use per tile (with the tile's slot).
  __device__ __forceinline__ QPipeline q_pipe() const { return {bars, 0, T::kQStages + 4 * T::kStages}; }
  __device__ __forceinline__ uint32_t q_stage(int s) const { return q + s * T::kQBytes; }
  __device__ __forceinline__ uint32_t k_stage(int s) const { return k + s * T::kKVBytes; }
  __device__ __forceinline__ uint32_t v_stage(int s) const { return v + s * T::kKVBytes; }
  __device__ __forceinline__ uint32_t tile_slot(int s) const { return tile_slots + s * T::kTileSlotBytes; }
};

// The producer's loads of one tile (one thread, Q stage `q_stage` already acquired): Q, then
// block i of the tile (key block n = n_block_max - 1 - i, down to n_block_min) into the stage of
// ring iteration kv_iteration + i, once the consumers released that stage.
template <typename T>
__device__ __forceinline__ void produce(const FwdKernelParams& params, const SmemPlan<T>& sm, int group, int head,
                                        int kv_head, int q_token0, int k_token0, int n_block_min, int n_block_max,
                                        int kv_iteration, int q_stage) {
  const void* tma_q = &params.tma_q[group];
  const uint32_t q_full = sm.q_pipe().full(q_stage);
  ptx::mbarrier_arrive_expect_tx(q_full, T::kQBytes);
#pragma unroll
  for (int cb = 0; cb < T::kColBlocks; ++cb)
    ptx::tma_load_3d(sm.q_stage(q_stage) + cb * T::kQColBlockBytes, tma_q, q_full, cb * 64, head, q_token0);
  const typename SmemPlan<T>::Pipeline k_pipe = sm.k_pipe(), v_pipe = sm.v_pipe();
  for (int i = 0; i < n_block_max - n_block_min; ++i) {
    const int n = n_block_max - 1 - i;
    const PipelineState<T::kStages> st(kv_iteration + i);
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
  __device__ __forceinline__ KMajorSteps<T::kQColBlockBytes> q_steps(int q_stage) const {
    return {ptx::smem_desc_sw128(sm.q_stage(q_stage) + wg * 64 * 128, 16, 1024)};
  }
  __device__ __forceinline__ KMajorSteps<T::kKVColBlockBytes> k_steps(int s) const {
    return {ptx::smem_desc_sw128(sm.k_stage(s), 16, 1024)};
  }
  // V of stage s as the MN-major B operand of P V: k-step kk covers keys [16 kk, 16 kk + 16);
  // the 64-column blocks of the head dim are kKVColBlockBytes apart.
  __device__ __forceinline__ MnMajorSteps v_steps(int s) const {
    return {ptx::smem_desc_sw128(sm.v_stage(s), T::kKVColBlockBytes, 1024)};
  }

  __device__ __forceinline__ void issue_qk(float (&s)[kNTiles][4], int q_stage, int stage) const {
    ptx::wgmma_fence();
    mma_ss<Element, kQKSteps, MmaInit::kOverwrite>(s, q_steps(q_stage), k_steps(stage));
    ptx::wgmma_commit_group();
  }
  __device__ __forceinline__ void issue_pv(float (&o)[kDTiles][4], const uint32_t (&p)[kPSteps][4], int stage) const {
    ptx::wgmma_fence();
    mma_rs_tb<Element, MmaInit::kAccumulate>(o, p, v_steps(stage));
    ptx::wgmma_commit_group();
  }
};

// The query tile of work-list entry `tile` of a list of `count` items (query_tile_work.h says
// how a tile index names an item and a head), decoded by the producer: its sequence, rows, mask and key blocks. `has_rows` is false for a tile past its
// sequence's rows (nothing to do); n_block_max <= n_block_min for a tile whose rows see no key.
template <typename T, MaskMode kMask>
struct FwdTile {
  int head, group, batch, row0, kv_head;
  SeqLenInfo seq;
  Mask<kMask> mask;
  bool has_rows;
  int n_block_min, n_block_max;

  __device__ __forceinline__ FwdTile(const FwdKernelParams& params, int tile, int count)
      : FwdTile(params, QueryTileWork::at(params.base.work_items, tile, count, params.base.num_heads_q,
                                          params.base.tile_head_run), params.base) {}

 private:
  __device__ __forceinline__ FwdTile(const FwdKernelParams& params, const QueryTileWork& work,
                                     const cuda::FwdKernelParams& p)
      : head(work.head),
        group(work.group()),
        batch(work.batch()),
        row0(work.m_block() * T::kBlockM),
        kv_head(head / p.q_heads_per_kv_head),
        seq(p.groups[group].cu_seqlens_q, p.groups[group].total_q, p.cu_seqlens_k, p.total_k, p.groups[group].seqused_k,
            batch),
        mask(seq.mask<kMask>(params.features, group, batch)),
        has_rows(row0 < seq.seqlen_q) {
    // Key blocks [n_block_min, n_block_max). n_block_min is the constant 0 when no row's keys can
    // start past key 0 (kNone, kCausal), so the loops are those of a walk down to block 0.
    const int m_block = row0 / T::kBlockM;
    n_block_min = Mask<kMask>::kKeysStartAtZero ? 0 : mask.n_block_min(m_block, T::kBlockM, T::kBlockN);
    n_block_max = mask.n_block_max(m_block, T::kBlockM, T::kBlockN);
  }
};

// What the producer tells the consumers about their next tile, in shared memory: written before
// the producer's arrival on Q's full barrier (release), read by the consumers after their wait on
// it (acquire) and copied to registers before they release Q's stage. head < 0: no more tiles.
template <MaskMode kMask>
struct FwdTileSlot {
  int32_t head;
  int32_t group;
  int32_t row0;
  int32_t q_start;
  int32_t n_block_min, n_block_max;  // n_block_max <= n_block_min: no row sees a key (nothing loaded)
  Mask<kMask> mask;                  // of the tile's sequence (its lengths, diagonal and window)
};

// A tile no row of which sees a key: O = 0 and LSE = -inf (or the head's sink), written by
// num_threads threads, this one numbered `thread` among them.
template <typename T, MaskMode kMask>
__device__ __forceinline__ void write_empty_tile(const FwdKernelParams& params, const FwdGroupArgs& g,
                                                 typename T::Element* out_tile, float* lse_tile, int head,
                                                 int rows_valid, int thread, int num_threads) {
  constexpr int kChunks = T::kHeadDim / 8;
  for (int i = thread; i < rows_valid * kChunks; i += num_threads)
    *reinterpret_cast<uint4*>(out_tile + (i / kChunks) * g.out_row_stride + (i % kChunks) * 8) = make_uint4(0, 0, 0, 0);
  float empty_lse = -INFINITY;
  if constexpr (kMask == MaskMode::kLocal) {
    if (params.features.sinks != nullptr) empty_lse = params.features.sinks[head];
  }
  for (int row = thread; row < rows_valid; row += num_threads) lse_tile[row] = empty_lse;
}

// The persistent kernel's O store through shared memory and TMA (consume_tile's epilogue): a
// consumer warpgroup whose 64 query rows all lie in the sequence writes its normalised O into its
// own 64 rows of the tile's Q stage (it alone read them, and its last S = Q K^T is done), in the
// layout TMA reads with the 128-byte swizzle, and one thread (the warpgroup's first) stores them
// with a TMA store per 64-column block, so the next tile's main loop starts while the store
// drains. A warpgroup with rows past the sequence's end keeps the per-thread stores: TMA clips a
// box only at the tensor's end, and in a varlen batch the rows past one sequence's end are the
// next sequence's, written by another tile. The stage goes back to the producer only once the
// store has read it: the issuing thread's warp arrives on the stage's empty barrier late
// (flush_o_store, at the next tile's first S or before the CTA leaves), the other seven warps as
// before, once the tile's last S is done.
template <MaskMode kMask>
__device__ __forceinline__ bool store_o_by_tma(const FwdKernelParams& params, int group, int wg_row0,
                                               const Mask<kMask>& seq_mask) {
  return ((params.tma_o_groups >> group) & 1u) != 0 && seq_mask.seqlen_q - wg_row0 >= 64;
}
// The issuing thread's deferred release of the Q stage its last TMA store of O read (pending_release,
// -1: none; only that thread ever holds one): waits until the store has read shared memory
// (`full`: until its writes are done too, before the CTA exits), then arrives for its warp.
template <typename T, bool kFull = false>
__device__ __forceinline__ void flush_o_store(const SmemPlan<T>& sm, int& pending_release) {
  if (pending_release < 0) return;
  if constexpr (kFull) {
    ptx::bulk_wait_group<0>();
  } else {
    ptx::bulk_wait_group_read<0>();
  }
  ptx::mbarrier_arrive(sm.q_pipe().empty(pending_release));
  pending_release = -1;
}

// One consumer warpgroup's work on one tile whose Q (stage q_stage) has landed: the main loop over
// key blocks [n_block_min, n_block_max) (ring iterations kv_iteration, kv_iteration + 1, ...),
// then the epilogue (normalise, store O and the LSE). kPersistent: Q's stage goes back to the
// producer once the tile's last S is done (or, where this warpgroup's O goes out by a TMA store,
// for its first warp once that store has read it: pending_release, store_o_by_tma above), and the
// issue turn circulates to the next tile.
template <typename T, MaskMode kMask, bool kSoftcap, bool kPersistent>
__device__ __forceinline__ void consume_tile(const FwdKernelParams& params, const SmemPlan<T>& sm,
                                             const IssueOrder& order, int q_stage, int kv_iteration, int head,
                                             int group, int row0, int q_start, int n_block_min, int n_block_max,
                                             const Mask<kMask>& seq_mask, int& pending_release) {
  constexpr bool kLocal = kMask == MaskMode::kLocal;
  using Element = typename T::Element;
  using Tile = ConsumerTile<T>;
  using State = PipelineState<T::kStages>;
  constexpr int kBlockN = T::kBlockN;
  constexpr int kNTiles = Tile::kNTiles;
  constexpr int kDTiles = Tile::kDTiles;
  constexpr int kPSteps = Tile::kPSteps;
  const cuda::FwdKernelParams& p = params.base;
  const typename SmemPlan<T>::Pipeline k_pipe = sm.k_pipe(), v_pipe = sm.v_pipe();
  const int tid = threadIdx.x;
  const int wg = order.wg;
  const int lane = tid & 31;
  const int warp_in_wg = (tid / 32) & 3;
  const bool arrive_lane = lane == 0;
  const Tile tile{sm, wg};
  float score_scale_log2 = p.softmax_scale_log2;
  if constexpr (kSoftcap) score_scale_log2 = params.features.softcap_log2;

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
    if constexpr (kLocal) {
      // The run-time window: each of the thread's two rows sees one run of keys, taken once per
      // block relative to the thread's first column (key_run_from), so an entry at the constant
      // column offset k is visible iff first <= k < end: two comparisons with an immediate and a
      // select, instead of key_masked's rule per entry (window sides, diagonal, sequence end).
      int first[2], end[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) seq_mask.key_run_from(my_row + 8 * r, col0 + my_col, first[r], end[r]);
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int k = nt * 8 + (c & 1);
          if ((k < first[c >> 1]) | (k >= end[c >> 1])) s[nt][c] = -INFINITY;
        }
    } else {
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int row = my_row + ((c >> 1) << 3);
          const int col = col0 + nt * 8 + my_col + (c & 1);
          if (seq_mask.key_masked(row, col)) s[nt][c] = -INFINITY;
        }
    }
  };
  // Softcap (kSoftcap): the scores become t = tanh(s * softcap_scale) before the mask, and the
  // softmax takes them with the softcap's scale (softcap.cuh).
  auto softcap = [&]() {
    if constexpr (kSoftcap) softcap_scores(s, params.features.softcap_scale);
  };
  // P (fp32 in s) -> the register A operand of P V.
  auto convert_p = [&]() { pack_a_fragments<Element>(s, pfrag); };
  // In the block holding the sequence's last key, zero the V rows past it (both consumer
  // warpgroups share the work and meet at a barrier: each one's P V reads all of them), then
  // make them visible to wgmma. Both warpgroups reach this for the same blocks.
  auto zero_v_tail = [&](int n, int stage) {
    const int valid = seq_mask.seqlen_k - n * kBlockN;
    if (valid >= kBlockN) return;
    ptx::zero_swizzled_rows(sm.v_stage(stage), T::kKVColBlockBytes, T::kColBlocks, valid < 0 ? 0 : valid, kBlockN,
                            tid - 128, 256);
    ptx::fence_proxy_async_shared();
    ptx::named_barrier_sync(barrier_id(NamedBarrier::kFwdVZeroed), 256);
  };

  // Block i of the loop is key block n = n_block_max - 1 - i, ring iteration kv_iteration + i of
  // both rings, for i in [0, n_blocks).
  const int n_blocks = n_block_max - n_block_min;
  float correction[2];
  {
    const int n = n_block_max - 1;
    const State st(kv_iteration);
    const int stage = st.stage();
    k_pipe.consumer_wait(st);
    order.wait_turn();
    tile.issue_qk(s, q_stage, stage);
    order.pass_turn(false);
    // The previous tile's O store (if any) has had its time; its Q stage goes back while S runs.
    if constexpr (kPersistent) flush_o_store(sm, pending_release);
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
    const State st(kv_iteration + i), prev = st.prev();  // S(n) reads K of st, P V(n+1) V of prev
    const int stage = st.stage(), prev_stage = prev.stage();
    consumer_wait(k_pipe, st, v_pipe, prev);
    zero_v_tail(n + 1, prev_stage);
    order.wait_turn();
    tile.issue_qk(s, q_stage, stage);
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
  // Every S of the tile is done: Q's stage goes back to the producer (a later tile's Q), but for
  // the first warp of a warpgroup that stages its O there (it arrives once the store read it).
  if constexpr (kPersistent) {
    const bool stages_o = warp_in_wg == 0 && store_o_by_tma<kMask>(params, group, wg_row0, seq_mask);
    sm.q_pipe().consumer_release(q_stage, arrive_lane && !stages_o);
  }
  {
    const State st(kv_iteration + n_blocks - 1);  // the last block's
    const int stage = st.stage();
    v_pipe.consumer_wait(st);
    zero_v_tail(n_block_min, stage);
    order.wait_turn();
    tile.issue_pv(o, pfrag, stage);
    order.pass_turn(!kPersistent);
    ptx::wgmma_wait_group<0>();
    fence_accumulator(o);
    v_pipe.consumer_release(stage, arrive_lane);
  }

  // ---------------- epilogue: normalise, store O and the LSE ----------------
  // (Where the tile's output goes is worked out here, not before the loop: no registers held
  // through it.)
  const FwdGroupArgs& g = p.groups[group];
  const int rows_valid = min(T::kBlockM, seq_mask.seqlen_q - row0);
  Element* out_tile = g.out_tile<Element>(q_start, row0, head);
  float* lse_tile = g.lse_tile(q_start, row0, head);
  float lse[2];
  if constexpr (kLocal) {
    const float sink = params.features.sinks != nullptr ? params.features.sinks[head] : -INFINITY;
    softmax.finalize_with_sink(o, kSoftcap ? params.features.softcap : p.softmax_scale, sink, lse);
  } else {
    softmax.finalize(o, p.softmax_scale, lse);
  }
  if constexpr (kPersistent) {
    if (store_o_by_tma<kMask>(params, group, wg_row0, seq_mask)) {
      const int bar = barrier_id(NamedBarrier::kFwdOStaged0, wg);
      ptx::named_barrier_sync(bar, 128);  // every warp of this warpgroup is done reading its Q rows
      const uint32_t staged = sm.q_stage(q_stage) + wg * 64 * 128;  // this warpgroup's 64 rows
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp_in_wg * 16 + (lane >> 2) + r * 8;  // within the warpgroup's rows
        const uint32_t row_addr = staged + row * 128 + (lane & 3) * 4;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          // Column block dt / 8, 16-byte chunk dt % 8 of the row, swizzled by the row's index mod 8.
          const uint32_t addr = row_addr + (dt / 8) * T::kQColBlockBytes + (((dt % 8) ^ (row & 7)) << 4);
          ptx::st_shared_u32(addr, ptx::pack2<Element>(o[dt][2 * r], o[dt][2 * r + 1]));
        }
      }
      ptx::fence_proxy_async_shared();    // the stores above, visible to the TMA store
      ptx::named_barrier_sync(bar, 128);  // ... from every thread of the warpgroup
      if ((tid & 127) == 0) {
#pragma unroll
        for (int cb = 0; cb < T::kColBlocks; ++cb)
          ptx::tma_store_3d(&params.tma_o[group], staged + cb * T::kQColBlockBytes, cb * 64, head, q_start + wg_row0);
        ptx::bulk_commit_group();
        pending_release = q_stage;
      }
      if ((lane & 3) == 0) {
        lse_tile[my_row - row0] = lse[0];
        lse_tile[my_row + 8 - row0] = lse[1];
      }
      return;
    }
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
}

// One CTA per tile: CTA b computes tile b of the sorted list (the grid of long tiles, where a
// tile's fixed cost is a small share of its time).
template <typename T, MaskMode kMask, bool kSoftcap>
__global__ void __launch_bounds__(T::kThreads, 1) grouped_fwd_kernel(const __grid_constant__ FwdKernelParams params) {
  static_assert(!kSoftcap || kMask == MaskMode::kLocal, "the softcap is compiled into kLocal kernels only");
  static_assert(T::kQStages == 1, "one tile per CTA: one Q stage");
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename T::Element;
  constexpr int kBlockM = T::kBlockM;
  constexpr int kBlockN = T::kBlockN;
  const cuda::FwdKernelParams& p = params.base;

  const int num_heads_q = p.num_heads_q;
  QueryTileWork work;
  if (!work.decode(p.work_items, p.work_count, num_heads_q, p.tile_head_run)) return;
  const QueryTile<FwdGroupArgs, kBlockM> tile(p, work);
  if (!tile.has_rows) return;
  const FwdGroupArgs& g = tile.g;
  const int kv_head = tile.head / p.q_heads_per_kv_head;
  const int tid = threadIdx.x;

  const Mask<kMask> seq_mask = tile.seq.mask<kMask>(params.features, tile.group, tile.batch);
  // Key blocks [n_block_min, n_block_max) of this tile. n_block_min is the constant 0 when no
  // row's keys can start past key 0 (kNone, kCausal), so the loops are those of a walk down to
  // block 0.
  const int n_block_min = Mask<kMask>::kKeysStartAtZero ? 0 : seq_mask.n_block_min(tile.m_block, kBlockM, kBlockN);
  const int n_block_max = seq_mask.n_block_max(tile.m_block, kBlockM, kBlockN);
  if (n_block_max <= n_block_min) {  // no row of this tile sees a key
    Element* out_tile = g.out_tile<Element>(tile.seq.q_start, tile.row0, tile.head);
    float* lse_tile = g.lse_tile(tile.seq.q_start, tile.row0, tile.head);
    write_empty_tile<T, kMask>(params, g, out_tile, lse_tile, tile.head, tile.rows_valid(), tid, T::kThreads);
    return;
  }

  const SmemPlan<T> sm(aligned_dynamic_smem());
  const typename SmemPlan<T>::QPipeline q_pipe = sm.q_pipe();
  init_pipeline_barriers(q_pipe.full(0), 1, T::kConsumerWarps, sm.k_pipe(), sm.v_pipe());

  const int warpgroup = ptx::warpgroup_index();
  if (warpgroup == 0) {
    // ---------------- producer ----------------
    ptx::setmaxnreg_dec<T::kProducerRegs>();
    if (tid == 0) {
      ptx::prefetch_tensor_map(&params.tma_q[tile.group]);
      ptx::prefetch_tensor_map(&params.tma_k);
      ptx::prefetch_tensor_map(&params.tma_v);
      produce<T>(params, sm, tile.group, tile.head, kv_head, tile.seq.q_start + tile.row0, tile.seq.k_start,
                 n_block_min, n_block_max, /*kv_iteration=*/0, /*q_stage=*/0);
    }
    return;
  }

  // ---------------- consumers ----------------
  ptx::setmaxnreg_inc<T::kConsumerRegs>();
  const IssueOrder order{T::kPingPong, warpgroup - 1};
  order.start();
  q_pipe.consumer_wait(PipelineState<T::kQStages>(0));
  int no_pending_release = -1;  // (only the persistent kernel stores O by TMA)
  consume_tile<T, kMask, kSoftcap, /*kPersistent=*/false>(params, sm, order, /*q_stage=*/0, /*kv_iteration=*/0,
                                                         tile.head, tile.group, tile.row0, tile.seq.q_start,
                                                         n_block_min, n_block_max, seq_mask, no_pending_release);
#endif
}

// Persistent grid, for short tiles (their fixed cost a large share of their time): the host
// launches min(tiles, SMs) CTAs; CTA c takes tile c of the sorted list first and then, until none
// is left, the next tile not yet taken (params.tile_counter), so the tiles go out longest first
// to whichever CTA is free (an SM busy with another kernel, e.g. a collective's, takes fewer).
// The producer thread decodes each tile (work item, sequence lengths, key-block range) and hands
// it to the consumers through a shared-memory slot that travels with Q: Q is a ring of kQStages
// stages whose stage the consumers release once the tile's last S = Q K^T is done, so the producer
// decodes and loads the next tile's Q and first K/V blocks while the consumers finish P V and
// write the output. The K/V rings run on across a CTA's tiles (ring iteration numbers continue).
// A consumer warpgroup whose 64 rows all lie in the sequence writes O through its rows of the
// tile's Q stage and a TMA store (store_o_by_tma), overlapping the next tile's main loop.
template <typename T, MaskMode kMask, bool kSoftcap>
__global__ void __launch_bounds__(T::kThreads, 1)
    grouped_fwd_persistent_kernel(const __grid_constant__ FwdKernelParams params) {
  static_assert(!kSoftcap || kMask == MaskMode::kLocal, "the softcap is compiled into kLocal kernels only");
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename T::Element;
  using Work = FwdTile<T, kMask>;
  static_assert(sizeof(FwdTileSlot<kMask>) <= T::kTileSlotBytes, "a tile slot fits its shared-memory space");
  // A Q stage that holds a tile's O for its TMA store goes back only during the next tile's first
  // S (flush_o_store): the next tile's Q needs a stage of its own.
  static_assert(T::kQStages >= 2, "the persistent kernel's O stores need two Q stages");
  const cuda::FwdKernelParams& p = params.base;
  const int count = *p.work_count;
  const int num_tiles = count * p.num_heads_q;
  if (static_cast<int>(blockIdx.x) >= num_tiles) return;  // the grid is sized for the list's capacity
  const int tid = threadIdx.x;

  const SmemPlan<T> sm(aligned_dynamic_smem());
  const typename SmemPlan<T>::QPipeline q_pipe = sm.q_pipe();
  using QState = PipelineState<T::kQStages>;
  if (tid == 0) {  // the Q ring's barriers but stage 0's full one; published by the init below
    for (int qs = 1; qs < T::kQStages; ++qs) ptx::mbarrier_init(q_pipe.full(qs), 1);
    for (int qs = 0; qs < T::kQStages; ++qs) ptx::mbarrier_init(q_pipe.empty(qs), T::kConsumerWarps);
  }
  init_pipeline_barriers(q_pipe.full(0), 1, T::kConsumerWarps, sm.k_pipe(), sm.v_pipe());

  const int warpgroup = ptx::warpgroup_index();
  if (warpgroup == 0) {
    // ---------------- producer ----------------
    ptx::setmaxnreg_dec<T::kProducerRegs>();
    if (tid == 0) {
      ptx::prefetch_tensor_map(&params.tma_k);
      ptx::prefetch_tensor_map(&params.tma_v);
      int kv_iteration = 0, q_iteration = 0;
      // Tiles in list order (longest first) to whichever CTA asks first: the first one by blockIdx.x,
      // the next ones from the counter (unsigned: no overflow near INT32_MAX tiles).
      const auto next_tile = [&]() {
        return static_cast<int>(min(atomicAdd(reinterpret_cast<unsigned*>(params.tile_counter), 1u) + gridDim.x,
                                    static_cast<unsigned>(num_tiles)));
      };
      for (int t = blockIdx.x; t < num_tiles; t = next_tile()) {
        const Work w(params, t, count);
        if (!w.has_rows) continue;
        const QState qs(q_iteration++);
        const int q_stage = qs.stage();
        q_pipe.producer_acquire(qs);  // the consumers copied the stage's last slot and are done with its Q
        FwdTileSlot<kMask>* slot = static_cast<FwdTileSlot<kMask>*>(__cvta_shared_to_generic(sm.tile_slot(q_stage)));
        slot->head = w.head;
        slot->group = w.group;
        slot->row0 = w.row0;
        slot->q_start = w.seq.q_start;
        slot->n_block_min = w.n_block_min;
        slot->n_block_max = w.n_block_max;
        slot->mask = w.mask;
        if (w.n_block_max <= w.n_block_min) {  // nothing to load: the arrival alone publishes the slot
          ptx::mbarrier_arrive(q_pipe.full(q_stage));
          continue;
        }
        ptx::prefetch_tensor_map(&params.tma_q[w.group]);
        produce<T>(params, sm, w.group, w.head, w.kv_head, w.seq.q_start + w.row0, w.seq.k_start, w.n_block_min,
                   w.n_block_max, kv_iteration, q_stage);
        kv_iteration += w.n_block_max - w.n_block_min;
      }
      const QState qs(q_iteration);
      q_pipe.producer_acquire(qs);
      static_cast<FwdTileSlot<kMask>*>(__cvta_shared_to_generic(sm.tile_slot(qs.stage())))->head = -1;  // the end
      ptx::mbarrier_arrive(q_pipe.full(qs.stage()));
    }
    return;
  }

  // ---------------- consumers ----------------
  ptx::setmaxnreg_inc<T::kConsumerRegs>();
  const IssueOrder order{T::kPingPong, warpgroup - 1};
  const bool arrive_lane = (tid & 31) == 0;
  int kv_iteration = 0;
  int pending_release = -1;  // the Q stage this thread's last TMA store of O reads (flush_o_store)
  order.start();
  for (int q_iteration = 0;; ++q_iteration) {
    const QState qs(q_iteration);
    const int q_stage = qs.stage();
    q_pipe.consumer_wait(qs);
    const FwdTileSlot<kMask>* slot =
        static_cast<const FwdTileSlot<kMask>*>(__cvta_shared_to_generic(sm.tile_slot(q_stage)));
    const int head = slot->head;
    if (head < 0) {  // the producer's end marker
      order.finish();
      flush_o_store<T, /*kFull=*/true>(sm, pending_release);
      break;
    }
    const int group = slot->group, row0 = slot->row0, q_start = slot->q_start;
    // n_block_min stays the constant 0 where no row's keys can start past key 0 (kNone, kCausal).
    const int n_block_min = Mask<kMask>::kKeysStartAtZero ? 0 : slot->n_block_min;
    const int n_block_max = slot->n_block_max;
    const Mask<kMask> seq_mask = slot->mask;
    if (n_block_max <= n_block_min) {  // no row of this tile sees a key
      flush_o_store(sm, pending_release);
      q_pipe.consumer_release(q_stage, arrive_lane);  // the slot is copied; no Q was loaded
      const FwdGroupArgs& g = p.groups[group];
      Element* out_tile = g.out_tile<Element>(q_start, row0, head);
      float* lse_tile = g.lse_tile(q_start, row0, head);
      write_empty_tile<T, kMask>(params, g, out_tile, lse_tile, head, min(T::kBlockM, seq_mask.seqlen_q - row0),
                                 tid - 128, 256);
      continue;
    }
    consume_tile<T, kMask, kSoftcap, /*kPersistent=*/true>(params, sm, order, q_stage, kv_iteration, head, group, row0,
                                                          q_start, n_block_min, n_block_max, seq_mask, pending_release);
    kv_iteration += n_block_max - n_block_min;
  }
#endif
}

// The launch of one (traits, mask, softcap) forward: the persistent kernel when the host gave the
// call a tile counter (fwd_dispatch.cu: short tiles, head dims of has_persistent_fwd), else one CTA
// per tile. Each kernel's
// shared-memory attribute is set once (launch.h).
template <typename T, MaskMode kMask, bool kSoftcap>
cudaError_t launch_grouped_fwd(const FwdKernelParams& params, int num_ctas, cudaStream_t stream) {
  if constexpr (has_persistent_fwd(T::kHeadDim)) {
    if (params.tile_counter != nullptr) {
      using TP = PersistentFwdTraits<T>;
      static KernelAttributeCache persistent_attributes_set;
      return launch_with_smem(&grouped_fwd_persistent_kernel<TP, kMask, kSoftcap>, num_ctas, TP::kThreads,
                              TP::kSmemBytes, stream, params, /*max_shared_carveout=*/false, persistent_attributes_set);
    }
  }
  static KernelAttributeCache attributes_set;
  return launch_with_smem(&grouped_fwd_kernel<T, kMask, kSoftcap>, num_ctas, T::kThreads, T::kSmemBytes, stream,
                          params, /*max_shared_carveout=*/false, attributes_set);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
