// Device support of the CUDA backend, shared by the forward and the backward dispatch: CUDA
// errors as statuses, the device a call runs on, whether a device can run our kernels, and which
// kernel tier runs a call.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ringattn/ringattn.h"

namespace ringattn {
namespace cuda {

// RINGATTN_STATUS_CUDA_ERROR with "<what> failed: <error name> (<error string>)".
ringattn_status cuda_fail(cudaError_t err, const char* what);

// The scale the kernels use: 1/sqrt(head_dim) when the caller asked for the default, else the
// (validated) softmax_scale.
inline float resolved_softmax_scale(const ringattn_problem& pr) {
  return pr.default_softmax_scale ? 1.f / std::sqrt(static_cast<float>(pr.head_dim)) : pr.softmax_scale;
}

// Makes `device` current for the scope of a call and restores the caller's device after.
class DeviceGuard {
 public:
  // cudaSetDevice also when `device` is already current: it makes the device's primary context
  // current on this thread (a thread that has made no runtime call yet, such as PyTorch's
  // autograd worker, may have none), which the driver calls of tier 2 (tensor maps) need.
  explicit DeviceGuard(int device) {
    err_ = cudaGetDevice(&previous_);
    if (err_ == cudaSuccess) err_ = cudaSetDevice(device);
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_ && previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;
  cudaError_t error() const { return err_; }

 private:
  int previous_ = -1;
  cudaError_t err_ = cudaSuccess;
};

// Whether the device exists, is new enough and has a kernel image in this build; checked once
// per device and cached with its message. *cc, *sm_count and *l2_bytes (optional) get its compute
// capability (major * 10 + minor), its number of SMs and its L2 cache size.
ringattn_status check_device(int device_index, int* cc = nullptr, int* sm_count = nullptr, int64_t* l2_bytes = nullptr);

// The device's number of SMs (from check_device's per-device cache), or 0 when the device
// cannot run our kernels.
int device_sm_count(int device_index);

// The GPU kernel tiers (ringattn_tier): tier 1 (mma.sync, sm80 and newer), tier 2 (sm90a).
enum class Tier { kSm80, kSm90 };

// The tier that runs a call, the same rule for the forward and the backward: tier 2 unless
// exec.tier asks for tier 1, when the GPU is an sm90 card (cc 90), a tier-2 kernel is compiled
// for the call's shape and kernel variant (tier2_kernel) and total_k > 0; tier 1 otherwise. When
// exec.tier asks for tier 2 and it cannot run, RINGATTN_STATUS_UNSUPPORTED saying why ("... cannot
// run <call>: ...").
ringattn_status choose_tier(const ringattn_exec& exec, int cc, bool tier2_kernel, int64_t total_k, const char* call,
                            Tier* tier);

}  // namespace cuda
}  // namespace ringattn
