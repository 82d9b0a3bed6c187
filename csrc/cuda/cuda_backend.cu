// Host dispatch of the CUDA backend: capability checks, workspace sizing, the work list, and
// one flat table from (dtype, head dim, causal) to a compiled kernel instantiation.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "common/backends.h"
#include "common/error.h"
#include "cuda/bwd_params.h"
#include "cuda/bwd_prepost.h"
#include "cuda/bwd_scheduler.h"
#include "cuda/fwd_params.h"
#include "cuda/sm80/bwd_traits.h"
#include "cuda/sm80/fwd_traits.h"
#include "cuda/tile_scheduler.h"
#ifdef RINGATTN_SM90_TIER
#include "cuda/sm90/bwd_dq_traits.h"
#include "cuda/sm90/bwd_params.h"
#include "cuda/sm90/bwd_traits.h"
#include "cuda/sm90/fwd_launch.h"
#include "cuda/sm90/tma_host.h"
#endif

namespace ringattn {
namespace cuda {
namespace {

// The four entries of one head dim: fp16/bf16 x causal or not, each made by make<Element, D,
// causal, dtype>() (one of the *_entry functions below).
#define RINGATTN_KERNEL_ENTRIES(make, D)                                            \
  make<__half, D, false, RINGATTN_DTYPE_FP16>(), make<__half, D, true, RINGATTN_DTYPE_FP16>(), \
      make<__nv_bfloat16, D, false, RINGATTN_DTYPE_BF16>(), make<__nv_bfloat16, D, true, RINGATTN_DTYPE_BF16>(),

// The entry of a dispatch table for (dtype, head dim, causal), or nullptr. A table's sentinel
// (dtype -1, for tables that may otherwise be empty) matches nothing.
template <typename Entry, size_t N>
const Entry* find_entry(const Entry (&table)[N], int dtype, int head_dim, bool causal) {
  for (const Entry& e : table)
    if (e.dtype == dtype && e.head_dim == head_dim && e.causal == causal) return &e;
  return nullptr;
}

// One compiled kernel with its tile shape: the forward of either tier, tier 2's dK/dV kernel.
template <typename LaunchFn>
struct KernelEntry {
  int dtype;
  int head_dim;
  bool causal;
  int block_m;
  int block_n;
  LaunchFn launch;
};

using FwdLaunchFn = cudaError_t (*)(const FwdKernelParams&, int, cudaStream_t);
using FwdKernelEntry = KernelEntry<FwdLaunchFn>;

template <typename Element, int kHeadDim, bool kCausal, int kDtype>
constexpr FwdKernelEntry sm80_fwd_entry() {
  using T = typename sm80::FwdConfig<Element, kHeadDim>::Traits;
  return FwdKernelEntry{kDtype, kHeadDim, kCausal, T::kBlockM, T::kBlockN, &sm80::launch_grouped_fwd<T, kCausal>};
}

// The compiled tier-1 forward kernels (CMake defines RINGATTN_HDIM_<D> for each head dim built).
const FwdKernelEntry kFwdKernels[] = {
#ifdef RINGATTN_HDIM_64
    RINGATTN_KERNEL_ENTRIES(sm80_fwd_entry, 64)
#endif
#ifdef RINGATTN_HDIM_128
    RINGATTN_KERNEL_ENTRIES(sm80_fwd_entry, 128)
#endif
#ifdef RINGATTN_HDIM_256
    RINGATTN_KERNEL_ENTRIES(sm80_fwd_entry, 256)
#endif
};

const FwdKernelEntry* find_fwd_kernel(int dtype, int head_dim, bool causal) {
  return find_entry(kFwdKernels, dtype, head_dim, causal);
}

#ifdef RINGATTN_SM90_TIER
// The compiled tier-2 (sm90a: TMA + wgmma, warp specialised) forward kernels.
using Sm90FwdKernelEntry = KernelEntry<cudaError_t (*)(const sm90::FwdKernelParams&, int, cudaStream_t)>;

template <typename Element, int kHeadDim, bool kCausal, int kDtype>
constexpr Sm90FwdKernelEntry sm90_fwd_entry() {
  using T = typename sm90::FwdConfig<Element, kHeadDim>::Traits;
  return Sm90FwdKernelEntry{kDtype, kHeadDim, kCausal, T::kBlockM, T::kBlockN, &sm90::launch_grouped_fwd<T, kCausal>};
}

const Sm90FwdKernelEntry kSm90FwdKernels[] = {
#ifdef RINGATTN_HDIM_64
    RINGATTN_KERNEL_ENTRIES(sm90_fwd_entry, 64)
#endif
#ifdef RINGATTN_HDIM_128
    RINGATTN_KERNEL_ENTRIES(sm90_fwd_entry, 128)
#endif
#ifdef RINGATTN_HDIM_256
    RINGATTN_KERNEL_ENTRIES(sm90_fwd_entry, 256)
#endif
    Sm90FwdKernelEntry{-1, 0, false, 0, 0, nullptr}};

const Sm90FwdKernelEntry* find_sm90_fwd_kernel(int dtype, int head_dim, bool causal) {
  return find_entry(kSm90FwdKernels, dtype, head_dim, causal);
}

// The compiled tier-2 backward dK/dV kernels (dQ through TMA reduce-add into dq_accum; the
// deterministic mode adds the tier-2 dQ kernel below).
using Sm90BwdKernelEntry = KernelEntry<cudaError_t (*)(const sm90::BwdKernelParams&, int, cudaStream_t)>;

template <typename Element, int kHeadDim, bool kCausal, int kDtype>
constexpr Sm90BwdKernelEntry sm90_bwd_entry() {
  using T = typename sm90::BwdConfig<Element, kHeadDim>::Traits;
  return Sm90BwdKernelEntry{kDtype, kHeadDim, kCausal, T::kBlockM, T::kBlockN, &sm90::launch_grouped_bwd_dkdv<T, kCausal>};
}

const Sm90BwdKernelEntry kSm90BwdKernels[] = {
#ifdef RINGATTN_HDIM_64
    RINGATTN_KERNEL_ENTRIES(sm90_bwd_entry, 64)
#endif
#ifdef RINGATTN_HDIM_128
    RINGATTN_KERNEL_ENTRIES(sm90_bwd_entry, 128)
#endif
    Sm90BwdKernelEntry{-1, 0, false, 0, 0, nullptr}};

const Sm90BwdKernelEntry* find_sm90_bwd_kernel(int dtype, int head_dim, bool causal) {
  return find_entry(kSm90BwdKernels, dtype, head_dim, causal);
}

// The compiled tier-2 dQ kernels of the deterministic mode (block_m: query rows per CTA,
// block_n: keys per step).
using Sm90BwdDqKernelEntry = KernelEntry<cudaError_t (*)(const sm90::BwdDqKernelParams&, int, cudaStream_t)>;

template <typename Element, int kHeadDim, bool kCausal, int kDtype>
constexpr Sm90BwdDqKernelEntry sm90_bwd_dq_entry() {
  using T = typename sm90::BwdDqConfig<Element, kHeadDim>::Traits;
  return Sm90BwdDqKernelEntry{kDtype, kHeadDim, kCausal, T::kBlockM, T::kBlockN, &sm90::launch_grouped_bwd_dq<T, kCausal>};
}

const Sm90BwdDqKernelEntry kSm90BwdDqKernels[] = {
#ifdef RINGATTN_HDIM_64
    RINGATTN_KERNEL_ENTRIES(sm90_bwd_dq_entry, 64)
#endif
#ifdef RINGATTN_HDIM_128
    RINGATTN_KERNEL_ENTRIES(sm90_bwd_dq_entry, 128)
#endif
    Sm90BwdDqKernelEntry{-1, 0, false, 0, 0, nullptr}};

const Sm90BwdDqKernelEntry* find_sm90_bwd_dq_kernel(int dtype, int head_dim, bool causal) {
  return find_entry(kSm90BwdDqKernels, dtype, head_dim, causal);
}

// One operand's tensor map; false with "<name>: <reason>" in *why when TMA cannot address it.
bool encode_operand_map(CUtensorMap* map, const std::string& name, const void* base, const ringattn_problem& pr,
                        int64_t tokens, int heads, int64_t row_stride, int64_t head_stride, int box_rows,
                        std::string* why) {
  std::string reason;
  if (sm90::encode_token_head_map(map, base, pr.dtype == RINGATTN_DTYPE_BF16, pr.head_dim, tokens, heads, row_stride,
                                  head_stride, box_rows, &reason))
    return true;
  *why = name + ": " + reason;
  return false;
}
#endif

using BwdLaunchFn = cudaError_t (*)(const BwdKernelParams&, int, cudaStream_t);
using BwdPrepFn = cudaError_t (*)(const BwdPrepParams&, cudaStream_t);

// One backward instantiation: the dK/dV kernel, the deterministic-mode dQ kernel and the
// dtype's pre/postprocess (bwd_params.h lists the launches).
struct BwdKernelEntry {
  int dtype;
  int head_dim;
  bool causal;
  int block_m;     // dK/dV kernel: query rows per inner step
  int block_n;     // dK/dV kernel: keys per CTA
  int dq_block_m;  // dQ kernel: query rows per CTA
  int dq_block_n;  // dQ kernel: keys per step
  int smem_bytes;  // the larger of the two kernels'
  BwdLaunchFn dkdv;
  BwdLaunchFn dq;
  BwdPrepFn preprocess;
  BwdPrepFn postprocess;
};

template <typename Element, int kHeadDim, bool kCausal, int kDtype>
constexpr BwdKernelEntry sm80_bwd_entry() {
  using T = typename sm80::BwdConfig<Element, kHeadDim>::Traits;
  using Q = typename sm80::BwdConfig<Element, kHeadDim>::DqTraits;
  return BwdKernelEntry{kDtype,
                        kHeadDim,
                        kCausal,
                        T::kBlockM,
                        T::kBlockN,
                        Q::kBlockM,
                        Q::kBlockN,
                        T::kSmemBytes > Q::kSmemBytes ? T::kSmemBytes : Q::kSmemBytes,
                        &sm80::launch_grouped_bwd_dkdv<T, kCausal>,
                        &sm80::launch_grouped_bwd_dq<Q, kCausal>,
                        &launch_bwd_preprocess<Element>,
                        &launch_bwd_postprocess<Element>};
}

// The compiled tier-1 backward kernels.
const BwdKernelEntry kBwdKernels[] = {
#ifdef RINGATTN_HDIM_64
    RINGATTN_KERNEL_ENTRIES(sm80_bwd_entry, 64)
#endif
#ifdef RINGATTN_HDIM_128
    RINGATTN_KERNEL_ENTRIES(sm80_bwd_entry, 128)
#endif
#ifdef RINGATTN_HDIM_256
    RINGATTN_KERNEL_ENTRIES(sm80_bwd_entry, 256)
#endif
};

const BwdKernelEntry* find_bwd_kernel(int dtype, int head_dim, bool causal) {
  return find_entry(kBwdKernels, dtype, head_dim, causal);
}

ringattn_status cuda_fail(cudaError_t err, const char* what) {
  return failf(RINGATTN_STATUS_CUDA_ERROR, "%s failed: %s (%s)", what, cudaGetErrorName(err), cudaGetErrorString(err));
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
  cudaError_t error() const { return err_; }

 private:
  int previous_ = -1;
  cudaError_t err_ = cudaSuccess;
};

// Upper bound on the query-tile work items of a forward or backward call's groups.
template <typename Params>
int64_t query_tile_capacity(const Params& p, int block_m) {
  std::vector<int64_t> total_q(p.problem.num_groups);
  for (int g = 0; g < p.problem.num_groups; ++g) total_q[g] = p.groups[g].total_q;
  return work_capacity(total_q.data(), p.problem.num_groups, p.problem.batch_size, block_m);
}

// The query-tile work list's arguments (forward kernel, and the backward's dQ kernel) for the
// groups of a forward or backward call, carved out of `workspace`.
template <typename Params>
SchedulerArgs query_tile_scheduler(const Params& p, int block_m, int block_n, int64_t capacity, void* workspace) {
  const ringattn_problem& pr = p.problem;
  SchedulerArgs sched{};
  for (int g = 0; g < pr.num_groups; ++g) {
    sched.cu_seqlens_q[g] = p.groups[g].cu_seqlens_q;
    sched.seqused_k[g] = p.groups[g].seqused_k;
    sched.total_q[g] = static_cast<int32_t>(p.groups[g].total_q);
  }
  sched.cu_seqlens_k = pr.cu_seqlens_k;
  sched.total_k = static_cast<int32_t>(pr.total_k);
  sched.num_groups = pr.num_groups;
  sched.batch_size = pr.batch_size;
  sched.block_m = block_m;
  sched.block_n = block_n;
  sched.causal = pr.causal;
  sched.capacity = static_cast<int32_t>(capacity);
  carve_scheduler_workspace(workspace, pr.num_groups, pr.batch_size, capacity, &sched);
  return sched;
}

}  // namespace

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
  return find_fwd_kernel(RINGATTN_DTYPE_BF16, head_dim, false) != nullptr ||
         find_fwd_kernel(RINGATTN_DTYPE_FP16, head_dim, false) != nullptr;
}

namespace {

// Whether a device can run our kernels. Checked once per device (cudaGetDeviceProperties is
// too slow for every call) and cached with its message.
struct DeviceSupport {
  bool checked = false;
  ringattn_status status = RINGATTN_STATUS_OK;
  std::string message;
  int cc = 0;  // compute capability, major * 10 + minor
};

ringattn_status check_device_uncached(int device_index, int* cc_out) {
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

// Checks the device once and caches the answer; *cc (optional) gets its compute capability.
ringattn_status check_device(int device_index, int* cc = nullptr) {
  constexpr int kMaxDevices = 64;
  static std::mutex mutex;
  static DeviceSupport cache[kMaxDevices];
  int scratch = 0;
  if (cc == nullptr) cc = &scratch;
  if (device_index >= kMaxDevices) return check_device_uncached(device_index, cc);
  std::lock_guard<std::mutex> lock(mutex);
  DeviceSupport& entry = cache[device_index];
  *cc = entry.cc;
  if (!entry.checked) {
    entry.status = check_device_uncached(device_index, &entry.cc);
    *cc = entry.cc;
    entry.message = entry.status == RINGATTN_STATUS_OK ? std::string() : std::string(last_error());
    // A missing device can appear later (CUDA_VISIBLE_DEVICES is read once, but a driver
    // error may be transient): cache only definite answers about an existing device.
    entry.checked = entry.status == RINGATTN_STATUS_OK || entry.status == RINGATTN_STATUS_UNSUPPORTED;
    return entry.status;
  }
  if (entry.status != RINGATTN_STATUS_OK) return fail(entry.status, entry.message);
  return RINGATTN_STATUS_OK;
}

}  // namespace

ringattn_status check_support(int device_index, int dtype, int head_dim) {
  const ringattn_status s = check_device(device_index);
  if (s != RINGATTN_STATUS_OK) return s;
  if (find_fwd_kernel(dtype, head_dim, false) == nullptr)
    return failf(RINGATTN_STATUS_UNSUPPORTED, "no GPU kernel compiled for dtype %d and head_dim %d", dtype, head_dim);
  return RINGATTN_STATUS_OK;
}

ringattn_status fwd_workspace_size(const ringattn_fwd_params& p, size_t* bytes) {
  const FwdKernelEntry* e = find_fwd_kernel(p.problem.dtype, p.problem.head_dim, p.problem.causal != 0);
  if (e == nullptr)
    return failf(RINGATTN_STATUS_UNSUPPORTED, "no GPU forward kernel compiled for dtype %d, head_dim %d, causal %d",
                 p.problem.dtype, p.problem.head_dim, p.problem.causal);
  int block_m = e->block_m;
#ifdef RINGATTN_SM90_TIER
  // Either tier may run the call: size the work list for the smaller query tile.
  if (const Sm90FwdKernelEntry* e90 = find_sm90_fwd_kernel(p.problem.dtype, p.problem.head_dim, p.problem.causal != 0))
    block_m = e90->block_m < block_m ? e90->block_m : block_m;
#endif
  *bytes = scheduler_workspace_bytes(p.problem.num_groups, p.problem.batch_size, query_tile_capacity(p, block_m));
  return RINGATTN_STATUS_OK;
}

namespace {

size_t align256(size_t x) { return (x + 255) & ~size_t{255}; }

// Where everything of one backward call lives in its workspace (byte offsets, 256-aligned).
struct BwdWorkspaceLayout {
  size_t lse_log2[RINGATTN_MAX_GROUPS];  // [Hq, total_q] fp32
  size_t di[RINGATTN_MAX_GROUPS];        // [Hq, total_q] fp32
  size_t dq_accum[RINGATTN_MAX_GROUPS];  // [total_q, Hq, D] fp32
  size_t kv_scheduler;                   // dK/dV work list
  size_t q_scheduler;                    // deterministic dQ work list (the forward's)
  size_t total;
  int64_t kv_capacity;
  int64_t q_capacity;  // 0 unless the dQ kernel runs
};

// dQ through the separate dQ kernel (plain stores, fixed order) instead of fp32 atomics from the
// dK/dV kernel. Always in deterministic mode; also the default at head dim 128, where it measured
// as fast or faster on an H100 (zigzag rank 0, L=65536, N=8: 56.0 vs 61.8 ms for the fused call;
// L=16384, N=2: 14.4 vs 14.6 ms) while the atomics win at 64 and 256 (docs/perf-notes.md).
bool use_dq_kernel(const ringattn_bwd_params& p) { return p.deterministic != 0 || p.problem.head_dim == 128; }

BwdWorkspaceLayout bwd_layout(const ringattn_bwd_params& p, const BwdKernelEntry& e) {
  const ringattn_problem& pr = p.problem;
  BwdWorkspaceLayout l{};
  size_t at = 0;
  for (int g = 0; g < pr.num_groups; ++g) {
    const size_t rows = static_cast<size_t>(p.groups[g].total_q) * static_cast<size_t>(pr.num_heads_q);
    l.lse_log2[g] = at;
    at += align256(rows * sizeof(float));
    l.di[g] = at;
    at += align256(rows * sizeof(float));
    l.dq_accum[g] = at;
    at += align256(rows * static_cast<size_t>(pr.head_dim) * sizeof(float));
  }
  l.kv_capacity = bwd_kv_capacity(pr.total_k, pr.batch_size, e.block_n);
  l.kv_scheduler = at;
  at += align256(bwd_scheduler_workspace_bytes(pr.batch_size, l.kv_capacity));
  l.q_scheduler = at;
  if (use_dq_kernel(p)) {
    l.q_capacity = query_tile_capacity(p, e.dq_block_m);
    at += align256(scheduler_workspace_bytes(pr.num_groups, pr.batch_size, l.q_capacity));
  }
  l.total = at;
  return l;
}

const BwdKernelEntry* find_bwd_kernel_or_fail(const ringattn_problem& pr) {
  const BwdKernelEntry* e = find_bwd_kernel(pr.dtype, pr.head_dim, pr.causal != 0);
  if (e == nullptr)
    failf(RINGATTN_STATUS_UNSUPPORTED, "no GPU backward kernel compiled for dtype %d, head_dim %d, causal %d",
          pr.dtype, pr.head_dim, pr.causal);
  return e;
}

}  // namespace

ringattn_status bwd_workspace_size(const ringattn_bwd_params& p, size_t* bytes) {
  const BwdKernelEntry* e = find_bwd_kernel_or_fail(p.problem);
  if (e == nullptr) return RINGATTN_STATUS_UNSUPPORTED;
  *bytes = bwd_layout(p, *e).total;
  return RINGATTN_STATUS_OK;
}

#ifdef RINGATTN_SM90_TIER
namespace {
// Q, dO, K and V tensor maps of a tier-2 backward kernel (the dK/dV or the dQ kernel), with boxes
// of block_m query rows and block_n keys; false (with the reason) when TMA cannot address an operand.
bool encode_bwd_tensor_maps(const ringattn_bwd_params& p, int block_m, int block_n, sm90::BwdOperandMaps* kp,
                            std::string* why) {
  const ringattn_problem& pr = p.problem;
  for (int g = 0; g < pr.num_groups; ++g) {
    const ringattn_bwd_group& src = p.groups[g];
    if (src.total_q == 0) continue;
    const std::string prefix = "groups[" + std::to_string(g) + "].";
    if (!encode_operand_map(&kp->tma_q[g], prefix + "q", src.q, pr, src.total_q, pr.num_heads_q, src.q_row_stride,
                            src.q_head_stride, block_m, why) ||
        !encode_operand_map(&kp->tma_do[g], prefix + "dout", src.dout, pr, src.total_q, pr.num_heads_q,
                            src.dout_row_stride, src.dout_head_stride, block_m, why))
      return false;
  }
  return encode_operand_map(&kp->tma_k, "k", p.k, pr, pr.total_k, pr.num_heads_k, p.k_row_stride, p.k_head_stride,
                            block_n, why) &&
         encode_operand_map(&kp->tma_v, "v", p.v, pr, pr.total_k, pr.num_heads_k, p.v_row_stride, p.v_head_stride,
                            block_n, why);
}
}  // namespace
#endif

ringattn_status grouped_bwd(const ringattn_bwd_params& p) {
  const ringattn_problem& pr = p.problem;
  ringattn_status s = check_support(p.exec.device_index, pr.dtype, pr.head_dim);
  if (s != RINGATTN_STATUS_OK) return s;
  const BwdKernelEntry* e = find_bwd_kernel_or_fail(pr);
  if (e == nullptr) return RINGATTN_STATUS_UNSUPPORTED;
  const BwdWorkspaceLayout layout = bwd_layout(p, *e);
  const int64_t kv_ctas = layout.kv_capacity * pr.num_heads_k;
  const int64_t q_ctas = layout.q_capacity * pr.num_heads_q;
  if (kv_ctas > INT32_MAX || q_ctas > INT32_MAX)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                 "total_k / total_q: %lld key blocks x %d KV heads or %lld query tiles x %d heads exceed the grid "
                 "limit of %d CTAs",
                 static_cast<long long>(layout.kv_capacity), pr.num_heads_k, static_cast<long long>(layout.q_capacity),
                 pr.num_heads_q, INT32_MAX);

  if (reinterpret_cast<uintptr_t>(p.workspace) % 16 != 0)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "workspace: expected a 16-byte aligned pointer, got %p",
                 p.workspace);

  DeviceGuard guard(p.exec.device_index);
  if (guard.error() != cudaSuccess) return cuda_fail(guard.error(), "cudaSetDevice");
  int max_smem = 0;
  cudaError_t err = cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, p.exec.device_index);
  if (err != cudaSuccess) return cuda_fail(err, "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  if (max_smem < e->smem_bytes)
    return failf(RINGATTN_STATUS_UNSUPPORTED,
                 "the GPU backward kernel for head_dim %d needs %d bytes of shared memory per block; GPU %d allows %d",
                 pr.head_dim, e->smem_bytes, p.exec.device_index, max_smem);
  cudaStream_t stream = static_cast<cudaStream_t>(p.exec.stream);
  char* ws = static_cast<char*>(p.workspace);
  const float softmax_scale =
      pr.default_softmax_scale ? 1.f / std::sqrt(static_cast<float>(pr.head_dim)) : pr.softmax_scale;

  // ---- pre/postprocess params ----
  BwdPrepParams prep{};
  for (int g = 0; g < pr.num_groups; ++g) {
    const ringattn_bwd_group& src = p.groups[g];
    BwdPrepGroupArgs& dst = prep.groups[g];
    dst.out = src.out;
    dst.dout = src.dout;
    dst.lse = src.softmax_lse;
    dst.dq = src.dq;
    dst.ws.lse_log2 = reinterpret_cast<float*>(ws + layout.lse_log2[g]);
    dst.ws.di = reinterpret_cast<float*>(ws + layout.di[g]);
    dst.ws.dq_accum = reinterpret_cast<float*>(ws + layout.dq_accum[g]);
    dst.out_row_stride = src.out_row_stride;
    dst.out_head_stride = src.out_head_stride;
    dst.dout_row_stride = src.dout_row_stride;
    dst.dout_head_stride = src.dout_head_stride;
    dst.dq_row_stride = src.dq_row_stride;
    dst.dq_head_stride = src.dq_head_stride;
    dst.total_q = static_cast<int32_t>(src.total_q);
  }
  prep.dk = p.dk;
  prep.dv = p.dv;
  prep.dk_row_stride = p.dk_row_stride;
  prep.dk_head_stride = p.dk_head_stride;
  prep.dv_row_stride = p.dv_row_stride;
  prep.dv_head_stride = p.dv_head_stride;
  prep.cu_seqlens_k = pr.cu_seqlens_k;
  prep.total_k = static_cast<int32_t>(pr.total_k);
  prep.batch_size = pr.batch_size;
  prep.num_groups = pr.num_groups;
  prep.num_heads_q = pr.num_heads_q;
  prep.num_heads_k = pr.num_heads_k;
  prep.head_dim = pr.head_dim;
  prep.softmax_scale = softmax_scale;

  // ---- dK/dV work list ----
  BwdSchedulerArgs kv_sched{};
  for (int g = 0; g < pr.num_groups; ++g) {
    kv_sched.cu_seqlens_q[g] = p.groups[g].cu_seqlens_q;
    kv_sched.seqused_k[g] = p.groups[g].seqused_k;
    kv_sched.total_q[g] = static_cast<int32_t>(p.groups[g].total_q);
  }
  kv_sched.cu_seqlens_k = pr.cu_seqlens_k;
  kv_sched.total_k = static_cast<int32_t>(pr.total_k);
  kv_sched.num_groups = pr.num_groups;
  kv_sched.batch_size = pr.batch_size;
  kv_sched.block_m = e->block_m;
  kv_sched.block_n = e->block_n;
  kv_sched.causal = pr.causal;
  kv_sched.capacity = static_cast<int32_t>(layout.kv_capacity);
  carve_bwd_scheduler_workspace(ws + layout.kv_scheduler, pr.batch_size, layout.kv_capacity, &kv_sched);

  // ---- kernel params ----
  BwdKernelParams kp{};
  for (int g = 0; g < pr.num_groups; ++g) {
    const ringattn_bwd_group& src = p.groups[g];
    BwdGroupArgs& dst = kp.groups[g];
    dst.q = src.q;
    dst.dout = src.dout;
    dst.lse_log2 = prep.groups[g].ws.lse_log2;
    dst.di = prep.groups[g].ws.di;
    dst.dq_accum = prep.groups[g].ws.dq_accum;
    dst.cu_seqlens_q = src.cu_seqlens_q;
    dst.seqused_k = src.seqused_k;
    dst.q_row_stride = src.q_row_stride;
    dst.q_head_stride = src.q_head_stride;
    dst.dout_row_stride = src.dout_row_stride;
    dst.dout_head_stride = src.dout_head_stride;
    dst.total_q = static_cast<int32_t>(src.total_q);
  }
  kp.k = p.k;
  kp.v = p.v;
  kp.dk = p.dk;
  kp.dv = p.dv;
  kp.k_row_stride = p.k_row_stride;
  kp.k_head_stride = p.k_head_stride;
  kp.v_row_stride = p.v_row_stride;
  kp.v_head_stride = p.v_head_stride;
  kp.dk_row_stride = p.dk_row_stride;
  kp.dk_head_stride = p.dk_head_stride;
  kp.dv_row_stride = p.dv_row_stride;
  kp.dv_head_stride = p.dv_head_stride;
  kp.cu_seqlens_k = pr.cu_seqlens_k;
  kp.total_k = static_cast<int32_t>(pr.total_k);
  kp.num_groups = pr.num_groups;
  kp.batch_size = pr.batch_size;
  kp.num_heads_q = pr.num_heads_q;
  kp.num_heads_k = pr.num_heads_k;
  kp.q_heads_per_kv_head = pr.num_heads_q / pr.num_heads_k;
  kp.softmax_scale = softmax_scale;
  kp.softmax_scale_log2 = softmax_scale * 1.4426950408889634f;
  bool dq_kernel = use_dq_kernel(p);

  // ---- tier 2 (sm90a) dK/dV kernel where it applies (see ringattn_tier) ----
  int64_t dkdv_ctas = kv_ctas;
#ifdef RINGATTN_SM90_TIER
  const Sm90BwdKernelEntry* e90 = nullptr;
  const Sm90BwdDqKernelEntry* e90_dq = nullptr;  // deterministic mode only
  sm90::BwdKernelParams kp90{};
  sm90::BwdDqKernelParams kp90_dq{};
  if (p.exec.tier != RINGATTN_TIER_SM80) {
    int cc = 0;
    if ((s = check_device(p.exec.device_index, &cc)) != RINGATTN_STATUS_OK) return s;
    std::string why = cc != 90 ? "the GPU is not an sm90 card" : "no tier-2 kernel compiled for this dtype and head_dim";
    const Sm90BwdKernelEntry* cand = cc == 90 ? find_sm90_bwd_kernel(pr.dtype, pr.head_dim, pr.causal != 0) : nullptr;
    if (cand != nullptr && pr.total_k == 0) {
      cand = nullptr;
      why = "total_k is 0";
    }
    if (cand != nullptr) {
      // As in the forward: a refused tensor map is an error, not a reason to run tier 1.
      if (!encode_bwd_tensor_maps(p, cand->block_m, cand->block_n, &kp90.maps, &why))
        return failf(RINGATTN_STATUS_CUDA_ERROR, "tier 2 backward: encoding a TMA tensor map failed: %s",
                     why.c_str());
      e90 = cand;
      if (p.deterministic != 0) {
        e90_dq = find_sm90_bwd_dq_kernel(pr.dtype, pr.head_dim, pr.causal != 0);
        if (e90_dq == nullptr)
          return failf(RINGATTN_STATUS_UNSUPPORTED, "tier 2 backward: no deterministic dQ kernel compiled for head_dim %d",
                       pr.head_dim);
        if (!encode_bwd_tensor_maps(p, e90_dq->block_m, e90_dq->block_n, &kp90_dq.maps, &why))
          return failf(RINGATTN_STATUS_CUDA_ERROR, "tier 2 backward: encoding a TMA tensor map of the dQ kernel failed: %s",
                       why.c_str());
      }
    }
    if (e90 == nullptr && p.exec.tier == RINGATTN_TIER_SM90)
      return failf(RINGATTN_STATUS_UNSUPPORTED,
                   "exec.tier: RINGATTN_TIER_SM90 requested, but tier 2 cannot run this backward: %s", why.c_str());
  }
  if (e90 != nullptr) {
    // Its own K/V block size: the work list shrinks into the workspace sized for tier 1's blocks
    // (bwd_layout), which holds as long as tier 2's blocks are not smaller.
    static_assert(sm90::BwdConfig<__half, 64>::Traits::kBlockN >= sm80::BwdConfig<__half, 64>::Traits::kBlockN &&
                      sm90::BwdConfig<__half, 128>::Traits::kBlockN >= sm80::BwdConfig<__half, 128>::Traits::kBlockN,
                  "tier 2's K/V blocks fit the work list sized for tier 1's");
    const int64_t capacity = bwd_kv_capacity(pr.total_k, pr.batch_size, e90->block_n);
    kv_sched.block_m = e90->block_m;
    kv_sched.block_n = e90->block_n;
    kv_sched.capacity = static_cast<int32_t>(capacity);
    carve_bwd_scheduler_workspace(ws + layout.kv_scheduler, pr.batch_size, capacity, &kv_sched);
    dkdv_ctas = capacity * pr.num_heads_k;
    dq_kernel = p.deterministic != 0;
  }
#else
  if (p.exec.tier == RINGATTN_TIER_SM90)
    return fail(RINGATTN_STATUS_UNSUPPORTED,
                "exec.tier: RINGATTN_TIER_SM90 requested, but this libringattn was built without sm90a kernels "
                "(RINGATTN_CUDA_ARCHS has no 90a)");
#endif
  kp.accumulate_dq = dq_kernel ? 0 : 1;
  kp.kv_items = kv_sched.sorted;
  kp.kv_count = kv_sched.count;
#ifdef RINGATTN_SM90_TIER
  // The dq_accum maps of tier 2's reduce-add, before anything is launched (a refused map writes nothing).
  if (e90 != nullptr && kp.accumulate_dq) {
    for (int g = 0; g < pr.num_groups; ++g) {
      std::string why;
      if (p.groups[g].total_q > 0 &&
          !sm90::encode_accum_map(&kp90.tma_dq[g], kp.groups[g].dq_accum, pr.head_dim, p.groups[g].total_q,
                                  pr.num_heads_q, e90->block_m, &why))
        return failf(RINGATTN_STATUS_CUDA_ERROR, "tier 2 backward: encoding the dq_accum tensor map of group %d failed: %s",
                     g, why.c_str());
    }
  }
#endif

  // ---- dQ kernel (deterministic mode, and the default at some head dims): its work list ----
  SchedulerArgs q_sched{};
  int64_t dq_ctas = q_ctas;
  if (dq_kernel) {
    int dq_block_m = e->dq_block_m, dq_block_n = e->dq_block_n;
    int64_t dq_capacity = layout.q_capacity;
#ifdef RINGATTN_SM90_TIER
    if (e90_dq != nullptr) {
      // Its own query tiles: the work list fits the workspace sized for tier 1's (smaller) tiles.
      static_assert(sm90::BwdDqConfig<__half, 64>::Traits::kBlockM >= sm80::BwdConfig<__half, 64>::DqTraits::kBlockM &&
                        sm90::BwdDqConfig<__half, 128>::Traits::kBlockM >= sm80::BwdConfig<__half, 128>::DqTraits::kBlockM,
                    "tier 2's dQ query tiles fit the work list sized for tier 1's");
      dq_block_m = e90_dq->block_m;
      dq_block_n = e90_dq->block_n;
      dq_capacity = query_tile_capacity(p, dq_block_m);
      dq_ctas = dq_capacity * pr.num_heads_q;
    }
#endif
    q_sched = query_tile_scheduler(p, dq_block_m, dq_block_n, dq_capacity, ws + layout.q_scheduler);
    kp.q_items = q_sched.sorted;
    kp.q_count = q_sched.count;
  }

  if ((err = e->preprocess(prep, stream)) != cudaSuccess) return cuda_fail(err, "launching the backward preprocess");
  if ((err = launch_build_bwd_work_list(kv_sched, stream)) != cudaSuccess)
    return cuda_fail(err, "launching the backward work-list kernel");
#ifdef RINGATTN_SM90_TIER
  if (e90 != nullptr) {
    kp90.base = kp;
    if ((err = e90->launch(kp90, static_cast<int>(dkdv_ctas), stream)) != cudaSuccess)
      return cuda_fail(err, "launching the grouped backward dK/dV kernel (tier 2, sm90a)");
  } else
#endif
      if ((err = e->dkdv(kp, static_cast<int>(dkdv_ctas), stream)) != cudaSuccess)
    return cuda_fail(err, "launching the grouped backward dK/dV kernel");
  if (dq_kernel) {
    if ((err = launch_build_work_list(q_sched, stream)) != cudaSuccess)
      return cuda_fail(err, "launching the backward dQ work-list kernel");
#ifdef RINGATTN_SM90_TIER
    if (e90_dq != nullptr) {
      kp90_dq.base = kp;
      if ((err = e90_dq->launch(kp90_dq, static_cast<int>(dq_ctas), stream)) != cudaSuccess)
        return cuda_fail(err, "launching the grouped backward dQ kernel (tier 2, sm90a)");
    } else
#endif
        if ((err = e->dq(kp, static_cast<int>(dq_ctas), stream)) != cudaSuccess)
      return cuda_fail(err, "launching the grouped backward dQ kernel");
  }
  if ((err = e->postprocess(prep, stream)) != cudaSuccess) return cuda_fail(err, "launching the backward postprocess");
  return RINGATTN_STATUS_OK;
}

namespace {

// Tier-1 kernel parameters of a forward call (tier 2 wraps them).
FwdKernelParams fwd_kernel_params(const ringattn_fwd_params& p, const SchedulerArgs& sched) {
  const ringattn_problem& pr = p.problem;
  FwdKernelParams kp{};
  for (int g = 0; g < pr.num_groups; ++g) {
    const ringattn_fwd_group& src = p.groups[g];
    FwdGroupArgs& dst = kp.groups[g];
    dst.q = src.q;
    dst.out = src.out;
    dst.softmax_lse = src.softmax_lse;
    dst.cu_seqlens_q = src.cu_seqlens_q;
    dst.seqused_k = src.seqused_k;
    dst.q_row_stride = src.q_row_stride;
    dst.q_head_stride = src.q_head_stride;
    dst.out_row_stride = src.out_row_stride;
    dst.out_head_stride = src.out_head_stride;
    dst.total_q = static_cast<int32_t>(src.total_q);
  }
  kp.k = p.k;
  kp.v = p.v;
  kp.k_row_stride = p.k_row_stride;
  kp.k_head_stride = p.k_head_stride;
  kp.v_row_stride = p.v_row_stride;
  kp.v_head_stride = p.v_head_stride;
  kp.cu_seqlens_k = pr.cu_seqlens_k;
  kp.total_k = static_cast<int32_t>(pr.total_k);
  kp.num_groups = pr.num_groups;
  kp.batch_size = pr.batch_size;
  kp.num_heads_q = pr.num_heads_q;
  kp.q_heads_per_kv_head = pr.num_heads_q / pr.num_heads_k;
  kp.softmax_scale = pr.default_softmax_scale ? 1.f / std::sqrt(static_cast<float>(pr.head_dim)) : pr.softmax_scale;
  kp.softmax_scale_log2 = kp.softmax_scale * 1.4426950408889634f;
  kp.work_items = sched.sorted;
  kp.work_count = sched.count;
  return kp;
}

ringattn_status launch_fwd(const ringattn_fwd_params& p, int block_m, int block_n, cudaStream_t stream,
                           FwdKernelParams* kp, int64_t* num_ctas) {
  const ringattn_problem& pr = p.problem;
  const int64_t capacity = query_tile_capacity(p, block_m);
  *num_ctas = capacity * pr.num_heads_q;
  if (*num_ctas > INT32_MAX)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "total_q: %lld query tiles x %d heads exceed the grid limit of %d CTAs",
                 static_cast<long long>(capacity), pr.num_heads_q, INT32_MAX);
  const SchedulerArgs sched = query_tile_scheduler(p, block_m, block_n, capacity, p.workspace);
  *kp = fwd_kernel_params(p, sched);
  const cudaError_t err = launch_build_work_list(sched, stream);
  if (err != cudaSuccess) return cuda_fail(err, "launching the work-list kernel");
  return RINGATTN_STATUS_OK;
}

#ifdef RINGATTN_SM90_TIER
// Tuning switch, read once: RINGATTN_SM90_PINGPONG=0 lets the tier-2 consumer warpgroups issue
// their products independently instead of taking turns (for measuring what ping-pong buys).
bool sm90_pingpong() {
  static const bool on = [] {
    const char* v = std::getenv("RINGATTN_SM90_PINGPONG");
    return v == nullptr || std::string(v) != "0";
  }();
  return on;
}

// Tensor maps of a tier-2 forward call; false (with the reason) when TMA cannot address an operand.
bool encode_fwd_tensor_maps(const ringattn_fwd_params& p, const Sm90FwdKernelEntry& e, sm90::FwdKernelParams* kp,
                            std::string* why) {
  const ringattn_problem& pr = p.problem;
  for (int g = 0; g < pr.num_groups; ++g) {
    const ringattn_fwd_group& src = p.groups[g];
    if (src.total_q == 0) continue;  // no tiles read this map
    if (!encode_operand_map(&kp->tma_q[g], "groups[" + std::to_string(g) + "].q", src.q, pr, src.total_q,
                            pr.num_heads_q, src.q_row_stride, src.q_head_stride, e.block_m, why))
      return false;
  }
  return encode_operand_map(&kp->tma_k, "k", p.k, pr, pr.total_k, pr.num_heads_k, p.k_row_stride, p.k_head_stride,
                            e.block_n, why) &&
         encode_operand_map(&kp->tma_v, "v", p.v, pr, pr.total_k, pr.num_heads_k, p.v_row_stride, p.v_head_stride,
                            e.block_n, why);
}
#endif

}  // namespace

ringattn_status grouped_fwd(const ringattn_fwd_params& p) {
  const ringattn_problem& pr = p.problem;
  ringattn_status s = check_support(p.exec.device_index, pr.dtype, pr.head_dim);
  if (s != RINGATTN_STATUS_OK) return s;
  int cc = 0;
  if ((s = check_device(p.exec.device_index, &cc)) != RINGATTN_STATUS_OK) return s;
  const bool causal = pr.causal != 0;
  DeviceGuard guard(p.exec.device_index);
  if (guard.error() != cudaSuccess) return cuda_fail(guard.error(), "cudaSetDevice");
  cudaStream_t stream = static_cast<cudaStream_t>(p.exec.stream);

#ifdef RINGATTN_SM90_TIER
  // Tier 2 on sm90 cards unless tier 1 is asked for; it needs TMA-addressable operands (16-byte
  // aligned bases, strides in multiples of 8 elements) and a compiled kernel for the shape.
  if (p.exec.tier != RINGATTN_TIER_SM80) {
    const Sm90FwdKernelEntry* e90 = cc == 90 ? find_sm90_fwd_kernel(pr.dtype, pr.head_dim, causal) : nullptr;
    std::string why = cc != 90 ? "the GPU is not an sm90 card" : "no tier-2 kernel compiled for this dtype and head_dim";
    if (e90 != nullptr && pr.total_k > 0) {
      sm90::FwdKernelParams kp90{};
      kp90.pingpong = sm90_pingpong() ? 1 : 0;
      // Every operand the API accepts on a GPU is TMA-addressable (16-byte aligned, strides in
      // multiples of 8 elements), so a refused tensor map is an error, not a reason to run tier 1.
      if (!encode_fwd_tensor_maps(p, *e90, &kp90, &why))
        return failf(RINGATTN_STATUS_CUDA_ERROR, "tier 2 forward: encoding a TMA tensor map failed: %s", why.c_str());
      {
        int64_t num_ctas = 0;
        if ((s = launch_fwd(p, e90->block_m, e90->block_n, stream, &kp90.base, &num_ctas)) != RINGATTN_STATUS_OK)
          return s;
        const cudaError_t err = e90->launch(kp90, static_cast<int>(num_ctas), stream);
        if (err != cudaSuccess) return cuda_fail(err, "launching the grouped forward kernel (tier 2, sm90a)");
        return RINGATTN_STATUS_OK;
      }
    } else if (e90 != nullptr) {
      why = "total_k is 0";
    }
    if (p.exec.tier == RINGATTN_TIER_SM90)
      return failf(RINGATTN_STATUS_UNSUPPORTED, "exec.tier: RINGATTN_TIER_SM90 requested, but tier 2 cannot run this call: %s",
                   why.c_str());
  }
#else
  if (p.exec.tier == RINGATTN_TIER_SM90)
    return fail(RINGATTN_STATUS_UNSUPPORTED,
                "exec.tier: RINGATTN_TIER_SM90 requested, but this libringattn was built without sm90a kernels "
                "(RINGATTN_CUDA_ARCHS has no 90a)");
#endif

  const FwdKernelEntry* e = find_fwd_kernel(pr.dtype, pr.head_dim, causal);
  if (e == nullptr)
    return failf(RINGATTN_STATUS_UNSUPPORTED, "no GPU forward kernel compiled for dtype %d, head_dim %d, causal %d",
                 pr.dtype, pr.head_dim, pr.causal);
  FwdKernelParams kp{};
  int64_t num_ctas = 0;
  if ((s = launch_fwd(p, e->block_m, e->block_n, stream, &kp, &num_ctas)) != RINGATTN_STATUS_OK) return s;
  const cudaError_t err = e->launch(kp, static_cast<int>(num_ctas), stream);
  if (err != cudaSuccess) return cuda_fail(err, "launching the grouped forward kernel");
  return RINGATTN_STATUS_OK;
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
