// The compiled kernels of the CUDA backend, by (dtype, head dim, variant: mask mode and softcap):
// one table per (tier, pass). The tables and lookups are generated into kernel_registry.cu by
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

// The largest window side the kernels are given. They compute row + diagonal offset +- side in
// int32 (common/mask.h), which a side near INT32_MAX (a common spelling of "unbounded") would
// wrap, silently masking every key of the row. Clamped to 2^30, a right side still reaches every
// key unless a sequence has more than 2^30 queries, a left side every key unless it has more than
// 2^30 keys (without a diagonal shift; the context-parallel shifts move these bounds by at most
// their size), so the clamp changes no mask of a call that fits a GPU's memory with room to spare
// (2^30 keys of one head at head dim 64 are 128 GiB); the int32 arithmetic of such longer
// windowed sequences is a limit of the GPU kernels (docs/api.md).
constexpr int32_t kMaxKernelWindowSide = int32_t{1} << 30;

// The window a call's mask applies: the problem's window with causal as a right bound of 0;
// (-1, -1) when nothing bounds the keys; sides clamped to kMaxKernelWindowSide.
inline MaskWindow call_window(const ringattn_problem& pr) {
  MaskWindow w{-1, -1};
  if (pr.has_window != 0) {
    w.left = pr.window_left < kMaxKernelWindowSide ? pr.window_left : kMaxKernelWindowSide;
    w.right = pr.window_right < kMaxKernelWindowSide ? pr.window_right : kMaxKernelWindowSide;
  }
  if (pr.causal != 0) w.right = 0;
  return w;
}

// Whether a window bounds a side (only then does a diagonal shift change the mask).
inline bool window_bounds_keys(const MaskWindow& w) { return w.left >= 0 || w.right >= 0; }

// Group g's diagonal shifts as the kernels and work lists read them: the caller's array when the
// call's window bounds a side, else nullptr (the shift changes nothing, and is not read).
template <typename Params>
const int32_t* call_diagonal_shift(const Params& p, int g) {
  return window_bounds_keys(call_window(p.problem)) ? p.groups[g].diagonal_shift : nullptr;
}

// Which compiled kernels run a call: a mask mode, and whether they apply the softcap (kLocal only).
struct KernelVariant {
  MaskMode mask = MaskMode::kNone;
  bool softcap = false;
  bool operator==(const KernelVariant& o) const { return mask == o.mask && softcap == o.softcap; }
};

// The variant of a forward or backward call. kNone / kCausal (the fixed-mask kernels) when the
// window is (-1, -1) or (-1, 0) without a diagonal shift and the call has no softcap (and, in the
// forward, no sinks); kLocal otherwise: it takes the window and the shifts at run time, and reads the sinks.
// Softcap is compiled into kLocal kernels only, so a softcapped call without a window runs kLocal
// with the window (-1, -1) or (-1, 0). The backward ignores the sinks (the forward's LSE holds them).
template <typename Params>
KernelVariant kernel_variant(const Params& p, bool forward) {
  const ringattn_problem& pr = p.problem;
  const MaskWindow w = call_window(pr);
  bool shifted = false;
  for (int g = 0; g < pr.num_groups; ++g) shifted = shifted || call_diagonal_shift(p, g) != nullptr;
  const bool softcap = pr.softcap > 0.0f;
  KernelVariant v;
  if (w.left >= 0 || w.right > 0 || shifted || softcap || (forward && pr.sinks != nullptr)) {
    v.mask = MaskMode::kLocal;
    v.softcap = softcap;
  } else {
    v.mask = w.right == 0 ? MaskMode::kCausal : MaskMode::kNone;
  }
  return v;
}

// One compiled kernel with its tile shape: the forward of either tier, tier 2's dK/dV kernel and
// tier 2's deterministic dQ kernel (block_m: query rows, block_n: keys of the kernel's tile).
template <typename LaunchFn>
struct KernelEntry {
  int dtype = -1;  // RINGATTN_DTYPE_*; -1 in the entry ending a table, which matches no lookup
  int head_dim = 0;
  KernelVariant variant;
  int block_m = 0;
  int block_n = 0;
  LaunchFn launch = nullptr;
};

// The row of a kernel whose traits T give its tile shape.
template <typename T, MaskMode kMask, bool kSoftcap, typename LaunchFn>
constexpr KernelEntry<LaunchFn> kernel_entry(int dtype, LaunchFn launch) {
  return KernelEntry<LaunchFn>{dtype, T::kHeadDim, KernelVariant{kMask, kSoftcap}, T::kBlockM, T::kBlockN, launch};
}

using FwdLaunchFn = cudaError_t (*)(const sm80::FwdKernelParams&, int, cudaStream_t);
using Sm80FwdKernelEntry = KernelEntry<FwdLaunchFn>;

using BwdLaunchFn = cudaError_t (*)(const sm80::BwdKernelParams&, int, cudaStream_t);
using BwdPrepFn = cudaError_t (*)(const BwdPrepParams&, cudaStream_t);

// One tier-1 backward instantiation: the dK/dV kernel, the deterministic-mode dQ kernel and the
// dtype's pre/postprocess (bwd_params.h lists the launches).
struct Sm80BwdKernelEntry {
  int dtype = -1;  // as in KernelEntry
  int head_dim = 0;
  KernelVariant variant;
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
template <typename T, typename Q, MaskMode kMask, bool kSoftcap>
constexpr Sm80BwdKernelEntry sm80_bwd_entry(int dtype, BwdLaunchFn dkdv, BwdLaunchFn dq, BwdPrepFn preprocess,
                                            BwdPrepFn postprocess) {
  return Sm80BwdKernelEntry{dtype,
                            T::kHeadDim,
                            KernelVariant{kMask, kSoftcap},
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

// The entry of a table for (dtype, head dim, variant), or nullptr.
template <typename Entry, size_t N>
const Entry* find_entry(const Entry (&table)[N], int dtype, int head_dim, KernelVariant variant) {
  for (const Entry& e : table)
    if (e.dtype == dtype && e.head_dim == head_dim && e.variant == variant) return &e;
  return nullptr;
}

// The lookups (kernel_registry.cu): nullptr when no kernel is compiled for the combination.
const Sm80FwdKernelEntry* find_sm80_fwd_kernel(int dtype, int head_dim, KernelVariant variant);
const Sm80BwdKernelEntry* find_sm80_bwd_kernel(int dtype, int head_dim, KernelVariant variant);

#ifdef RINGATTN_SM90_TIER
using Sm90FwdKernelEntry = KernelEntry<cudaError_t (*)(const sm90::FwdKernelParams&, int, cudaStream_t)>;
using Sm90BwdKernelEntry = KernelEntry<cudaError_t (*)(const sm90::BwdKernelParams&, int, cudaStream_t)>;
using Sm90BwdDqKernelEntry = KernelEntry<cudaError_t (*)(const sm90::BwdDqKernelParams&, int, cudaStream_t)>;

const Sm90FwdKernelEntry* find_sm90_fwd_kernel(int dtype, int head_dim, KernelVariant variant);
const Sm90BwdKernelEntry* find_sm90_bwd_kernel(int dtype, int head_dim, KernelVariant variant);
const Sm90BwdDqKernelEntry* find_sm90_bwd_dq_kernel(int dtype, int head_dim, KernelVariant variant);
#endif

}  // namespace cuda
}  // namespace ringattn
