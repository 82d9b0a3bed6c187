// The backends behind the C ABI. The host API (csrc/api) validates every argument first; a
// backend receives only validated params and may assume the rules of validate.h hold
// (on CPU also the cu_seqlens / seqused_k VALUES). A backend reports failures through
// ringattn::fail so the message reaches ringattn_last_error().
#pragma once

#include <cstddef>

#include "ringattn/ringattn.h"

namespace ringattn {
namespace cpu {
ringattn_status grouped_fwd(const ringattn_fwd_params& params);
ringattn_status grouped_bwd(const ringattn_bwd_params& params);
// Head dims the CPU backend accepts.
bool supports_head_dim(int head_dim);
// The features of ABI 4 (see BackendLimits in api/validate.h): all of them.
constexpr bool kSupportsWindow = true;
constexpr bool kSupportsSoftcap = true;
constexpr bool kSupportsSinks = true;
constexpr bool kSupportsDiagonalShift = true;
}  // namespace cpu

namespace cuda {
// The features of ABI 4 that the GPU kernels implement (see BackendLimits in api/validate.h); the
// host API refuses the others with RINGATTN_STATUS_UNSUPPORTED.
constexpr bool kSupportsWindow = true;
constexpr bool kSupportsSoftcap = true;
constexpr bool kSupportsSinks = true;
constexpr bool kSupportsDiagonalShift = true;
// All of these exist in every build; without CUDA they report RINGATTN_STATUS_UNSUPPORTED.
bool compiled();
int compiled_archs(int* archs, int capacity);
bool supports_head_dim(int head_dim);
// Device present, arch new enough, dtype and head dim compiled in.
ringattn_status check_support(int device_index, int dtype, int head_dim);
ringattn_status fwd_workspace_size(const ringattn_fwd_params& params, size_t* bytes);
ringattn_status bwd_workspace_size(const ringattn_bwd_params& params, size_t* bytes);
ringattn_status grouped_fwd(const ringattn_fwd_params& params);
ringattn_status grouped_bwd(const ringattn_bwd_params& params);
// Copies `count` int32 from device memory to host (synchronising `stream`); used only when
// problem.check_metadata asks for value checks on the host.
ringattn_status copy_to_host(const int32_t* device_ptr, int count, int32_t* host, int device_index,
                             void* stream);
}  // namespace cuda
}  // namespace ringattn
