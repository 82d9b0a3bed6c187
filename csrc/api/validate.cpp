#include "api/validate.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

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
    return BackendLimits{false, true, true, false, &cuda::supports_head_dim, 8, 16};
  }
  return BackendLimits{true, true, true, true, &cpu::supports_head_dim, 1, 1};
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
  if (t.rows > 1) {
    if (t.row_stride < head_dim)
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                   "%s: expected a row (token) stride >= head_dim (%d) elements, got %lld",
                   arg_name(t, "row_stride").c_str(), head_dim, static_cast<long long>(t.row_stride));
    if (t.row_stride % lim.stride_alignment_elems != 0)
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                   "%s: expected a multiple of %d elements on this device, got %lld",
                   arg_name(t, "row_stride").c_str(), lim.stride_alignment_elems,
                   static_cast<long long>(t.row_stride));
  }
  if (t.num_heads > 1) {
    if (t.head_stride < head_dim)
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                   "%s: expected a head stride >= head_dim (%d) elements, got %lld",
                   arg_name(t, "head_stride").c_str(), head_dim, static_cast<long long>(t.head_stride));
    if (t.head_stride % lim.stride_alignment_elems != 0)
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT,
                   "%s: expected a multiple of %d elements on this device, got %lld",
                   arg_name(t, "head_stride").c_str(), lim.stride_alignment_elems,
                   static_cast<long long>(t.head_stride));
  }
  return RINGATTN_STATUS_OK;
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

#define RINGATTN_TRY(expr)                          \
  do {                                              \
    const ringattn_status _s = (expr);              \
    if (_s != RINGATTN_STATUS_OK) return _s;        \
  } while (0)

}  // namespace

ringattn_status validate_fwd(const ringattn_fwd_params* params, bool need_data) {
  if (params == nullptr) return fail(RINGATTN_STATUS_INVALID_ARGUMENT, "params: expected a non-NULL pointer, got NULL");
  const ringattn_fwd_params& p = *params;
  RINGATTN_TRY(check_exec(p.exec));
  RINGATTN_TRY(check_problem(p.problem, p.exec, need_data));
  const ringattn_problem& pr = p.problem;
  const BackendLimits lim = limits_for(p.exec.device_type);
  RINGATTN_TRY(check_tensor({"k", -1, p.k, pr.total_k, p.k_row_stride, p.k_head_stride, pr.num_heads_k},
                            pr.head_dim, lim, need_data));
  RINGATTN_TRY(check_tensor({"v", -1, p.v, pr.total_k, p.v_row_stride, p.v_head_stride, pr.num_heads_k},
                            pr.head_dim, lim, need_data));
  if (p.groups == nullptr)
    return fail(RINGATTN_STATUS_INVALID_ARGUMENT, "groups: expected a non-NULL array of num_groups entries, got NULL");
  for (int g = 0; g < pr.num_groups; ++g) {
    const ringattn_fwd_group& gr = p.groups[g];
    RINGATTN_TRY(check_group_common(g, gr.total_q, gr.max_seqlen_q, gr.cu_seqlens_q, gr.softmax_lse, need_data));
    RINGATTN_TRY(check_tensor({"q", g, gr.q, gr.total_q, gr.q_row_stride, gr.q_head_stride, pr.num_heads_q},
                              pr.head_dim, lim, need_data));
    RINGATTN_TRY(check_tensor({"out", g, gr.out, gr.total_q, gr.out_row_stride, gr.out_head_stride, pr.num_heads_q},
                              pr.head_dim, lim, need_data));
  }
  return RINGATTN_STATUS_OK;
}

ringattn_status validate_bwd(const ringattn_bwd_params* params, bool need_data) {
  if (params == nullptr) return fail(RINGATTN_STATUS_INVALID_ARGUMENT, "params: expected a non-NULL pointer, got NULL");
  const ringattn_bwd_params& p = *params;
  RINGATTN_TRY(check_exec(p.exec));
  RINGATTN_TRY(check_problem(p.problem, p.exec, need_data));
  const ringattn_problem& pr = p.problem;
  const BackendLimits lim = limits_for(p.exec.device_type);
  if (p.deterministic != 0 && p.deterministic != 1)
    return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "deterministic: expected 0 or 1, got %d", p.deterministic);
  const int hk = pr.num_heads_k;
  RINGATTN_TRY(check_tensor({"k", -1, p.k, pr.total_k, p.k_row_stride, p.k_head_stride, hk}, pr.head_dim, lim, need_data));
  RINGATTN_TRY(check_tensor({"v", -1, p.v, pr.total_k, p.v_row_stride, p.v_head_stride, hk}, pr.head_dim, lim, need_data));
  RINGATTN_TRY(check_tensor({"dk", -1, p.dk, pr.total_k, p.dk_row_stride, p.dk_head_stride, hk}, pr.head_dim, lim, need_data));
  RINGATTN_TRY(check_tensor({"dv", -1, p.dv, pr.total_k, p.dv_row_stride, p.dv_head_stride, hk}, pr.head_dim, lim, need_data));
  if (p.groups == nullptr)
    return fail(RINGATTN_STATUS_INVALID_ARGUMENT, "groups: expected a non-NULL array of num_groups entries, got NULL");
  const int hq = pr.num_heads_q;
  for (int g = 0; g < pr.num_groups; ++g) {
    const ringattn_bwd_group& gr = p.groups[g];
    RINGATTN_TRY(check_group_common(g, gr.total_q, gr.max_seqlen_q, gr.cu_seqlens_q, gr.softmax_lse, need_data));
    RINGATTN_TRY(check_tensor({"q", g, gr.q, gr.total_q, gr.q_row_stride, gr.q_head_stride, hq}, pr.head_dim, lim, need_data));
    RINGATTN_TRY(check_tensor({"out", g, gr.out, gr.total_q, gr.out_row_stride, gr.out_head_stride, hq}, pr.head_dim, lim, need_data));
    RINGATTN_TRY(check_tensor({"dout", g, gr.dout, gr.total_q, gr.dout_row_stride, gr.dout_head_stride, hq}, pr.head_dim, lim, need_data));
    RINGATTN_TRY(check_tensor({"dq", g, gr.dq, gr.total_q, gr.dq_row_stride, gr.dq_head_stride, hq}, pr.head_dim, lim, need_data));
  }
  return RINGATTN_STATUS_OK;
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
