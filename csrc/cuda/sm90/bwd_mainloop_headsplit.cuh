// The head-split main loop of the tier-2 (sm90a) dK/dV kernel (bwd_kernel.cuh), head dim 256:
// the consumer warpgroups of a CTA that owns kBlockN = 64 keys (BwdHeadSplitTraits).
//
// At head dim 256 a warpgroup cannot hold dK and dV of 64 keys over all columns (2 x 64 x 256
// fp32 over 128 threads: 256 registers; the budget is 240), so the two warpgroups split the head
// dim of the key-side products and the queries of the score-side ones. Per query tile (64 rows,
// stage s, buffer t & 1), warpgroup w (0 or 1):
//   S^T = K Q_w^T, dP^T = V dO_w^T     64 keys x the 32 queries [32 w, +32), k = 256 (wgmma,
//                                      shared-memory operands)
//   P^T = exp2(S^T scale - LSE), dS^T = P^T (dP^T - Di), masked entries exactly 0 (softcap:
//   from t = tanh, dS^T times 1 - t^2); both to shared memory as [64 keys][64 queries] bf16/fp16
//   tiles (128-byte swizzle), then a barrier between the two warpgroups (kBwdPdsWritten);
//   dV[:, C_w] += P^T dO[:, C_w], dK[:, C_w] += dS^T Q[:, C_w]   C_w = columns [128 w, +128)
//                                      (P^T, dS^T and dO, Q from shared memory)
//   dQ[:, C_w] = dS K[:, C_w]         in two 64-column parts (one commit group each), staged in
//                                      fp32 in the stage's own Q and dO column blocks of C_w
//                                      (free once this warpgroup's dK and dV products completed:
//                                      the other warpgroup's S^T / dP^T finished before the
//                                      barrier, its dK / dV read only its own columns), and added
//                                      to dq_accum by TMA reduce-add (skipped in deterministic
//                                      mode, where the dQ kernel computes dQ).
// The stage is released at the next tile once the reduce-add has read it (a warp's release
// waits for its issuing thread's bulk read), so the producer's next load into it cannot
// overwrite staged dQ. P^T / dS^T buffer t & 1 is written again at tile t + 2, after tile t + 1's
// barrier, which both warpgroups reach only once their tile-t products (the readers) completed.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/ptx.h"
#include "cuda/query_tile_cursor.h"
#include "cuda/seqlen_info.h"
#include "cuda/sm90/bwd_common.cuh"
#include "cuda/sm90/bwd_mainloop_common.cuh"
#include "cuda/sm90/bwd_params.h"
#include "cuda/sm90/fragments.h"
#include "cuda/sm90/mma_loop.h"
#include "cuda/sm90/named_barriers.h"
#include "cuda/sm90/pipeline.h"
#include "cuda/sm90/ptx_sm90.h"
#include "cuda/sm90/softcap.cuh"
#include "cuda/sm90/wgmma.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

// The consumer warpgroups' part of the dK/dV kernel for keys [key0, key0 + kBlockN) of sequence
// b (keys_valid of them in the sequence, which starts at token k_start), KV head kv_head;
// warpgroup: 1 or 2.
template <typename T, MaskMode kMask, bool kSoftcap>
__device__ __forceinline__ void consume_bwd_headsplit(const BwdKernelParams& params, const BwdSmem<T>& sm,
                                                      const typename BwdSmem<T>::Pipeline& q_pipe, int b, int key0,
                                                      int kv_head, int32_t k_start, int keys_valid, int warpgroup) {
  using Element = typename T::Element;
  constexpr int kBlockM = T::kBlockM;
  constexpr int kBlockN = T::kBlockN;
  constexpr int kQw = T::kQueriesPerWarpgroup;           // S^T / dP^T columns of a warpgroup
  constexpr int kSTiles = kQw / 8;                       // S^T / dP^T accumulators: n8 fragments (queries)
  constexpr int kDTiles = T::kColsPerWarpgroup / 8;      // dK / dV accumulators (this warpgroup's columns)
  constexpr int kDqParts = T::kColBlocksPerWarpgroup;    // dQ in 64-column parts
  constexpr int kDqPartTiles = 64 / 8;
  constexpr int kQSteps = kBlockM / 16;                  // k-steps over queries (dV, dK)
  constexpr int kKSteps = kBlockN / 16;                  // k-steps over keys (dQ)
  constexpr int kDSteps = T::kHeadDim / 16;              // k-steps over the head dim (S^T, dP^T)
  static_assert(kDqParts * kDqPartTiles == kDTiles, "dQ parts cover the warpgroup's columns");
  static_assert(kDqParts == 2 && T::kDqBoxesInQ == 2, "part 0 is staged in the Q column blocks, part 1 in dO's");
  using Cursor = QueryTileCursor<kBlockM, kBlockN, kMask>;
  using State = PipelineState<T::kStages>;
  const cuda::BwdKernelParams& p = params.base;
  const FeatureParams& features = params.features;  // kLocal: the window and diagonal shifts (cursor)
  const int ratio = p.q_heads_per_kv_head;
  const int wg = warpgroup - 1;
  const int tid = threadIdx.x;
  const int ctid = tid - 128;  // 0 .. 255
  const int lane = tid & 31;
  const int warp_in_wg = (tid / 32) & 3;
  const int key_local = warp_in_wg * 16 + (lane >> 2);  // this thread's first key in the block (+8: its second)
  const int qcol = (lane & 3) * 2;                      // this thread's first column in an n8 fragment
  const int q_first = wg * kQw;                         // this warpgroup's first query of S^T / dP^T
  const int col_first = wg * T::kColsPerWarpgroup;      // its first head-dim column of dK / dV / dQ
  const int cb_first = wg * T::kColBlocksPerWarpgroup;  // the column block holding it

  float dk[kDTiles][4], dv[kDTiles][4];
  Cursor cur;
  if (start_key_block(params, sm, cur, b, key0, keys_valid, ctid, dk, dv)) {
    // K and V (all 64 keys) as the K-major A operand of S^T and dP^T.
    const KMajorSteps<T::kKVColBlockBytes> k_a{ptx::smem_desc_sw128(sm.k, 16, 1024)};
    const KMajorSteps<T::kKVColBlockBytes> v_a{ptx::smem_desc_sw128(sm.v, 16, 1024)};

    // This thread's entries of a [keys][queries] accumulator (P^T or dS^T, this warpgroup's
    // queries) into a 128-byte swizzled [64 keys][64 queries] tile.
    auto store_t = [&](uint32_t tile, const float (&acc)[kSTiles][4]) {
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int key = key_local + r * 8;
          const int byte = (q_first + nt * 8 + qcol) * 2;
          st_shared_u32(tile + key * 128 + (((byte >> 4) ^ (key & 7)) << 4) + (byte & 15),
                        ptx::pack2<Element>(acc[nt][2 * r], acc[nt][2 * r + 1]));
        }
    };
    // Writes dQ part h (columns col_first + 64 h, +64) into its two fp32 staging boxes ([64
    // rows][32 floats], 128-byte swizzle; rows past the sequence as 0, so the next sequence's
    // rows get exactly +0) in column blocks cb_first, cb_first + 1 of `region` (the stage's Q for
    // part 0, its dO for part 1), then one thread adds them to dq_accum by TMA reduce-add.
    auto stage_and_reduce_dq = [&](const float (&dq)[kDqPartTiles][4], int h, uint32_t region, const Cursor& c,
                                   int head, int row0) {
      stage_and_reduce_dq_boxes<T>(params, c, dq, region + cb_first * T::kQColBlockBytes, 0, col_first + h * 64, head,
                                   row0, NamedBarrier::kBwdHsDqStage0, wg, warp_in_wg, lane, ctid);
    };

    int t = 0;
    for (; cur.valid(p); ++t) {
      const State q_state(t);
      const int s = q_state.stage();
      const int buf = t & 1;
      q_pipe.consumer_wait(q_state);
      const uint32_t q_tile = sm.q_stage(s);
      const uint32_t do_tile = sm.do_stage(s);
      zero_query_tail_rows<T>(q_tile, do_tile, cur.seqlen_q - cur.m_block * kBlockM, ctid);

      // ---- S^T = K Q_w^T, dP^T = V dO_w^T (this warpgroup's 32 queries as the K-major B operand) ----
      float st[kSTiles][4], dpt[kSTiles][4];
      const KMajorSteps<T::kQColBlockBytes> q_b{ptx::smem_desc_sw128(q_tile + q_first * 128, 16, 1024)};
      const KMajorSteps<T::kQColBlockBytes> do_b{ptx::smem_desc_sw128(do_tile + q_first * 128, 16, 1024)};
      ptx::wgmma_fence();
      mma_ss<Element, kDSteps, MmaInit::kOverwrite>(st, k_a, q_b);
      ptx::wgmma_commit_group();
      ptx::wgmma_fence();
      mma_ss<Element, kDSteps, MmaInit::kOverwrite>(dpt, v_a, do_b);
      ptx::wgmma_commit_group();

      // The previous tile's stage: free once the reduce-add of its staged dQ has read it (the
      // issuing thread waits; its warp's release follows the wait). Here, behind this tile's
      // products, rather than at the end of the previous tile.
      if (t > 0) {
        if (ctid % 128 == 0) ptx::bulk_wait_group_read<0>();
        q_pipe.consumer_release(q_state.prev().stage(), lane == 0);
      }

      const int row0 = cur.m_block * kBlockM;
      const Mask<kMask> seq_mask = cur.mask();
      const bool need_mask = seq_mask.tile_needs_mask(row0 + q_first, kQw, key0, kBlockN);

      ptx::wgmma_wait_group<1>();
      fence_accumulator(st);
      // Entry (nt, c) of S^T / dP^T masked iff masked(nt, c): this thread's keys against this
      // warpgroup's queries from row0 + q_first (key_row_mask_bounds).
      int row_bias[2], width[2];
      key_row_mask_bounds(seq_mask, row0 + q_first, key0 + key_local, cur.seqlen_k, row_bias, width);
      auto masked = [&](int nt, int c) {
        return static_cast<uint32_t>(nt * 8 + qcol + (c & 1) + row_bias[c >> 1]) >= static_cast<uint32_t>(width[c >> 1]);
      };
      // This thread's LSE / Di entries of the tile: from the tile's first row in the stage's boxes
      // (stat_row_shift: 4-byte aligned, hence ld_shared_f32x2).
      const uint32_t row_off = stat_row_shift(cur.q_start) + 4 * (q_first + qcol);
      const uint32_t lse_row = sm.lse_stage(s) + row_off;
      const uint32_t di_row = sm.di_stage(s) + row_off;
      if constexpr (kSoftcap) {
        // t = tanh(S^T * softcap_scale) in place while dP^T is still being computed.
#pragma unroll
        for (int nt = 0; nt < kSTiles; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) st[nt][c] = tanh_approx(st[nt][c] * features.softcap_scale);
      } else {
        // P^T = exp2(S^T * scale_log2 - LSE_log2[query]); masked entries 0.
#pragma unroll
        for (int nt = 0; nt < kSTiles; ++nt) {
          const float2 l = ld_shared_f32x2(lse_row + 4 * nt * 8);
#pragma unroll
          for (int c = 0; c < 4; ++c)
            st[nt][c] = ptx::exp2_approx(fmaf(st[nt][c], p.softmax_scale_log2, -((c & 1) ? l.y : l.x)));
        }
        if (need_mask) zero_masked(st, masked);
      }
      ptx::wgmma_wait_group<0>();
      fence_accumulator(dpt);
      if constexpr (kSoftcap) {
        // P^T = exp2(t * softcap_log2 - LSE_log2[query]), dS^T = P^T (1 - t^2) (dP^T - Di[query]).
#pragma unroll
        for (int nt = 0; nt < kSTiles; ++nt) {
          const float2 l = ld_shared_f32x2(lse_row + 4 * nt * 8);
          const float2 d = ld_shared_f32x2(di_row + 4 * nt * 8);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const float tc = st[nt][c];
            const float prob = ptx::exp2_approx(fmaf(tc, features.softcap_log2, -((c & 1) ? l.y : l.x)));
            st[nt][c] = prob;
            dpt[nt][c] = prob * fmaf(-tc, tc, 1.f) * (dpt[nt][c] - ((c & 1) ? d.y : d.x));
          }
        }
        if (need_mask) zero_masked(st, masked);
      } else {
        // dS^T = P^T (dP^T - Di[query]).
#pragma unroll
        for (int nt = 0; nt < kSTiles; ++nt) {
          const float2 d = ld_shared_f32x2(di_row + 4 * nt * 8);
#pragma unroll
          for (int c = 0; c < 4; ++c) dpt[nt][c] = st[nt][c] * (dpt[nt][c] - ((c & 1) ? d.y : d.x));
        }
      }
      // Masked entries 0 (selected: dP^T there may be garbage).
      if (need_mask) zero_masked(dpt, masked);

      // ---- P^T and dS^T of this warpgroup's queries to shared memory; wait for the other's ----
      const uint32_t pt_tile = sm.pt_buf(buf);
      const uint32_t ds_tile = sm.ds_buf(buf);
      store_t(pt_tile, st);
      store_t(ds_tile, dpt);
      ptx::fence_proxy_async_shared();
      ptx::named_barrier_sync(barrier_id(NamedBarrier::kBwdPdsWritten), 256);

      // ---- dV[:, C_w] += P^T dO[:, C_w], dK[:, C_w] += dS^T Q[:, C_w] ----
      // P^T / dS^T as the K-major A operand (k = queries); dO / Q columns C_w as the MN-major B
      // operand (K = queries, N = head dim).
      const KMajorSteps<T::kDsBytes> pt_a{ptx::smem_desc_sw128(pt_tile, 16, 1024)};
      const KMajorSteps<T::kDsBytes> ds_a{ptx::smem_desc_sw128(ds_tile, 16, 1024)};
      const MnMajorSteps do_bt{
          ptx::smem_desc_sw128(do_tile + cb_first * T::kQColBlockBytes, T::kQColBlockBytes, 1024)};
      const MnMajorSteps q_bt{ptx::smem_desc_sw128(q_tile + cb_first * T::kQColBlockBytes, T::kQColBlockBytes, 1024)};
      ptx::wgmma_fence();
      mma_ss_tb<Element, kQSteps, MmaInit::kAccumulate>(dv, pt_a, do_bt);
      mma_ss_tb<Element, kQSteps, MmaInit::kAccumulate>(dk, ds_a, q_bt);
      ptx::wgmma_commit_group();
      if (p.accumulate_dq) {
        // ---- dQ[:, C_w] = dS K[:, C_w]: dS^T read transposed (MN-major A, M = queries), K
        // columns as the MN-major B operand; one commit group per 64-column part ----
        float dq[kDqParts][kDqPartTiles][4];
        const MnMajorSteps ds_at{ptx::smem_desc_sw128(ds_tile, T::kDsBytes, 1024)};
        ptx::wgmma_fence();
#pragma unroll
        for (int h = 0; h < kDqParts; ++h) {
          const MnMajorSteps k_bt{
              ptx::smem_desc_sw128(sm.k + (cb_first + h) * T::kKVColBlockBytes, T::kKVColBlockBytes, 1024)};
          mma_ss_tt<Element, kKSteps, MmaInit::kOverwrite>(dq[h], ds_at, k_bt);
          ptx::wgmma_commit_group();
        }
        const int head = kv_head * ratio + cur.head_in_kv;
        // dK / dV and part 0 done: this warpgroup's Q columns of the stage are free for part 0.
        ptx::wgmma_wait_group<1>();
        fence_accumulator(dq[0]);
        stage_and_reduce_dq(dq[0], 0, q_tile, cur, head, row0);
        ptx::wgmma_wait_group<0>();
        fence_accumulator(dq[1]);
        stage_and_reduce_dq(dq[1], 1, do_tile, cur, head, row0);
      } else {
        ptx::wgmma_wait_group<0>();
      }
      cur.next(p, features, b, key0);
    }
    // The last tile's stage (no producer waits for it, but the reduce-add must finish before the
    // CTA exits: it still reads this CTA's shared memory).
    if (ctid % 128 == 0) ptx::bulk_wait_group<0>();
    if (t > 0) q_pipe.consumer_release(State(t - 1).stage(), lane == 0);
    fence_accumulator(dk);
    fence_accumulator(dv);
  }

  // ---- epilogue: dK * scale and dV, rows of this thread's keys, columns C_w (the thread's key and
  // column again from threadIdx with kLocal, as in the key-split loop) ----
  store_dkdv<T, kMask>(p, b, key0, kv_head, k_start, keys_valid, key_local, col_first + qcol, 0, [](int thread) {
    return make_int2(((thread / 32) & 3) * 16 + ((thread & 31) >> 2),
                     (thread / 128 - 1) * T::kColsPerWarpgroup + (thread & 3) * 2);
  }, dk, dv);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
