// Tier-1 grouped varlen attention backward, dK/dV kernel (mma.sync, FlashAttention-2 order).
//
// One CTA owns one K/V block (kBlockN keys) of one (sequence, KV head). It loads K and V once,
// then walks every (group, query head of this KV head, query tile) that sees the block (the
// tiles holding the rows that see one of its keys, common/mask.h: for causal, from the first
// one whose last row reaches the block's first key to the end of the sequence; groups whose
// used keys end before the block are skipped). Per query
// tile (kBlockM rows), with Q, dO, LSE and Di double-buffered through cp.async:
//   phase 1  S^T = K Q^T and dP^T = V dO^T; P = exp2(S * scale_log2 - LSE_log2), dS = P (dP - Di);
//            P^T and dS^T go to shared memory in the dtype;
//   phase 2  dV += P^T dO and dK += dS^T Q into fp32 registers that live across all tiles;
//   phase 3  dQ_tile = dS K, added to the group's fp32 dq_accum with atomics (skipped in
//            deterministic mode, where bwd_dq_kernel.cuh computes dQ).
// kMask = kLocal takes the call's window and diagonal shifts (params.features); kSoftcap (kLocal
// only) recomputes the capped scores, P = exp2(t * softcap_log2 - LSE_log2) with
// t = tanh(s * softcap_scale), and multiplies dS by 1 - t^2 (features.cuh).
// At the end dK (times the softmax scale) and dV are converted and written once: every key
// row of the block, zeros for keys no query sees. See bwd_traits.h for the warp layouts.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "common/tile_order.h"
#include "cuda/bwd_params.h"
#include "cuda/features.cuh"
#include "cuda/launch.h"
#include "cuda/ptx.h"
#include "cuda/query_tile_cursor.h"
#include "cuda/seqlen_info.h"
#include "cuda/sm80/bwd_common.cuh"
#include "cuda/sm80/bwd_traits.h"
#include "cuda/sm80/mma_fragments.cuh"

namespace ringattn {
namespace cuda {
namespace sm80 {

// CTAs per SM to ask registers for: T::kMinBlocksPerSm where that many fit in the shared memory
// of the architecture being compiled (sm_90: 228 KB, sm_80: 164 KB, sm_86/89: 100 KB), else
// fewer (more CTAs would only cap the registers).
template <typename T>
constexpr int bwd_min_blocks_per_sm() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kSmemPerSm = 228 * 1024;
#elif defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 890)
  constexpr int kSmemPerSm = 100 * 1024;
#else
  constexpr int kSmemPerSm = 164 * 1024;
#endif
  constexpr int kFit = kSmemPerSm / (T::kSmemBytes + 1024);  // 1 KB reserved per CTA
  return kFit < 1 ? 1 : (kFit < T::kMinBlocksPerSm ? kFit : T::kMinBlocksPerSm);
}

template <typename T, MaskMode kMask, bool kSoftcap>
__global__ void __launch_bounds__(T::kThreads, bwd_min_blocks_per_sm<T>())
    grouped_bwd_dkdv_kernel(const __grid_constant__ BwdKernelParams params) {
  static_assert(!kSoftcap || kMask == MaskMode::kLocal, "the softcap is compiled into kLocal kernels only");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Element = typename T::Element;
  constexpr int kHeadDim = T::kHeadDim;
  constexpr int kBlockM = T::kBlockM;
  constexpr int kBlockN = T::kBlockN;
  constexpr int kThreads = T::kThreads;
  constexpr int kStages = T::kStages;
  constexpr int kWarpsN = T::kWarpsN;
  constexpr int kQCols = T::kQCols;
  constexpr int kSTiles = T::kSTiles;
  constexpr int kDCols2 = T::kDCols2;
  constexpr int kDTiles2 = T::kDTiles2;
  constexpr int kWarpsM3 = T::kWarpsM3;
  constexpr int kDCols3 = T::kDCols3;
  constexpr int kDqChunk = T::kDqChunk;
  // Byte offsets between the tiles (all multiples of 1024, so SwizzledRows addresses of one
  // tile move to another by a plain add).
  constexpr uint32_t kKvBytes = T::kKvElems * sizeof(Element);
  constexpr uint32_t kQBytes = T::kQElems * sizeof(Element);
  constexpr uint32_t kPBytes = T::kPElems * sizeof(Element);
  constexpr uint32_t kDoOffset = kStages * kQBytes;  // sdO - sQ

  // CTA -> (K/V block, K/V head) in runs of kv_tile_head_run blocks per head (common/tile_order.h).
  const int kv_count = *params.kv_count;
  if (blockIdx.x >= static_cast<unsigned>(kv_count) * static_cast<unsigned>(params.num_heads_k)) return;
  int item_index = 0, kv_head = 0;
  split_query_tile(blockIdx.x, kv_count, params.num_heads_k, params.kv_tile_head_run, &item_index, &kv_head);
  const BwdKvWorkItem item = params.kv_items[item_index];
  const int b = item.batch;
  const int key0 = item.n_block * kBlockN;  // first key of the block, within the sequence
  const int32_t k_start = SeqLenInfo::clamp(params.cu_seqlens_k[b], 0, params.total_k);
  const int32_t seqlen_k_full = SeqLenInfo::clamp(params.cu_seqlens_k[b + 1], k_start, params.total_k) - k_start;
  const int keys_valid = min(kBlockN, seqlen_k_full - key0);  // rows of dK/dV this CTA writes
  if (keys_valid <= 0) return;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int ratio = params.q_heads_per_kv_head;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  Element* sK = reinterpret_cast<Element*>(smem_raw);
  Element* sV = sK + T::kKvElems;
  Element* sQ = sV + T::kKvElems;             // [kStages][kBlockM][kHeadDim]
  Element* sdO = sQ + kStages * T::kQElems;   // [kStages][kBlockM][kHeadDim]
  Element* sP = sdO + kStages * T::kQElems;   // P^T  [kBlockN][kBlockM]
  Element* sdS = sP + T::kPElems;             // dS^T [kBlockN][kBlockM]
  float* sLse = reinterpret_cast<float*>(sdS + T::kPElems);  // [kStages][kBlockM]
  float* sDi = sLse + kStages * kBlockM;                      // [kStages][kBlockM]

  const int64_t key_row0 = static_cast<int64_t>(k_start) + key0;
  const Element* k_blk = static_cast<const Element*>(params.k) + key_row0 * params.k_row_stride + kv_head * params.k_head_stride;
  const Element* v_blk = static_cast<const Element*>(params.v) + key_row0 * params.v_row_stride + kv_head * params.v_head_stride;

  using Cursor = QueryTileCursor<kBlockM, kBlockN, kMask>;
  auto load_query_tile = [&](const Cursor& c, int stage) {
    const BwdGroupArgs& g = params.groups[c.group];
    const int head = kv_head * ratio + c.head_in_kv;
    const int row0 = c.m_block * kBlockM;
    const int rows_valid = min(kBlockM, c.seqlen_q - row0);
    const int64_t token0 = static_cast<int64_t>(c.q_start) + row0;
    bwd::load_rows<Element, kHeadDim, kBlockM, kThreads>(
        sQ + stage * T::kQElems,
        static_cast<const Element*>(g.q) + token0 * g.q_row_stride + head * g.q_head_stride, g.q_row_stride,
        rows_valid, tid);
    bwd::load_rows<Element, kHeadDim, kBlockM, kThreads>(
        sdO + stage * T::kQElems,
        static_cast<const Element*>(g.dout) + token0 * g.dout_row_stride + head * g.dout_head_stride,
        g.dout_row_stride, rows_valid, tid);
    const int64_t stat0 = g.stat_row(head) + token0;
    bwd::load_floats<kBlockM, kThreads>(sLse + stage * kBlockM, g.lse_log2 + stat0, rows_valid, tid);
    bwd::load_floats<kBlockM, kThreads>(sDi + stage * kBlockM, g.di + stat0, rows_valid, tid);
  };

  // Accumulators: this warp's 16 keys x kDCols2 head-dim columns of dK and dV.
  float dk[kDTiles2][4], dv[kDTiles2][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles2; ++dt)
#pragma unroll
    for (int c = 0; c < 4; ++c) dk[dt][c] = dv[dt][c] = 0.f;

  // Warp layouts (bwd_traits.h).
  const int wn = warp % kWarpsN;  // phases 1, 2: keys [16 wn, 16 wn + 16)
  const int wq = warp / kWarpsN;  // phase 1: query cols [kQCols wq, ...); phase 2: head-dim cols [kDCols2 wq, ...)
  const int wm = warp % kWarpsM3;  // phase 3: query rows [16 wm, 16 wm + 16)
  const int wd = warp / kWarpsM3;  // phase 3: head-dim cols [kDCols3 wd, ...)

  // Fragment addresses (SwizzledRows; the lane -> (row, chunk) maps follow ldmatrix's four 8x8
  // matrices per x4, as in the forward). A warp's column offset is folded into the lane chunk:
  // it is a multiple of the chunks the warp's j range spans, so the XOR stays exact.
  // phase 1: K and V as A (rows = keys), Q and dO as B (non-transposed, rows = queries).
  const SwizzledRows<kHeadDim> kv_a(ptx::smem_addr(sK), wn * 16 + (lane & 15), lane >> 4);
  const SwizzledRows<kHeadDim> qdo_b(ptx::smem_addr(sQ), wq * kQCols + (lane & 7) + ((lane >> 4) << 3),
                                     (lane >> 3) & 1);
  // phase 2: P^T and dS^T as A (rows = keys), dO and Q as B (transposed: k = queries, n = head dim).
  const SwizzledRows<kBlockM> pds_a(ptx::smem_addr(sP), wn * 16 + (lane & 15), lane >> 4);
  const SwizzledRows<kHeadDim> qdo_bt(ptx::smem_addr(sQ), (lane & 7) + (((lane >> 3) & 1) << 3),
                                      (lane >> 4) + wq * (kDCols2 / 8));
  // phase 3: dS as A read transposed from dS^T (k = keys), K as B (transposed: k = keys, n = head dim).
  const SwizzledRows<kBlockM> ds_at(ptx::smem_addr(sdS), (lane & 7) + ((lane >> 4) << 3),
                                    ((lane >> 3) & 1) + 2 * wm);
  const SwizzledRows<kHeadDim> k_bt(ptx::smem_addr(sK), (lane & 7) + (((lane >> 3) & 1) << 3),
                                    (lane >> 4) + wd * (kDCols3 / 8));

  Cursor cur;
  cur.start(params, params.features, b, key0);
  if (cur.valid(params)) {
    // K/V rows some group uses; zeros past them (keys past seqused_k may hold NaN).
    const int keys_loaded = max(0, min(keys_valid, keys_used_by_any_group(params, b) - key0));
    bwd::load_rows<Element, kHeadDim, kBlockN, kThreads>(sK, k_blk, params.k_row_stride, keys_loaded, tid);
    bwd::load_rows<Element, kHeadDim, kBlockN, kThreads>(sV, v_blk, params.v_row_stride, keys_loaded, tid);
    load_query_tile(cur, 0);
    ptx::cp_async_commit();
    Cursor nxt = cur;
    nxt.next(params, params.features, b, key0);

    for (int it = 0;; ++it) {
      const int stage = kStages == 2 ? (it & 1) : 0;
      ptx::cp_async_wait<0>();
      __syncthreads();  // tile `it` is in; every warp finished tile it-1 (its stage, sP, sdS)
      if (kStages == 2 && nxt.valid(params)) {
        load_query_tile(nxt, stage ^ 1);
        ptx::cp_async_commit();
      }
      const uint32_t q_off = stage * kQBytes;
      const int row0 = cur.m_block * kBlockM;  // first query row of the tile, within the sequence

      // ---- phase 1: S^T = K Q^T, dP^T = V dO^T ----
      float s[kSTiles][4], dp[kSTiles][4];
#pragma unroll
      for (int nt = 0; nt < kSTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[nt][c] = dp[nt][c] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        uint32_t ak[4], av[4];
        ptx::ldmatrix_x4(kv_a(kk, 0), ak[0], ak[1], ak[2], ak[3]);
        ptx::ldmatrix_x4(kv_a(kk, 0) + kKvBytes, av[0], av[1], av[2], av[3]);
#pragma unroll
        for (int nt2 = 0; nt2 < kSTiles / 2; ++nt2) {
          uint32_t b0, b1, b2, b3;
          ptx::ldmatrix_x4(qdo_b(kk, nt2 * 16) + q_off, b0, b1, b2, b3);
          mma_tile_pair<Element>(s, nt2, ak, b0, b1, b2, b3);
          ptx::ldmatrix_x4(qdo_b(kk, nt2 * 16) + q_off + kDoOffset, b0, b1, b2, b3);
          mma_tile_pair<Element>(dp, nt2, av, b0, b1, b2, b3);
        }
      }

      // ---- P and dS (masked entries: 0), stored transposed for phases 2 and 3 ----
      {
        const float* lse = sLse + stage * kBlockM;
        const float* di = sDi + stage * kBlockM;
        const int key_base = key0 + wn * 16 + (lane >> 2);  // + 8 for the second row pair
        const int col_base = wq * kQCols + 2 * (lane & 3);   // query column within the tile
        const Mask<kMask> seq_mask = cur.mask();
        const bool need_mask = seq_mask.tile_needs_mask(row0, kBlockM, key0, kBlockN);
        // kLocal: the query columns (rows of the sequence minus row0) that see each of this
        // thread's two keys, [rows_first[h], rows_end[h]) (common/mask.h; rows past the sequence
        // and keys past it see nothing).
        int rows_first[2] = {0, 0}, rows_end[2] = {0, 0};
        if constexpr (kMask == MaskMode::kLocal) {
          if (need_mask) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int key = key_base + h * 8;
              rows_first[h] = seq_mask.row_begin(key) - row0;
              rows_end[h] = key < cur.seqlen_k ? seq_mask.row_end(key) - row0 : rows_first[h];
            }
          }
        }
#pragma unroll
        for (int nt = 0; nt < kSTiles; ++nt) {
          const int col = col_base + nt * 8;
          const float2 l = *reinterpret_cast<const float2*>(lse + col);
          const float2 d = *reinterpret_cast<const float2*>(di + col);
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const float lse_c = (c & 1) ? l.y : l.x;
            const float di_c = (c & 1) ? d.y : d.x;
            float t = 0.f;  // softcap: tanh of the scaled score
            float p;
            if constexpr (kSoftcap) {
              t = tanh_approx(s[nt][c] * params.features.softcap_scale);
              p = ptx::exp2_approx(fmaf(t, params.features.softcap_log2, -lse_c));
            } else {
              p = ptx::exp2_approx(fmaf(s[nt][c], params.softmax_scale_log2, -lse_c));
            }
            if (need_mask) {
              bool masked;
              if constexpr (kMask == MaskMode::kLocal) {
                const int h = c >> 1;
                masked = (col + (c & 1) < rows_first[h]) | (col + (c & 1) >= rows_end[h]);
              } else {
                const int key = key_base + ((c >> 1) << 3);
                const int row = row0 + col + (c & 1);
                masked = seq_mask.masked(row, key);
              }
              if (masked) p = 0.f;  // dS = 0 too (t stays: 1 - t^2 multiplies a 0)
            }
            s[nt][c] = p;
            if constexpr (kSoftcap) {
              dp[nt][c] = p * (dp[nt][c] - di_c) * fmaf(-t, t, 1.f);  // dS times 1 - t^2
            } else {
              dp[nt][c] = p * (dp[nt][c] - di_c);
            }
          }
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int key_row = wn * 16 + (lane >> 2) + r * 8;
            const int off = swizzle<kBlockM>(key_row, col >> 3) + (col & 7);
            *reinterpret_cast<uint32_t*>(sP + off) = ptx::pack2<Element>(s[nt][2 * r], s[nt][2 * r + 1]);
            *reinterpret_cast<uint32_t*>(sdS + off) = ptx::pack2<Element>(dp[nt][2 * r], dp[nt][2 * r + 1]);
          }
        }
      }
      __syncthreads();  // P^T and dS^T complete

      // ---- phase 2: dV += P^T dO, dK += dS^T Q ----
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        uint32_t ap[4], ads[4];
        ptx::ldmatrix_x4(pds_a(kk, 0), ap[0], ap[1], ap[2], ap[3]);
        ptx::ldmatrix_x4(pds_a(kk, 0) + kPBytes, ads[0], ads[1], ads[2], ads[3]);
#pragma unroll
        for (int dt2 = 0; dt2 < kDTiles2 / 2; ++dt2) {
          uint32_t b0, b1, b2, b3;
          ptx::ldmatrix_x4_trans(qdo_bt(dt2, kk * 16) + q_off + kDoOffset, b0, b1, b2, b3);
          mma_tile_pair<Element>(dv, dt2, ap, b0, b1, b2, b3);
          ptx::ldmatrix_x4_trans(qdo_bt(dt2, kk * 16) + q_off, b0, b1, b2, b3);
          mma_tile_pair<Element>(dk, dt2, ads, b0, b1, b2, b3);
        }
      }

      // ---- phase 3: dQ += dS K into the group's fp32 accumulator ----
      if (params.accumulate_dq) {
        const BwdGroupArgs& g = params.groups[cur.group];
        const int head = kv_head * ratio + cur.head_in_kv;
        const int row_a = row0 + wm * 16 + (lane >> 2);  // and row_a + 8
        float* dq_row_a = g.dq_accum +
                          ((static_cast<int64_t>(cur.q_start) + row_a) * params.num_heads_q + head) * kHeadDim +
                          wd * kDCols3 + 2 * (lane & 3);
        const int64_t dq_8rows = static_cast<int64_t>(8) * params.num_heads_q * kHeadDim;
        const bool row_a_ok = row_a < cur.seqlen_q;
        const bool row_b_ok = row_a + 8 < cur.seqlen_q;
#pragma unroll
        for (int ch = 0; ch < kDCols3 / kDqChunk; ++ch) {
          float acc[kDqChunk / 8][4];
#pragma unroll
          for (int dt = 0; dt < kDqChunk / 8; ++dt)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[dt][c] = 0.f;
#pragma unroll
          for (int kk = 0; kk < kBlockN / 16; ++kk) {
            uint32_t a[4];
            ptx::ldmatrix_x4_trans(ds_at(0, kk * 16), a[0], a[1], a[2], a[3]);
#pragma unroll
            for (int dt2 = 0; dt2 < kDqChunk / 16; ++dt2) {
              uint32_t b0, b1, b2, b3;
              ptx::ldmatrix_x4_trans(k_bt(ch * (kDqChunk / 16) + dt2, kk * 16), b0, b1, b2, b3);
              mma_tile_pair<Element>(acc, dt2, a, b0, b1, b2, b3);
            }
          }
          bwd::red_add_fragments(acc, dq_row_a + ch * kDqChunk, dq_8rows, row_a_ok, row_b_ok, lane);
        }
      }

      if (!nxt.valid(params)) break;
      if (kStages == 1) {
        __syncthreads();  // every warp is done with the only Q/dO buffer
        load_query_tile(nxt, 0);
        ptx::cp_async_commit();
      }
      cur = nxt;
      nxt.next(params, params.features, b, key0);
    }
  }

  // ---- epilogue: dK * scale and dV through shared memory (sK, sV), 16-byte stores ----
  __syncthreads();  // every warp is done with sK and sV
#pragma unroll
  for (int dt = 0; dt < kDTiles2; ++dt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = wn * 16 + (lane >> 2) + r * 8;
      const int col = wq * kDCols2 + dt * 8 + 2 * (lane & 3);
      const int off = swizzle<kHeadDim>(row, col >> 3) + (col & 7);
      *reinterpret_cast<uint32_t*>(sK + off) = ptx::pack2<Element>(dk[dt][2 * r] * params.softmax_scale,
                                                                  dk[dt][2 * r + 1] * params.softmax_scale);
      *reinterpret_cast<uint32_t*>(sV + off) = ptx::pack2<Element>(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  __syncthreads();
  Element* dk_blk = static_cast<Element*>(params.dk) + key_row0 * params.dk_row_stride + kv_head * params.dk_head_stride;
  Element* dv_blk = static_cast<Element*>(params.dv) + key_row0 * params.dv_row_stride + kv_head * params.dv_head_stride;
  bwd::store_rows<Element, kHeadDim, kBlockN, kThreads>(dk_blk, params.dk_row_stride, sK, keys_valid, tid);
  bwd::store_rows<Element, kHeadDim, kBlockN, kThreads>(dv_blk, params.dv_row_stride, sV, keys_valid, tid);
#endif
}

}  // namespace sm80
}  // namespace cuda
}  // namespace ringattn
