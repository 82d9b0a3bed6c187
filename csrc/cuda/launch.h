// Host-side launch of one kernel instantiation: raise its dynamic shared-memory limit to what it
// uses, optionally ask for the whole L1/shared carve-out as shared memory, then launch
// `num_ctas` CTAs (none is a no-op after the attribute calls). Returns the first CUDA error.
//
// The attributes belong to the kernel in the device's context and stay until the context goes,
// so each launch function (generated, one per kernel) keeps a KernelAttributeCache: the
// attributes are set on a device's first launch only, not at every call (cudaFuncSetAttribute
// is a driver call on the host path of every forward and backward).
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace ringattn {
namespace cuda {

// The devices (bits 0..63) on which a kernel's launch attributes are set. Devices past 63 set
// them at every launch.
class KernelAttributeCache {
 public:
  bool contains(int device) const {
    return device >= 0 && device < 64 && ((bits_.load(std::memory_order_acquire) >> device) & 1u) != 0;
  }
  void insert(int device) {
    if (device >= 0 && device < 64) bits_.fetch_or(uint64_t{1} << device, std::memory_order_release);
  }
  void erase(int device) {
    if (device >= 0 && device < 64) bits_.fetch_and(~(uint64_t{1} << device), std::memory_order_release);
  }

 private:
  std::atomic<uint64_t> bits_{0};
};

template <typename Params>
cudaError_t set_launch_attributes(void (*kernel)(Params), int smem_bytes, bool max_shared_carveout) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess || !max_shared_carveout) return err;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
}

template <typename Params>
cudaError_t launch_with_smem(void (*kernel)(Params), int num_ctas, int threads, int smem_bytes, cudaStream_t stream,
                             const Params& params, bool max_shared_carveout, KernelAttributeCache& attributes_set) {
  int device = -1;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool cached = attributes_set.contains(device);
  if (!cached) {
    if ((err = set_launch_attributes(kernel, smem_bytes, max_shared_carveout)) != cudaSuccess) return err;
    attributes_set.insert(device);
  }
  if (num_ctas <= 0) return cudaSuccess;
  kernel<<<num_ctas, threads, smem_bytes, stream>>>(params);
  err = cudaGetLastError();
  if (err == cudaErrorInvalidValue && cached) {
    // What a launch above the default 48 KB of dynamic shared memory returns when the attribute
    // is gone (a new context of the device, after cudaDeviceReset): set it again, launch again.
    attributes_set.erase(device);
    if ((err = set_launch_attributes(kernel, smem_bytes, max_shared_carveout)) != cudaSuccess) return err;
    attributes_set.insert(device);
    kernel<<<num_ctas, threads, smem_bytes, stream>>>(params);
    err = cudaGetLastError();
  }
  return err;
}

}  // namespace cuda
}  // namespace ringattn
