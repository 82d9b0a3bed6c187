// The tier-2 forward launch, declared for the host dispatch (defined in fwd_kernel.cuh and
// instantiated once per small file under sm90/instantiations/, compiled for sm_90a only).
#pragma once

#include <cuda_runtime.h>

#include "common/mask.h"
#include "cuda/sm90/fwd_params.h"
#include "cuda/sm90/fwd_traits.h"

namespace ringattn {
namespace cuda {
namespace sm90 {

// kSoftcap (MaskMode::kLocal only) applies the logit softcap of params.features.
template <typename T, MaskMode kMask, bool kSoftcap = false>
cudaError_t launch_grouped_fwd(const FwdKernelParams& params, int num_ctas, cudaStream_t stream);

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
