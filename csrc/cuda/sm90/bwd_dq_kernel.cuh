// Tier-2 grouped varlen attention backward for sm90a, dQ kernel of the deterministic mode: TMA
// loads on an mbarrier pipeline, wgmma for all three products, warp specialisation.
//
// One CTA owns one 128-row query tile of one (group, sequence, query head), from the forward's
// longest-first work list built with this kernel's tile shape. It streams the K/V blocks the tile
// sees in a fixed order (first to last) and accumulates dQ in fp32 registers; the tile is written
// once, with plain stores, into the group's dq_accum (the postprocess scales and converts it), so
// results are bit-identical run to run.
//   warpgroup 0 (producer): one thread loads Q and dO once, then K and V block by block into
//     kStages stages guarded by full/empty mbarriers.
//   warpgroups 1, 2 (consumers): 64 query rows each. Per K/V block: S = Q K^T and dP = dO V^T
//     (wgmma, shared-memory operands), P = exp2(S scale - LSE), dS = P (dP - Di) with masked
//     entries exactly 0, dQ += dS K (wgmma, dS from registers, K transposed from shared memory).
//     The dQ product of block n runs while block n+1's S and dP are issued; a stage is released
//     once the dQ product that reads its K has completed.
// Keys past the sequence are masked; in the block holding the sequence's last key, K rows past
// it are zeroed in shared memory before dQ = dS K reads them (0 * garbage could be NaN). Query
// rows past the sequence get LSE = +inf (P = 0) and are computed but not stored.
// The tile reads the key blocks [n_block_min, n_block_max) of the mask policy (common/mask.h), in
// that order; with MaskMode::kLocal the element mask also bounds each row's keys on the left, and
// kSoftcap kernels recompute the softcapped scores (softcap.cuh) and multiply dS by 1 - t^2.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/launch.h"
#include "cuda/ptx.h"
#include "cuda/query_tile_work.h"
#include "cuda/seqlen_info.h"
#include "cuda/sm90/bwd_dq_traits.h"
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

template <typename T>
struct BwdDqSmem {
  using Pipeline = MbarrierPipeline<T::kStages>;
  uint32_t q, dout, k, v, bars;
  __device__ __forceinline__ explicit BwdDqSmem(uint32_t base)
      : q(base + T::kOffQ), dout(base + T::kOffDo), k(base + T::kOffK), v(base + T::kOffV), bars(base + T::kOffBarriers) {}
  __device__ __forceinline__ uint32_t bar_q() const { return bars; }  // Q and dO
  // The ring of K/V stages (sm90/pipeline.h): entries 1.. of the barrier array.
  __device__ __forceinline__ Pipeline kv_pipe() const { return {bars, 1, 1 + T::kStages}; }
  __device__ __forceinline__ uint32_t k_stage(int s) const { return k + s * T::kKVBytes; }
  __device__ __forceinline__ uint32_t v_stage(int s) const { return v + s * T::kKVBytes; }
};

template <typename T, MaskMode kMask, bool kSoftcap>
__global__ void __launch_bounds__(T::kThreads, 1)
    grouped_bwd_dq_kernel(const __grid_constant__ BwdDqKernelParams params) {
  static_assert(!kSoftcap || kMask == MaskMode::kLocal, "the softcap is compiled into kLocal kernels only");
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename T::Element;
  constexpr int kHeadDim = T::kHeadDim;
  constexpr int kBlockM = T::kBlockM;
  constexpr int kBlockN = T::kBlockN;
  constexpr int kNTiles = kBlockN / 8;    // S / dP accumulators: n8 fragments (keys)
  constexpr int kDTiles = kHeadDim / 8;   // dQ accumulator
  constexpr int kKSteps = kBlockN / 16;   // k-steps of dQ = dS K (keys)
  constexpr int kDSteps = kHeadDim / 16;  // k-steps of S and dP (head dim)
  const cuda::BwdKernelParams& p = params.base;

  const int num_heads_q = p.num_heads_q;
  QueryTileWork work;
  if (!work.decode(p.q_items, p.q_count, num_heads_q, p.dq_tile_head_run)) return;
  const QueryTile<BwdGroupArgs, kBlockM> tile(p, work);
  if (!tile.has_rows) return;
  const BwdGroupArgs& g = tile.g;
  // Key blocks [n_block_min, n_block_max) (n_block_min the constant 0 for kNone / kCausal). A
  // tile that sees no key keeps dQ = 0 (dq_accum was zeroed by the preprocess).
  const Mask<kMask> seq_mask = tile.seq.mask<kMask>(params.features, tile.group, tile.batch);
  const int n_block_min = Mask<kMask>::kKeysStartAtZero ? 0 : seq_mask.n_block_min(tile.m_block, kBlockM, kBlockN);
  const int n_block_max = seq_mask.n_block_max(tile.m_block, kBlockM, kBlockN);
  if (n_block_max <= n_block_min) return;
  const int kv_head = tile.head / p.q_heads_per_kv_head;
  const int tid = threadIdx.x;

  const BwdDqSmem<T> sm(aligned_dynamic_smem());
  const typename BwdDqSmem<T>::Pipeline kv_pipe = sm.kv_pipe();
  using State = PipelineState<T::kStages>;
  init_pipeline_barriers(sm.bar_q(), 1, T::kConsumerWarps, kv_pipe);

  const int warpgroup = ptx::warpgroup_index();
  if (warpgroup == 0) {
    // ---------------- producer (one thread) ----------------
    ptx::setmaxnreg_dec<T::kProducerRegs>();
    if (tid == 0) {
      ptx::prefetch_tensor_map(&params.maps.tma_q[tile.group]);
      ptx::prefetch_tensor_map(&params.maps.tma_do[tile.group]);
      ptx::prefetch_tensor_map(&params.maps.tma_k);
      ptx::prefetch_tensor_map(&params.maps.tma_v);
      const int q_token0 = tile.seq.q_start + tile.row0;
      ptx::mbarrier_arrive_expect_tx(sm.bar_q(), 2 * T::kQBytes);
#pragma unroll
      for (int cb = 0; cb < T::kColBlocks; ++cb) {
        ptx::tma_load_3d(sm.q + cb * T::kQColBlockBytes, &params.maps.tma_q[tile.group], sm.bar_q(), cb * 64, tile.head,
                         q_token0);
        ptx::tma_load_3d(sm.dout + cb * T::kQColBlockBytes, &params.maps.tma_do[tile.group], sm.bar_q(), cb * 64,
                         tile.head, q_token0);
      }
      for (int n = n_block_min; n < n_block_max; ++n) {
        const State st(n - n_block_min);
        const int s = st.stage();
        const int token = tile.seq.k_start + n * kBlockN;
        kv_pipe.producer_acquire(st);
        ptx::mbarrier_arrive_expect_tx(kv_pipe.full(s), 2 * T::kKVBytes);
#pragma unroll
        for (int cb = 0; cb < T::kColBlocks; ++cb) {
          ptx::tma_load_3d(sm.k_stage(s) + cb * T::kKVColBlockBytes, &params.maps.tma_k, kv_pipe.full(s), cb * 64, kv_head, token);
          ptx::tma_load_3d(sm.v_stage(s) + cb * T::kKVColBlockBytes, &params.maps.tma_v, kv_pipe.full(s), cb * 64, kv_head, token);
        }
      }
    }
    return;
  }

  // ---------------- consumers ----------------
  ptx::setmaxnreg_inc<T::kConsumerRegs>();
  const int wg = warpgroup - 1;
  const int ctid = tid - 128;  // 0 .. 255
  const int lane = tid & 31;
  const int warp_in_wg = (tid / 32) & 3;
  const int my_row = tile.row0 + wg * 64 + warp_in_wg * 16 + (lane >> 2);  // this thread's first row (+8: its second)
  const int qcol = (lane & 3) * 2;  // this thread's first key column in an n8 fragment

  // LSE (log2 units) and Di of this thread's two rows; rows past the sequence: LSE = +inf (P = 0).
  float lse[2], di[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = my_row + 8 * r;
    const bool ok = row < tile.seq.seqlen_q;
    const int64_t idx = g.stat_row(tile.head) + tile.seq.q_start + row;
    lse[r] = ok ? g.lse_log2[idx] : INFINITY;
    di[r] = ok ? g.di[idx] : 0.f;
  }

  float dq[kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
    for (int c = 0; c < 4; ++c) dq[dt][c] = 0.f;

  // Descriptors: a base per operand tile, advanced by constant offsets per k step (mma_loop.h).
  // Q and dO rows of this warpgroup as the K-major A operand.
  const KMajorSteps<T::kQColBlockBytes> q_a{ptx::smem_desc_sw128(sm.q + wg * 64 * 128, 16, 1024)};
  const KMajorSteps<T::kQColBlockBytes> do_a{ptx::smem_desc_sw128(sm.dout + wg * 64 * 128, 16, 1024)};

  // The softmax scale of the scores the wgmma leaves (log2 units): softmax_scale for the raw q.k,
  // or, with the softcap, the softcap's for t = tanh(q.k * softcap_scale).
  float score_scale_log2 = p.softmax_scale_log2;
  if constexpr (kSoftcap) score_scale_log2 = params.features.softcap_log2;

  ptx::mbarrier_wait_parity(sm.bar_q(), 0);
  for (int n = n_block_min; n < n_block_max; ++n) {
    const State st(n - n_block_min);
    const int s = st.stage();
    kv_pipe.consumer_wait(st);
    const uint32_t k_tile = sm.k_stage(s);
    const uint32_t v_tile = sm.v_stage(s);
    const int col0 = n * kBlockN;
    const int keys_valid = tile.seq.seqlen_k - col0;
    if (keys_valid < kBlockN) {  // both warpgroups reach this for the same block
      ptx::zero_swizzled_rows(k_tile, T::kKVColBlockBytes, T::kColBlocks, keys_valid, kBlockN, ctid, 256);
      ptx::fence_proxy_async_shared();
      ptx::named_barrier_sync(barrier_id(NamedBarrier::kBwdDqKZeroed), 256);
    }

    // ---- S = Q K^T, dP = dO V^T (the dQ product of block n - 1 may still run) ----
    float sacc[kNTiles][4], dpacc[kNTiles][4];
    // K and V as the K-major B operand (N = keys).
    const KMajorSteps<T::kKVColBlockBytes> k_b{ptx::smem_desc_sw128(k_tile, 16, 1024)};
    const KMajorSteps<T::kKVColBlockBytes> v_b{ptx::smem_desc_sw128(v_tile, 16, 1024)};
    ptx::wgmma_fence();
    mma_ss<Element, kDSteps, MmaInit::kOverwrite>(sacc, q_a, k_b);
    ptx::wgmma_commit_group();
    ptx::wgmma_fence();
    mma_ss<Element, kDSteps, MmaInit::kOverwrite>(dpacc, do_a, v_b);
    ptx::wgmma_commit_group();

    ptx::wgmma_wait_group<1>();  // S(n) is in, and so is dQ(n - 1): its K stage is free
    fence_accumulator(sacc);
    if (n > n_block_min) kv_pipe.consumer_release(st.prev().stage(), lane == 0);

    // Entry (nt, c) is key col0 + j, j = nt * 8 + qcol + (c & 1), of row r = c >> 1; visible iff
    // j < width[r], i.e. the key is below the row's Mask::key_end (past the sequence and past the
    // window are masked). kLocal (keys may start past 0) also needs the key at or past the row's
    // Mask::key_begin: visible iff (unsigned)(j - first_key[r]) < width[r], with first_key[r] the
    // row's key_begin and width[r] its number of keys (0 when none), both relative to column j = 0.
    // Made opaque after the wait so the index-only test is not hoisted above the wgmma (see the
    // dK/dV kernel); run only on blocks that need it.
    const bool need_mask = seq_mask.tile_needs_key_mask(tile.row0 + wg * 64, 64, col0, kBlockN);
    int width[2];
    [[maybe_unused]] int first_key[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if constexpr (Mask<kMask>::kKeysStartAtZero) {
        width[r] = seq_mask.key_end(my_row + 8 * r) - col0 - qcol;
      } else {
        const int first = seq_mask.key_begin(my_row + 8 * r) - col0 - qcol;
        width[r] = max(seq_mask.key_end(my_row + 8 * r) - col0 - qcol - first, 0);
        first_key[r] = first;
        asm volatile("" : "+r"(first_key[r]));
      }
      asm volatile("" : "+r"(width[r]));
    }
    auto masked = [&](int nt, int c) {
      if constexpr (Mask<kMask>::kKeysStartAtZero) {
        return nt * 8 + (c & 1) >= width[c >> 1];
      } else {
        return static_cast<uint32_t>(nt * 8 + (c & 1) - first_key[c >> 1]) >= static_cast<uint32_t>(width[c >> 1]);
      }
    };

    // P = exp2(S * scale_log2 - LSE_log2[row]); masked entries 0. With the softcap, S is first
    // t = tanh(S * softcap_scale), and the factor 1 - t^2 of dS is folded into P here (this
    // kernel needs P only for dS).
    if constexpr (kSoftcap) {
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const float t = tanh_approx(sacc[nt][c] * params.features.softcap_scale);
          sacc[nt][c] = ptx::exp2_approx(fmaf(t, score_scale_log2, -lse[c >> 1])) * fmaf(-t, t, 1.f);
        }
    } else {
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          sacc[nt][c] = ptx::exp2_approx(fmaf(sacc[nt][c], score_scale_log2, -lse[c >> 1]));
    }
    if (need_mask) zero_masked(sacc, masked);
    ptx::wgmma_wait_group<0>();
    fence_accumulator(dpacc);
    // dS = P (dP - Di[row]) (softcap: P (1 - t^2) (dP - Di[row])); masked entries 0 (selected: dP
    // there may be garbage).
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) dpacc[nt][c] = sacc[nt][c] * (dpacc[nt][c] - di[c >> 1]);
    if (need_mask) zero_masked(dpacc, masked);
    uint32_t dsfrag[kKSteps][4];
    pack_a_fragments<Element>(dpacc, dsfrag);

    // ---- dQ += dS K ----
    // K as the MN-major B operand (K = keys, N = head dim).
    const MnMajorSteps k_bt{ptx::smem_desc_sw128(k_tile, T::kKVColBlockBytes, 1024)};
    ptx::wgmma_fence();
    mma_rs_tb<Element, MmaInit::kAccumulate>(dq, dsfrag, k_bt);
    ptx::wgmma_commit_group();
  }
  ptx::wgmma_wait_group<0>();
  fence_accumulator(dq);

  // ---- epilogue: unscaled fp32 dQ into dq_accum, rows in the sequence, 8-byte stores ----
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = my_row + 8 * r;
    if (row >= tile.seq.seqlen_q) continue;
    float* dst =
        g.dq_accum + ((static_cast<int64_t>(tile.seq.q_start) + row) * num_heads_q + tile.head) * kHeadDim + qcol;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt)
      *reinterpret_cast<float2*>(dst + dt * 8) = make_float2(dq[dt][2 * r], dq[dt][2 * r + 1]);
  }
#endif
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
