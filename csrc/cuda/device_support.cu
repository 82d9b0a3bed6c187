// Device support of the CUDA backend: which architectures and head dims this build has, whether
// a device can run its kernels (checked once per device), the tier choice of a call, and the
// host copies of the metadata checks.
#include <cuda_runtime.h>

#include <mutex>
#include <string>

#include "common/backends.h"
#include "common/error.h"
#include "cuda/device_support.h"
#include "cuda/kernel_registry.h"
#include "cuda/tile_scheduler.h"

namespace ringattn {
namespace cuda {

ringattn_status cuda_fail(cudaError_t err, const char* what) {
  return failf(RINGATTN_STATUS_CUDA_ERROR, "%s failed: %s (%s)", what, cudaGetErrorName(err), cudaGetErrorString(err));
}

bool compiled() { return true; }

int compiled_archs(int* archs, int capacity) {
  // CMake defines RINGATTN_CUDA_ARCH_<sm> for each architecture it builds.
  static const int kArchs[] = {
#ifdef RINGATTN_CUDA_ARCH_80
      80,
#endif
#ifdef RINGATTN_CUDA_ARCH_86
      86,
#endif
#ifdef RINGATTN_CUDA_ARCH_89
      89,
#endif
#ifdef RINGATTN_CUDA_ARCH_90
      90,
#endif
      0};
  const int n = static_cast<int>(sizeof(kArchs) / sizeof(kArchs[0])) - 1;
  for (int i = 0; i < n && i < capacity; ++i) archs[i] = kArchs[i];
  return n;
}

bool supports_head_dim(int head_dim) {
  return find_sm80_fwd_kernel(RINGATTN_DTYPE_BF16, head_dim, KernelVariant{}) != nullptr ||
         find_sm80_fwd_kernel(RINGATTN_DTYPE_FP16, head_dim, KernelVariant{}) != nullptr;
}

namespace {

// Whether a device can run our kernels. Checked once per device (cudaGetDeviceProperties is
// too slow for every call) and cached with its message.
struct DeviceSupport {
  bool checked = false;
  ringattn_status status = RINGATTN_STATUS_OK;
  std::string message;
  int cc = 0;  // compute capability, major * 10 + minor
  int sm_count = 0;  // streaming multiprocessors
  int64_t l2_bytes = 0;
};

ringattn_status check_device_uncached(int device_index, int* cc_out, int* sm_count_out, int64_t* l2_bytes_out) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess)
    return failf(RINGATTN_STATUS_UNSUPPORTED, "no usable CUDA device: cudaGetDeviceCount failed: %s",
                 cudaGetErrorString(err));
  if (device_index >= count)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "exec.device_index: expected 0 to %d, got %d", count - 1,
                 device_index);
  cudaDeviceProp prop;
  if ((err = cudaGetDeviceProperties(&prop, device_index)) != cudaSuccess)
    return cuda_fail(err, "cudaGetDeviceProperties");
  const int cc = prop.major * 10 + prop.minor;
  *cc_out = cc;
  *sm_count_out = prop.multiProcessorCount;
  *l2_bytes_out = prop.l2CacheSize;
  if (cc < 80)
    return failf(RINGATTN_STATUS_UNSUPPORTED,
                 "GPU %d (%s) has compute capability %d.%d; libringattn needs 8.0 or newer (Ampere, Ada, Hopper)",
                 device_index, prop.name, prop.major, prop.minor);
  DeviceGuard guard(device_index);
  if (guard.error() != cudaSuccess) return cuda_fail(guard.error(), "cudaSetDevice");
  if ((err = probe_kernel_image()) != cudaSuccess) {
    cudaGetLastError();
    int archs[16];
    const int n = compiled_archs(archs, 16);
    std::string list;
    for (int i = 0; i < n && i < 16; ++i) list += (i ? ", " : "") + std::to_string(archs[i]);
    return failf(RINGATTN_STATUS_UNSUPPORTED,
                 "GPU %d (%s, compute capability %d.%d) has no kernel image in this build (compiled for sm %s); "
                 "rebuild with RINGATTN_CUDA_ARCHS including %d",
                 device_index, prop.name, prop.major, prop.minor, list.c_str(), cc);
  }
  return RINGATTN_STATUS_OK;
}

}  // namespace

ringattn_status check_device(int device_index, int* cc, int* sm_count, int64_t* l2_bytes) {
  constexpr int kMaxDevices = 64;
  static std::mutex mutex;
  static DeviceSupport cache[kMaxDevices];
  int scratch_cc = 0, scratch_sm_count = 0;
  int64_t scratch_l2_bytes = 0;
  if (cc == nullptr) cc = &scratch_cc;
  if (sm_count == nullptr) sm_count = &scratch_sm_count;
  if (l2_bytes == nullptr) l2_bytes = &scratch_l2_bytes;
  if (device_index >= kMaxDevices) return check_device_uncached(device_index, cc, sm_count, l2_bytes);
  std::lock_guard<std::mutex> lock(mutex);
  DeviceSupport& entry = cache[device_index];
  if (!entry.checked) entry.status = check_device_uncached(device_index, &entry.cc, &entry.sm_count, &entry.l2_bytes);
  *cc = entry.cc;
  *sm_count = entry.sm_count;
  *l2_bytes = entry.l2_bytes;
  if (!entry.checked) {
    entry.message = entry.status == RINGATTN_STATUS_OK ? std::string() : std::string(last_error());
    // A missing device can appear later (CUDA_VISIBLE_DEVICES is read once, but a driver
    // error may be transient): cache only definite answers about an existing device.
    entry.checked = entry.status == RINGATTN_STATUS_OK || entry.status == RINGATTN_STATUS_UNSUPPORTED;
    return entry.status;
  }
  if (entry.status != RINGATTN_STATUS_OK) return fail(entry.status, entry.message);
  return RINGATTN_STATUS_OK;
}

int device_sm_count(int device_index) {
  int sm_count = 0;
  return check_device(device_index, nullptr, &sm_count) == RINGATTN_STATUS_OK ? sm_count : 0;
}

ringattn_status check_support(int device_index, int dtype, int head_dim) {
  const ringattn_status s = check_device(device_index);
  if (s != RINGATTN_STATUS_OK) return s;
  if (find_sm80_fwd_kernel(dtype, head_dim, KernelVariant{}) == nullptr)
    return failf(RINGATTN_STATUS_UNSUPPORTED, "no GPU kernel compiled for dtype %d and head_dim %d", dtype, head_dim);
  return RINGATTN_STATUS_OK;
}

ringattn_status choose_tier(const ringattn_exec& exec, int cc, bool tier2_kernel, int64_t total_k, const char* call,
                            Tier* tier) {
  *tier = Tier::kSm80;
#ifdef RINGATTN_SM90_TIER
  if (exec.tier == RINGATTN_TIER_SM80) return RINGATTN_STATUS_OK;
  const char* why = nullptr;
  if (cc != 90)
    why = "the GPU is not an sm90 card";
  else if (!tier2_kernel)
    why = "no tier-2 kernel compiled for this dtype and head_dim";
  else if (total_k <= 0)
    why = "total_k is 0";
  if (why == nullptr) {
    *tier = Tier::kSm90;
    return RINGATTN_STATUS_OK;
  }
  if (exec.tier == RINGATTN_TIER_SM90)
    return failf(RINGATTN_STATUS_UNSUPPORTED, "exec.tier: RINGATTN_TIER_SM90 requested, but tier 2 cannot run %s: %s",
                 call, why);
  return RINGATTN_STATUS_OK;
#else
  (void)cc;
  (void)tier2_kernel;
  (void)total_k;
  (void)call;
  if (exec.tier == RINGATTN_TIER_SM90)
    return fail(RINGATTN_STATUS_UNSUPPORTED,
                "exec.tier: RINGATTN_TIER_SM90 requested, but this libringattn was built without sm90a kernels "
                "(RINGATTN_CUDA_ARCHS has no 90a)");
  return RINGATTN_STATUS_OK;
#endif
}

ringattn_status copy_to_host(const int32_t* device_ptr, int count, int32_t* host, int device_index, void* stream) {
  DeviceGuard guard(device_index);
  if (guard.error() != cudaSuccess) return cuda_fail(guard.error(), "cudaSetDevice");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaMemcpyAsync(host, device_ptr, sizeof(int32_t) * static_cast<size_t>(count),
                                    cudaMemcpyDeviceToHost, s);
  if (err == cudaSuccess) err = cudaStreamSynchronize(s);
  if (err != cudaSuccess) return cuda_fail(err, "copying cu_seqlens/seqused_k to the host (check_metadata)");
  return RINGATTN_STATUS_OK;
}

}  // namespace cuda
}  // namespace ringattn
