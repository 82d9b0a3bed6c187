// Where one (group, sequence) lives and how long it is. All sequence-length logic of the GPU
// kernels is here (which keys a row sees is common/mask.h's). Every length is clamped to its
// tensor, so malformed cu_seqlens can give wrong numbers but never an out-of-bounds access.
#pragma once

#include <cstdint>

#include "common/mask.h"

namespace ringattn {
namespace cuda {

struct SeqLenInfo {
  int32_t q_start;  // first token of the sequence in Q_g
  int32_t seqlen_q;
  int32_t k_start;  // first token in K/V
  int32_t seqlen_k;  // keys this group uses (seqused_k when given)

  __device__ __forceinline__ static int32_t clamp(int32_t x, int32_t lo, int32_t hi) {
    return x < lo ? lo : (x > hi ? hi : x);
  }

  __device__ __forceinline__ SeqLenInfo(const int32_t* cu_seqlens_q, int32_t total_q, const int32_t* cu_seqlens_k,
                                        int32_t total_k, const int32_t* seqused_k, int32_t b) {
    q_start = clamp(cu_seqlens_q[b], 0, total_q);
    const int32_t q_end = clamp(cu_seqlens_q[b + 1], q_start, total_q);
    seqlen_q = q_end - q_start;
    k_start = clamp(cu_seqlens_k[b], 0, total_k);
    const int32_t k_end = clamp(cu_seqlens_k[b + 1], k_start, total_k);
    seqlen_k = k_end - k_start;
    if (seqused_k != nullptr) seqlen_k = clamp(seqused_k[b], 0, seqlen_k);
  }

  // Which keys each query row of this sequence sees (common/mask.h).
  template <MaskMode kMode>
  __device__ __forceinline__ Mask<kMode> mask() const {
    return Mask<kMode>(seqlen_q, seqlen_k);
  }
};

}  // namespace cuda
}  // namespace ringattn
