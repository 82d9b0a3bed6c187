// Host-side launch of one kernel instantiation: raise its dynamic shared-memory limit to what it
// uses, optionally ask for the whole L1/shared carve-out as shared memory, then launch
// `num_ctas` CTAs (none is a no-op after the attribute calls). Returns the first CUDA error.
#pragma once

#include <cuda_runtime.h>

namespace ringattn {
namespace cuda {

template <typename Params>
cudaError_t launch_with_smem(void (*kernel)(Params), int num_ctas, int threads, int smem_bytes, cudaStream_t stream,
                             const Params& params, bool max_shared_carveout = false) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (err != cudaSuccess) return err;
  if (max_shared_carveout) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (err != cudaSuccess) return err;
  }
  if (num_ctas <= 0) return cudaSuccess;
  kernel<<<num_ctas, threads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace ringattn
