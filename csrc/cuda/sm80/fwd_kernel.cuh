// Tier-1 grouped varlen attention forward: FlashAttention-2 structure on mma.sync.
//
// One CTA computes one query tile (kBlockM rows) of one (group, sequence, head), streaming
// the K/V blocks that tile needs, from the last (the one needing the causal mask) to the first.
// Which (group, sequence, tile) a CTA takes comes from the longest-first work list built by
// tile_scheduler.cu; the heads of one work item are consecutive CTAs so the query heads of one
// KV head (GQA) read the same K/V from L2 at about the same time.
//
// Per CTA: kNWarps warps, each owning kMTiles x 16 query rows. Q, K and V tiles live in shared
// memory with an XOR swizzle of 16-byte chunks (conflict-free ldmatrix). K(n-1) is fetched with
// cp.async while P*V(n) runs and V(n) while Q*K(n)^T runs. Softmax is online, in registers, in
// the exp2 domain.
//
// kMask = kLocal takes the call's window and diagonal shifts (params.features) and counts the
// head's sink logit, if any, as one more key of every row with value 0 (so it joins each row's
// denominator and LSE, never its output); kSoftcap (kLocal only) caps the scores with tanh before
// the mask (features.cuh).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/features.cuh"
#include "cuda/fwd_params.h"
#include "cuda/launch.h"
#include "cuda/ptx.h"
#include "cuda/query_tile_work.h"
#include "cuda/seqlen_info.h"
#include "cuda/sm80/fwd_traits.h"
#include "cuda/sm80/mma_fragments.cuh"
#include "cuda/sm80/softmax.cuh"

namespace ringattn {
namespace cuda {
namespace sm80 {

// cp.async a [kRows, kHeadDim] tile whose first `rows_valid` rows are real; the rest are zeros.
template <typename T, int kRows>
__device__ __forceinline__ void load_tile(typename T::Element* smem, const typename T::Element* gmem,
                                          int64_t row_stride, int rows_valid, int tid) {
  constexpr int kTotal = kRows * T::kChunks;
  static_assert(kTotal % T::kThreads == 0, "tile chunks divide evenly over threads");
#pragma unroll
  for (int it = 0; it < kTotal / T::kThreads; ++it) {
    const int i = tid + it * T::kThreads;
    const int row = i / T::kChunks;
    const int chunk = i % T::kChunks;
    const bool valid = row < rows_valid;
    const typename T::Element* src = valid ? gmem + row * row_stride + chunk * 8 : gmem;
    ptx::cp_async_16(ptx::smem_addr(smem + swizzle<T::kHeadDim>(row, chunk)), src, valid);
  }
}

template <typename T, MaskMode kMask, bool kSoftcap>
__global__ void __launch_bounds__(T::kThreads, T::kMinBlocksPerSm)
    grouped_fwd_kernel(const __grid_constant__ FwdKernelParams params) {
  static_assert(!kSoftcap || kMask == MaskMode::kLocal, "the softcap is compiled into kLocal kernels only");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Element = typename T::Element;
  constexpr int kHeadDim = T::kHeadDim;
  constexpr int kBlockM = T::kBlockM;
  constexpr int kBlockN = T::kBlockN;
  constexpr int kMTiles = T::kMTiles;
  constexpr int kNTiles = T::kNTiles;
  constexpr int kDTiles = T::kDTiles;

  QueryTileWork work;
  if (!work.decode(params.work_items, params.work_count, params.num_heads_q, params.tile_head_run)) return;
  const QueryTile<FwdGroupArgs, kBlockM> tile(params, work);
  if (!tile.has_rows) return;
  const int rows_valid = tile.rows_valid();
  const int kv_head = tile.head / params.q_heads_per_kv_head;
  const FwdGroupArgs& g = tile.g;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;

  Element* out_tile = g.out_tile<Element>(tile.seq.q_start, tile.row0, tile.head);
  float* lse_tile = g.lse_tile(tile.seq.q_start, tile.row0, tile.head);

  const Mask<kMask> seq_mask = tile.seq.mask<kMask>(params.features, tile.group, tile.batch);
  // Key blocks [n_block_min, n_block_max) of this tile; n_block_min is the constant 0 when no row's
  // keys can start past key 0, so the loop bounds below stay compile-time constants then.
  const int n_block_min = Mask<kMask>::kKeysStartAtZero ? 0 : seq_mask.n_block_min(tile.m_block, kBlockM, kBlockN);
  const int n_block_max = seq_mask.n_block_max(tile.m_block, kBlockM, kBlockN);
  if (n_block_max <= n_block_min) {
    // No query row of this tile sees a key: O = 0, LSE = -inf (the head's sink logit with sinks).
    for (int i = tid; i < rows_valid * T::kChunks; i += T::kThreads) {
      const int row = i / T::kChunks;
      const int chunk = i % T::kChunks;
      *reinterpret_cast<uint4*>(out_tile + row * g.out_row_stride + chunk * 8) = make_uint4(0, 0, 0, 0);
    }
    if constexpr (kMask == MaskMode::kLocal) {
      const float empty_lse = params.features.sinks != nullptr ? params.features.sinks[tile.head] : -INFINITY;
      for (int row = tid; row < rows_valid; row += T::kThreads) lse_tile[row] = empty_lse;
    } else {
      for (int row = tid; row < rows_valid; row += T::kThreads) lse_tile[row] = -INFINITY;
    }
    return;
  }

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  Element* sQ = reinterpret_cast<Element*>(smem_raw);
  Element* sK = sQ + kBlockM * kHeadDim;     // [kStages][kBlockN, kHeadDim]
  Element* sV = sK + T::kStages * T::kKVTileElems;  // [kStages][kBlockN, kHeadDim]

  const Element* q_tile =
      static_cast<const Element*>(g.q) + (tile.seq.q_start + tile.row0) * g.q_row_stride + tile.head * g.q_head_stride;
  const Element* k_seq =
      static_cast<const Element*>(params.k) + tile.seq.k_start * params.k_row_stride + kv_head * params.k_head_stride;
  const Element* v_seq =
      static_cast<const Element*>(params.v) + tile.seq.k_start * params.v_row_stride + kv_head * params.v_head_stride;

  // K/V block n lives in stage n % kStages.
  auto load_k = [&](int n) {
    load_tile<T, kBlockN>(sK + (n % T::kStages) * T::kKVTileElems, k_seq + n * kBlockN * params.k_row_stride, params.k_row_stride,
                          tile.seq.seqlen_k - n * kBlockN, tid);
  };
  auto load_v = [&](int n) {
    load_tile<T, kBlockN>(sV + (n % T::kStages) * T::kKVTileElems, v_seq + n * kBlockN * params.v_row_stride, params.v_row_stride,
                          tile.seq.seqlen_k - n * kBlockN, tid);
  };

  load_tile<T, kBlockM>(sQ, q_tile, g.q_row_stride, rows_valid, tid);
  load_k(n_block_max - 1);
  if constexpr (T::kStages == 2) load_v(n_block_max - 1);
  ptx::cp_async_commit();

  float o[kMTiles][kDTiles][4];
  zero_fragments(o);
  OnlineSoftmax<kMTiles> softmax;
  if constexpr (kMask == MaskMode::kLocal) {
    // The head's sink logit counts as one more key of every row (value 0).
    if (params.features.sinks != nullptr)
      softmax.start_with_sink(
          params.features.sinks[tile.head] / (kSoftcap ? params.features.softcap : params.softmax_scale), lane);
  }

  const int warp_row0 = warp * kMTiles * 16;  // first row of this warp within the tile
  // Fragment addresses (see SwizzledRows): Q as the A operand, K as B (non-transposed), V as B
  // (transposed). The lane -> (row, chunk) maps follow ldmatrix's four 8x8 matrices per x4.
  const SwizzledRows<kHeadDim> q_rows(ptx::smem_addr(sQ), warp_row0 + (lane & 15), lane >> 4);
  const SwizzledRows<kHeadDim> k_rows(ptx::smem_addr(sK), (lane & 7) + ((lane >> 4) << 3), (lane >> 3) & 1);
  const SwizzledRows<kHeadDim> v_rows(ptx::smem_addr(sV), (lane & 7) + (((lane >> 3) & 1) << 3), lane >> 4);
  for (int n = n_block_max - 1; n >= n_block_min; --n) {
    ptx::cp_async_wait<0>();
    __syncthreads();  // block n is in (K, or K and V); every warp finished block n+1
    if constexpr (T::kStages == 2) {
      if (n > n_block_min) {  // the other stage is free: fetch all of block n-1 during this block
        load_k(n - 1);
        load_v(n - 1);
        ptx::cp_async_commit();
      }
    } else {
      load_v(n);
      ptx::cp_async_commit();
    }
    constexpr uint32_t kStageBytes = T::kKVTileElems * sizeof(Element);
    const uint32_t stage_bytes = static_cast<uint32_t>(n % T::kStages) * kStageBytes;
    const SwizzledRows<kHeadDim> k_stage = k_rows.shifted(stage_bytes);
    const SwizzledRows<kHeadDim> v_stage = v_rows.shifted(stage_bytes);

    // ---- S = Q K^T ----
    float s[kMTiles][kNTiles][4];
    zero_fragments(s);
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
        ptx::ldmatrix_x4(q_rows(kk, mt * 16), a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
#pragma unroll
      for (int nt2 = 0; nt2 < kNTiles / 2; ++nt2) {
        uint32_t b0, b1, b2, b3;
        ptx::ldmatrix_x4(k_stage(kk, nt2 * 16), b0, b1, b2, b3);
        mma_tile_pair<Element>(s, nt2, a, b0, b1, b2, b3);
      }
    }

    // ---- softcap: t = tanh(s * softcap_scale), the softmax then runs on t (features.cuh) ----
    if constexpr (kSoftcap) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int c = 0; c < 4; ++c) s[mt][nt][c] = tanh_approx(s[mt][nt][c] * params.features.softcap_scale);
    }

    // ---- mask the keys past the end and outside each row's window (common/mask.h) ----
    const int col0 = n * kBlockN;
    if (seq_mask.tile_needs_key_mask(tile.row0, kBlockM, col0, kBlockN)) {
      if constexpr (kMask == MaskMode::kLocal) {
        // A run-time window: each of the thread's rows sees the keys [key_begin, key_end), two
        // compares per entry (the same test as key_masked for a row in the sequence).
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const int row = tile.row0 + warp_row0 + mt * 16 + (lane >> 2) + r * 8;
            const int first = seq_mask.key_begin(row) - col0 - ((lane & 3) << 1);
            const int end = seq_mask.key_end(row) - col0 - ((lane & 3) << 1);
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                const int col = nt * 8 + c;  // the entry's key minus the thread's first key of the block
                if (col < first || col >= end) s[mt][nt][2 * r + c] = -INFINITY;
              }
          }
      } else {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const int row = tile.row0 + warp_row0 + mt * 16 + (lane >> 2) + ((c >> 1) << 3);
              const int col = col0 + nt * 8 + ((lane & 3) << 1) + (c & 1);
              if (seq_mask.key_masked(row, col)) s[mt][nt][c] = -INFINITY;
            }
      }
    }

    softmax.template update<kNTiles, kDTiles, kMask == MaskMode::kLocal>(s, o, kSoftcap ? params.features.softcap_log2 : params.softmax_scale_log2);

    if constexpr (T::kStages == 1) {
      ptx::cp_async_wait<0>();
      __syncthreads();  // V(n) is in; every warp finished Q*K(n)^T, so sK is free
      if (n > n_block_min) {
        load_k(n - 1);
        ptx::cp_async_commit();
      }
    }

    // ---- O += P V ----
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        a[mt][0] = ptx::pack2<Element>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = ptx::pack2<Element>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = ptx::pack2<Element>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = ptx::pack2<Element>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dt2 = 0; dt2 < kDTiles / 2; ++dt2) {
        uint32_t b0, b1, b2, b3;
        ptx::ldmatrix_x4_trans(v_stage(dt2, kk * 16), b0, b1, b2, b3);
        mma_tile_pair<Element>(o, dt2, a, b0, b1, b2, b3);
      }
    }
  }

  // ---- epilogue: normalise, stage O through shared memory, 16-byte stores ----
  float lse[kMTiles][2];
  if constexpr (kMask == MaskMode::kLocal) {
    const float score_scale = kSoftcap ? params.features.softcap : params.softmax_scale;
    // The head again from the CTA index (keeps no register alive across the loop for it).
    int sink_item = 0, sink_head = 0;
    split_query_tile(blockIdx.x, *params.work_count, params.num_heads_q, params.tile_head_run, &sink_item, &sink_head);
    const float sink = params.features.sinks != nullptr ? params.features.sinks[sink_head] : -INFINITY;
    softmax.template finalize_with_sink<kDTiles>(o, score_scale, sink, sink / score_scale, lse);
  } else {
    softmax.template finalize<kDTiles>(o, params.softmax_scale, lse);
  }
  __syncthreads();  // every warp is done with sQ/sK/sV
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp_row0 + mt * 16 + (lane >> 2) + r * 8;
        const int col = ((lane & 3) << 1);
        *reinterpret_cast<uint32_t*>(sQ + swizzle<kHeadDim>(row, dt) + col) =
            ptx::pack2<Element>(o[mt][dt][2 * r], o[mt][dt][2 * r + 1]);
      }
  if ((lane & 3) == 0) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp_row0 + mt * 16 + (lane >> 2) + r * 8;
        if (row < rows_valid) lse_tile[row] = lse[mt][r];
      }
  }
  __syncthreads();
#pragma unroll
  for (int it = 0; it < kBlockM * T::kChunks / T::kThreads; ++it) {
    const int i = tid + it * T::kThreads;
    const int row = i / T::kChunks;
    const int chunk = i % T::kChunks;
    if (row < rows_valid)
      *reinterpret_cast<uint4*>(out_tile + row * g.out_row_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(sQ + swizzle<kHeadDim>(row, chunk));
  }
#endif
}

}  // namespace sm80
}  // namespace cuda
}  // namespace ringattn
