// libringattn_torch: C++ kernels of torch.ops.ring_flash_attn.grouped_fwd / grouped_bwd over
// PyTorch's stable ABI (torch/csrc/stable, torch/headeronly and the aoti_torch C shim; no ATen or
// c10 C++ API), so that one binary serves every PyTorch from 2.10 on. The schemas stay defined in
// Python (python/ring_flash_attn/ops.py); python/ring_flash_attn/_torch_shim.py loads this
// library and calls ringattn_torch_shim_register(), which registers the kernels for CPU (and for
// CUDA when asked: see _torch_shim.py for when it is).
//
// What a kernel does per call: the checks of the Python path (ops.py: _validate_common,
// _check_3d, _check_int32_vector, _check_lse, _check_sinks, _fill_common), the C structs of
// ringattn.h filled on the stack, the outputs and workspace allocated through torch
// (aoti_torch_empty_strided), the device's current CUDA stream and metadata error word, one
// library call. Nothing else is allocated and no string is built.
//
// Calls it does not take itself go to the Python path, unchanged: a call that any check rejects,
// one the library refuses, a CUDA device whose metadata error word Python has not created yet, a
// $RING_FLASH_ATTN_TIER spelling it does not know. The kernel hands its arguments to the op
// ring_flash_attn::_grouped_fwd_python / _grouped_bwd_python (same arguments, the Python kernel),
// which either runs the call or reports its exception here (ringattn_torch_shim_report_error); the
// kernel then throws it again: ValueError as std::invalid_argument, which reaches Python as
// ValueError with the same message, anything else as std::runtime_error (RuntimeError, same
// message; a kernel under the stable ABI has no way to raise NotImplementedError). Every message
// is therefore the Python path's own.
//
// Minimum PyTorch version of each API used (the build targets 2.10: TORCH_TARGET_VERSION):
//   2.10: StableListHandle / torch_list_* (Tensor[] and SymInt[] arguments and returns),
//         torch_library_impl (through StableLibrary::impl), torch_call_dispatcher,
//         torch_get_num_threads;
//   2.9 or older: the aoti_torch_* tensor getters, aoti_torch_empty_strided,
//         aoti_torch_delete_tensor_object, aoti_torch_library_init_impl, the dtype / device /
//         layout codes; aoti_torch_get_current_cuda_stream (in libtorch_cuda, looked up with
//         dlsym on the first CUDA call, so the same binary loads into a CPU-only PyTorch).
#include <dlfcn.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/c/shim.h>
#include <torch/csrc/stable/library.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "ringattn/ringattn.h"
#include "torch_shim/stack_args.h"

#if !defined(TORCH_TARGET_VERSION) || TORCH_TARGET_VERSION != TORCH_VERSION_2_10_0
#error "build libringattn_torch with TORCH_TARGET_VERSION set to PyTorch 2.10 (see cmake/torch_shim.cmake)"
#endif

#define RINGATTN_TORCH_SHIM_API extern "C" __attribute__((visibility("default")))

namespace ringattn {
namespace torch_shim {
namespace {

constexpr size_t kMaxGroups = RINGATTN_MAX_GROUPS;
constexpr int32_t kInt32Max = INT32_MAX;
constexpr int kMaxCudaDevices = 256;

// ---- torch's codes (functions of the C shim, read once) ---------------------------------------

struct TorchCodes {
  int32_t float32, float16, bfloat16, float64, int32, uint8;
  int32_t cpu, cuda, strided;
};

const TorchCodes& codes() {
  static const TorchCodes c{aoti_torch_dtype_float32(),  aoti_torch_dtype_float16(), aoti_torch_dtype_bfloat16(),
                            aoti_torch_dtype_float64(),  aoti_torch_dtype_int32(),   aoti_torch_dtype_uint8(),
                            aoti_torch_device_type_cpu(), aoti_torch_device_type_cuda(), aoti_torch_layout_strided()};
  return c;
}

// The ringattn_dtype of a torch dtype, or -1 (ops.dtype_code).
int32_t ringattn_dtype_of(int32_t dtype) {
  const TorchCodes& c = codes();
  if (dtype == c.float32) return RINGATTN_DTYPE_FP32;
  if (dtype == c.float16) return RINGATTN_DTYPE_FP16;
  if (dtype == c.bfloat16) return RINGATTN_DTYPE_BF16;
  if (dtype == c.float64) return RINGATTN_DTYPE_FP64;
  return -1;
}

// ---- state shared with Python -------------------------------------------------------------------

// The metadata error word of each CUDA device (ops._metadata_errors), handed over by Python once
// it has created it (ringattn_torch_shim_set_metadata_error_word).
std::atomic<uint32_t*> g_error_words[kMaxCudaDevices] = {};

// How many calls ran here and how many went to the Python path (ringattn_torch_shim_counts).
std::atomic<int64_t> g_native_calls{0};
std::atomic<int64_t> g_python_calls{0};

// Tests: every call takes the Python path (ringattn_torch_shim_force_python_path).
std::atomic<bool> g_force_python{false};

// The exception of the Python path's last call on this thread (see ringattn_torch_shim_report_error).
enum PendingKind : int32_t { kNoError = 0, kValueError = 1, kOtherError = 2 };
struct PendingError {
  int32_t kind = kNoError;
  std::string message;
};
PendingError& pending_error() {
  thread_local PendingError pending;
  return pending;
}

// ---- tensors ------------------------------------------------------------------------------------

struct Device {
  int32_t type = -1;
  int32_t index = -1;
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

struct TensorMeta {
  AtenTensorHandle handle = nullptr;
  int64_t dim = 0;
  const int64_t* sizes = nullptr;
  const int64_t* strides = nullptr;
  int32_t dtype = -1;
  Device device;
};

// Reads what the checks look at; false for a tensor that is not strided (the Python path decides).
bool read_meta(AtenTensorHandle handle, TensorMeta* m) {
  m->handle = handle;
  int32_t layout = -1;
  int64_t* sizes = nullptr;
  int64_t* strides = nullptr;
  if (handle == nullptr || aoti_torch_get_layout(handle, &layout) != AOTI_TORCH_SUCCESS ||
      layout != codes().strided || aoti_torch_get_dim(handle, &m->dim) != AOTI_TORCH_SUCCESS ||
      aoti_torch_get_sizes(handle, &sizes) != AOTI_TORCH_SUCCESS ||
      aoti_torch_get_strides(handle, &strides) != AOTI_TORCH_SUCCESS ||
      aoti_torch_get_dtype(handle, &m->dtype) != AOTI_TORCH_SUCCESS ||
      aoti_torch_get_device_type(handle, &m->device.type) != AOTI_TORCH_SUCCESS ||
      aoti_torch_get_device_index(handle, &m->device.index) != AOTI_TORCH_SUCCESS)
    return false;
  m->sizes = sizes;
  m->strides = strides;
  return true;
}

bool data_ptr(AtenTensorHandle handle, void** ptr) {
  return aoti_torch_get_data_ptr(handle, ptr) == AOTI_TORCH_SUCCESS;
}

// ops._check_3d: a [tokens, heads, head_dim] tensor of `dtype` on `device` whose head dim is
// contiguous. Sets the row and head strides the library receives: those of a dense layout when
// no element is addressed (an empty tensor may carry any strides).
bool check_3d(const TensorMeta& t, int32_t dtype, Device device, int64_t* row_stride, int64_t* head_stride) {
  if (t.dim != 3 || t.dtype != dtype || t.device != device) return false;
  const int64_t* s = t.sizes;
  if (s[0] == 0 || s[1] == 0) {
    *row_stride = s[1] * s[2];
    *head_stride = s[2];
    return true;
  }
  if (t.strides[2] != 1 && s[2] > 1) return false;
  *row_stride = t.strides[0];
  *head_stride = t.strides[1];
  return true;
}

bool same_sizes(const TensorMeta& a, const TensorMeta& b) {
  if (a.dim != b.dim) return false;
  for (int64_t i = 0; i < a.dim; ++i)
    if (a.sizes[i] != b.sizes[i]) return false;
  return true;
}

// ops._check_int32_vector: a 1-D contiguous int32 tensor on `device` with `numel` entries (any if < 0).
bool check_int32_vector(const TensorMeta& t, int64_t numel, Device device) {
  return t.dtype == codes().int32 && t.dim == 1 && (numel < 0 || t.sizes[0] == numel) &&
         (t.sizes[0] <= 1 || t.strides[0] == 1) && t.device == device;
}

// ops._check_lse: a contiguous float32 [Hq, total_q] tensor on `device`.
bool check_lse(const TensorMeta& t, int64_t num_heads_q, int64_t total_q, Device device) {
  if (t.dtype != codes().float32 || t.dim != 2 || t.sizes[0] != num_heads_q || t.sizes[1] != total_q ||
      t.device != device)
    return false;
  bool contiguous = false;
  return aoti_torch_is_contiguous(t.handle, &contiguous) == AOTI_TORCH_SUCCESS && contiguous;
}

// _lib.float32_scale: a positive finite value whose float32 rounding is a normal number.
bool float32_normal(double value, float* narrowed) {
  // Doubles from FLT_MAX + half its ulp up round to infinity (and converting them is undefined).
  static const double kRoundsToInfinity = static_cast<double>(FLT_MAX) + std::ldexp(1.0, 103);
  if (!(value > 0.0) || !std::isfinite(value) || value >= kRoundsToInfinity) return false;
  const float f = static_cast<float>(value);
  if (!(f >= FLT_MIN && f <= FLT_MAX)) return false;
  *narrowed = f;
  return true;
}

bool int32_in(int64_t value, int64_t minimum) { return value >= minimum && value <= kInt32Max; }

// Allocates a contiguous tensor of `sizes` as torch.empty does (strides from the last dim, each
// size counted as at least 1).
bool empty_contiguous(int64_t dim, const int64_t* sizes, int32_t dtype, Device device, OwnedTensor* out) {
  int64_t strides[3];
  int64_t stride = 1;
  for (int64_t i = dim - 1; i >= 0; --i) {
    strides[i] = stride;
    stride *= sizes[i] > 1 ? sizes[i] : 1;
  }
  return aoti_torch_empty_strided(dim, sizes, strides, dtype, device.type, device.index, out->out()) ==
         AOTI_TORCH_SUCCESS;
}

// ---- the environment and the device -------------------------------------------------------------

// $RING_FLASH_ATTN_TIER as ops._parse_tier reads it (unset, empty or blank: auto), or -1 for a
// value other than the ASCII spellings of auto / sm80 / sm90 (the Python path then reads it and
// names a wrong one).
int32_t tier_setting() {
  const char* raw = std::getenv("RING_FLASH_ATTN_TIER");
  if (raw == nullptr) return RINGATTN_TIER_AUTO;
  auto blank = [](unsigned char ch) { return ch == ' ' || (ch >= '\t' && ch <= '\r') || (ch >= 0x1c && ch <= 0x1f); };
  const char* end = raw + std::strlen(raw);
  while (raw < end && blank(static_cast<unsigned char>(*raw))) ++raw;
  while (end > raw && blank(static_cast<unsigned char>(end[-1]))) --end;
  char name[8];
  const size_t length = static_cast<size_t>(end - raw);
  if (length == 0) return RINGATTN_TIER_AUTO;
  if (length >= sizeof(name)) return -1;
  for (size_t i = 0; i < length; ++i) {
    const unsigned char ch = static_cast<unsigned char>(raw[i]);
    if (ch >= 0x80) return -1;
    name[i] = static_cast<char>(ch >= 'A' && ch <= 'Z' ? ch - 'A' + 'a' : ch);
  }
  name[length] = '\0';
  if (std::strcmp(name, "auto") == 0) return RINGATTN_TIER_AUTO;
  if (std::strcmp(name, "sm80") == 0) return RINGATTN_TIER_SM80;
  if (std::strcmp(name, "sm90") == 0) return RINGATTN_TIER_SM90;
  return -1;
}

// $RING_FLASH_ATTN_CHECK_METADATA: 1 when it is exactly "1" (ops._CHECK_METADATA_SETTING).
int32_t check_metadata_setting() {
  const char* raw = std::getenv("RING_FLASH_ATTN_CHECK_METADATA");
  return raw != nullptr && std::strcmp(raw, "1") == 0 ? 1 : 0;
}

// aoti_torch_get_current_cuda_stream lives in libtorch_cuda, which a CPU-only PyTorch does not
// have: looked up in the loaded library on the first CUDA call instead of linked.
using CurrentCudaStreamFn = AOTITorchError (*)(int32_t device_index, void** ret_stream);

CurrentCudaStreamFn current_cuda_stream_function() {
  static const CurrentCudaStreamFn fn = []() -> CurrentCudaStreamFn {
    void* library = dlopen("libtorch_cuda.so", RTLD_LAZY | RTLD_NOLOAD);
    if (library == nullptr) return nullptr;
    return reinterpret_cast<CurrentCudaStreamFn>(dlsym(library, "aoti_torch_get_current_cuda_stream"));
  }();
  return fn;
}

// ops._exec: where the call runs.
bool fill_exec(Device device, ringattn_exec* ex, int32_t* check_metadata) {
  const TorchCodes& c = codes();
  if (device.type == c.cpu) {
    uint32_t threads = 0;
    if (torch_get_num_threads(&threads) != AOTI_TORCH_SUCCESS) return false;
    ex->device_type = RINGATTN_DEVICE_CPU;
    ex->num_threads = threads > static_cast<uint32_t>(kInt32Max) ? kInt32Max : static_cast<int32_t>(threads);
    *check_metadata = 1;  // free on the host
    return true;
  }
  if (device.type != c.cuda || device.index < 0 || device.index >= kMaxCudaDevices) return false;
  uint32_t* word = g_error_words[device.index].load(std::memory_order_acquire);
  const int32_t tier = tier_setting();
  const CurrentCudaStreamFn stream_of = current_cuda_stream_function();
  void* stream = nullptr;
  if (word == nullptr || tier < 0 || stream_of == nullptr || stream_of(device.index, &stream) != AOTI_TORCH_SUCCESS)
    return false;
  ex->device_type = RINGATTN_DEVICE_CUDA;
  ex->device_index = device.index;
  ex->stream = stream;
  ex->tier = tier;
  ex->metadata_errors = word;
  *check_metadata = check_metadata_setting();
  return true;
}

// ---- the arguments shared by forward and backward -----------------------------------------------

// Where the shared arguments sit in each op's schema.
struct CommonArgIndex {
  size_t q_list, k, v, cu_seqlens_q_list, cu_seqlens_k, seqused_k_list, max_seqlen_q_list, max_seqlen_k,
      softmax_scale, causal, window_size, softcap, sinks, diagonal_shift_list;
};
constexpr CommonArgIndex kFwdIndex{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14};
constexpr CommonArgIndex kBwdIndex{1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 14, 15, 16, 17};

// What _validate_common and _fill_common establish besides the fields of the call's structs.
struct Common {
  size_t num_groups = 0;
  int64_t batch_size = 0, num_heads_q = 0;
  int32_t dtype = -1;  // torch's code
  Device device;
  TensorMeta q[kMaxGroups];
  TensorMeta k, v;
};

// The row and head strides of a tensor the kernel allocated, as _check_3d hands them on.
bool new_tensor_strides(AtenTensorHandle tensor, const Common& c, int64_t* row_stride, int64_t* head_stride) {
  TensorMeta m;
  return read_meta(tensor, &m) && check_3d(m, c.dtype, c.device, row_stride, head_stride);
}

bool read_tensor_list(StableIValue value, size_t expected_size, TensorMeta* metas) {
  ListArg list;
  if (!list.open(to_value<StableListHandle>(value)) || list.size() != expected_size) return false;
  for (size_t i = 0; i < expected_size; ++i) {
    StableIValue element = 0;
    if (!list.get(i, &element) || !read_meta(tensor_arg(element), &metas[i])) return false;
  }
  return true;
}

bool read_int(const ListArg& list, size_t i, int64_t* value) {
  StableIValue element = 0;
  if (!list.get(i, &element)) return false;
  *value = to_value<int64_t>(element);
  return true;
}

// An optional int32 [B] vector (seqused_k_list / diagonal_shift_list entry): its data pointer or NULL.
bool optional_int32_vector(StableIValue element, int64_t batch_size, Device device, const int32_t** ptr) {
  const AtenTensorHandle handle = optional_tensor_arg(element);
  *ptr = nullptr;
  if (handle == nullptr) return true;
  TensorMeta m;
  void* p = nullptr;
  if (!read_meta(handle, &m) || !check_int32_vector(m, batch_size, device) || !data_ptr(handle, &p)) return false;
  *ptr = static_cast<const int32_t*>(p);
  return true;
}

// _validate_common + _fill_common (+ the shared group fields of _build_fwd / _build_bwd), into
// the params of either pass (problem, exec, K/V) and its first num_groups groups. False for
// anything the Python path would reject or may decide differently.
template <typename Params, typename Group>
bool read_common(const OwnedArgs& a, const CommonArgIndex& at, Common* c, Params* params, Group* groups) {
  ringattn_problem* p = &params->problem;
  ringattn_exec* ex = &params->exec;
  ringattn_kv* kv = &params->kv;
  ListArg q_list;
  if (!q_list.open(to_value<StableListHandle>(a[at.q_list]))) return false;
  const size_t G = q_list.size();
  if (G == 0 || G > kMaxGroups || !read_tensor_list(a[at.q_list], G, c->q)) return false;
  c->num_groups = G;
  const TensorMeta& q0 = c->q[0];
  c->dtype = q0.dtype;
  c->device = q0.device;
  const int32_t dtype_code = ringattn_dtype_of(q0.dtype);
  if (dtype_code < 0) return false;

  ListArg cu_q, max_q, seqused;
  if (!cu_q.open(to_value<StableListHandle>(a[at.cu_seqlens_q_list])) || cu_q.size() != G ||
      !max_q.open(to_value<StableListHandle>(a[at.max_seqlen_q_list])) || max_q.size() != G ||
      !seqused.open(to_value<StableListHandle>(a[at.seqused_k_list])) || (seqused.size() != 0 && seqused.size() != G))
    return false;

  if (!read_meta(tensor_arg(a[at.k]), &c->k) || !read_meta(tensor_arg(a[at.v]), &c->v) ||
      !check_3d(c->k, c->dtype, c->device, &kv->k_row_stride, &kv->k_head_stride) ||
      !check_3d(c->v, c->dtype, c->device, &kv->v_row_stride, &kv->v_head_stride) || !same_sizes(c->v, c->k) ||
      q0.dim != 3)
    return false;
  const int64_t Hk = c->k.sizes[1], D = c->k.sizes[2], Hq = q0.sizes[1];
  for (size_t g = 0; g < G; ++g) {
    Group& gr = groups[g];
    if (!check_3d(c->q[g], c->dtype, c->device, &gr.q_row_stride, &gr.q_head_stride) || c->q[g].sizes[1] != Hq ||
        c->q[g].sizes[2] != D)
      return false;
  }
  c->num_heads_q = Hq;

  TensorMeta cu_k;
  if (!read_meta(tensor_arg(a[at.cu_seqlens_k]), &cu_k) || !check_int32_vector(cu_k, -1, c->device)) return false;
  const int64_t B = cu_k.sizes[0] - 1;
  if (B < 1) return false;
  c->batch_size = B;
  for (size_t g = 0; g < G; ++g) {
    StableIValue element = 0;
    TensorMeta m;
    void* ptr = nullptr;
    if (!cu_q.get(g, &element) || !read_meta(tensor_arg(element), &m) || !check_int32_vector(m, B + 1, c->device) ||
        !data_ptr(m.handle, &ptr))
      return false;
    groups[g].cu_seqlens_q = static_cast<const int32_t*>(ptr);
    groups[g].seqused_k = nullptr;
    if (seqused.size() == G &&
        (!seqused.get(g, &element) || !optional_int32_vector(element, B, c->device, &groups[g].seqused_k)))
      return false;
  }

  // _fill_common
  if (B + 1 > kInt32Max || Hq > kInt32Max || Hk > kInt32Max || D > kInt32Max) return false;
  const int64_t max_seqlen_k = to_value<int64_t>(a[at.max_seqlen_k]);
  if (!int32_in(max_seqlen_k, 0)) return false;
  const double softmax_scale = to_value<double>(a[at.softmax_scale]);
  const bool default_scale = softmax_scale == 0.0;  // the ops' encoding of 1/sqrt(head_dim)
  float scale = 0.0f;
  if (!default_scale && !float32_normal(softmax_scale, &scale)) return false;
  int32_t check_metadata = 0;
  if (!fill_exec(c->device, ex, &check_metadata)) return false;
  void* ptr = nullptr;
  p->dtype = dtype_code;
  p->batch_size = static_cast<int32_t>(B);
  p->num_heads_q = static_cast<int32_t>(Hq);
  p->num_heads_k = static_cast<int32_t>(Hk);
  p->head_dim = static_cast<int32_t>(D);
  p->num_groups = static_cast<int32_t>(G);
  p->softmax_scale = scale;
  p->default_softmax_scale = default_scale ? 1 : 0;
  p->causal = to_value<bool>(a[at.causal]) ? 1 : 0;
  p->total_k = c->k.sizes[0];
  p->max_seqlen_k = static_cast<int32_t>(max_seqlen_k);
  if (!data_ptr(cu_k.handle, &ptr)) return false;
  p->cu_seqlens_k = static_cast<const int32_t*>(ptr);
  p->check_metadata = check_metadata;
  if (!data_ptr(c->k.handle, &ptr)) return false;
  kv->k = ptr;
  if (!data_ptr(c->v.handle, &ptr)) return false;
  kv->v = ptr;

  // Window, softcap, sinks.
  ListArg window;
  int64_t left = 0, right = 0;
  if (!window.open(to_value<StableListHandle>(a[at.window_size])) || window.size() != 2 || !read_int(window, 0, &left) ||
      !read_int(window, 1, &right))
    return false;
  if (left != -1 || right != -1) {
    if (!int32_in(left, -1) || !int32_in(right, -1)) return false;
    p->has_window = 1;
    p->window_left = static_cast<int32_t>(left);
    p->window_right = static_cast<int32_t>(right);
  }
  const double softcap = to_value<double>(a[at.softcap]);
  if (softcap != 0.0 && !float32_normal(softcap, &p->softcap)) return false;
  if (const AtenTensorHandle sinks = optional_tensor_arg(a[at.sinks])) {
    TensorMeta m;
    if (!read_meta(sinks, &m) || m.dtype != codes().float32 || m.dim != 1 || m.sizes[0] != Hq ||
        (Hq > 1 && m.strides[0] != 1) || m.device != c->device || !data_ptr(sinks, &ptr))
      return false;
    p->sinks = static_cast<const float*>(ptr);
  }

  // diagonal_shift_list: None, or G entries each None or int32 [B].
  const std::optional<StableListHandle> shifts_value = [&]() -> std::optional<StableListHandle> {
    const StableIValue* box = to_value<StableIValue*>(a[at.diagonal_shift_list]);
    if (box == nullptr) return std::nullopt;
    return to_value<StableListHandle>(*box);
  }();
  ListArg shifts;
  if (shifts_value.has_value() && (!shifts.open(*shifts_value) || shifts.size() != G)) return false;
  for (size_t g = 0; g < G; ++g) {
    Group& gr = groups[g];
    gr.diagonal_shift = nullptr;
    StableIValue element = 0;
    if (shifts_value.has_value() &&
        (!shifts.get(g, &element) || !optional_int32_vector(element, B, c->device, &gr.diagonal_shift)))
      return false;
    int64_t max_seqlen_q = 0;
    if (!read_int(max_q, g, &max_seqlen_q) || !int32_in(max_seqlen_q, 0) || !data_ptr(c->q[g].handle, &ptr))
      return false;
    gr.q = ptr;
    gr.total_q = c->q[g].sizes[0];
    gr.max_seqlen_q = static_cast<int32_t>(max_seqlen_q);
  }
  return true;
}

// A workspace of `bytes` (none when 0), as ops._workspace allocates it.
bool allocate_workspace(size_t bytes, Device device, OwnedTensor* workspace, void** ptr, size_t* size) {
  *ptr = nullptr;
  *size = bytes;
  if (bytes == 0) return true;
  const int64_t n = static_cast<int64_t>(bytes), one = 1;
  return aoti_torch_empty_strided(1, &n, &one, codes().uint8, device.type, device.index, workspace->out()) ==
             AOTI_TORCH_SUCCESS &&
         data_ptr(workspace->get(), ptr);
}

// Moves `count` owned tensors into a new list (the value of a Tensor[] output).
bool tensor_list(OwnedTensor* tensors, size_t count, StableIValue* value) {
  StableListHandle list = nullptr;
  if (torch_new_list_reserve_size(count, &list) != AOTI_TORCH_SUCCESS) return false;
  for (size_t i = 0; i < count; ++i) {
    if (torch_list_push_back(list, from_value(tensors[i].get())) != AOTI_TORCH_SUCCESS) {
      // The list owns what it holds already; take those back so that each tensor is freed once.
      size_t held = 0;
      if (torch_list_size(list, &held) == AOTI_TORCH_SUCCESS)
        for (size_t j = 0; j < held; ++j) tensors[j].release();
      free_list(list, [](StableIValue e) { free_tensor(tensor_arg(e)); });
      return false;
    }
  }
  for (size_t i = 0; i < count; ++i) tensors[i].release();
  *value = from_value(list);
  return true;
}

// One library call of a pass (ringattn_fwd_params or ringattn_bwd_params): the shared arguments
// into the call's structs (read_common), the pass's own through `fill_pass(c, params, groups)`
// (which allocates the outputs and keeps them), then the workspace the library asks for and the
// call. False as soon as a step declines the call; the library then wrote nothing.
template <typename Params, typename FillPass>
bool run_library(const OwnedArgs& a, const CommonArgIndex& at, ringattn_status (*workspace_size)(const Params*, size_t*),
                 ringattn_status (*run)(const Params*), FillPass&& fill_pass) {
  using Group = std::remove_const_t<std::remove_pointer_t<decltype(Params::groups)>>;
  Common c;
  Params params{};
  Group groups[kMaxGroups] = {};
  if (!read_common(a, at, &c, &params, groups) || !fill_pass(c, params, groups)) return false;
  params.groups = groups;
  size_t bytes = 0;
  OwnedTensor workspace;
  return workspace_size(&params, &bytes) == RINGATTN_STATUS_OK &&
         allocate_workspace(bytes, c.device, &workspace, &params.workspace, &params.workspace_size) &&
         run(&params) == RINGATTN_STATUS_OK;
}

// ---- forward ------------------------------------------------------------------------------------

constexpr ArgKind kFwdArgs[] = {
    ArgKind::kTensorList, ArgKind::kTensor, ArgKind::kTensor, ArgKind::kTensorList, ArgKind::kTensor,
    ArgKind::kListOfOptionalTensors, ArgKind::kIntList, ArgKind::kScalar, ArgKind::kScalar, ArgKind::kScalar,
    ArgKind::kScalar, ArgKind::kIntList, ArgKind::kScalar, ArgKind::kOptionalTensor,
    ArgKind::kOptionalListOfOptionalTensors};
constexpr size_t kFwdNumArgs = sizeof(kFwdArgs) / sizeof(kFwdArgs[0]);
constexpr ArgKind kFwdOutputs[] = {ArgKind::kTensorList, ArgKind::kTensorList};

// The forward of a call the checks accept; false (nothing written to `stack`) otherwise.
bool run_fwd(const OwnedArgs& a, StableIValue* stack) {
  size_t G = 0;
  OwnedTensor outs[kMaxGroups], lses[kMaxGroups];
  // Each group's out and LSE.
  auto allocate_outputs = [&](const Common& c, ringattn_fwd_params&, ringattn_fwd_group* groups) {
    G = c.num_groups;
    for (size_t g = 0; g < G; ++g) {
      const TensorMeta& q = c.q[g];
      const int64_t lse_sizes[2] = {c.num_heads_q, q.sizes[0]};
      void* out_ptr = nullptr;
      void* lse_ptr = nullptr;
      if (!empty_contiguous(3, q.sizes, c.dtype, c.device, &outs[g]) ||
          !empty_contiguous(2, lse_sizes, codes().float32, c.device, &lses[g]) ||
          !data_ptr(outs[g].get(), &out_ptr) || !data_ptr(lses[g].get(), &lse_ptr))
        return false;
      ringattn_fwd_group& gr = groups[g];
      gr.out = out_ptr;
      if (!new_tensor_strides(outs[g].get(), c, &gr.out_row_stride, &gr.out_head_stride)) return false;
      gr.softmax_lse = static_cast<float*>(lse_ptr);
    }
    return true;
  };
  if (!run_library(a, kFwdIndex, ringattn_fwd_workspace_size, ringattn_grouped_fwd, allocate_outputs)) return false;
  StableIValue out_list = 0, lse_list = 0;
  if (!tensor_list(outs, G, &out_list)) return false;
  if (!tensor_list(lses, G, &lse_list)) {
    free_arg(ArgKind::kTensorList, out_list);
    return false;
  }
  stack[0] = out_list;
  stack[1] = lse_list;
  return true;
}

// ---- backward -----------------------------------------------------------------------------------

constexpr ArgKind kBwdArgs[] = {
    ArgKind::kTensorList, ArgKind::kTensorList, ArgKind::kTensor, ArgKind::kTensor, ArgKind::kTensorList,
    ArgKind::kTensorList, ArgKind::kTensorList, ArgKind::kTensor, ArgKind::kListOfOptionalTensors,
    ArgKind::kIntList, ArgKind::kScalar, ArgKind::kScalar, ArgKind::kScalar, ArgKind::kScalar, ArgKind::kIntList,
    ArgKind::kScalar, ArgKind::kOptionalTensor, ArgKind::kOptionalListOfOptionalTensors};
constexpr size_t kBwdNumArgs = sizeof(kBwdArgs) / sizeof(kBwdArgs[0]);
constexpr ArgKind kBwdPythonOutputs[] = {ArgKind::kTensorList};  // see split_bwd_outputs

bool run_bwd(const OwnedArgs& a, StableIValue* stack) {
  size_t G = 0;
  OwnedTensor dk, dv, dqs[kMaxGroups];
  // dout, out and LSE of each group, deterministic, and the new dk, dv and dQs.
  auto fill_backward = [&](const Common& c, ringattn_bwd_params& params, ringattn_bwd_group* groups) {
    G = c.num_groups;
    TensorMeta douts[kMaxGroups], outs[kMaxGroups], lses[kMaxGroups];
    if (!read_tensor_list(a[0], G, douts) || !read_tensor_list(a[4], G, outs) || !read_tensor_list(a[5], G, lses))
      return false;
    // dk, dv: new, shaped like k and v (contiguous).
    void* ptr = nullptr;
    if (!empty_contiguous(3, c.k.sizes, c.dtype, c.device, &dk) || !data_ptr(dk.get(), &params.dk) ||
        !new_tensor_strides(dk.get(), c, &params.dk_row_stride, &params.dk_head_stride) ||
        !empty_contiguous(3, c.v.sizes, c.dtype, c.device, &dv) || !data_ptr(dv.get(), &params.dv) ||
        !new_tensor_strides(dv.get(), c, &params.dv_row_stride, &params.dv_head_stride))
      return false;
    params.deterministic = to_value<bool>(a[13]) ? 1 : 0;

    for (size_t g = 0; g < G; ++g) {
      const TensorMeta& q = c.q[g];
      ringattn_bwd_group& gr = groups[g];
      if (!check_3d(outs[g], c.dtype, c.device, &gr.out_row_stride, &gr.out_head_stride) ||
          !same_sizes(outs[g], q) ||
          !check_3d(douts[g], c.dtype, c.device, &gr.dout_row_stride, &gr.dout_head_stride) ||
          !same_sizes(douts[g], q) || !check_lse(lses[g], c.num_heads_q, q.sizes[0], c.device))
        return false;
      if (!data_ptr(outs[g].handle, &ptr)) return false;
      gr.out = ptr;
      if (!data_ptr(douts[g].handle, &ptr)) return false;
      gr.dout = ptr;
      if (!data_ptr(lses[g].handle, &ptr)) return false;
      gr.softmax_lse = static_cast<const float*>(ptr);
      if (!empty_contiguous(3, q.sizes, c.dtype, c.device, &dqs[g]) || !data_ptr(dqs[g].get(), &gr.dq) ||
          !new_tensor_strides(dqs[g].get(), c, &gr.dq_row_stride, &gr.dq_head_stride))
        return false;
    }
    return true;
  };
  if (!run_library(a, kBwdIndex, ringattn_bwd_workspace_size, ringattn_grouped_bwd, fill_backward)) return false;
  StableIValue dq_list = 0;
  if (!tensor_list(dqs, G, &dq_list)) return false;
  stack[0] = dq_list;
  stack[1] = from_value(dk.release());
  stack[2] = from_value(dv.release());
  return true;
}

// ---- the Python path ----------------------------------------------------------------------------

// Hands the call to `op` (the Python kernel; the op's arguments) and moves its `num_outputs`
// outputs into `outputs`; throws the exception it reported.
void run_python(OwnedArgs& a, const char* op, const ArgKind* output_kinds, size_t num_outputs, StableIValue* outputs) {
  g_python_calls.fetch_add(1, std::memory_order_relaxed);
  StableIValue inner[OwnedArgs::kCapacity] = {};
  a.hand_on(inner);
  PendingError& pending = pending_error();
  pending.kind = kNoError;
  pending.message.clear();
  if (torch_call_dispatcher(op, "", inner, TORCH_ABI_VERSION) != AOTI_TORCH_SUCCESS)
    throw std::runtime_error(std::string("ring_flash_attn: the call of ") + op +
                             " failed (PyTorch logged its error above)");
  if (pending.kind != kNoError) {
    for (size_t i = 0; i < num_outputs; ++i) free_arg(output_kinds[i], inner[i]);
    std::string message;
    message.swap(pending.message);
    const int32_t kind = pending.kind;
    pending.kind = kNoError;
    if (kind == kValueError) throw std::invalid_argument(message);
    throw std::runtime_error(message);
  }
  for (size_t i = 0; i < num_outputs; ++i) outputs[i] = inner[i];
}

// Whether `run` (run_fwd / run_bwd) took the call, which it then counts; false when the caller
// hands the call to the Python path (forced, or the call is not one this library takes).
bool ran_natively(bool (*run)(const OwnedArgs&, StableIValue*), const OwnedArgs& args, StableIValue* stack) {
  if (g_force_python.load(std::memory_order_relaxed) || !run(args, stack)) return false;
  g_native_calls.fetch_add(1, std::memory_order_relaxed);
  return true;
}

void boxed_fwd(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  STD_TORCH_CHECK(num_args == kFwdNumArgs && num_outputs == 2,
                  "ring_flash_attn: grouped_fwd's schema does not match libringattn_torch");
  OwnedArgs args(stack, kFwdArgs, kFwdNumArgs);
  if (ran_natively(run_fwd, args, stack)) return;
  run_python(args, "ring_flash_attn::_grouped_fwd_python", kFwdOutputs, 2, stack);
}

// _grouped_bwd_python returns one list [*dq_list, dk, dv]: torch_call_dispatcher (2.10, 2.11)
// converts each output with the type of the output at the other end of the list, so an op it
// calls must return outputs of one type. Splits it into grouped_bwd's three outputs.
void split_bwd_outputs(StableIValue all, StableIValue* stack) {
  const StableListHandle list = to_value<StableListHandle>(all);
  size_t n = 0;
  StableListHandle dq_list = nullptr;
  if (torch_list_size(list, &n) != AOTI_TORCH_SUCCESS || n < 2 ||
      torch_new_list_reserve_size(n - 2, &dq_list) != AOTI_TORCH_SUCCESS) {
    free_arg(ArgKind::kTensorList, all);
    throw std::runtime_error("ring_flash_attn: _grouped_bwd_python returned no [*dq_list, dk, dv] list");
  }
  StableIValue element[3] = {};
  for (size_t i = 0; i < n; ++i) {
    StableIValue e = 0;
    STD_TORCH_CHECK(torch_list_get_item(list, i, &e) == AOTI_TORCH_SUCCESS, "ring_flash_attn: reading a list failed");
    if (i + 2 < n) {
      STD_TORCH_CHECK(torch_list_push_back(dq_list, e) == AOTI_TORCH_SUCCESS, "ring_flash_attn: building a list failed");
    } else {
      element[i + 2 - n] = e;
    }
  }
  torch_delete_list(list);  // the container only: its tensors moved on
  stack[0] = from_value(dq_list);
  stack[1] = element[0];
  stack[2] = element[1];
}

void boxed_bwd(StableIValue* stack, uint64_t num_args, uint64_t num_outputs) {
  STD_TORCH_CHECK(num_args == kBwdNumArgs && num_outputs == 3,
                  "ring_flash_attn: grouped_bwd's schema does not match libringattn_torch");
  OwnedArgs args(stack, kBwdArgs, kBwdNumArgs);
  if (ran_natively(run_bwd, args, stack)) return;
  StableIValue all = 0;
  run_python(args, "ring_flash_attn::_grouped_bwd_python", kBwdPythonOutputs, 1, &all);
  split_bwd_outputs(all, stack);
}

static_assert(kFwdNumArgs <= OwnedArgs::kCapacity && kBwdNumArgs <= OwnedArgs::kCapacity, "OwnedArgs capacity");

}  // namespace
}  // namespace torch_shim
}  // namespace ringattn

// ---- C entry points for the Python loader (ctypes) -------------------------------------------------

using ringattn::torch_shim::g_error_words;
using ringattn::torch_shim::kMaxCudaDevices;

// The C ABI version of ringattn.h this library was built against (must equal the loaded
// libringattn's ringattn_abi_version()).
RINGATTN_TORCH_SHIM_API int32_t ringattn_torch_shim_abi_version(void) { return RINGATTN_ABI_VERSION; }

// The address of ringattn_grouped_fwd as this library links it: the loader compares it with the
// libringattn that Python loaded, so that both use one copy.
RINGATTN_TORCH_SHIM_API const void* ringattn_torch_shim_linked_entry_point(void) {
  return reinterpret_cast<const void*>(&ringattn_grouped_fwd);
}

// The stable ABI version of the PyTorch headers it was built with (TORCH_ABI_VERSION).
RINGATTN_TORCH_SHIM_API uint64_t ringattn_torch_shim_torch_abi_version(void) { return TORCH_ABI_VERSION; }

// Registers the C++ kernel of `op` ("grouped_fwd" or "grouped_bwd") for CPU, and for CUDA too when
// `with_cuda` is non-zero, for the op and for "_<op>_native" (the same kernel without autograd, for
// the package's eager calls). Their schemas and "_<op>_python" must be defined first. Returns 0; 1
// if registering threw (PyTorch logged why); 2 for another op name. Registering an op again is a
// no-op.
RINGATTN_TORCH_SHIM_API int32_t ringattn_torch_shim_register(const char* op, int32_t with_cuda) {
  using torch::stable::detail::StableLibrary;
  static std::atomic<bool> fwd_registered{false}, bwd_registered{false};
  if (op == nullptr) return 2;
  const bool fwd = std::strcmp(op, "grouped_fwd") == 0;
  if (!fwd && std::strcmp(op, "grouped_bwd") != 0) return 2;
  if ((fwd ? fwd_registered : bwd_registered).exchange(true)) return 0;
  void (*kernel)(StableIValue*, uint64_t, uint64_t) =
      fwd ? &ringattn::torch_shim::boxed_fwd : &ringattn::torch_shim::boxed_bwd;
  const std::string native = std::string("_") + op + "_native";
  try {
    for (const char* key : {"CPU", "CUDA"}) {
      if (with_cuda == 0 && std::strcmp(key, "CUDA") == 0) continue;
      // Never freed: freeing a library object removes its registrations.
      auto* library = new StableLibrary(StableLibrary::Kind::IMPL, "ring_flash_attn", key, __FILE__, __LINE__);
      library->impl(op, kernel).impl(native.c_str(), kernel);
    }
  } catch (const std::exception&) {
    return 1;
  }
  return 0;
}

// The metadata error word of CUDA device `device_index` (ops._metadata_errors.word_pointer).
// Returns 0, or 1 for an index out of range.
RINGATTN_TORCH_SHIM_API int32_t ringattn_torch_shim_set_metadata_error_word(int32_t device_index, void* word) {
  if (device_index < 0 || device_index >= kMaxCudaDevices) return 1;
  g_error_words[device_index].store(static_cast<uint32_t*>(word), std::memory_order_release);
  return 0;
}

// Called by the Python kernel of _grouped_{fwd,bwd}_python when its call raised: `kind` 1 for a
// ValueError, 2 for any other exception, and its message; the C++ kernel that handed the call
// over throws it again.
RINGATTN_TORCH_SHIM_API void ringattn_torch_shim_report_error(int32_t kind, const char* message) {
  ringattn::torch_shim::PendingError& pending = ringattn::torch_shim::pending_error();
  pending.kind = kind == ringattn::torch_shim::kValueError ? ringattn::torch_shim::kValueError
                                                           : ringattn::torch_shim::kOtherError;
  pending.message = message != nullptr ? message : "";
}

// For tests: `force` != 0 makes every kernel call take the Python path (as a call on a CUDA device
// without a metadata error word does), 0 restores the default.
RINGATTN_TORCH_SHIM_API void ringattn_torch_shim_force_python_path(int32_t force) {
  ringattn::torch_shim::g_force_python.store(force != 0, std::memory_order_relaxed);
}

// How many kernel calls ran here (`native`) and how many went to the Python path (`python`), in
// this process.
RINGATTN_TORCH_SHIM_API void ringattn_torch_shim_counts(int64_t* native, int64_t* python) {
  if (native != nullptr) *native = ringattn::torch_shim::g_native_calls.load(std::memory_order_relaxed);
  if (python != nullptr) *python = ringattn::torch_shim::g_python_calls.load(std::memory_order_relaxed);
}
