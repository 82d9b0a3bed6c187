// The C ABI: validate, then dispatch to the CPU or CUDA backend. Nothing here knows kernel
// details; nothing in the backends re-validates.
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "api/validate.h"
#include "common/backends.h"
#include "common/error.h"
#include "ringattn/ringattn.h"

#ifndef RINGATTN_VERSION_STRING
#define RINGATTN_VERSION_STRING "0.0.0"
#endif

using namespace ringattn;

namespace {

// Value checks of cu_seqlens / seqused_k. CPU: always (the data is on the host). CUDA: only
// when problem.check_metadata asks, because it copies to the host and synchronises.
template <typename Params>
ringattn_status check_metadata_values(const Params& p, const char* pass_name) {
  const ringattn_problem& pr = p.problem;
  const int G = pr.num_groups;
  const int B = pr.batch_size;
  std::vector<const int32_t*> cu_q(G), used(G);
  std::vector<int64_t> total_q(G);
  for (int g = 0; g < G; ++g) {
    cu_q[g] = p.groups[g].cu_seqlens_q;
    used[g] = p.groups[g].seqused_k;
    total_q[g] = p.groups[g].total_q;
  }
  if (p.exec.device_type == RINGATTN_DEVICE_CPU)
    return validate_metadata(pr, pr.cu_seqlens_k, cu_q.data(), used.data(), total_q.data(), pass_name);
  if (!pr.check_metadata) return RINGATTN_STATUS_OK;

  // CUDA: copy each array to the host first.
  std::vector<std::vector<int32_t>> host_q(G), host_used(G);
  std::vector<int32_t> host_k(B + 1);
  auto copy = [&](const int32_t* src, int n, int32_t* dst) {
    return cuda::copy_to_host(src, n, dst, p.exec.device_index, p.exec.stream);
  };
  ringattn_status s = copy(pr.cu_seqlens_k, B + 1, host_k.data());
  if (s != RINGATTN_STATUS_OK) return s;
  for (int g = 0; g < G; ++g) {
    host_q[g].resize(B + 1);
    if ((s = copy(cu_q[g], B + 1, host_q[g].data())) != RINGATTN_STATUS_OK) return s;
    cu_q[g] = host_q[g].data();
    if (used[g] != nullptr) {
      host_used[g].resize(B);
      if ((s = copy(used[g], B, host_used[g].data())) != RINGATTN_STATUS_OK) return s;
      used[g] = host_used[g].data();
    }
  }
  return validate_metadata(pr, host_k.data(), cu_q.data(), used.data(), total_q.data(), pass_name);
}

template <typename Fn>
ringattn_status guarded(Fn&& fn) {
  clear_error();
  try {
    return fn();
  } catch (const std::exception& e) {
    return failf(RINGATTN_STATUS_INTERNAL_ERROR, "internal error: %s", e.what());
  } catch (...) {
    return fail(RINGATTN_STATUS_INTERNAL_ERROR, "internal error: unknown exception");
  }
}

// One phrase per ringattn_metadata_error bit (what the condition is, as the host check words it).
struct MetadataErrorPhrase {
  uint32_t bit;
  const char* phrase;
};
constexpr MetadataErrorPhrase kMetadataErrorPhrases[] = {
    {RINGATTN_METADATA_CU_SEQLENS_Q_FIRST, "cu_seqlens_q[0] of some group is not 0"},
    {RINGATTN_METADATA_CU_SEQLENS_Q_DECREASING, "cu_seqlens_q of some group decreases"},
    {RINGATTN_METADATA_CU_SEQLENS_Q_PAST_END,
     "cu_seqlens_q[batch_size] of some group exceeds the group's query tokens (total_q)"},
    {RINGATTN_METADATA_CU_SEQLENS_K_FIRST, "cu_seqlens_k[0] is not 0"},
    {RINGATTN_METADATA_CU_SEQLENS_K_DECREASING, "cu_seqlens_k decreases"},
    {RINGATTN_METADATA_CU_SEQLENS_K_PAST_END, "cu_seqlens_k[batch_size] exceeds the key tokens (total_k)"},
    {RINGATTN_METADATA_SEQUSED_K_RANGE,
     "seqused_k of some group is negative or exceeds its sequence's keys (cu_seqlens_k[b + 1] - cu_seqlens_k[b])"},
};

constexpr uint32_t phrased_bits() {
  uint32_t bits = 0;
  for (const MetadataErrorPhrase& p : kMetadataErrorPhrases) bits |= p.bit;
  return bits;
}
static_assert(phrased_bits() == RINGATTN_METADATA_ALL_ERRORS, "every metadata error bit has a phrase");

// What the forward and backward entry points differ by: their name in messages and their
// validation and backend functions.
template <typename Params>
struct PassFunctions {
  const char* pass_name;       // "forward" / "backward"
  const char* size_function;  // the public workspace-size function, named in the message
  ringattn_status (*validate)(const Params*, bool need_data);
  ringattn_status (*cpu_run)(const Params&);
  ringattn_status (*cuda_workspace_size)(const Params&, size_t*);
  ringattn_status (*cuda_run)(const Params&);
};

const PassFunctions<ringattn_fwd_params> kFwdPass{"forward", "ringattn_fwd_workspace_size", validate_fwd,
                                                  cpu::grouped_fwd, cuda::fwd_workspace_size, cuda::grouped_fwd};
const PassFunctions<ringattn_bwd_params> kBwdPass{"backward", "ringattn_bwd_workspace_size", validate_bwd,
                                                  cpu::grouped_bwd, cuda::bwd_workspace_size, cuda::grouped_bwd};

// A forward or backward call: validate, check the metadata values, then run on the CPU or (after
// checking the caller's workspace) on the GPU.
template <typename Params>
ringattn_status run_pass(const Params* params, const PassFunctions<Params>& fn) {
  return guarded([&]() -> ringattn_status {
    ringattn_status s = fn.validate(params, /*need_data=*/true);
    if (s != RINGATTN_STATUS_OK) return s;
    if ((s = check_metadata_values(*params, fn.pass_name)) != RINGATTN_STATUS_OK) return s;
    if (params->exec.device_type == RINGATTN_DEVICE_CPU) return fn.cpu_run(*params);
    size_t need = 0;
    if ((s = fn.cuda_workspace_size(*params, &need)) != RINGATTN_STATUS_OK) return s;
    if (params->workspace_size < need || (need > 0 && params->workspace == nullptr))
      return failf(RINGATTN_STATUS_INVALID_ARGUMENT, "workspace: expected >= %zu bytes (%s), got %zu bytes at %p",
                   need, fn.size_function, params->workspace_size, params->workspace);
    return fn.cuda_run(*params);
  });
}

// The workspace a forward or backward call needs (0 on the CPU), after validating its shapes.
template <typename Params>
ringattn_status query_workspace_size(const Params* params, size_t* bytes, const PassFunctions<Params>& fn) {
  return guarded([&]() -> ringattn_status {
    if (bytes == nullptr) return fail(RINGATTN_STATUS_INVALID_ARGUMENT, "bytes: expected a non-NULL pointer, got NULL");
    *bytes = 0;
    ringattn_status s = fn.validate(params, /*need_data=*/false);
    if (s != RINGATTN_STATUS_OK) return s;
    if (params->exec.device_type == RINGATTN_DEVICE_CPU) return RINGATTN_STATUS_OK;
    return fn.cuda_workspace_size(*params, bytes);
  });
}

}  // namespace

extern "C" {

RINGATTN_API const char* ringattn_describe_metadata_errors(uint32_t bits) {
  thread_local std::string text;
  text.clear();
  for (const MetadataErrorPhrase& p : kMetadataErrorPhrases) {
    if ((bits & p.bit) == 0) continue;
    if (!text.empty()) text += "; ";
    text += p.phrase;
  }
  const uint32_t unknown = bits & ~static_cast<uint32_t>(RINGATTN_METADATA_ALL_ERRORS);
  if (unknown != 0) {
    char buf[48];
    std::snprintf(buf, sizeof(buf), "unknown bits 0x%x", static_cast<unsigned>(unknown));
    if (!text.empty()) text += "; ";
    text += buf;
  }
  return text.c_str();
}

RINGATTN_API ringattn_status ringattn_grouped_fwd(const ringattn_fwd_params* params) {
  return run_pass(params, kFwdPass);
}

RINGATTN_API ringattn_status ringattn_grouped_bwd(const ringattn_bwd_params* params) {
  return run_pass(params, kBwdPass);
}

RINGATTN_API ringattn_status ringattn_fwd_workspace_size(const ringattn_fwd_params* params, size_t* bytes) {
  return query_workspace_size(params, bytes, kFwdPass);
}

RINGATTN_API ringattn_status ringattn_bwd_workspace_size(const ringattn_bwd_params* params, size_t* bytes) {
  return query_workspace_size(params, bytes, kBwdPass);
}

RINGATTN_API const char* ringattn_last_error(void) { return last_error(); }
RINGATTN_API const char* ringattn_version(void) { return RINGATTN_VERSION_STRING; }
RINGATTN_API int32_t ringattn_abi_version(void) { return RINGATTN_ABI_VERSION; }
RINGATTN_API int32_t ringattn_cuda_compiled(void) { return cuda::compiled() ? 1 : 0; }

RINGATTN_API int32_t ringattn_compiled_archs(int32_t* archs, int32_t capacity) {
  int tmp[16];
  const int n = cuda::compiled_archs(tmp, 16);
  for (int i = 0; i < n && i < capacity && archs != nullptr; ++i) archs[i] = tmp[i];
  return n;
}

RINGATTN_API int32_t ringattn_supported_head_dims(int32_t device_type, int32_t* head_dims, int32_t capacity) {
  int n = 0;
  for (int d = 8; d <= 512; d += 8) {
    const bool ok = device_type == RINGATTN_DEVICE_CUDA ? cuda::supports_head_dim(d) : cpu::supports_head_dim(d);
    if (!ok) continue;
    if (head_dims != nullptr && n < capacity) head_dims[n] = d;
    ++n;
  }
  return n;
}

RINGATTN_API ringattn_status ringattn_check_support(int32_t device_type, int32_t device_index, int32_t dtype,
                                                    int32_t head_dim) {
  return guarded([&]() -> ringattn_status {
    ringattn_exec exec{};
    exec.device_type = device_type;
    exec.device_index = device_index;
    ringattn_problem pr{};
    pr.dtype = dtype;
    pr.batch_size = 1;
    pr.num_heads_q = pr.num_heads_k = 1;
    pr.head_dim = head_dim;
    pr.num_groups = 1;
    pr.default_softmax_scale = 1;
    ringattn_fwd_group group{};
    ringattn_fwd_params p{};
    p.problem = pr;
    p.exec = exec;
    p.groups = &group;
    ringattn_status s = validate_fwd(&p, /*need_data=*/false);
    if (s != RINGATTN_STATUS_OK) return s;
    if (device_type == RINGATTN_DEVICE_CUDA) return cuda::check_support(device_index, dtype, head_dim);
    return RINGATTN_STATUS_OK;
  });
}

}  // extern "C"
