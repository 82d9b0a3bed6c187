// Pieces the two consumer main loops of the tier-2 (sm90a) dK/dV kernel run the same way
// (bwd_mainloop_keysplit.cuh, head dims 64 / 128; bwd_mainloop_headsplit.cuh, head dim 256): the
// start of a key block, the dQ staging and TMA reduce-add, and the dK / dV epilogue. Each is
// written so that, inlined, it compiles to the code each loop had with it written out (the
// sm90a dK/dV cubins are byte-identical); where the two loops did an address computation in
// another order, the helper takes both pieces (first_box / col0, row_col / col) rather than
// changing one kernel. bwd_common.cuh has the smaller shared pieces (accumulator zeroing, K / Q /
// dO row zeroing, key_row_mask_bounds) and the producer.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/ptx.h"
#include "cuda/seqlen_info.h"
#include "cuda/sm90/bwd_common.cuh"
#include "cuda/sm90/bwd_params.h"
#include "cuda/sm90/named_barriers.h"
#include "cuda/sm90/ptx_sm90.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

// Start of a consumer's key block: dK and dV zeroed, the cursor at the block's first query tile;
// when some tile sees the block (the return value), K and V have landed and the K rows past the
// keys in use are zeroed (zero_unused_key_rows).
template <typename T, typename Cursor, int kDTiles>
__device__ __forceinline__ bool start_key_block(const BwdKernelParams& params, const BwdSmem<T>& sm, Cursor& cur, int b,
                                                int key0, int keys_valid, int ctid, float (&dk)[kDTiles][4],
                                                float (&dv)[kDTiles][4]) {
  zero_dkdv_accumulators(dk, dv);
  cur.start(params.base, params.features, b, key0);
  if (!cur.valid(params.base)) return false;
  ptx::mbarrier_wait_parity(sm.bar_kv(), 0);
  zero_unused_key_rows(params.base, sm, b, key0, keys_valid, ctid);
  return true;
}

// A warpgroup's dQ part (kTiles n8 tiles of its 64 rows from tile row row0 of cursor c's tile)
// into kTiles / 4 fp32 staging boxes ([64 rows][32 floats], 128-byte swizzle) first_box,
// first_box + 1, ... of those kDqBoxBytes apart from `boxes` (rows past the sequence as 0, so the
// next sequence's rows get exactly +0); then, after the warpgroup's barrier
// (barrier_id(first_barrier, wg), 128 threads), one thread adds box i to dq_accum by TMA
// reduce-add: columns col0 + 32 i of head `head` of the cursor's group, one bulk group.
template <typename T, int kTiles, typename Cursor>
__device__ __forceinline__ void stage_and_reduce_dq_boxes(const BwdKernelParams& params, const Cursor& c,
                                                          const float (&dq)[kTiles][4], uint32_t boxes, int first_box,
                                                          int col0, int head, int row0, NamedBarrier first_barrier,
                                                          int wg, int warp_in_wg, int lane, int ctid) {
  constexpr int kBoxes = kTiles / 4;  // 32 columns = 4 n8 tiles per box
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_in_wg * 16 + (lane >> 2) + r * 8;
    const bool ok = row0 + row < c.seqlen_q;
#pragma unroll
    for (int dt = 0; dt < kTiles; ++dt) {
      const int box = first_box + dt / 4;
      const int byte = (dt % 4) * 32 + (lane & 3) * 8;
      const uint32_t addr = boxes + box * T::kDqBoxBytes + row * 128 + (((byte >> 4) ^ (row & 7)) << 4) + (byte & 15);
      st_shared_f2(addr, ok ? dq[dt][2 * r] : 0.f, ok ? dq[dt][2 * r + 1] : 0.f);
    }
  }
  ptx::fence_proxy_async_shared();
  ptx::named_barrier_sync(barrier_id(first_barrier, wg), 128);
  if (ctid % 128 == 0) {
#pragma unroll
    for (int bx = 0; bx < kBoxes; ++bx)
      ptx::tma_reduce_add_3d(&params.tma_dq[c.group], boxes + (first_box + bx) * T::kDqBoxBytes,
                             col0 + (first_box + bx) * 32, head, c.q_start + row0);
    ptx::bulk_commit_group();
  }
}

// Epilogue of a consumer: dK * softmax_scale and dV of this thread's keys my_key, my_key + 8 of
// the block (those below the block's keys in the sequence), kDTiles n8 tiles from column
// row_col + col (+0, +1 each), plain stores (zeros where no query saw a key). row_col is added to
// the two row pointers once, col to each store's address: the head-split loop passes its column
// as row_col, the key-split loop as col, where each loop had it (either way round changes the
// other kernel's code). With kLocal the block's start and key count are read again rather than
// held across the tile loop, whose run-time mask needs the registers (they would be spilled; the
// empty asm keeps the compiler from reusing the first loads), and key_col(threadIdx.x) gives
// my_key and row_col again (an int2).
template <typename T, MaskMode kMask, int kDTiles, typename KeyCol>
__device__ __forceinline__ void store_dkdv(const cuda::BwdKernelParams& p, int b, int key0, int kv_head,
                                           int32_t k_start, int keys_valid, int my_key, int row_col, int col,
                                           KeyCol key_col, const float (&dk)[kDTiles][4],
                                           const float (&dv)[kDTiles][4]) {
  using Element = typename T::Element;
  int32_t block_k_start = k_start;
  int block_keys = keys_valid;
  if constexpr (kMask == MaskMode::kLocal) {
    asm volatile("" ::: "memory");
    block_k_start = SeqLenInfo::clamp(p.cu_seqlens_k[b], 0, p.total_k);
    block_keys = min(T::kBlockN, SeqLenInfo::clamp(p.cu_seqlens_k[b + 1], block_k_start, p.total_k) - block_k_start - key0);
    const int2 kc = key_col(static_cast<int>(threadIdx.x));
    my_key = kc.x;
    row_col = kc.y;
  }
  const int64_t key_row0 = static_cast<int64_t>(block_k_start) + key0;
  Element* dk_blk = static_cast<Element*>(p.dk) + key_row0 * p.dk_row_stride + kv_head * p.dk_head_stride + row_col;
  Element* dv_blk = static_cast<Element*>(p.dv) + key_row0 * p.dv_row_stride + kv_head * p.dv_head_stride + row_col;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = my_key + r * 8;
    if (key < block_keys) {
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        *reinterpret_cast<uint32_t*>(dk_blk + key * p.dk_row_stride + dt * 8 + col) =
            ptx::pack2<Element>(dk[dt][2 * r] * p.softmax_scale, dk[dt][2 * r + 1] * p.softmax_scale);
        *reinterpret_cast<uint32_t*>(dv_blk + key * p.dv_row_stride + dt * 8 + col) =
            ptx::pack2<Element>(dv[dt][2 * r], dv[dt][2 * r + 1]);
      }
    }
  }
}

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
