#include "api/validate.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common/backends.h"
#include "common/error.h"

namespace ringattn {

const char* dtype_name(int dtype) {
  switch (dtype) {
    case RINGATTN_DTYPE_FP32: return "fp32";
    case RINGATTN_DTYPE_FP16: return "fp16";
    case RINGATTN_DTYPE_BF16: return "bf16";
    case RINGATTN_DTYPE_FP64: return "fp64";
    default: return "unknown";
  }
}

size_t dtype_size(int dtype) {
  switch (dtype) {
    case RINGATTN_DTYPE_FP32: return 4;
    case RINGATTN_DTYPE_FP16: return 2;
    case RINGATTN_DTYPE_BF16: return 2;
    case RINGATTN_DTYPE_FP64: return 8;
    default: return 0;
  }
}

BackendLimits limits_for(int device_type) {
  if (device_type == RINGATTN_DEVICE_CUDA) {
    // 16-byte vector loads: 8 half elements.
    return BackendLimits{false, true, true, false, &cuda::supports_head_dim, 8, 16, cuda::kSupportsWindow,
                         cuda::kSupportsSoftcap, cuda::kSupportsSinks, cuda::kSupportsDiagonalShift};
  }
  return BackendLimits{true, true, true, true, &cpu::supports_head_dim, 1, 1, cpu::kSupportsWindow,
                       cpu::kSupportsSoftcap, cpu::kSupportsSinks, cpu::kSupportsDiagonalShift};
}

namespace {

constexpr int64_t kMaxTokens = (int64_t{1} << 31) - 1;

const char* device_name(int device_type) {
  return device_type == RINGATTN_DEVICE_CUDA ? "CUDA" : "CPU";
}

std::string supported_dtypes(const BackendLimits& lim) {
  std::string s;
  auto add = [&](bool ok, const char* name) {
    if (!ok) return;
    if (!s.empty()) s += ", ";
    s += name;
  };
  add(lim.fp32, "fp32");
  add(lim.fp16, "fp16");
  add(lim.bf16, "bf16");
  add(lim.fp64, "fp64");
  return s;
}

bool dtype_ok(const BackendLimits& lim, int dtype) {
  switch (dtype) {
    case RINGATTN_DTYPE_FP32: return lim.fp32;
    case RINGATTN_DTYPE_FP16: return lim.fp16;
    case RINGATTN_DTYPE_BF16: return lim.bf16;
    case RINGATTN_DTYPE_FP64: return lim.fp64;
    default: return false;
  }
}

std::string supported_head_dims(int device_type) {
  if (device_type != RINGATTN_DEVICE_CUDA) return "a multiple of 8 in [8, 256]";
  std::string s = "one of {";
  int count = 0;
  for (int d = 8; d <= 512; d += 8) {
    if (!cuda::supports_head_dim(d)) continue;
    s += (count++ ? ", " : "") + std::to_string(d);
  }
  return s + "} (compiled into this build)";
}

// A tensor [extent0, num_heads, head_dim] addressed by (ptr, row_stride, head_stride).
struct TensorArg {
  const char* name;
  int group;  // -1 for shared tensors
  const void* ptr;
  int64_t rows;
  int64_t row_stride;
  int64_t head_stride;
  int num_heads;
};

std::string arg_name(const TensorArg& t, const char* field) {
  std::string s = t.name;
  if (field) s += std::string(".") + field;
  if (t.group >= 0) s += " (group " + std::to_string(t.group) + ")";
  return s;
}

// One stride of a tensor (its row or head stride): at least head_dim elements and a multiple of the
// backend's stride alignment. what: how the first message names the stride ("row (token)", "head").
ringattn_status check_stride(const TensorArg& t, int64_t stride, const char* field, const char* what, int head_dim,
                             const BackendLimits& lim) {
  if (stride < head_dim)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "%s: expected a %s stride >= head_dim (%d) elements, got %lld",
                 arg_name(t, field).c_str(), what, head_dim, static_cast<long long>(stride));
  if (stride % lim.stride_alignment_elems != 0)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "%s: expected a multiple of %d elements on this device, got %lld",
                 arg_name(t, field).c_str(), lim.stride_alignment_elems, static_cast<long long>(stride));
  return RINGATTN_STATUS_OK;
}

ringattn_status check_tensor(const TensorArg& t, int head_dim, const BackendLimits& lim,
                             bool need_data) {
  if (t.rows > 0 && need_data) {
    if (t.ptr == nullptr)
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "%s: expected a non-NULL data pointer for %lld rows, got NULL",
                   arg_name(t, nullptr).c_str(), static_cast<long long>(t.rows));
    if (reinterpret_cast<uintptr_t>(t.ptr) % static_cast<uintptr_t>(lim.pointer_alignment_bytes) != 0)
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                   "%s: expected a data pointer aligned to %d bytes, got address %p (misaligned by %llu bytes)",
                   arg_name(t, nullptr).c_str(), lim.pointer_alignment_bytes, t.ptr,
                   static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(t.ptr) %
                                                   static_cast<uintptr_t>(lim.pointer_alignment_bytes)));
  }
  ringattn_status s = RINGATTN_STATUS_OK;
  if (t.rows > 1) s = check_stride(t, t.row_stride, "row_stride", "row (token)", head_dim, lim);
  if (s == RINGATTN_STATUS_OK && t.num_heads > 1) s = check_stride(t, t.head_stride, "head_stride", "head", head_dim, lim);
  return s;
}

ringattn_status check_exec(const ringattn_exec& exec) {
  if (exec.device_type != RINGATTN_DEVICE_CPU && exec.device_type != RINGATTN_DEVICE_CUDA)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                 "exec.device_type: expected RINGATTN_DEVICE_CPU (0) or RINGATTN_DEVICE_CUDA (1), got %d",
                 exec.device_type);
  if (exec.device_type == RINGATTN_DEVICE_CUDA) {
    if (!cuda::compiled())
      return fail(RINGATTN_STATUS_UNSUPPORTED,
                  "exec.device_type: CUDA requested, but this libringattn was built without CUDA "
                  "(RINGATTN_ENABLE_CUDA=OFF); rebuild it with the CUDA toolkit to run on a GPU");
    if (exec.device_index < 0)
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "exec.device_index: expected >= 0, got %d",
                   exec.device_index);
    if (exec.tier != RINGATTN_TIER_AUTO && exec.tier != RINGATTN_TIER_SM80 && exec.tier != RINGATTN_TIER_SM90)
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                   "exec.tier: expected RINGATTN_TIER_AUTO (0), RINGATTN_TIER_SM80 (80) or RINGATTN_TIER_SM90 (90), "
                   "got %d",
                   exec.tier);
    if (reinterpret_cast<uintptr_t>(exec.metadata_errors) % alignof(uint32_t) != 0)
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                   "exec.metadata_errors: expected NULL or a %zu-byte aligned pointer, got address %p",
                   alignof(uint32_t), static_cast<void*>(exec.metadata_errors));
  }
  return RINGATTN_STATUS_OK;
}

ringattn_status check_problem(const ringattn_problem& p, const ringattn_exec& exec, bool need_data) {
  const BackendLimits lim = limits_for(exec.device_type);
  if (p.dtype < RINGATTN_DTYPE_FP32 || p.dtype > RINGATTN_DTYPE_FP64 || !dtype_ok(lim, p.dtype))
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "dtype: expected one of %s on %s, got %s (%d)",
                 supported_dtypes(lim).c_str(), device_name(exec.device_type), dtype_name(p.dtype), p.dtype);
  if (p.batch_size < 1)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                 "batch_size: expected >= 1 (cu_seqlens of length >= 2), got %d", p.batch_size);
  if (p.num_heads_k < 1)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "num_heads_k: expected >= 1, got %d", p.num_heads_k);
  if (p.num_heads_q < 1 || p.num_heads_q % p.num_heads_k != 0)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                 "num_heads_q: expected a positive multiple of num_heads_k (%d), got %d", p.num_heads_k,
                 p.num_heads_q);
  if (!lim.supports_head_dim(p.head_dim))
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "head_dim: expected %s on %s, got %d",
                 supported_head_dims(exec.device_type).c_str(), device_name(exec.device_type), p.head_dim);
  if (p.num_groups < 1 || p.num_groups > RINGATTN_MAX_GROUPS)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "num_groups: expected 1 to %d, got %d", RINGATTN_MAX_GROUPS,
                 p.num_groups);
  if (p.default_softmax_scale != 0 && p.default_softmax_scale != 1)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                 "default_softmax_scale: expected 0 (use softmax_scale) or 1 (use 1/sqrt(head_dim)), got %d",
                 p.default_softmax_scale);
  if (p.default_softmax_scale == 1 && p.softmax_scale != 0.0f)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                 "softmax_scale: expected 0 with default_softmax_scale = 1 (the scale is then 1/sqrt(head_dim)), "
                 "got %g",
                 static_cast<double>(p.softmax_scale));
  // A NaN, inf, zero, negative or subnormal scale is an error, never the default: the default
  // has its own flag.
  if (p.default_softmax_scale == 0 &&
      !(std::isfinite(p.softmax_scale) && p.softmax_scale >= std::numeric_limits<float>::min()))
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                 "softmax_scale: expected a finite float32 >= %g (positive, not subnormal; set "
                 "default_softmax_scale = 1 for 1/sqrt(head_dim)), got %g",
                 static_cast<double>(std::numeric_limits<float>::min()), static_cast<double>(p.softmax_scale));
  if (p.causal != 0 && p.causal != 1)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "causal: expected 0 or 1, got %d", p.causal);
  if (p.has_window != 0 && p.has_window != 1)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "has_window: expected 0 or 1, got %d", p.has_window);
  if (p.has_window == 1) {
    if (p.window_left < -1)
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "window_left: expected -1 (unbounded) or >= 0, got %d",
                   p.window_left);
    if (p.window_right < -1)
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "window_right: expected -1 (unbounded) or >= 0, got %d",
                   p.window_right);
    if (p.causal == 1 && p.window_right > 0)
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                   "window_right: expected -1 or 0 with causal = 1 (causal means no key right of the diagonal), "
                   "got %d",
                   p.window_right);
  }
  if (!(std::isfinite(p.softcap) && p.softcap >= 0.0f))
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "softcap: expected a finite float32 >= 0 (0 = off), got %g",
                 static_cast<double>(p.softcap));
  // A softcap so small that softmax_scale * q.k / softcap overflows for ordinary scores is a
  // mistake, not a cap: the same normal-magnitude rule as the scale.
  if (p.softcap != 0.0f && p.softcap < std::numeric_limits<float>::min())
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                 "softcap: expected 0 (off) or a float32 >= %g (positive, not subnormal), got %g",
                 static_cast<double>(std::numeric_limits<float>::min()), static_cast<double>(p.softcap));
  if (p.sinks != nullptr && reinterpret_cast<uintptr_t>(p.sinks) % alignof(float) != 0)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                 "sinks: expected NULL or a %zu-byte aligned pointer to num_heads_q (%d) float32 values, got "
                 "address %p",
                 alignof(float), p.num_heads_q, static_cast<const void*>(p.sinks));
  // Features the backend does not implement: refused, never ignored.
  if (p.has_window == 1 && (p.window_left >= 0 || p.window_right >= 0) && !lim.supports_window)
    return failf(RINGATTN_STATUS_UNSUPPORTED,
                 "window_left/window_right: expected no window (has_window = 0, or both -1) on %s, where local "
                 "(sliding-window) attention is not implemented yet, got (%d, %d)",
                 device_name(exec.device_type), p.window_left, p.window_right);
  if (p.softcap != 0.0f && !lim.supports_softcap)
    return failf(RINGATTN_STATUS_UNSUPPORTED,
                 "softcap: expected 0 on %s, where logit softcapping is not implemented yet, got %g",
                 device_name(exec.device_type), static_cast<double>(p.softcap));
  if (p.sinks != nullptr && !lim.supports_sinks)
    return failf(RINGATTN_STATUS_UNSUPPORTED,
                 "sinks: expected NULL on %s, where sink logits are not implemented yet, got address %p",
                 device_name(exec.device_type), static_cast<const void*>(p.sinks));
  if (p.total_k < 0 || p.total_k > kMaxTokens)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "total_k: expected 0 to %lld, got %lld",
                 static_cast<long long>(kMaxTokens), static_cast<long long>(p.total_k));
  if (p.max_seqlen_k < 0)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "max_seqlen_k: expected >= 0, got %d", p.max_seqlen_k);
  if (need_data && p.cu_seqlens_k == nullptr)
    return fail(RINGATTN_STATUS_INVALID_ARGUMENT, "cu_seqlens_k: expected a non-NULL pointer, got NULL");
  return RINGATTN_STATUS_OK;
}

// Checks shared to the per-group parts of forward and backward.
ringattn_status check_group_common(int g, int64_t total_q, int max_seqlen_q, const int32_t* cu_seqlens_q,
                                   const void* lse, bool need_data) {
  if (total_q < 0 || total_q > kMaxTokens)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "total_q (group %d): expected 0 to %lld, got %lld", g,
                 static_cast<long long>(kMaxTokens), static_cast<long long>(total_q));
  if (max_seqlen_q < 0)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "max_seqlen_q (group %d): expected >= 0, got %d", g,
                 max_seqlen_q);
  if (need_data && cu_seqlens_q == nullptr)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                 "cu_seqlens_q (group %d): expected a non-NULL pointer, got NULL", g);
  if (need_data && total_q > 0 && lse == nullptr)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                 "softmax_lse (group %d): expected a non-NULL pointer, got NULL", g);
  return RINGATTN_STATUS_OK;
}

// A group's diagonal_shift: NULL, or an aligned int32 [B] on a backend that implements shifts.
ringattn_status check_diagonal_shift(int g, const int32_t* shift, const BackendLimits& lim, const ringattn_exec& exec) {
  if (shift == nullptr) return RINGATTN_STATUS_OK;
  if (!lim.supports_diagonal_shift)
    return failf(RINGATTN_STATUS_UNSUPPORTED,
                 "diagonal_shift (group %d): expected NULL on %s, where shifted masks are not implemented yet, got "
                 "address %p",
                 g, device_name(exec.device_type), static_cast<const void*>(shift));
  if (reinterpret_cast<uintptr_t>(shift) % alignof(int32_t) != 0)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                 "diagonal_shift (group %d): expected NULL or a %zu-byte aligned pointer to batch_size int32 values, "
                 "got address %p",
                 g, alignof(int32_t), static_cast<const void*>(shift));
  return RINGATTN_STATUS_OK;
}

// ---- overlapping memory ----
//
// The memory of a tensor argument as byte segments: `seg` bytes at base + i * s1 + j * s2 for
// i < n1, j < n2 (s1 >= s2 >= 0; a dim of one entry has stride 0). Every tensor of the ABI has
// this form: [rows, heads, head_dim] with a contiguous head dim, the LSE and the metadata arrays
// (one segment), the workspace (one segment).
struct Footprint {
  const char* name = "";
  int group = -1;  // -1 for shared tensors
  uintptr_t base = 0;
  int64_t n1 = 1, s1 = 0, n2 = 1, s2 = 0, seg = 0;

  bool empty() const { return seg == 0 || base == 0; }
  // The bounding byte range [lo, hi).
  __int128 lo() const { return static_cast<__int128>(base); }
  __int128 hi() const {
    return lo() + static_cast<__int128>(n1 - 1) * s1 + static_cast<__int128>(n2 - 1) * s2 + seg;
  }
};

// The argument's name as messages write it, e.g. "out (group 1)". Only built for a message.
std::string footprint_name(const Footprint& f) {
  std::string s = f.name;
  if (f.group >= 0) s += " (group " + std::to_string(f.group) + ")";
  return s;
}

// A contiguous range of `bytes` bytes.
Footprint range_footprint(const char* name, int group, const void* ptr, int64_t bytes) {
  Footprint f;
  f.name = name;
  f.group = group;
  f.base = reinterpret_cast<uintptr_t>(ptr);
  f.seg = ptr != nullptr && bytes > 0 ? bytes : 0;
  return f;
}

// The error word a GPU call may write (exec.metadata_errors): an output like the others. Nothing
// on CPU, which ignores it.
Footprint metadata_errors_footprint(const ringattn_exec& exec) {
  return range_footprint("exec.metadata_errors", -1,
                         exec.device_type == RINGATTN_DEVICE_CUDA ? exec.metadata_errors : nullptr,
                         static_cast<int64_t>(sizeof(uint32_t)));
}

// A [rows, heads, head_dim] tensor, in canonical form: dims of one entry dropped, a dim whose
// stride equals the segment merged into it (so a dense tensor is one segment), the larger
// stride first.
Footprint tensor_footprint(const TensorArg& t, int head_dim, size_t elem_bytes) {
  Footprint f;
  f.name = t.name;
  f.group = t.group;
  f.base = reinterpret_cast<uintptr_t>(t.ptr);
  if (t.ptr == nullptr || t.rows <= 0) return f;  // empty: no byte is addressed
  const int64_t e = static_cast<int64_t>(elem_bytes);
  f.seg = static_cast<int64_t>(head_dim) * e;
  int64_t n[2] = {t.rows, t.num_heads};
  int64_t s[2] = {t.rows > 1 ? t.row_stride * e : 0, t.num_heads > 1 ? t.head_stride * e : 0};
  for (int pass = 0; pass < 2; ++pass)
    for (int d = 0; d < 2; ++d)
      if (n[d] > 1 && s[d] == f.seg) {  // dim d lays its segments end to end: one longer segment
        f.seg *= n[d];
        n[d] = 1;
        s[d] = 0;
      }
  for (int d = 0; d < 2; ++d)
    if (n[d] <= 1) n[d] = 1, s[d] = 0;
  const int big = s[0] >= s[1] ? 0 : 1;
  f.n1 = n[big];
  f.s1 = s[big];
  f.n2 = n[1 - big];
  f.s2 = s[1 - big];
  return f;
}

enum class Overlap { kNo, kYes, kUnknown };

// Whether some integer d in [d_lo, d_hi] has lower < d * s < upper (s >= 0).
bool multiple_in_open_range(__int128 d_lo, __int128 d_hi, int64_t s, __int128 lower, __int128 upper) {
  if (d_lo > d_hi) return false;
  if (s == 0) return d_lo <= 0 && 0 <= d_hi && lower < 0 && 0 < upper;
  // Smallest d with d * s > lower: floor(lower / s) + 1.
  __int128 q = lower / s;
  if (lower % s != 0 && lower < 0) --q;
  const __int128 d = std::max<__int128>(q + 1, d_lo);
  return d <= d_hi && d * s < upper;
}

// More combinations than this of the enumerated dim: the check gives up (reports kUnknown).
constexpr int64_t kMaxEnumerated = int64_t{1} << 16;

// Whether d1 in [lo1, hi1], d2 in [lo2, hi2] exist with lower < delta + d1 * s1 + d2 * s2 <
// upper; the dim with fewer values is enumerated, the other solved for.
Overlap lattice_hits_range(__int128 lo1, __int128 hi1, int64_t s1, __int128 lo2, __int128 hi2, int64_t s2,
                           __int128 delta, __int128 lower, __int128 upper) {
  if (hi1 - lo1 > hi2 - lo2) {
    std::swap(lo1, lo2);
    std::swap(hi1, hi2);
    std::swap(s1, s2);
  }
  if (hi1 - lo1 >= kMaxEnumerated) return Overlap::kUnknown;
  for (__int128 d1 = lo1; d1 <= hi1; ++d1) {
    const __int128 shift = delta + d1 * s1;
    if (multiple_in_open_range(lo2, hi2, s2, lower - shift, upper - shift)) return Overlap::kYes;
  }
  return Overlap::kNo;
}

// Whether two footprints share a byte. Exact when one of them is a single segment or both have
// the same strides (aliases, and views into one packed buffer such as dk/dv of a [tokens, 2,
// heads, head_dim] gradient); kUnknown for interleaved layouts with different strides.
Overlap footprints_overlap(const Footprint& a, const Footprint& b) {
  if (a.empty() || b.empty()) return Overlap::kNo;
  if (a.hi() <= b.lo() || b.hi() <= a.lo()) return Overlap::kNo;
  // Segment A(i, j) = [x, x + a.seg) and B(i', j') = [y, y + b.seg) share a byte iff
  // -b.seg < y - x < a.seg.
  const __int128 delta = b.lo() - a.lo();
  if (a.n1 == 1 && a.n2 == 1)  // y - x = delta + i' s1 + j' s2
    return lattice_hits_range(0, b.n1 - 1, b.s1, 0, b.n2 - 1, b.s2, delta, -b.seg, a.seg);
  if (b.n1 == 1 && b.n2 == 1)  // y - x = delta - i s1 - j s2
    return lattice_hits_range(-(a.n1 - 1), 0, a.s1, -(a.n2 - 1), 0, a.s2, delta, -b.seg, a.seg);
  if (a.s1 == b.s1 && a.s2 == b.s2)  // y - x = delta + (i' - i) s1 + (j' - j) s2
    return lattice_hits_range(-(a.n1 - 1), b.n1 - 1, a.s1, -(a.n2 - 1), b.n2 - 1, a.s2, delta, -b.seg, a.seg);
  return Overlap::kUnknown;
}

// Whether a footprint maps two of its own elements to one byte: some (d1, d2) != (0, 0) with
// |d1 * s1 + d2 * s2| < seg. By symmetry d1 >= 0, and d2 >= 1 where d1 = 0.
Overlap footprint_overlaps_itself(const Footprint& f) {
  if (f.empty()) return Overlap::kNo;
  if (f.n1 > 1 && f.s1 < f.seg) return Overlap::kYes;  // d1 = 1, d2 = 0 (s1 >= s2 >= 0)
  if (f.n2 > 1 && f.s2 < f.seg) return Overlap::kYes;  // d1 = 0, d2 = 1
  if (f.n1 == 1 || f.n2 == 1) return Overlap::kNo;
  // d1 >= 1, d2 of either sign.
  return lattice_hits_range(1, f.n1 - 1, f.s1, -(f.n2 - 1), f.n2 - 1, f.s2, 0, -f.seg, f.seg);
}

std::string describe(const Footprint& f) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "bytes [%p, %p)", reinterpret_cast<void*>(f.base),
                reinterpret_cast<void*>(static_cast<uintptr_t>(f.hi())));
  return buf;
}

// Outputs must neither overlap themselves, nor each other, nor any input; a call that breaks
// this would write one element twice, or read an input another task has already overwritten.
// Checked where it is exact and cheap (see footprints_overlap); layouts it cannot decide pass.
ringattn_status check_no_overlap(const std::vector<Footprint>& outputs, const std::vector<Footprint>& inputs) {
  for (size_t i = 0; i < outputs.size(); ++i) {
    const Footprint& o = outputs[i];
    if (footprint_overlaps_itself(o) == Overlap::kYes)
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                   "%s: expected an output whose rows and heads do not overlap, got strides that map two "
                   "elements to one address",
                   footprint_name(o).c_str());
    for (size_t j = 0; j < i; ++j)
      if (footprints_overlap(outputs[j], o) == Overlap::kYes)
        return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                     "%s: expected an output that shares no memory with the output %s, got overlapping %s and %s",
                     footprint_name(o).c_str(), footprint_name(outputs[j]).c_str(), describe(o).c_str(),
                     describe(outputs[j]).c_str());
    for (const Footprint& in : inputs)
      if (footprints_overlap(in, o) == Overlap::kYes)
        return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                     "%s: expected an output that shares no memory with the input %s, got overlapping %s and %s",
                     footprint_name(o).c_str(), footprint_name(in).c_str(), describe(o).c_str(),
                     describe(in).c_str());
  }
  return RINGATTN_STATUS_OK;
}

// The small arrays a call reads: cu_seqlens_k and the sinks [Hq] fp32, and per group cu_seqlens_q,
// seqused_k and diagonal_shift [B] (the optional ones when given).
template <typename Group>
void add_metadata_footprints(const ringattn_problem& pr, const Group* groups, std::vector<Footprint>& inputs) {
  const int64_t cu_bytes = static_cast<int64_t>(pr.batch_size + 1) * 4;
  const int64_t per_sequence_bytes = static_cast<int64_t>(pr.batch_size) * 4;
  inputs.push_back(range_footprint("cu_seqlens_k", -1, pr.cu_seqlens_k, cu_bytes));
  inputs.push_back(range_footprint("sinks", -1, pr.sinks, static_cast<int64_t>(pr.num_heads_q) * 4));
  for (int g = 0; g < pr.num_groups; ++g) {
    inputs.push_back(range_footprint("cu_seqlens_q", g, groups[g].cu_seqlens_q, cu_bytes));
    inputs.push_back(range_footprint("seqused_k", g, groups[g].seqused_k, per_sequence_bytes));
    inputs.push_back(range_footprint("diagonal_shift", g, groups[g].diagonal_shift, per_sequence_bytes));
  }
}

int64_t lse_bytes(const ringattn_problem& pr, int64_t total_q) { return static_cast<int64_t>(pr.num_heads_q) * total_q * 4; }

// The TensorArg of the tensor `name` of a call's params, K/V (ringattn_kv) or group `obj`: its
// pointer obj.name and strides obj.name_row_stride / obj.name_head_stride, named "name" in messages.
#define RINGATTN_TENSOR_ARG(obj, name, group, rows, heads) \
  TensorArg { #name, group, (obj).name, rows, (obj).name##_row_stride, (obj).name##_head_stride, heads }

#define RINGATTN_TRY(expr)                          \
  do {                                              \
    const ringattn_status _s = (expr);              \
    if (_s != RINGATTN_STATUS_OK) return _s;        \
  } while (0)

// check_tensor on each of `tensors`, in order.
ringattn_status check_tensors(std::initializer_list<TensorArg> tensors, int head_dim, const BackendLimits& lim,
                              bool need_data) {
  for (const TensorArg& t : tensors) RINGATTN_TRY(check_tensor(t, head_dim, lim, need_data));
  return RINGATTN_STATUS_OK;
}

// The groups array, then per group its common fields and its tensors (group_tensors(g), in order).
template <typename Group, typename GroupTensors>
ringattn_status check_groups(const Group* groups, int num_groups, bool need_data, const GroupTensors& group_tensors,
                             int head_dim, const BackendLimits& lim, const ringattn_exec& exec) {
  if (groups == nullptr)
    return fail(RINGATTN_STATUS_INVALID_ARGUMENT, "groups: expected a non-NULL array of num_groups entries, got NULL");
  for (int g = 0; g < num_groups; ++g) {
    const Group& gr = groups[g];
    RINGATTN_TRY(check_group_common(g, gr.total_q, gr.max_seqlen_q, gr.cu_seqlens_q, gr.softmax_lse, need_data));
    RINGATTN_TRY(check_diagonal_shift(g, gr.diagonal_shift, lim, exec));
    for (const TensorArg& t : group_tensors(g)) RINGATTN_TRY(check_tensor(t, head_dim, lim, need_data));
  }
  return RINGATTN_STATUS_OK;
}

// The footprint lists of a call, room reserved, with K and V as its first inputs.
void start_footprints(int num_groups, Footprint k, Footprint v, std::vector<Footprint>& outputs,
                      std::vector<Footprint>& inputs) {
  outputs.reserve(2 * static_cast<size_t>(num_groups) + 4);
  inputs.reserve(7 * static_cast<size_t>(num_groups) + 4);
  inputs.push_back(std::move(k));
  inputs.push_back(std::move(v));
}

// check_no_overlap after adding the metadata arrays (inputs), the workspace and the metadata error
// word (outputs).
template <typename Params>
ringattn_status check_no_overlap_with_metadata(const Params& p, std::vector<Footprint>& outputs,
                                               std::vector<Footprint>& inputs) {
  add_metadata_footprints(p.problem, p.groups, inputs);
  outputs.push_back(range_footprint("workspace", -1, p.workspace, static_cast<int64_t>(std::min<size_t>(
                                                                   p.workspace_size, size_t{1} << 62))));
  outputs.push_back(metadata_errors_footprint(p.exec));
  return check_no_overlap(outputs, inputs);
}

// The checks every call starts with: the params pointer, its exec, its problem.
template <typename Params>
ringattn_status check_call_start(const Params* params, bool need_data) {
  if (params == nullptr) return fail(RINGATTN_STATUS_INVALID_ARGUMENT, "params: expected a non-NULL pointer, got NULL");
  RINGATTN_TRY(check_exec(params->exec));
  return check_problem(params->problem, params->exec, need_data);
}

}  // namespace

ringattn_status validate_fwd(const ringattn_fwd_params* params, bool need_data) {
  RINGATTN_TRY(check_call_start(params, need_data));
  const ringattn_fwd_params& p = *params;
  const ringattn_problem& pr = p.problem;
  const BackendLimits lim = limits_for(p.exec.device_type);
  const int d = pr.head_dim, hk = pr.num_heads_k, hq = pr.num_heads_q;
  const TensorArg k = RINGATTN_TENSOR_ARG(p.kv, k, -1, pr.total_k, hk);
  const TensorArg v = RINGATTN_TENSOR_ARG(p.kv, v, -1, pr.total_k, hk);
  // The group's q and out.
  auto group_tensors = [&](int g) {
    const ringattn_fwd_group& gr = p.groups[g];
    return std::array<TensorArg, 2>{RINGATTN_TENSOR_ARG(gr, q, g, gr.total_q, hq),
                                    RINGATTN_TENSOR_ARG(gr, out, g, gr.total_q, hq)};
  };
  RINGATTN_TRY(check_tensors({k, v}, d, lim, need_data));
  RINGATTN_TRY(check_groups(p.groups, pr.num_groups, need_data, group_tensors, d, lim, p.exec));
  if (!need_data) return RINGATTN_STATUS_OK;
  const size_t e = dtype_size(pr.dtype);
  std::vector<Footprint> outputs, inputs;
  start_footprints(pr.num_groups, tensor_footprint(k, d, e), tensor_footprint(v, d, e), outputs, inputs);
  for (int g = 0; g < pr.num_groups; ++g) {
    const auto t = group_tensors(g);  // q, out
    inputs.push_back(tensor_footprint(t[0], d, e));
    outputs.push_back(tensor_footprint(t[1], d, e));
    outputs.push_back(range_footprint("softmax_lse", g, p.groups[g].softmax_lse, lse_bytes(pr, p.groups[g].total_q)));
  }
  return check_no_overlap_with_metadata(p, outputs, inputs);
}

ringattn_status validate_bwd(const ringattn_bwd_params* params, bool need_data) {
  RINGATTN_TRY(check_call_start(params, need_data));
  const ringattn_bwd_params& p = *params;
  const ringattn_problem& pr = p.problem;
  const BackendLimits lim = limits_for(p.exec.device_type);
  if (p.deterministic != 0 && p.deterministic != 1)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "deterministic: expected 0 or 1, got %d", p.deterministic);
  const int d = pr.head_dim, hk = pr.num_heads_k, hq = pr.num_heads_q;
  const TensorArg k = RINGATTN_TENSOR_ARG(p.kv, k, -1, pr.total_k, hk);
  const TensorArg v = RINGATTN_TENSOR_ARG(p.kv, v, -1, pr.total_k, hk);
  const TensorArg dk = RINGATTN_TENSOR_ARG(p, dk, -1, pr.total_k, hk);
  const TensorArg dv = RINGATTN_TENSOR_ARG(p, dv, -1, pr.total_k, hk);
  // The group's q, out, dout and dq.
  auto group_tensors = [&](int g) {
    const ringattn_bwd_group& gr = p.groups[g];
    return std::array<TensorArg, 4>{
        RINGATTN_TENSOR_ARG(gr, q, g, gr.total_q, hq), RINGATTN_TENSOR_ARG(gr, out, g, gr.total_q, hq),
        RINGATTN_TENSOR_ARG(gr, dout, g, gr.total_q, hq), RINGATTN_TENSOR_ARG(gr, dq, g, gr.total_q, hq)};
  };
  RINGATTN_TRY(check_tensors({k, v, dk, dv}, d, lim, need_data));
  RINGATTN_TRY(check_groups(p.groups, pr.num_groups, need_data, group_tensors, d, lim, p.exec));
  if (!need_data) return RINGATTN_STATUS_OK;
  const size_t e = dtype_size(pr.dtype);
  std::vector<Footprint> outputs, inputs;
  start_footprints(pr.num_groups, tensor_footprint(k, d, e), tensor_footprint(v, d, e), outputs, inputs);
  outputs.push_back(tensor_footprint(dk, d, e));
  outputs.push_back(tensor_footprint(dv, d, e));
  for (int g = 0; g < pr.num_groups; ++g) {
    const auto t = group_tensors(g);  // q, out, dout, dq
    for (int i = 0; i < 3; ++i) inputs.push_back(tensor_footprint(t[i], d, e));
    inputs.push_back(range_footprint("softmax_lse", g, p.groups[g].softmax_lse, lse_bytes(pr, p.groups[g].total_q)));
    outputs.push_back(tensor_footprint(t[3], d, e));
  }
  return check_no_overlap_with_metadata(p, outputs, inputs);
}

namespace {
ringattn_status check_cu_seqlens(const int32_t* cu, int batch_size, int64_t total, const char* name, int group,
                                 const char* pass_name) {
  std::string where = group >= 0 ? std::string(" (group ") + std::to_string(group) + ")" : std::string();
  if (cu[0] != 0)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "%s: %s[0]%s: expected 0, got %d", pass_name, name, where.c_str(), cu[0]);
  for (int b = 1; b <= batch_size; ++b) {
    if (cu[b] < cu[b - 1])
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                   "%s: %s[%d]%s: expected >= %s[%d] (%d) (cumulative lengths never decrease), got %d", pass_name,
                   name, b, where.c_str(), name, b - 1, cu[b - 1], cu[b]);
  }
  if (cu[batch_size] > total)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                 "%s: %s[%d]%s: expected <= the number of tokens in the tensor (%lld), got %d", pass_name, name,
                 batch_size, where.c_str(), static_cast<long long>(total), cu[batch_size]);
  return RINGATTN_STATUS_OK;
}
}  // namespace

ringattn_status validate_metadata(const ringattn_problem& pr, const int32_t* cu_seqlens_k,
                                  const int32_t* const* cu_seqlens_q, const int32_t* const* seqused_k,
                                  const int64_t* total_q, const char* pass_name) {
  RINGATTN_TRY(check_cu_seqlens(cu_seqlens_k, pr.batch_size, pr.total_k, "cu_seqlens_k", -1, pass_name));
  for (int g = 0; g < pr.num_groups; ++g) {
    RINGATTN_TRY(check_cu_seqlens(cu_seqlens_q[g], pr.batch_size, total_q[g], "cu_seqlens_q", g, pass_name));
    if (seqused_k[g] == nullptr) continue;
    for (int b = 0; b < pr.batch_size; ++b) {
      const int32_t len_k = cu_seqlens_k[b + 1] - cu_seqlens_k[b];
      const int32_t used = seqused_k[g][b];
      if (used < 0 || used > len_k)
        return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                     "%s: seqused_k[%d] (group %d): expected 0 to the key length of sequence %d from cu_seqlens_k (%d), got %d",
                     pass_name, b, g, b, len_k, used);
    }
  }
  return RINGATTN_STATUS_OK;
}

}  // namespace ringattn
