// Where one (group, sequence) lives and how long it is. All sequence-length logic of the GPU
// kernels is here (which keys a row sees is common/mask.h's). Every length is clamped to its
// tensor, so malformed cu_seqlens can give wrong numbers but never an out-of-bounds access.
#pragma once

#include <cstdint>

#include "common/mask.h"
#include "cuda/fwd_params.h"

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

  // Which keys each query row of this sequence sees (common/mask.h), for the fixed modes.
  template <MaskMode kMode>
  __device__ __forceinline__ Mask<kMode> mask() const {
    return Mask<kMode>(seqlen_q, seqlen_k);
  }
  // The same for any mode: kLocal takes the call's window and the shift of sequence b of `group`
  // (nothing is read for the fixed modes).
  template <MaskMode kMode>
  __device__ __forceinline__ Mask<kMode> mask(const FeatureParams& features, int group, int b) const {
    if constexpr (kMode == MaskMode::kLocal) {
      return Mask<kMode>(seqlen_q, seqlen_k, features.window, diagonal_shift_of(features, group, b));
    } else {
      return mask<kMode>();
    }
  }
  // The diagonal shift of sequence b of `group` (0 without a shift array).
  __device__ __forceinline__ static int32_t diagonal_shift_of(const FeatureParams& features, int group, int b) {
    const int32_t* shifts = features.diagonal_shift[group];
    return shifts != nullptr ? shifts[b] : 0;
  }
};

}  // namespace cuda
}  // namespace ringattn
