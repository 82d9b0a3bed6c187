// The dK/dV kernels' walk over the query tiles that see one K/V block (both tiers).
#pragma once

#include "cuda/bwd_params.h"
#include "cuda/seqlen_info.h"

namespace ringattn {
namespace cuda {

// Keys of sequence b that some group with queries uses (seqused_k applied): no query of any
// group sees a key at or past it. The dK/dV kernels keep K/V rows only below it (zeros past it),
// since the keys past seqused_k may hold anything, NaN included, and a masked dS = 0 times a NaN
// row of K (dQ = dS K) or of V (dP, tier 1) would still be NaN.
__device__ __forceinline__ int32_t keys_used_by_any_group(const BwdKernelParams& p, int b) {
  int32_t used = 0;
  for (int g = 0; g < p.num_groups; ++g) {
    const BwdGroupArgs& gr = p.groups[g];
    const SeqLenInfo seq(gr.cu_seqlens_q, gr.total_q, p.cu_seqlens_k, p.total_k, gr.seqused_k, b);
    if (seq.seqlen_q > 0 && seq.seqlen_k > used) used = seq.seqlen_k;
  }
  return used;
}

// Walks the (group, query head, query tile) triples that see keys [key0, key0 + kBlockN) of
// sequence b under mask kMask: groups outermost, then the query heads of the KV head, then the
// tiles. The fixed modes (kNone, kCausal) take start(p, b, key0) / next(p, b, key0); kLocal also
// takes the call's features (window and diagonal shifts): start(p, f, b, key0) / next(p, f, b,
// key0), which the fixed modes accept too (and ignore).
template <int kBlockM, int kBlockN, MaskMode kMask>
struct QueryTileCursor {
  int group;
  int head_in_kv;  // 0 .. q_heads_per_kv_head - 1
  int m_block;
  int m_first, m_end;  // tiles of this group that see the block
  int q_start, seqlen_q, seqlen_k;
  // kLocal: the window and the current (group, sequence)'s diagonal shift (unused otherwise).
  MaskWindow window;
  int diagonal_shift;

  __device__ __forceinline__ void enter_group(const BwdKernelParams& p, const FeatureParams* f, int b, int key0) {
    const BwdGroupArgs& g = p.groups[group];
    const SeqLenInfo seq(g.cu_seqlens_q, g.total_q, p.cu_seqlens_k, p.total_k, g.seqused_k, b);
    q_start = seq.q_start;
    seqlen_q = seq.seqlen_q;
    seqlen_k = seq.seqlen_k;
    if constexpr (kMask == MaskMode::kLocal) {
      window = f->window;
      diagonal_shift = SeqLenInfo::diagonal_shift_of(*f, group, b);
    }
    m_first = m_end = 0;
    if (key0 < seqlen_k && seqlen_q > 0) {
      // Rows [first_row, rows_end) see a key of the block (common/mask.h); their tiles follow.
      const Mask<kMask> seq_mask = mask();
      const int first_row = seq_mask.row_begin(key0);
      const int rows_end = seq_mask.row_end(min(key0 + kBlockN, seqlen_k) - 1);
      if (first_row < rows_end) {
        m_first = first_row / kBlockM;
        m_end = (rows_end + kBlockM - 1) / kBlockM;
      }
    }
    head_in_kv = 0;
    m_block = m_first;
  }
  // Moves forward to the first valid triple at or after the current one.
  __device__ __forceinline__ void settle(const BwdKernelParams& p, const FeatureParams* f, int b, int key0) {
    while (group < p.num_groups && m_block >= m_end) {
      if (m_end > m_first && ++head_in_kv < p.q_heads_per_kv_head) {
        m_block = m_first;
      } else if (++group < p.num_groups) {
        enter_group(p, f, b, key0);
      }
    }
  }
  __device__ __forceinline__ void start(const BwdKernelParams& p, const FeatureParams& f, int b, int key0) {
    group = 0;
    enter_group(p, &f, b, key0);
    settle(p, &f, b, key0);
  }
  __device__ __forceinline__ void next(const BwdKernelParams& p, const FeatureParams& f, int b, int key0) {
    ++m_block;
    settle(p, &f, b, key0);
  }
  __device__ __forceinline__ void start(const BwdKernelParams& p, int b, int key0) {
    static_assert(kMask != MaskMode::kLocal, "kLocal's cursor needs the features: start(p, f, b, key0)");
    group = 0;
    enter_group(p, nullptr, b, key0);
    settle(p, nullptr, b, key0);
  }
  __device__ __forceinline__ void next(const BwdKernelParams& p, int b, int key0) {
    static_assert(kMask != MaskMode::kLocal, "kLocal's cursor needs the features: next(p, f, b, key0)");
    ++m_block;
    settle(p, nullptr, b, key0);
  }
  __device__ __forceinline__ bool valid(const BwdKernelParams& p) const { return group < p.num_groups; }
  // The mask of the current (group, sequence).
  __device__ __forceinline__ Mask<kMask> mask() const {
    if constexpr (kMask == MaskMode::kLocal) {
      return Mask<kMask>(seqlen_q, seqlen_k, window, diagonal_shift);
    } else {
      return Mask<kMask>(seqlen_q, seqlen_k);
    }
  }
};

}  // namespace cuda
}  // namespace ringattn
