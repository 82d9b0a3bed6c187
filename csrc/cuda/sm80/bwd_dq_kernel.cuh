// Tier-1 grouped varlen attention backward, dQ kernel of the deterministic mode.
//
// One CTA owns one query tile (kBlockM rows) of one (group, sequence, query head), from the
// forward's longest-first work list (tile_scheduler.cu). It streams the K/V blocks the tile
// sees in a fixed order (first to last, K and V double-buffered through cp.async), recomputes
// P and dP like the dK/dV kernel, and accumulates dQ = dS K in fp32 registers:
//   S = Q K^T, dP = dO V^T; P = exp2(S * scale_log2 - LSE_log2), dS = P (dP - Di); dQ += dS K.
// dS goes from the C fragments straight into A fragments (as P does in the forward). The tile
// is written once, with plain stores, into the group's dq_accum (the postprocess scales and
// converts it), so results are bit-identical run to run.
// kMask = kLocal takes the call's window and diagonal shifts (params.features); kSoftcap (kLocal
// only) recomputes the capped scores and multiplies dS by 1 - t^2, as the dK/dV kernel does.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/bwd_params.h"
#include "cuda/features.cuh"
#include "cuda/launch.h"
#include "cuda/ptx.h"
#include "cuda/query_tile_work.h"
#include "cuda/seqlen_info.h"
#include "cuda/sm80/bwd_common.cuh"
#include "cuda/sm80/bwd_traits.h"
#include "cuda/sm80/mma_fragments.cuh"

namespace ringattn {
namespace cuda {
namespace sm80 {

template <typename T, MaskMode kMask, bool kSoftcap>
__global__ void __launch_bounds__(T::kThreads, 1) grouped_bwd_dq_kernel(const __grid_constant__ BwdKernelParams params) {
  static_assert(!kSoftcap || kMask == MaskMode::kLocal, "the softcap is compiled into kLocal kernels only");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Element = typename T::Element;
  constexpr int kHeadDim = T::kHeadDim;
  constexpr int kBlockM = T::kBlockM;
  constexpr int kBlockN = T::kBlockN;
  constexpr int kThreads = T::kThreads;
  constexpr int kMTiles = T::kMTiles;
  constexpr int kNTiles = T::kNTiles;
  constexpr int kDTiles = T::kDTiles;
  constexpr uint32_t kKvBytes = kBlockN * kHeadDim * sizeof(Element);  // one K or V stage

  const int num_heads_q = params.num_heads_q;
  QueryTileWork work;
  if (!work.decode(params.q_items, params.q_count, num_heads_q, params.dq_tile_head_run)) return;
  const QueryTile<BwdGroupArgs, kBlockM> tile(params, work);
  if (!tile.has_rows) return;
  const BwdGroupArgs& g = tile.g;
  const int rows_valid = tile.rows_valid();
  // A tile that sees no key keeps dQ = 0 (dq_accum was zeroed by the preprocess).
  const Mask<kMask> seq_mask = tile.seq.mask<kMask>(params.features, tile.group, tile.batch);
  // Key blocks [n_block_min, n_block_max) of this tile; n_block_min is the constant 0 when no row's
  // keys can start past key 0, so the loop bounds below stay compile-time constants then.
  const int n_block_min = Mask<kMask>::kKeysStartAtZero ? 0 : seq_mask.n_block_min(tile.m_block, kBlockM, kBlockN);
  const int n_block_max = seq_mask.n_block_max(tile.m_block, kBlockM, kBlockN);
  if (n_block_max <= n_block_min) return;
  const int kv_head = tile.head / params.q_heads_per_kv_head;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  Element* sQ = reinterpret_cast<Element*>(smem_raw);
  Element* sdO = sQ + kBlockM * kHeadDim;
  Element* sK = sdO + kBlockM * kHeadDim;  // [2][kBlockN][kHeadDim]
  Element* sV = sK + 2 * kBlockN * kHeadDim;  // [2][kBlockN][kHeadDim]

  const int64_t token0 = static_cast<int64_t>(tile.seq.q_start) + tile.row0;
  const Element* k_seq = static_cast<const Element*>(params.k) +
                         static_cast<int64_t>(tile.seq.k_start) * params.k_row_stride +
                         kv_head * params.k_head_stride;
  const Element* v_seq = static_cast<const Element*>(params.v) +
                         static_cast<int64_t>(tile.seq.k_start) * params.v_row_stride +
                         kv_head * params.v_head_stride;
  auto load_kv = [&](int n, int stage) {
    bwd::load_rows<Element, kHeadDim, kBlockN, kThreads>(sK + stage * kBlockN * kHeadDim,
                                                         k_seq + n * kBlockN * params.k_row_stride,
                                                         params.k_row_stride, tile.seq.seqlen_k - n * kBlockN, tid);
    bwd::load_rows<Element, kHeadDim, kBlockN, kThreads>(sV + stage * kBlockN * kHeadDim,
                                                         v_seq + n * kBlockN * params.v_row_stride,
                                                         params.v_row_stride, tile.seq.seqlen_k - n * kBlockN, tid);
  };

  bwd::load_rows<Element, kHeadDim, kBlockM, kThreads>(
      sQ, static_cast<const Element*>(g.q) + token0 * g.q_row_stride + tile.head * g.q_head_stride, g.q_row_stride,
      rows_valid, tid);
  bwd::load_rows<Element, kHeadDim, kBlockM, kThreads>(
      sdO, static_cast<const Element*>(g.dout) + token0 * g.dout_row_stride + tile.head * g.dout_head_stride,
      g.dout_row_stride, rows_valid, tid);
  load_kv(n_block_min, n_block_min & 1);  // K/V block n lives in stage n & 1
  ptx::cp_async_commit();

  // Per-row statistics of the two rows (lane/4 and lane/4 + 8) a thread holds per m16 tile.
  // Rows past the sequence get LSE = +inf, so their P (and dS) are 0.
  const int warp_row0 = warp * kMTiles * 16;
  float lse[kMTiles][2], di[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + mt * 16 + (lane >> 2) + r * 8;
      const int64_t idx = g.stat_row(tile.head) + token0 + row;
      lse[mt][r] = row < rows_valid ? g.lse_log2[idx] : INFINITY;
      di[mt][r] = row < rows_valid ? g.di[idx] : 0.f;
    }

  float dq[kMTiles][kDTiles][4];
  zero_fragments(dq);

  // Fragment addresses: Q and dO as A; K and V as B (non-transposed) for S and dP; K as B
  // (transposed: k = keys, n = head dim) for dQ.
  const SwizzledRows<kHeadDim> qdo_a(ptx::smem_addr(sQ), warp_row0 + (lane & 15), lane >> 4);
  const SwizzledRows<kHeadDim> kv_b(ptx::smem_addr(sK), (lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
  const SwizzledRows<kHeadDim> k_bt(ptx::smem_addr(sK), (lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);
  constexpr uint32_t kDoOffset = kBlockM * kHeadDim * sizeof(Element);  // sdO - sQ
  constexpr uint32_t kVOffset = 2 * kKvBytes;                           // sV - sK

  for (int n = n_block_min; n < n_block_max; ++n) {
    const int stage = n & 1;
    const uint32_t kv_off = stage * kKvBytes;
    ptx::cp_async_wait<0>();
    __syncthreads();  // K/V(n) are in; every warp finished block n-1, so the other stage is free
    if (n + 1 < n_block_max) {
      load_kv(n + 1, stage ^ 1);
      ptx::cp_async_commit();
    }

    // ---- S = Q K^T, dP = dO V^T ----
    float s[kMTiles][kNTiles][4], dp[kMTiles][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) s[mt][nt][c] = dp[mt][nt][c] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t aq[kMTiles][4], ado[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        ptx::ldmatrix_x4(qdo_a(kk, mt * 16), aq[mt][0], aq[mt][1], aq[mt][2], aq[mt][3]);
        ptx::ldmatrix_x4(qdo_a(kk, mt * 16) + kDoOffset, ado[mt][0], ado[mt][1], ado[mt][2], ado[mt][3]);
      }
#pragma unroll
      for (int nt2 = 0; nt2 < kNTiles / 2; ++nt2) {
        uint32_t b0, b1, b2, b3;
        ptx::ldmatrix_x4(kv_b(kk, nt2 * 16) + kv_off, b0, b1, b2, b3);
        mma_tile_pair<Element>(s, nt2, aq, b0, b1, b2, b3);
        ptx::ldmatrix_x4(kv_b(kk, nt2 * 16) + kv_off + kVOffset, b0, b1, b2, b3);
        mma_tile_pair<Element>(dp, nt2, ado, b0, b1, b2, b3);
      }
    }

    // ---- P and dS (masked entries: 0) ----
    const int col0 = n * kBlockN;
    const bool need_mask = seq_mask.tile_needs_key_mask(tile.row0, kBlockM, col0, kBlockN);
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int r = c >> 1;
          float t = 0.f;  // softcap: tanh of the scaled score
          float p;
          if constexpr (kSoftcap) {
            t = tanh_approx(s[mt][nt][c] * params.features.softcap_scale);
            p = ptx::exp2_approx(fmaf(t, params.features.softcap_log2, -lse[mt][r]));
          } else {
            p = ptx::exp2_approx(fmaf(s[mt][nt][c], params.softmax_scale_log2, -lse[mt][r]));
          }
          if (need_mask) {
            const int row = tile.row0 + warp_row0 + mt * 16 + (lane >> 2) + r * 8;
            const int col = col0 + nt * 8 + 2 * (lane & 3) + (c & 1);
            if (seq_mask.key_masked(row, col)) p = 0.f;  // dS = 0 too (t stays: 1 - t^2 multiplies a 0)
          }
          if constexpr (kSoftcap) {
            dp[mt][nt][c] = p * (dp[mt][nt][c] - di[mt][r]) * fmaf(-t, t, 1.f);  // dS times 1 - t^2
          } else {
            dp[mt][nt][c] = p * (dp[mt][nt][c] - di[mt][r]);
          }
        }

    // ---- dQ += dS K ----
    const auto k_bt_stage = [&](int j, int row) { return k_bt(j, row) + kv_off; };
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) mma_c_times_bt_step<Element>(dq, dp, kk, k_bt_stage);
  }

  // ---- epilogue: unscaled fp32 dQ into dq_accum, 8-byte stores ----
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = warp_row0 + mt * 16 + (lane >> 2) + r * 8;
      if (row >= rows_valid) continue;
      float* dst = g.dq_accum + ((token0 + row) * num_heads_q + tile.head) * kHeadDim + 2 * (lane & 3);
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
        *reinterpret_cast<float2*>(dst + dt * 8) = make_float2(dq[mt][dt][2 * r], dq[mt][dt][2 * r + 1]);
    }
#endif
}

}  // namespace sm80
}  // namespace cuda
}  // namespace ringattn
