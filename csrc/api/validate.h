// Every validation rule of the kernel contract, in one place. Both backends run only after
// these pass, so kernels never re-check arguments.
#pragma once

#include <cstddef>

#include "ringattn/ringattn.h"

namespace ringattn {

// What a backend accepts; filled from the backend's capability functions.
struct BackendLimits {
  bool fp32, fp16, bf16, fp64;
  bool (*supports_head_dim)(int);
  int stride_alignment_elems;  // row/head strides must be multiples of this (1 = any)
  int pointer_alignment_bytes;  // data pointers must be aligned to this
  // Features of ABI 4 (a call asking for one the backend lacks gets RINGATTN_STATUS_UNSUPPORTED):
  bool supports_window;          // has_window = 1 with window_left or window_right >= 0
  bool supports_softcap;         // softcap > 0
  bool supports_sinks;           // sinks != NULL
  bool supports_diagonal_shift;  // a group's diagonal_shift != NULL
};

BackendLimits limits_for(int device_type);

// `need_data` is false for workspace-size queries (data pointers may be NULL there).
ringattn_status validate_fwd(const ringattn_fwd_params* params, bool need_data);
ringattn_status validate_bwd(const ringattn_bwd_params* params, bool need_data);

// Checks the VALUES of cu_seqlens_k, cu_seqlens_q_g and seqused_k_g. `host_*` are host copies.
// cu_seqlens_q[g] is a host array of B+1, seqused_k[g] of B or NULL.
ringattn_status validate_metadata(const ringattn_problem& problem, const int32_t* cu_seqlens_k,
                                  const int32_t* const* cu_seqlens_q, const int32_t* const* seqused_k,
                                  const int64_t* total_q, const char* pass_name);

const char* dtype_name(int dtype);
size_t dtype_size(int dtype);

}  // namespace ringattn
