// What the two main loops of the tier-2 (sm90a) dK/dV kernel share (bwd_kernel.cuh): the
// shared-memory plan's addresses, small shared-memory accessors, and the producer thread, which
// loads K and V once and then, per query tile the cursor walks, Q, dO and the tile's LSE (log2
// units) and Di rows by TMA into the Q/dO stages, all on the stage's full barrier.
//   bwd_mainloop_keysplit.cuh   head dims 64 and 128: 128 keys per CTA, 64 per consumer warpgroup
//   bwd_mainloop_headsplit.cuh  head dim 256: 64 keys per CTA, the head dim split between the
//                               consumer warpgroups
// Both traits (bwd_traits.h) give the offsets this file reads: K, V, the Q/dO stages, the LSE/Di
// stages and the barriers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bwd_stat_rows.h"
#include "cuda/ptx.h"
#include "cuda/query_tile_cursor.h"
#include "cuda/seqlen_info.h"
#include "cuda/sm90/bwd_params.h"
#include "cuda/sm90/named_barriers.h"
#include "cuda/sm90/pipeline.h"
#include "cuda/sm90/ptx_sm90.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

template <typename T>
struct BwdSmem {
  using Pipeline = MbarrierPipeline<T::kStages>;
  uint32_t base, k, v, q, dout, ds, stats, bars;
  __device__ __forceinline__ explicit BwdSmem(uint32_t base_)
      : base(base_),
        k(base_ + T::kOffK),
        v(base_ + T::kOffV),
        q(base_ + T::kOffQ),
        dout(base_ + T::kOffDo),
        ds(base_ + T::kOffDs),
        stats(base_ + T::kOffStats),
        bars(base_ + T::kOffBarriers) {}
  __device__ __forceinline__ uint32_t bar_kv() const { return bars; }
  // The ring of Q / dO / LSE / Di stages (sm90/pipeline.h): entries 1.. of the barrier array.
  __device__ __forceinline__ Pipeline q_pipe() const { return {bars, 1, 1 + T::kStages}; }
  __device__ __forceinline__ uint32_t q_stage(int s) const { return q + s * T::kQBytes; }
  __device__ __forceinline__ uint32_t do_stage(int s) const { return dout + s * T::kQBytes; }
  __device__ __forceinline__ uint32_t ds_buf(int b) const { return ds + b * T::kDsBytes; }
  // A stage's LSE and Di boxes (kStatBox floats from the tile's first token rounded down to 16
  // bytes); the tile's row starts bwd_stat_box_shift(token0) floats in: stat_row_shift.
  __device__ __forceinline__ uint32_t lse_stage(int s) const { return stats + s * T::kStatBytes; }
  __device__ __forceinline__ uint32_t di_stage(int s) const { return stats + s * T::kStatBytes + T::kStatSlotBytes; }
  // Key-split loop: a consumer warpgroup's dQ staging boxes.
  __device__ __forceinline__ uint32_t dq_stage(int wg) const { return base + T::kOffDqStage + wg * T::kDqStageBytes; }
  // Head-split loop: the P^T double buffer.
  __device__ __forceinline__ uint32_t pt_buf(int b) const { return base + T::kOffPt + b * T::kDsBytes; }
};

// Two consecutive floats at a 4-byte aligned address (two loads: ld.shared.v2 needs 8 bytes).
__device__ __forceinline__ float2 ld_shared_f32x2(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.f32 %0, [%2];\n\tld.shared.f32 %1, [%2+4];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
  return v;
}
// Bytes from the start of a stage's LSE / Di box to the current tile's first row: the tile's
// first token q_start + 64 m is q_start mod 4 floats past the box's 16-byte aligned start
// (bwd_stat_rows.h). 0 .. 12, so the consumers' reads of a row are 4-byte aligned only.
__device__ __forceinline__ uint32_t stat_row_shift(int32_t q_start) {
  return 4u * static_cast<uint32_t>(bwd_stat_box_shift(q_start));
}
__device__ __forceinline__ void st_shared_f2(uint32_t addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x), "f"(y) : "memory");
}
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

// ---- Pieces both consumer main loops run the same way (the larger ones: bwd_mainloop_common.cuh) ----

// The dK and dV accumulators of a consumer thread, zeroed before the first query tile.
template <int kDTiles>
__device__ __forceinline__ void zero_dkdv_accumulators(float (&dk)[kDTiles][4], float (&dv)[kDTiles][4]) {
#pragma unroll
  for (int i = 0; i < kDTiles; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) dk[i][c] = dv[i][c] = 0.f;
}

// Zeroes the K rows of the block past the keys some group uses (past the sequence, or past every
// group's seqused_k, where they may hold NaN): dQ = dS K reads them. V rows there only reach
// masked entries of dP^T, which are selected to 0. Both consumer warpgroups (ctid 0 .. 255), once
// K has landed.
template <typename T>
__device__ __forceinline__ void zero_unused_key_rows(const cuda::BwdKernelParams& p, const BwdSmem<T>& sm, int b,
                                                     int key0, int keys_valid, int ctid) {
  const int keys_in_use = max(0, min(keys_valid, keys_used_by_any_group(p, b) - key0));
  if (keys_in_use < T::kBlockN) {
    ptx::zero_swizzled_rows(sm.k, T::kKVColBlockBytes, T::kColBlocks, keys_in_use, T::kBlockN, ctid, 256);
    ptx::fence_proxy_async_shared();
    ptx::named_barrier_sync(barrier_id(NamedBarrier::kBwdKZeroed), 256);
  }
}

// Rows of a partial query tile past the sequence are the next sequence's or padding (TMA fills
// zeros only past the tensor): zeroes them in the stage's Q and dO, since P^T dO and dS^T Q
// multiply them by 0 and 0 * NaN would reach dK/dV. Both consumer warpgroups, same condition.
template <typename T>
__device__ __forceinline__ void zero_query_tail_rows(uint32_t q_tile, uint32_t do_tile, int rows_valid, int ctid) {
  if (rows_valid < T::kBlockM) {
    ptx::zero_swizzled_rows(q_tile, T::kQColBlockBytes, T::kColBlocks, rows_valid, T::kBlockM, ctid, 256);
    ptx::zero_swizzled_rows(do_tile, T::kQColBlockBytes, T::kColBlocks, rows_valid, T::kBlockM, ctid, 256);
    ptx::fence_proxy_async_shared();
    ptx::named_barrier_sync(barrier_id(NamedBarrier::kBwdQTailZeroed), 256);
  }
}

// The mask of a [keys][queries] accumulator (S^T, P^T, dP^T, dS^T) of one consumer thread:
// entry (nt, c) is key first_key + 8 r (r = c >> 1), query first_query + j with j = nt * 8 +
// qcol + (c & 1). The entry is visible iff the key is in the sequence and lo_r <= query < hi_r
// (the rows that see the key: lo_r = Mask::row_begin_unclamped, hi_r = Mask::row_end), i.e. iff
// (unsigned)(j + row_bias[r]) < width[r]. Called after the wait for S^T, and the two made opaque
// there: the test depends on indices only, and the compiler would otherwise hoist it above the
// wgmma and run it, predicated, on every tile.
template <typename SeqMask>
__device__ __forceinline__ void key_row_mask_bounds(const SeqMask& seq_mask, int first_query, int first_key,
                                                    int seqlen_k, int (&row_bias)[2], int (&width)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = first_key + r * 8;
    const int lo = seq_mask.row_begin_unclamped(key);
    row_bias[r] = first_query - lo;
    width[r] = key < seqlen_k ? max(seq_mask.row_end(key) - lo, 0) : 0;
    asm volatile("" : "+r"(row_bias[r]), "+r"(width[r]));
  }
}

// The producer thread (thread 0 of warpgroup 0) of the dK/dV kernel for keys [key0, key0 +
// kBlockN) of sequence b (its keys start at token k_start) and KV head kv_head: K and V once,
// when some query tile sees the block (the consumers wait for them only then, and a CTA must not
// exit with a bulk copy into its shared memory still in flight); then, per query tile of the
// cursor, Q, dO and the tile's LSE / Di rows by TMA into the tile's stage, on its full barrier
// (arrival count 1: everything the consumers read of a stage is written by TMA, whose completion
// on the barrier compute-sanitizer's racecheck follows). LSE / Di of rows past the sequence in a
// partial tile are the next sequence's values, or zeros past total_q (TMA fill): every entry of
// such a row is masked (selected to 0), as in the tile's Q and dO tail.
template <typename T, MaskMode kMask>
__device__ __forceinline__ void produce_bwd_tiles(const BwdKernelParams& params, const BwdSmem<T>& sm,
                                                  const typename BwdSmem<T>::Pipeline& q_pipe, int b, int key0,
                                                  int kv_head, int32_t k_start) {
  using Cursor = QueryTileCursor<T::kBlockM, T::kBlockN, kMask>;
  using State = PipelineState<T::kStages>;
  constexpr int kBlockM = T::kBlockM;
  const cuda::BwdKernelParams& p = params.base;
  const FeatureParams& features = params.features;
  const int ratio = p.q_heads_per_kv_head;
  Cursor cur;
  cur.start(p, features, b, key0);
  if (cur.valid(p)) {
    ptx::mbarrier_arrive_expect_tx(sm.bar_kv(), 2 * T::kKVBytes);
#pragma unroll
    for (int cb = 0; cb < T::kColBlocks; ++cb) {
      ptx::tma_load_3d(sm.k + cb * T::kKVColBlockBytes, &params.maps.tma_k, sm.bar_kv(), cb * 64, kv_head, k_start + key0);
      ptx::tma_load_3d(sm.v + cb * T::kKVColBlockBytes, &params.maps.tma_v, sm.bar_kv(), cb * 64, kv_head, k_start + key0);
    }
  }
  for (int t = 0; cur.valid(p); ++t) {
    const State q_state(t);
    const int s = q_state.stage();
    q_pipe.producer_acquire(q_state);
    const int head = kv_head * ratio + cur.head_in_kv;
    const int token0 = cur.q_start + cur.m_block * kBlockM;
    ptx::mbarrier_arrive_expect_tx(q_pipe.full(s), 2 * T::kQBytes + T::kStatTxBytes);
#pragma unroll
    for (int cb = 0; cb < T::kColBlocks; ++cb) {
      ptx::tma_load_3d(sm.q_stage(s) + cb * T::kQColBlockBytes, &params.maps.tma_q[cur.group], q_pipe.full(s), cb * 64,
                       head, token0);
      ptx::tma_load_3d(sm.do_stage(s) + cb * T::kQColBlockBytes, &params.maps.tma_do[cur.group], q_pipe.full(s), cb * 64,
                       head, token0);
    }
    // The tile's LSE and Di rows: one box of tma_stats each (kStatBox tokens), rows head and
    // Hq + head of the group's stats map; tokens past total_q read as 0. The box starts at token0
    // rounded down to 16 bytes: TMA raises an illegal instruction for an innermost coordinate
    // that is not 16-byte aligned, and a varlen sequence's q_start is any integer (the consumers
    // read the tile's row stat_row_shift(q_start) bytes in).
    const int32_t box0 = bwd_stat_box_start(token0);
    ptx::tma_load_2d(sm.lse_stage(s), &params.tma_stats[cur.group], q_pipe.full(s), box0, head);
    ptx::tma_load_2d(sm.di_stage(s), &params.tma_stats[cur.group], q_pipe.full(s), box0, p.num_heads_q + head);
    cur.next(p, features, b, key0);
  }
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
