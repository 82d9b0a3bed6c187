// Elementwise pre- and postprocess launches of the GPU backward (see bwd_params.h for the
// order of the launches). Templated on the element type only: the head dim is a runtime value.
#pragma once

#include <cuda_runtime.h>

#include "cuda/bwd_params.h"

namespace ringattn {
namespace cuda {

// Di, LSE in log2 units, dq_accum = 0, dK = dV = 0 on rows after the last sequence.
template <typename Element>
cudaError_t launch_bwd_preprocess(const BwdPrepParams& params, cudaStream_t stream);

// dQ = softmax_scale * dq_accum in the dtype, every row of every group.
template <typename Element>
cudaError_t launch_bwd_postprocess(const BwdPrepParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace ringattn
