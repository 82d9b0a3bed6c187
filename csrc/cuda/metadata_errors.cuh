// Device-side check of the sequence metadata that the work-list kernels read anyway: the same
// conditions as the host check (validate_metadata in api/validate.cpp), reported as
// ringattn_metadata_error bits into the caller's word (ringattn_exec.metadata_errors) without a
// host sync. The kernels themselves still clamp every sequence to its tensor.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ringattn/ringattn.h"

namespace ringattn {
namespace cuda {
namespace metadata_errors {

// Which cu_seqlens array a check is about (it picks the bits).
enum class CuSeqlens { kQuery, kKey };

// Entries b and b + 1 of a cu_seqlens array of batch_size + 1 entries over `total` tokens.
// Checking every b in [0, batch_size) covers the whole array: the first entry is 0, no entry is
// below the one before it, the last one is at most `total`.
template <CuSeqlens kWhich>
__device__ __forceinline__ uint32_t cu_seqlens_pair(int32_t start, int32_t end, int b, int batch_size, int32_t total) {
  constexpr bool kQ = kWhich == CuSeqlens::kQuery;
  constexpr uint32_t kFirst = kQ ? RINGATTN_METADATA_CU_SEQLENS_Q_FIRST : RINGATTN_METADATA_CU_SEQLENS_K_FIRST;
  constexpr uint32_t kDecreasing =
      kQ ? RINGATTN_METADATA_CU_SEQLENS_Q_DECREASING : RINGATTN_METADATA_CU_SEQLENS_K_DECREASING;
  constexpr uint32_t kPastEnd = kQ ? RINGATTN_METADATA_CU_SEQLENS_Q_PAST_END : RINGATTN_METADATA_CU_SEQLENS_K_PAST_END;
  uint32_t flags = 0;
  if (b == 0 && start != 0) flags |= kFirst;
  if (end < start) flags |= kDecreasing;
  if (b == batch_size - 1 && end > total) flags |= kPastEnd;
  return flags;
}

// seqused_k[b] against the key length of sequence b as cu_seqlens_k gives it (unclamped, in 64
// bits: a malformed cu_seqlens_k is reported through its own bits as well).
__device__ __forceinline__ uint32_t seqused_k_entry(int32_t used, int32_t k_start, int32_t k_end) {
  const int64_t len_k = static_cast<int64_t>(k_end) - static_cast<int64_t>(k_start);
  return used < 0 || used > len_k ? static_cast<uint32_t>(RINGATTN_METADATA_SEQUSED_K_RANGE) : 0u;
}

// A thread's findings into the caller's word (one atomic per thread that found something;
// nothing at all for well-formed metadata).
__device__ __forceinline__ void report(uint32_t* word, uint32_t flags) {
  if (flags != 0 && word != nullptr) atomicOr(reinterpret_cast<unsigned int*>(word), flags);
}

}  // namespace metadata_errors
}  // namespace cuda
}  // namespace ringattn
