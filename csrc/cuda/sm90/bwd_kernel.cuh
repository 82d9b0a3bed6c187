// Tier-2 grouped varlen attention backward for sm90a, dK/dV kernel: TMA loads on mbarriers,
// wgmma for all five products, warp specialisation.
//
// One CTA owns one K/V block of kBlockN keys of one (sequence, KV head) (the dK/dV work list,
// longest first) and walks every (group, query head of this KV head, 64-row query tile) that sees
// the block, so dK and dV accumulate across all groups in registers and are written once.
//   warpgroup 0 (producer, one thread, bwd_common.cuh): loads K and V once; per query tile, Q,
//     dO and the tile's LSE (log2 units) and Di rows by TMA on the stage's full barrier, into the
//     Q/dO stages. LSE/Di of rows past the sequence are the next sequence's or zeros past total_q:
//     every entry of such a row is masked (selected to 0), as in a tile's Q and dO tail.
//   warpgroups 1, 2 (consumers): one of two main loops, chosen by the traits (bwd_traits.h):
//     bwd_mainloop_keysplit.cuh   head dims 64, 128: 128 keys per CTA, 64 per warpgroup, each
//                                 warpgroup all head-dim columns of its keys' dK and dV
//     bwd_mainloop_headsplit.cuh  head dim 256: 64 keys per CTA; S^T and dP^T split between the
//                                 warpgroups by queries, P^T and dS^T exchanged through shared
//                                 memory, each warpgroup half of the head-dim columns of dK, dV
//                                 and dQ
//   Both add dQ = dS K to the group's dq_accum by TMA reduce-add (skipped in deterministic mode,
//   where the tier-2 dQ kernel, bwd_dq_kernel.cuh, computes dQ).
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

#include "common/tile_order.h"
#include "cuda/launch.h"
#include "cuda/ptx.h"
#include "cuda/seqlen_info.h"
#include "cuda/sm90/bwd_common.cuh"
#include "cuda/sm90/bwd_mainloop_headsplit.cuh"
#include "cuda/sm90/bwd_mainloop_keysplit.cuh"
#include "cuda/sm90/bwd_params.h"
#include "cuda/sm90/bwd_traits.h"
#include "cuda/sm90/pipeline.h"
#include "cuda/sm90/ptx_sm90.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

template <typename T, MaskMode kMask, bool kSoftcap>
__global__ void __launch_bounds__(T::kThreads, 1)
    grouped_bwd_dkdv_kernel(const __grid_constant__ BwdKernelParams params) {
  static_assert(!kSoftcap || kMask == MaskMode::kLocal, "the softcap is compiled into kLocal kernels only");
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kBlockN = T::kBlockN;
  const cuda::BwdKernelParams& p = params.base;

  // CTA -> (K/V block, K/V head) in runs of kv_tile_head_run blocks per head (common/tile_order.h).
  const int kv_count = *p.kv_count;
  if (blockIdx.x >= static_cast<unsigned>(kv_count) * static_cast<unsigned>(p.num_heads_k)) return;
  int item_index = 0, kv_head = 0;
  split_query_tile(blockIdx.x, kv_count, p.num_heads_k, p.kv_tile_head_run, &item_index, &kv_head);
  const BwdKvWorkItem item = p.kv_items[item_index];
  const int b = item.batch;
  const int key0 = item.n_block * kBlockN;
  const int32_t k_start = SeqLenInfo::clamp(p.cu_seqlens_k[b], 0, p.total_k);
  const int32_t seqlen_k_full = SeqLenInfo::clamp(p.cu_seqlens_k[b + 1], k_start, p.total_k) - k_start;
  const int keys_valid = min(kBlockN, seqlen_k_full - key0);
  if (keys_valid <= 0) return;
  const int tid = threadIdx.x;

  const BwdSmem<T> sm(aligned_dynamic_smem());
  const typename BwdSmem<T>::Pipeline q_pipe = sm.q_pipe();
  // A Q stage's full barrier waits for the producer thread: one arrival with the TMA bytes (Q, dO,
  // LSE and Di: everything the consumers read of a stage is written by TMA, whose completion on
  // the barrier compute-sanitizer's racecheck follows).
  init_pipeline_barriers(sm.bar_kv(), 1, T::kConsumerWarps, q_pipe);

  const int warpgroup = ptx::warpgroup_index();
  if (warpgroup == 0) {
    // ---------------- producer (thread 0) ----------------
    ptx::setmaxnreg_dec<T::kProducerRegs>();
    if (tid != 0) return;
    produce_bwd_tiles<T, kMask>(params, sm, q_pipe, b, key0, kv_head, k_start);
    return;
  }

  // ---------------- consumers ----------------
  ptx::setmaxnreg_inc<T::kConsumerRegs>();
  if constexpr (T::kHeadSplit)
    consume_bwd_headsplit<T, kMask, kSoftcap>(params, sm, q_pipe, b, key0, kv_head, k_start, keys_valid, warpgroup);
  else
    consume_bwd_keysplit<T, kMask, kSoftcap>(params, sm, q_pipe, b, key0, kv_head, k_start, keys_valid, warpgroup);
#endif
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
