// The key-split main loop of the tier-2 (sm90a) dK/dV kernel (bwd_kernel.cuh), head dims 64 and
// 128: the consumer warpgroups of a CTA that owns kBlockN = 128 keys, 64 keys each.
//   Per query tile: S^T = K Q^T and dP^T = V dO^T (wgmma; shared-memory operands at head dim
//   128, K and V from registers at head dim 64, loaded once per CTA), P^T =
//   exp2(S^T scale - LSE), dS^T = P^T (dP^T - Di) with masked entries exactly 0; dV += P^T dO
//   and dK += dS^T Q (wgmma, P^T/dS^T from registers, dO/Q transposed); dS^T to shared memory.
//   Without the softcap, dV is issued as soon as P^T is final (before the wait for dP^T), so it
//   runs while dS^T is computed and stored; dK follows the dS^T store. With the softcap, P^T is
//   computed after dP^T has landed, and dV and dK are issued together.
//   dQ = dS K over all 128 keys is computed by the consumers in turn (tile t by consumer wg =
//   t & 1, all head-dim columns as one wgmma chain, once the other has written its dS^T half),
//   staged in fp32 in shared memory and added to the group's dq_accum by TMA reduce-add (one
//   bulk operation per 64 x 32 box, issued by one thread); the other warpgroup goes on to the next tile without
//   waiting, so the two are not held in lock step (skipped in deterministic mode, where the
//   tier-2 dQ kernel, bwd_dq_kernel.cuh, computes dQ).
//   Epilogue: dK * scale and dV of this thread's keys, plain stores.
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
__device__ __forceinline__ void consume_bwd_keysplit(const BwdKernelParams& params, const BwdSmem<T>& sm,
                                                     const typename BwdSmem<T>::Pipeline& q_pipe, int b, int key0,
                                                     int kv_head, int32_t k_start, int keys_valid, int warpgroup) {
  using Element = typename T::Element;
  constexpr int kHeadDim = T::kHeadDim;
  constexpr int kBlockM = T::kBlockM;
  constexpr int kBlockN = T::kBlockN;
  constexpr int kSTiles = kBlockM / 8;   // S^T / dP^T accumulators: n8 fragments (queries)
  constexpr int kDTiles = kHeadDim / 8;  // dK / dV accumulators
  constexpr int kQSteps = kBlockM / 16;  // k-steps over queries (dV, dK)
  constexpr int kDSteps = kHeadDim / 16;  // k-steps over the head dim (S^T, dP^T)
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
  const int key_local = wg * 64 + warp_in_wg * 16 + (lane >> 2);  // this thread's first key in the block
  const int qcol = (lane & 3) * 2;                                 // this thread's first query column in an n8 fragment

  float dk[kDTiles][4], dv[kDTiles][4];
  Cursor cur;
  if (start_key_block(params, sm, cur, b, key0, keys_valid, ctid, dk, dv)) {
    // Descriptors (see fwd_kernel.cuh for the layouts): one per operand tile, advanced by
    // constant byte offsets per k step.
    const uint64_t k_a_desc0 = ptx::smem_desc_sw128(sm.k + wg * 64 * 128, 16, 1024);
    const uint64_t v_a_desc0 = ptx::smem_desc_sw128(sm.v + wg * 64 * 128, 16, 1024);
    auto kv_a_desc = [&](uint64_t desc0, int kk) {  // K or V rows of this warpgroup as the K-major A operand
      return ptx::desc_advance(desc0, (kk / 4) * T::kKVColBlockBytes + (kk % 4) * 32);
    };
    // At head dim 64, S^T and dP^T take K and V from registers (RS wgmma): the A fragments of
    // this warp's 16 keys, read once by ldmatrix (after the K rows past the keys in use have been
    // zeroed), so a tile's S^T and dP^T read only Q and dO from shared memory (8 KB less per
    // product and warpgroup, 32 KB per tile). 32 registers per thread; at head dim 128 they would
    // be 64, which do not fit under 240.
    constexpr bool kKVInRegs = kHeadDim == 64;
    uint32_t kfrag[kKVInRegs ? kDSteps : 1][4], vfrag[kKVInRegs ? kDSteps : 1][4];
    if constexpr (kKVInRegs) {
      // ldmatrix.x4: lanes 8 i .. 8 i + 7 give the rows of matrix i (i = 0..3: keys +0 / +8,
      // columns +0 / +8 of the k step), so register i is the A fragment's a[i].
      const int row = wg * 64 + warp_in_wg * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int kk = 0; kk < kDSteps; ++kk) {
        const int chunk = (kk % 4) * 2 + (lane >> 4);
        const uint32_t off = (kk / 4) * T::kKVColBlockBytes + row * 128 + ((chunk ^ (row & 7)) << 4);
        ptx::ldmatrix_x4(sm.k + off, kfrag[kk][0], kfrag[kk][1], kfrag[kk][2], kfrag[kk][3]);
        ptx::ldmatrix_x4(sm.v + off, vfrag[kk][0], vfrag[kk][1], vfrag[kk][2], vfrag[kk][3]);
      }
    }
    auto qdo_b_desc = [&](uint64_t desc0, int kk) {  // Q or dO as the K-major B operand (N = queries); desc0: (tile, 16, 1024)
      return ptx::desc_advance(desc0, (kk / 4) * T::kQColBlockBytes + (kk % 4) * 32);
    };
    auto qdo_bt_desc = [&](uint64_t desc0, int kk) {  // Q or dO as the MN-major B operand (K = queries, N = head dim); desc0: (tile, kQColBlockBytes, 1024)
      return ptx::desc_advance(desc0, kk * 2048);
    };

    // dS^T rows of this thread's keys into a 128-byte swizzled [keys][64 queries] tile.
    auto store_ds_t = [&](uint32_t ds_tile, const uint32_t (&dsfrag)[kQSteps][4]) {
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int key = key_local + r * 8;
          const int byte = (nt * 8 + qcol) * 2;
          st_shared_u32(ds_tile + key * 128 + (((byte >> 4) ^ (key & 7)) << 4) + (byte & 15),
                        r == 0 ? dsfrag[nt / 2][(nt & 1) * 2] : dsfrag[nt / 2][(nt & 1) * 2 + 1]);
        }
    };
    // Writes one column part (kTiles * 8 columns from h * kTiles * 8) of
    // this warpgroup's dQ tile into its fp32 staging boxes ([64 rows][32 floats], 128-byte
    // swizzle; rows past the sequence as 0, so the next sequence's rows get exactly +0), then one
    // thread adds the boxes to dq_accum with TMA reduce-add.
    auto stage_and_reduce_dq = [&](const auto& dq, int h, const Cursor& c, int head, int row0) {
      constexpr int kBoxes = sizeof(dq) / sizeof(dq[0]) / 4;  // 32 columns = 4 n8 tiles per box
      stage_and_reduce_dq_boxes<T>(params, c, dq, sm.dq_stage(wg), h * kBoxes, 0, head, row0, NamedBarrier::kBwdDqStage0,
                                   wg, warp_in_wg, lane, ctid);
    };

    int num_tiles = 0;  // tiles walked, for the kDsFree drain after the loop
    for (int t = 0; cur.valid(p); ++t, ++num_tiles) {
      const State q_state(t);
      const int s = q_state.stage();
      q_pipe.consumer_wait(q_state);
      const uint32_t q_tile = sm.q_stage(s);
      const uint32_t do_tile = sm.do_stage(s);
      zero_query_tail_rows<T>(q_tile, do_tile, cur.seqlen_q - cur.m_block * kBlockM, ctid);

      // ---- S^T = K Q^T, dP^T = V dO^T ----
      float st[kSTiles][4], dpt[kSTiles][4];
      const uint64_t q_b_desc0 = ptx::smem_desc_sw128(q_tile, 16, 1024);
      const uint64_t do_b_desc0 = ptx::smem_desc_sw128(do_tile, 16, 1024);
      ptx::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kDSteps; ++kk) {
        if constexpr (kKVInRegs)
          ptx::Wgmma<Element, kBlockM>::rs(st, kfrag[kk], qdo_b_desc(q_b_desc0, kk), kk > 0 ? 1 : 0);
        else
          ptx::Wgmma<Element, kBlockM>::ss(st, kv_a_desc(k_a_desc0, kk), qdo_b_desc(q_b_desc0, kk), kk > 0 ? 1 : 0);
      }
      ptx::wgmma_commit_group();
      ptx::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kDSteps; ++kk) {
        if constexpr (kKVInRegs)
          ptx::Wgmma<Element, kBlockM>::rs(dpt, vfrag[kk], qdo_b_desc(do_b_desc0, kk), kk > 0 ? 1 : 0);
        else
          ptx::Wgmma<Element, kBlockM>::ss(dpt, kv_a_desc(v_a_desc0, kk), qdo_b_desc(do_b_desc0, kk), kk > 0 ? 1 : 0);
      }
      ptx::wgmma_commit_group();

      const int row0 = cur.m_block * kBlockM;
      const Mask<kMask> seq_mask = cur.mask();
      const bool need_mask = seq_mask.tile_needs_mask(row0, kBlockM, key0, kBlockN);

      ptx::wgmma_wait_group<1>();
      fence_accumulator(st);
      // Entry (nt, c) of S^T / dP^T masked iff masked(nt, c): this thread's keys against the tile's
      // queries from row0 (key_row_mask_bounds).
      int row_bias[2], width[2];
      key_row_mask_bounds(seq_mask, row0, key0 + key_local, cur.seqlen_k, row_bias, width);
      auto masked = [&](int nt, int c) {
        return static_cast<uint32_t>(nt * 8 + qcol + (c & 1) + row_bias[c >> 1]) >= static_cast<uint32_t>(width[c >> 1]);
      };
      // This thread's LSE / Di entries of the tile: from the tile's first row in the stage's boxes
      // (stat_row_shift: 4-byte aligned, hence ld_shared_f32x2).
      const uint32_t row_off = stat_row_shift(cur.q_start) + 4 * qcol;
      const uint32_t lse_row = sm.lse_stage(s) + row_off;
      const uint32_t di_row = sm.di_stage(s) + row_off;
      if constexpr (kSoftcap) {
        // t = tanh(S^T * softcap_scale) in place while dP^T is still being computed; P^T and dS^T
        // follow once it has landed, both from t (no third accumulator-sized array: the hdim-128
        // kernel has no registers to spare for one).
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
      // Without the softcap P^T is final here: dV += P^T dO is issued now (its own commit group,
      // behind dP^T), so the tensor pipe works on it while dS^T is computed and stored; the fp32
      // P^T stays for dS^T. The softcap path computes P^T only once dP^T has landed (below).
      uint32_t pfrag[kQSteps][4], dsfrag[kQSteps][4];
      const uint64_t do_bt_desc0 = ptx::smem_desc_sw128(do_tile, T::kQColBlockBytes, 1024);
      const uint64_t q_bt_desc0 = ptx::smem_desc_sw128(q_tile, T::kQColBlockBytes, 1024);
      if constexpr (!kSoftcap) {
#pragma unroll
        for (int kk = 0; kk < kQSteps; ++kk) pack_a_fragment<Element>(st, kk, pfrag[kk]);
        ptx::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kQSteps; ++kk) ptx::Wgmma<Element, kHeadDim>::rs_tb(dv, pfrag[kk], qdo_bt_desc(do_bt_desc0, kk), 1);
        ptx::wgmma_commit_group();
        ptx::wgmma_wait_group<1>();  // dP^T (groups complete in order; dV may still run)
      } else {
        ptx::wgmma_wait_group<0>();
      }
      fence_accumulator(dpt);
      if constexpr (kSoftcap) {
        // P^T = exp2(t * softcap_log2 - LSE_log2[query]), dS^T = P^T (1 - t^2) (dP^T - Di[query]);
        // masked entries 0 in both (selected: dP^T there may be garbage).
#pragma unroll
        for (int nt = 0; nt < kSTiles; ++nt) {
          const float2 l = ld_shared_f32x2(lse_row + 4 * nt * 8);
          const float2 d = ld_shared_f32x2(di_row + 4 * nt * 8);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const float t = st[nt][c];
            const float prob = ptx::exp2_approx(fmaf(t, features.softcap_log2, -((c & 1) ? l.y : l.x)));
            st[nt][c] = prob;
            dpt[nt][c] = prob * fmaf(-t, t, 1.f) * (dpt[nt][c] - ((c & 1) ? d.y : d.x));
          }
        }
        if (need_mask) zero_masked(st, masked);
      } else {
        // dS^T = P^T (dP^T - Di[query]); masked entries 0 (selected: dP^T there may be garbage).
#pragma unroll
        for (int nt = 0; nt < kSTiles; ++nt) {
          const float2 d = ld_shared_f32x2(di_row + 4 * nt * 8);
#pragma unroll
          for (int c = 0; c < 4; ++c) dpt[nt][c] = st[nt][c] * (dpt[nt][c] - ((c & 1) ? d.y : d.x));
        }
      }
      if (need_mask) zero_masked(dpt, masked);
#pragma unroll
      for (int kk = 0; kk < kQSteps; ++kk) {
        if constexpr (kSoftcap) pack_a_fragment<Element>(st, kk, pfrag[kk]);
        pack_a_fragment<Element>(dpt, kk, dsfrag[kk]);
      }

      // ---- dQ alternates between the warpgroups: warpgroup (t & 1) computes all of dQ = dS K
      // for tile t; the other only writes its dS^T half and goes on (bar.arrive), so the two
      // warpgroups are not held in lock step. ds_buf(t & 1) is reused at t + 2: the writer of
      // the next use waits (kDsFree) until the dQ product of t has read it.
      const bool dq_wg = p.accumulate_dq && (t & 1) == wg;
      if (p.accumulate_dq) {
        const uint32_t ds_tile = sm.ds_buf(t & 1);
        if (!dq_wg && t >= 2) ptx::named_barrier_sync(barrier_id(NamedBarrier::kBwdDsFree0, t & 1), 256);
        store_ds_t(ds_tile, dsfrag);
        ptx::fence_proxy_async_shared();
        if (!dq_wg) ptx::named_barrier_arrive(barrier_id(NamedBarrier::kBwdDsWritten0, t & 1), 256);
      }
      ptx::wgmma_fence();
      if constexpr (kSoftcap) {
#pragma unroll
        for (int kk = 0; kk < kQSteps; ++kk) ptx::Wgmma<Element, kHeadDim>::rs_tb(dv, pfrag[kk], qdo_bt_desc(do_bt_desc0, kk), 1);
      }
#pragma unroll
      for (int kk = 0; kk < kQSteps; ++kk) ptx::Wgmma<Element, kHeadDim>::rs_tb(dk, dsfrag[kk], qdo_bt_desc(q_bt_desc0, kk), 1);
      ptx::wgmma_commit_group();
      if (dq_wg) {
        const uint32_t ds_tile = sm.ds_buf(t & 1);
        ptx::named_barrier_sync(barrier_id(NamedBarrier::kBwdDsWritten0, t & 1), 256);
        // This warpgroup's staging boxes are free once its previous tile's reduce has read them.
        if (ctid % 128 == 0) ptx::bulk_wait_group_read<0>();
        ptx::named_barrier_sync(barrier_id(NamedBarrier::kBwdDqStage0, wg), 128);
        ptx::wgmma_wait_group<0>();
        q_pipe.consumer_release(s, lane == 0);
        // dQ = dS K as one m64n<kHeadDim>k16 chain over the 128 keys: each k step reads its dS
        // slice once for all head-dim columns (at D=128, 48 KB of shared memory per tile where two
        // 64-column chains read 64 KB: the SS products run at the shared-memory port's rate).
        float dq[kDTiles][4];
        ptx::wgmma_fence();
        const uint64_t ds_a_desc0 = ptx::smem_desc_sw128(ds_tile, T::kDsBytes, 1024);
        const uint64_t k_b_desc0 = ptx::smem_desc_sw128(sm.k, T::kKVColBlockBytes, 1024);
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk)
          ptx::Wgmma<Element, kHeadDim>::ss_tt(dq, ptx::desc_advance(ds_a_desc0, kk * 2048),
                                                ptx::desc_advance(k_b_desc0, kk * 2048), kk > 0 ? 1 : 0);
        ptx::wgmma_commit_group();
        ptx::wgmma_wait_group<0>();
        fence_accumulator(dq);
        ptx::named_barrier_arrive(barrier_id(NamedBarrier::kBwdDsFree0, t & 1), 256);
        stage_and_reduce_dq(dq, 0, cur, kv_head * ratio + cur.head_in_kv, row0);
      } else {
        ptx::wgmma_wait_group<0>();
        q_pipe.consumer_release(s, lane == 0);
      }
      cur.next(p, features, b, key0);
    }
    // A CTA must not exit while a TMA reduce still reads its shared memory (or is unfinished).
    if (p.accumulate_dq && ctid % 128 == 0) ptx::bulk_wait_group<0>();
    // The kDsFree arrivals of the last two tiles have no writer waiting at t + 2: consume them.
    if (p.accumulate_dq) {
      for (int t = max(num_tiles - 2, 0); t < num_tiles; ++t)
        if ((t & 1) != wg) ptx::named_barrier_sync(barrier_id(NamedBarrier::kBwdDsFree0, t & 1), 256);
    }
    fence_accumulator(dk);
    fence_accumulator(dv);
  }

  // ---- epilogue: dK * scale and dV, rows of this thread's keys (zeros where no query saw them),
  // all columns from qcol; with kLocal the key again from threadIdx ----
  store_dkdv<T, kMask>(p, b, key0, kv_head, k_start, keys_valid, key_local, 0, qcol, [](int thread) {
    return make_int2((thread / 128 - 1) * 64 + ((thread / 32) & 3) * 16 + ((thread & 31) >> 2), 0);
  }, dk, dv);
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
