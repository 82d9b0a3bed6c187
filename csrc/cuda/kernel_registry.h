// The compiled kernels of the CUDA backend, by (dtype, head dim, mask mode): one table per (tier,
// pass). The tables and lookups are generated into kernel_registry.cu by
// scripts/dev/gen_instantiations.py, from the same table of tiers, passes, head dims, dtypes and
// mask modes that writes the instantiation files; this header holds what their rows are.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "common/mask.h"
#include "cuda/bwd_params.h"
#include "cuda/fwd_params.h"
#include "ringattn/ringattn.h"
#ifdef RINGATTN_SM90_TIER
#include "cuda/sm90/bwd_params.h"
#include "cuda/sm90/fwd_params.h"
#endif

namespace ringattn {
namespace cuda {

// The mask mode of a call's kernels.
inline MaskMode mask_mode(const ringattn_problem& pr) { return pr.causal != 0 ? MaskMode::kCausal : MaskMode::kNone; }

// One compiled kernel with its tile shape: the forward of either tier, tier 2's dK/dV kernel and
// tier 2's deterministic dQ kernel (block_m: query rows, block_n: keys of the kernel's tile).
template <typename LaunchFn>
struct KernelEntry {
  int dtype = -1;  // RINGATTN_DTYPE_*; -1 in the entry ending a table, which matches no lookup
  int head_dim = 0;
  MaskMode mask = MaskMode::kNone;
  int block_m = 0;
  int block_n = 0;
  LaunchFn launch = nullptr;
};

// The row of a kernel whose traits T give its tile shape.
template <typename T, MaskMode kMask, typename LaunchFn>
constexpr KernelEntry<LaunchFn> kernel_entry(int dtype, LaunchFn launch) {
  return KernelEntry<LaunchFn>{dtype, T::kHeadDim, kMask, T::kBlockM, T::kBlockN, launch};
}

using FwdLaunchFn = cudaError_t (*)(const FwdKernelParams&, int, cudaStream_t);
using Sm80FwdKernelEntry = KernelEntry<FwdLaunchFn>;

using BwdLaunchFn = cudaError_t (*)(const BwdKernelParams&, int, cudaStream_t);
using BwdPrepFn = cudaError_t (*)(const BwdPrepParams&, cudaStream_t);

// One tier-1 backward instantiation: the dK/dV kernel, the deterministic-mode dQ kernel and the
// dtype's pre/postprocess (bwd_params.h lists the launches).
struct Sm80BwdKernelEntry {
  int dtype = -1;  // as in KernelEntry
  int head_dim = 0;
  MaskMode mask = MaskMode::kNone;
  int block_m = 0;     // dK/dV kernel: query rows per inner step
  int block_n = 0;     // dK/dV kernel: keys per CTA
  int dq_block_m = 0;  // dQ kernel: query rows per CTA
  int dq_block_n = 0;  // dQ kernel: keys per step
  int smem_bytes = 0;  // the larger of the two kernels'
  BwdLaunchFn dkdv = nullptr;
  BwdLaunchFn dq = nullptr;
  BwdPrepFn preprocess = nullptr;
  BwdPrepFn postprocess = nullptr;
};

// The row of a tier-1 backward whose dK/dV kernel has traits T and dQ kernel traits Q.
template <typename T, typename Q, MaskMode kMask>
constexpr Sm80BwdKernelEntry sm80_bwd_entry(int dtype, BwdLaunchFn dkdv, BwdLaunchFn dq, BwdPrepFn preprocess,
                                            BwdPrepFn postprocess) {
  return Sm80BwdKernelEntry{dtype,
                            T::kHeadDim,
                            kMask,
                            T::kBlockM,
                            T::kBlockN,
                            Q::kBlockM,
                            Q::kBlockN,
                            T::kSmemBytes > Q::kSmemBytes ? T::kSmemBytes : Q::kSmemBytes,
                            dkdv,
                            dq,
                            preprocess,
                            postprocess};
}

// The entry of a table for (dtype, head dim, mask mode), or nullptr.
template <typename Entry, size_t N>
const Entry* find_entry(const Entry (&table)[N], int dtype, int head_dim, MaskMode mask) {
  for (const Entry& e : table)
    if (e.dtype == dtype && e.head_dim == head_dim && e.mask == mask) return &e;
  return nullptr;
}

// The lookups (kernel_registry.cu): nullptr when no kernel is compiled for the combination.
const Sm80FwdKernelEntry* find_sm80_fwd_kernel(int dtype, int head_dim, MaskMode mask);
const Sm80BwdKernelEntry* find_sm80_bwd_kernel(int dtype, int head_dim, MaskMode mask);

#ifdef RINGATTN_SM90_TIER
using Sm90FwdKernelEntry = KernelEntry<cudaError_t (*)(const sm90::FwdKernelParams&, int, cudaStream_t)>;
using Sm90BwdKernelEntry = KernelEntry<cudaError_t (*)(const sm90::BwdKernelParams&, int, cudaStream_t)>;
using Sm90BwdDqKernelEntry = KernelEntry<cudaError_t (*)(const sm90::BwdDqKernelParams&, int, cudaStream_t)>;

const Sm90FwdKernelEntry* find_sm90_fwd_kernel(int dtype, int head_dim, MaskMode mask);
const Sm90BwdKernelEntry* find_sm90_bwd_kernel(int dtype, int head_dim, MaskMode mask);
const Sm90BwdDqKernelEntry* find_sm90_bwd_dq_kernel(int dtype, int head_dim, MaskMode mask);
#endif

}  // namespace cuda
}  // namespace ringattn
