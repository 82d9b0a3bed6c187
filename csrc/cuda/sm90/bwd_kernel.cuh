// Tier-2 grouped varlen attention backward for sm90a, dK/dV kernel: TMA loads on mbarriers,
// wgmma for all five products, warp specialisation.
//
// One CTA owns one 128-key K/V block of one (sequence, KV head) (the tier-1 dK/dV work list,
// longest first) and walks every (group, query head of this KV head, 64-row query tile) that sees
// the block, so dK and dV accumulate across all groups in registers and are written once.
//   warpgroup 0 (producer): loads K and V once; per query tile, Q and dO by TMA and the tile's
//     LSE (log2 units) and Di by plain loads (zeros past the sequence), into 2 stages.
//   warpgroups 1, 2 (consumers; wg = 0, 1 below): 64 keys each. Per query tile:
//     S^T = K Q^T and dP^T = V dO^T (wgmma, shared-memory operands), P^T = exp2(S^T scale - LSE),
//     dS^T = P^T (dP^T - Di) with masked entries exactly 0; dV += P^T dO and dK += dS^T Q (wgmma,
//     P^T/dS^T from registers, dO/Q transposed); dS^T to shared memory. dQ = dS K over all 128
//     keys is computed by the consumers in turn (tile t by consumer wg = t & 1, all head-dim
//     columns, once the other has written its dS^T half), staged in fp32 in shared memory and added
//     to the group's dq_accum by TMA reduce-add (one bulk operation per 64 x 32 box, issued by one
//     thread); the other warpgroup goes on to the next tile without waiting, so the
//     two are not held in lock step (skipped in deterministic mode, where the tier-2 dQ kernel,
//     bwd_dq_kernel.cuh, computes dQ).
// Keys past the sequence, or past every group's seqused_k, are masked; their K rows are zeroed
// once (dQ reads K: they may hold NaN); query rows past the sequence in a partial tile are zeroed
// in Q and dO (dV and dK read them); V rows past the keys in use only reach masked entries of
// dP^T, which are selected to 0, never multiplied.
// The query tiles come from the mask policy (common/mask.h, through the cursor): with
// MaskMode::kLocal, those of the call's window and diagonal shifts; kSoftcap kernels recompute
// the softcapped scores (softcap.cuh) and multiply dS^T by 1 - t^2.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "cuda/launch.h"
#include "cuda/ptx.h"
#include "cuda/query_tile_cursor.h"
#include "cuda/seqlen_info.h"
#include "cuda/sm80/bwd_common.cuh"
#include "cuda/sm90/bwd_params.h"
#include "cuda/sm90/bwd_traits.h"
#include "cuda/sm90/fragments.h"
#include "cuda/sm90/named_barriers.h"
#include "cuda/sm90/pipeline.h"
#include "cuda/sm90/ptx_sm90.h"
#include "cuda/sm90/softcap.cuh"
#include "cuda/sm90/wgmma.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

template <typename T>
struct BwdSmem {
  using Pipeline = MbarrierPipeline<T::kStages>;
  uint32_t k, v, q, dout, ds, stats, dq_stages, bars;
  __device__ __forceinline__ explicit BwdSmem(uint32_t base)
      : k(base + T::kOffK),
        v(base + T::kOffV),
        q(base + T::kOffQ),
        dout(base + T::kOffDo),
        ds(base + T::kOffDs),
        stats(base + T::kOffStats),
        dq_stages(base + T::kOffDqStage),
        bars(base + T::kOffBarriers) {}
  __device__ __forceinline__ uint32_t bar_kv() const { return bars; }
  // The ring of Q / dO / LSE / Di stages (sm90/pipeline.h): entries 1.. of the barrier array.
  __device__ __forceinline__ Pipeline q_pipe() const { return {bars, 1, 1 + T::kStages}; }
  __device__ __forceinline__ uint32_t q_stage(int s) const { return q + s * T::kQBytes; }
  __device__ __forceinline__ uint32_t do_stage(int s) const { return dout + s * T::kQBytes; }
  __device__ __forceinline__ uint32_t ds_buf(int b) const { return ds + b * T::kDsBytes; }
  __device__ __forceinline__ uint32_t dq_stage(int wg) const { return dq_stages + wg * T::kDqStageBytes; }
  __device__ __forceinline__ uint32_t lse_stage(int s) const { return stats + s * T::kStatBytes; }
  __device__ __forceinline__ uint32_t di_stage(int s) const { return stats + s * T::kStatBytes + T::kBlockM * 4; }
};

__device__ __forceinline__ float2 ld_shared_f2(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(addr));
  return v;
}
__device__ __forceinline__ void st_shared_f32(uint32_t addr, float v) {
  asm volatile("st.shared.f32 [%0], %1;\n" ::"r"(addr), "f"(v) : "memory");
}
__device__ __forceinline__ void st_shared_f2(uint32_t addr, float x, float y) {
  asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(addr), "f"(x), "f"(y) : "memory");
}
__device__ __forceinline__ void st_shared_u32(uint32_t addr, uint32_t v) {
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(addr), "r"(v) : "memory");
}

template <typename T, MaskMode kMask, bool kSoftcap>
__global__ void __launch_bounds__(T::kThreads, 1)
    grouped_bwd_dkdv_kernel(const __grid_constant__ BwdKernelParams params) {
  static_assert(!kSoftcap || kMask == MaskMode::kLocal, "the softcap is compiled into kLocal kernels only");
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Element = typename T::Element;
  constexpr int kHeadDim = T::kHeadDim;
  constexpr int kBlockM = T::kBlockM;
  constexpr int kBlockN = T::kBlockN;
  constexpr int kSTiles = kBlockM / 8;   // S^T / dP^T accumulators: n8 fragments (queries)
  constexpr int kDTiles = kHeadDim / 8;  // dK / dV accumulators
  constexpr int kQSteps = kBlockM / 16;  // k-steps over queries (dV, dK)
  constexpr int kDSteps = kHeadDim / 16;  // k-steps over the head dim (S^T, dP^T)
  using Cursor = QueryTileCursor<kBlockM, kBlockN, kMask>;
  const cuda::BwdKernelParams& p = params.base;
  const FeatureParams& features = params.features;  // kLocal: the window and diagonal shifts (cursor)

  const int item_index = blockIdx.x / p.num_heads_k;
  if (item_index >= *p.kv_count) return;
  const int kv_head = blockIdx.x % p.num_heads_k;
  const BwdKvWorkItem item = p.kv_items[item_index];
  const int b = item.batch;
  const int key0 = item.n_block * kBlockN;
  const int32_t k_start = SeqLenInfo::clamp(p.cu_seqlens_k[b], 0, p.total_k);
  const int32_t seqlen_k_full = SeqLenInfo::clamp(p.cu_seqlens_k[b + 1], k_start, p.total_k) - k_start;
  const int keys_valid = min(kBlockN, seqlen_k_full - key0);
  if (keys_valid <= 0) return;
  const int ratio = p.q_heads_per_kv_head;
  const int tid = threadIdx.x;

  const BwdSmem<T> sm(aligned_dynamic_smem());
  const typename BwdSmem<T>::Pipeline q_pipe = sm.q_pipe();
  using State = PipelineState<T::kStages>;
  // A Q stage's full barrier waits for the producer warp: 31 arrivals + 1 with the TMA bytes.
  init_pipeline_barriers(sm.bar_kv(), 32, T::kConsumerWarps, q_pipe);

  const int warpgroup = ptx::warpgroup_index();
  if (warpgroup == 0) {
    // ---------------- producer (warp 0) ----------------
    ptx::setmaxnreg_dec<T::kProducerRegs>();
    if (tid >= 32) return;
    const int lane = tid;
    Cursor cur;
    cur.start(p, features, b, key0);
    // K and V only when some query tile sees the block: the consumers wait for them only then, and
    // a CTA must not exit with a bulk copy into its shared memory still in flight.
    if (lane == 0 && cur.valid(p)) {
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
      const BwdGroupArgs& g = p.groups[cur.group];
      const int head = kv_head * ratio + cur.head_in_kv;
      const int row0 = cur.m_block * kBlockM;
      const int rows_valid = min(kBlockM, cur.seqlen_q - row0);
      const int token0 = cur.q_start + row0;
      const int64_t stat0 = static_cast<int64_t>(head) * g.total_q + token0;
      for (int i = lane; i < kBlockM; i += 32) {
        const bool ok = i < rows_valid;
        st_shared_f32(sm.lse_stage(s) + 4 * i, ok ? g.lse_log2[stat0 + i] : 0.f);
        st_shared_f32(sm.di_stage(s) + 4 * i, ok ? g.di[stat0 + i] : 0.f);
      }
      if (lane == 0) {
        ptx::mbarrier_arrive_expect_tx(q_pipe.full(s), 2 * T::kQBytes);
#pragma unroll
        for (int cb = 0; cb < T::kColBlocks; ++cb) {
          ptx::tma_load_3d(sm.q_stage(s) + cb * T::kQColBlockBytes, &params.maps.tma_q[cur.group], q_pipe.full(s), cb * 64,
                           head, token0);
          ptx::tma_load_3d(sm.do_stage(s) + cb * T::kQColBlockBytes, &params.maps.tma_do[cur.group], q_pipe.full(s),
                           cb * 64, head, token0);
        }
      } else {
        ptx::mbarrier_arrive(q_pipe.full(s));
      }
      cur.next(p, features, b, key0);
    }
    return;
  }

  // ---------------- consumers ----------------
  ptx::setmaxnreg_inc<T::kConsumerRegs>();
  const int wg = warpgroup - 1;
  const int ctid = tid - 128;  // 0 .. 255
  const int lane = tid & 31;
  const int warp_in_wg = (tid / 32) & 3;
  const int key_local = wg * 64 + warp_in_wg * 16 + (lane >> 2);  // this thread's first key in the block
  const int qcol = (lane & 3) * 2;                                 // this thread's first query column in an n8 fragment

  float dk[kDTiles][4], dv[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i)
#pragma unroll
    for (int c = 0; c < 4; ++c) dk[i][c] = dv[i][c] = 0.f;

  Cursor cur;
  cur.start(p, features, b, key0);
  if (cur.valid(p)) {
    ptx::mbarrier_wait_parity(sm.bar_kv(), 0);
    // Zero K rows past the keys some group uses (past the sequence, or past every group's
    // seqused_k, where they may hold NaN): dQ = dS K reads them. V rows there only reach masked
    // entries of dP^T, which are selected to 0.
    const int keys_in_use = max(0, min(keys_valid, keys_used_by_any_group(p, b) - key0));
    if (keys_in_use < kBlockN) {
      ptx::zero_swizzled_rows(sm.k, T::kKVColBlockBytes, T::kColBlocks, keys_in_use, kBlockN, ctid, 256);
      ptx::fence_proxy_async_shared();
      ptx::named_barrier_sync(barrier_id(NamedBarrier::kBwdKZeroed), 256);
    }

    // Descriptors (see fwd_kernel.cuh for the layouts): one per operand tile, advanced by
    // constant byte offsets per k step.
    const uint64_t k_a_desc0 = ptx::smem_desc_sw128(sm.k + wg * 64 * 128, 16, 1024);
    const uint64_t v_a_desc0 = ptx::smem_desc_sw128(sm.v + wg * 64 * 128, 16, 1024);
    auto kv_a_desc = [&](uint64_t desc0, int kk) {  // K or V rows of this warpgroup as the K-major A operand
      return ptx::desc_advance(desc0, (kk / 4) * T::kKVColBlockBytes + (kk % 4) * 32);
    };
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
      constexpr int kTiles = sizeof(dq) / sizeof(dq[0]);
      constexpr int kBoxes = kTiles / 4;  // 32 columns = 4 n8 tiles per box
      const uint32_t stage = sm.dq_stage(wg);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int row = warp_in_wg * 16 + (lane >> 2) + r * 8;
        const bool ok = row0 + row < c.seqlen_q;
#pragma unroll
        for (int dt = 0; dt < kTiles; ++dt) {
          const int box = h * kBoxes + dt / 4;
          const int byte = (dt % 4) * 32 + (lane & 3) * 8;
          const uint32_t addr = stage + box * T::kDqBoxBytes + row * 128 + ((((byte >> 4) ^ (row & 7))) << 4) + (byte & 15);
          st_shared_f2(addr, ok ? dq[dt][2 * r] : 0.f, ok ? dq[dt][2 * r + 1] : 0.f);
        }
      }
      ptx::fence_proxy_async_shared();
      ptx::named_barrier_sync(barrier_id(NamedBarrier::kBwdDqStage0, wg), 128);
      if (ctid % 128 == 0) {
#pragma unroll
        for (int bx = 0; bx < kBoxes; ++bx)
          ptx::tma_reduce_add_3d(&params.tma_dq[c.group], stage + (h * kBoxes + bx) * T::kDqBoxBytes,
                                 (h * kBoxes + bx) * 32, head, c.q_start + row0);
        ptx::bulk_commit_group();
      }
    };

    int num_tiles = 0;  // tiles walked, for the kDsFree drain after the loop
    for (int t = 0; cur.valid(p); ++t, ++num_tiles) {
      const State q_state(t);
      const int s = q_state.stage();
      q_pipe.consumer_wait(q_state);
      const uint32_t q_tile = sm.q_stage(s);
      const uint32_t do_tile = sm.do_stage(s);
      {
        // Rows of a partial query tile past the sequence are the next sequence's or padding (TMA
        // fills zeros only past the tensor): zero them in Q and dO, since P^T dO and dS^T Q
        // multiply them by 0 and 0 * NaN would reach dK/dV. Both warpgroups, same condition.
        const int rows_valid = cur.seqlen_q - cur.m_block * kBlockM;
        if (rows_valid < kBlockM) {
          ptx::zero_swizzled_rows(q_tile, T::kQColBlockBytes, T::kColBlocks, rows_valid, kBlockM, ctid, 256);
          ptx::zero_swizzled_rows(do_tile, T::kQColBlockBytes, T::kColBlocks, rows_valid, kBlockM, ctid, 256);
          ptx::fence_proxy_async_shared();
          ptx::named_barrier_sync(barrier_id(NamedBarrier::kBwdQTailZeroed), 256);
        }
      }

      // ---- S^T = K Q^T, dP^T = V dO^T ----
      float st[kSTiles][4], dpt[kSTiles][4];
      const uint64_t q_b_desc0 = ptx::smem_desc_sw128(q_tile, 16, 1024);
      const uint64_t do_b_desc0 = ptx::smem_desc_sw128(do_tile, 16, 1024);
      ptx::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kDSteps; ++kk)
        ptx::Wgmma<Element, kBlockM>::ss(st, kv_a_desc(k_a_desc0, kk), qdo_b_desc(q_b_desc0, kk), kk > 0 ? 1 : 0);
      ptx::wgmma_commit_group();
      ptx::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kDSteps; ++kk)
        ptx::Wgmma<Element, kBlockM>::ss(dpt, kv_a_desc(v_a_desc0, kk), qdo_b_desc(do_b_desc0, kk), kk > 0 ? 1 : 0);
      ptx::wgmma_commit_group();

      const int row0 = cur.m_block * kBlockM;
      const Mask<kMask> seq_mask = cur.mask();
      const bool need_mask = seq_mask.tile_needs_mask(row0, kBlockM, key0, kBlockN);

      ptx::wgmma_wait_group<1>();
      fence_accumulator(st);
      // The mask of entry (nt, c): key row r = c >> 1 of this thread, query row0 + j with
      // j = nt * 8 + qcol + (c & 1). Entry visible iff the key is in the sequence and
      // lo_r <= query < hi_r (the rows that see the key: lo_r = Mask::row_begin_unclamped,
      // hi_r = Mask::row_end), i.e. iff (unsigned)(j + row_bias[r]) < width[r]. Made opaque
      // after the wait: the test depends on indices only, and the compiler would otherwise hoist
      // it above the wgmma and run it, predicated, on every tile.
      int row_bias[2], width[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int key = key0 + key_local + r * 8;
        const int lo = seq_mask.row_begin_unclamped(key);
        row_bias[r] = row0 - lo;
        width[r] = key < cur.seqlen_k ? max(seq_mask.row_end(key) - lo, 0) : 0;
        asm volatile("" : "+r"(row_bias[r]), "+r"(width[r]));
      }
      auto masked = [&](int nt, int c) {
        return static_cast<uint32_t>(nt * 8 + qcol + (c & 1) + row_bias[c >> 1]) >= static_cast<uint32_t>(width[c >> 1]);
      };
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
          const float2 l = ld_shared_f2(sm.lse_stage(s) + 4 * (nt * 8 + qcol));
#pragma unroll
          for (int c = 0; c < 4; ++c)
            st[nt][c] = ptx::exp2_approx(fmaf(st[nt][c], p.softmax_scale_log2, -((c & 1) ? l.y : l.x)));
        }
        if (need_mask) zero_masked(st, masked);
      }
      ptx::wgmma_wait_group<0>();
      fence_accumulator(dpt);
      if constexpr (kSoftcap) {
        // P^T = exp2(t * softcap_log2 - LSE_log2[query]), dS^T = P^T (1 - t^2) (dP^T - Di[query]);
        // masked entries 0 in both (selected: dP^T there may be garbage).
#pragma unroll
        for (int nt = 0; nt < kSTiles; ++nt) {
          const float2 l = ld_shared_f2(sm.lse_stage(s) + 4 * (nt * 8 + qcol));
          const float2 d = ld_shared_f2(sm.di_stage(s) + 4 * (nt * 8 + qcol));
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
          const float2 d = ld_shared_f2(sm.di_stage(s) + 4 * (nt * 8 + qcol));
#pragma unroll
          for (int c = 0; c < 4; ++c) dpt[nt][c] = st[nt][c] * (dpt[nt][c] - ((c & 1) ? d.y : d.x));
        }
      }
      if (need_mask) zero_masked(dpt, masked);
      uint32_t pfrag[kQSteps][4], dsfrag[kQSteps][4];
#pragma unroll
      for (int kk = 0; kk < kQSteps; ++kk) {
        pack_a_fragment<Element>(st, kk, pfrag[kk]);
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
      const uint64_t do_bt_desc0 = ptx::smem_desc_sw128(do_tile, T::kQColBlockBytes, 1024);
      const uint64_t q_bt_desc0 = ptx::smem_desc_sw128(q_tile, T::kQColBlockBytes, 1024);
      ptx::wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < kQSteps; ++kk) ptx::Wgmma<Element, kHeadDim>::rs_tb(dv, pfrag[kk], qdo_bt_desc(do_bt_desc0, kk), 1);
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
        // At head dim >= 128, dQ in two column halves (one commit group each): the first is
        // added while the second is computed.
        constexpr int kDqSplit = kHeadDim >= 128 ? 2 : 1;
        constexpr int kPartTiles = kDTiles / kDqSplit;
        float dq[kDqSplit][kPartTiles][4];
        ptx::wgmma_fence();
        const uint64_t ds_a_desc0 = ptx::smem_desc_sw128(ds_tile, T::kDsBytes, 1024);
        const uint64_t k_b_desc0 = ptx::smem_desc_sw128(sm.k, T::kKVColBlockBytes, 1024);
#pragma unroll
        for (int h = 0; h < kDqSplit; ++h) {
#pragma unroll
          for (int kk = 0; kk < kBlockN / 16; ++kk) {
            const uint64_t a = ptx::desc_advance(ds_a_desc0, kk * 2048);
            const uint64_t bk = ptx::desc_advance(k_b_desc0, h * T::kKVColBlockBytes + kk * 2048);
            ptx::Wgmma<Element, kPartTiles * 8>::ss_tt(dq[h], a, bk, kk > 0 ? 1 : 0);
          }
          ptx::wgmma_commit_group();
        }
        const int head = kv_head * ratio + cur.head_in_kv;
#pragma unroll
        for (int h = 0; h < kDqSplit; ++h) {
          if (h + 1 < kDqSplit)
            ptx::wgmma_wait_group<1>();
          else
            ptx::wgmma_wait_group<0>();
          fence_accumulator(dq[h]);
          if (h + 1 == kDqSplit)
            ptx::named_barrier_arrive(barrier_id(NamedBarrier::kBwdDsFree0, t & 1), 256);
          stage_and_reduce_dq(dq[h], h, cur, head, row0);
        }
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

  // ---- epilogue: dK * scale and dV, rows of this thread's keys (zeros where no query saw them) ----
  int32_t block_k_start = k_start;
  int block_keys = keys_valid;
  int my_key = key_local;
  if constexpr (kMask == MaskMode::kLocal) {
    // Read again rather than held across the tile loop, whose run-time mask needs the registers
    // (they would be spilled). The empty asm keeps the compiler from reusing the first loads.
    asm volatile("" ::: "memory");
    block_k_start = SeqLenInfo::clamp(p.cu_seqlens_k[b], 0, p.total_k);
    block_keys = min(kBlockN, SeqLenInfo::clamp(p.cu_seqlens_k[b + 1], block_k_start, p.total_k) - block_k_start - key0);
    const int thread = threadIdx.x;
    my_key = (thread / 128 - 1) * 64 + ((thread / 32) & 3) * 16 + ((thread & 31) >> 2);
  }
  const int64_t key_row0 = static_cast<int64_t>(block_k_start) + key0;
  Element* dk_blk = static_cast<Element*>(p.dk) + key_row0 * p.dk_row_stride + kv_head * p.dk_head_stride;
  Element* dv_blk = static_cast<Element*>(p.dv) + key_row0 * p.dv_row_stride + kv_head * p.dv_head_stride;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = my_key + r * 8;
    if (key < block_keys) {
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        *reinterpret_cast<uint32_t*>(dk_blk + key * p.dk_row_stride + dt * 8 + qcol) =
            ptx::pack2<Element>(dk[dt][2 * r] * p.softmax_scale, dk[dt][2 * r + 1] * p.softmax_scale);
        *reinterpret_cast<uint32_t*>(dv_blk + key * p.dv_row_stride + dt * 8 + qcol) =
            ptx::pack2<Element>(dv[dt][2 * r], dv[dt][2 * r + 1]);
      }
    }
  }
#endif
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
