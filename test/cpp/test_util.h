// Helpers for the GoogleTest suite: host tensors in every dtype with arbitrary strides, random
// grouped varlen problems, calls through the public C ABI with poisoned outputs, and checks
// against the naive reference.
//
// The fp16 / bf16 encoders here are written independently of the library's (frexp/ldexp and
// nearbyint on doubles instead of bit manipulation), so a test that compares the two checks
// both.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "naive_reference.h"
#include "ringattn/ringattn.h"

namespace ratest {

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// dtypes
// ---------------------------------------------------------------------------------------------

inline size_t dtype_size(int dtype) {
  switch (dtype) {
    case RINGATTN_DTYPE_FP32: return 4;
    case RINGATTN_DTYPE_FP16: return 2;
    case RINGATTN_DTYPE_BF16: return 2;
    case RINGATTN_DTYPE_FP64: return 8;
  }
  return 0;
}

inline const char* dtype_name(int dtype) {
  switch (dtype) {
    case RINGATTN_DTYPE_FP32: return "fp32";
    case RINGATTN_DTYPE_FP16: return "fp16";
    case RINGATTN_DTYPE_BF16: return "bf16";
    case RINGATTN_DTYPE_FP64: return "fp64";
  }
  return "unknown";
}

// A binary floating-point format with `mantissa_bits` explicit mantissa bits and normal
// exponents in [min_exp, max_exp].
struct Format {
  int mantissa_bits;
  int min_exp;
  int max_exp;
};
constexpr Format kHalf{10, -14, 15};
constexpr Format kBf16{7, -126, 127};

// Rounds x to the nearest value of the format, ties to even (nearbyint in the default
// rounding mode), with gradual underflow and overflow to inf.
inline double round_to_format(double x, Format f) {
  if (std::isnan(x) || std::isinf(x) || x == 0.0) return x;
  const double a = std::fabs(x);
  int e = 0;
  std::frexp(a, &e);
  const int exponent = std::max(e - 1, f.min_exp);  // a in [2^(e-1), 2^e); subnormals share min_exp
  const double quantum = std::ldexp(1.0, exponent - f.mantissa_bits);
  double r = std::nearbyint(a / quantum) * quantum;
  const double max_finite = std::ldexp(2.0 - std::ldexp(1.0, -f.mantissa_bits), f.max_exp);
  if (r > max_finite) r = kInf;
  return std::copysign(r, x);
}

// Encodes a value already representable in the format.
inline uint16_t encode_exact(double r, Format f) {
  const int exponent_bits = (f.mantissa_bits == 10) ? 5 : 8;
  const int bias = f.max_exp;
  const uint16_t sign = std::signbit(r) ? static_cast<uint16_t>(1u << 15) : 0;
  const uint16_t exp_all_ones = static_cast<uint16_t>(((1u << exponent_bits) - 1u) << f.mantissa_bits);
  if (std::isnan(r)) return static_cast<uint16_t>(exp_all_ones | (1u << (f.mantissa_bits - 1)));
  if (std::isinf(r)) return static_cast<uint16_t>(sign | exp_all_ones);
  const double a = std::fabs(r);
  if (a == 0.0) return sign;
  int e = 0;
  std::frexp(a, &e);
  const int exponent = e - 1;
  if (exponent < f.min_exp) {  // subnormal: a multiple of 2^(min_exp - mantissa_bits)
    const double m = a / std::ldexp(1.0, f.min_exp - f.mantissa_bits);
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(m));
  }
  const double m = a / std::ldexp(1.0, exponent - f.mantissa_bits) - std::ldexp(1.0, f.mantissa_bits);
  return static_cast<uint16_t>(sign | ((exponent + bias) << f.mantissa_bits) | static_cast<uint16_t>(m));
}

inline double decode(uint16_t bits, Format f) {
  const int exponent_bits = (f.mantissa_bits == 10) ? 5 : 8;
  const int bias = f.max_exp;
  const double sign = (bits >> 15) ? -1.0 : 1.0;
  const int exponent = (bits >> f.mantissa_bits) & ((1 << exponent_bits) - 1);
  const int mantissa = bits & ((1 << f.mantissa_bits) - 1);
  if (exponent == (1 << exponent_bits) - 1)
    return mantissa ? std::numeric_limits<double>::quiet_NaN() : sign * kInf;
  if (exponent == 0) return sign * std::ldexp(static_cast<double>(mantissa), f.min_exp - f.mantissa_bits);
  return sign * std::ldexp(static_cast<double>(mantissa + (1 << f.mantissa_bits)), exponent - bias - f.mantissa_bits);
}

// The value the library stores for `x` in `dtype` (fp32 and fp64 use the compiler's conversions).
inline double round_to_dtype(double x, int dtype) {
  switch (dtype) {
    case RINGATTN_DTYPE_FP32: return static_cast<double>(static_cast<float>(x));
    case RINGATTN_DTYPE_FP16: return round_to_format(x, kHalf);
    case RINGATTN_DTYPE_BF16: return round_to_format(x, kBf16);
    default: return x;
  }
}

// Distinctive NaN patterns written into every output before a call.
inline uint64_t poison_bits(int dtype) {
  switch (dtype) {
    case RINGATTN_DTYPE_FP32: return 0x7fdeadbeu;
    case RINGATTN_DTYPE_FP16: return 0x7e5au;
    case RINGATTN_DTYPE_BF16: return 0x7fdau;
    default: return 0x7ff8deadbeef0001ull;
  }
}
constexpr uint32_t kLsePoison = 0x7fdeadbeu;  // also of other float32 buffers (poisoned_floats)

// n float32 values, each the NaN pattern kLsePoison.
inline std::vector<float> poisoned_floats(size_t n) {
  std::vector<float> v(n);
  for (float& x : v) std::memcpy(&x, &kLsePoison, 4);
  return v;
}

// Every value still the pattern of poisoned_floats: nothing wrote there.
inline bool still_poisoned(const std::vector<float>& v) {
  for (float x : v) {
    uint32_t b;
    std::memcpy(&b, &x, 4);
    if (b != kLsePoison) return false;
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// host tensors [rows, heads, dim] with arbitrary strides
// ---------------------------------------------------------------------------------------------

enum class Layout {
  kContiguous,   // [rows, heads, dim]
  kPaddedHeads,  // head stride dim + 8, row stride heads * (dim + 8) + 24
  kHeadMajor,    // memory [heads, rows, dim + 4]: head stride rows * (dim + 4) + 16, row stride dim + 4
};

inline const char* layout_name(Layout l) {
  switch (l) {
    case Layout::kContiguous: return "contiguous";
    case Layout::kPaddedHeads: return "padded";
    case Layout::kHeadMajor: return "headmajor";
  }
  return "?";
}

class Tensor3 {
 public:
  Tensor3() = default;
  Tensor3(int dtype, int64_t rows, int heads, int dim, Layout layout)
      : dtype_(dtype), rows_(rows), heads_(heads), dim_(dim) {
    switch (layout) {
      case Layout::kContiguous:
        head_stride_ = dim;
        row_stride_ = static_cast<int64_t>(heads) * dim;
        break;
      case Layout::kPaddedHeads:
        head_stride_ = dim + 8;
        row_stride_ = static_cast<int64_t>(heads) * (dim + 8) + 24;
        break;
      case Layout::kHeadMajor:
        row_stride_ = dim + 4;
        head_stride_ = std::max<int64_t>(rows, 1) * (dim + 4) + 16;
        break;
    }
    num_elems_ = rows > 0 ? static_cast<size_t>((rows - 1) * row_stride_ + (heads - 1) * head_stride_ + dim) : 1;
    // Backed by uint64_t so every dtype is naturally aligned.
    storage_.assign((num_elems_ * dtype_size(dtype) + 7) / 8 + 1, 0);
  }

  int dtype() const { return dtype_; }
  int64_t rows() const { return rows_; }
  int heads() const { return heads_; }
  int dim() const { return dim_; }
  int64_t row_stride() const { return row_stride_; }
  int64_t head_stride() const { return head_stride_; }
  void* data() { return storage_.data(); }
  const void* data() const { return storage_.data(); }
  size_t num_elems() const { return num_elems_; }

  size_t offset(int64_t row, int head, int d) const {
    return static_cast<size_t>(row * row_stride_ + head * head_stride_ + d);
  }

  uint64_t bits_at(size_t index) const {
    uint64_t b = 0;
    std::memcpy(&b, bytes() + index * dtype_size(dtype_), dtype_size(dtype_));
    return b;
  }
  void set_bits_at(size_t index, uint64_t b) {
    std::memcpy(bytes() + index * dtype_size(dtype_), &b, dtype_size(dtype_));
  }

  double value_at(size_t index) const {
    const uint64_t b = bits_at(index);
    switch (dtype_) {
      case RINGATTN_DTYPE_FP32: {
        float f;
        const uint32_t u = static_cast<uint32_t>(b);
        std::memcpy(&f, &u, 4);
        return f;
      }
      case RINGATTN_DTYPE_FP16: return decode(static_cast<uint16_t>(b), kHalf);
      case RINGATTN_DTYPE_BF16: return decode(static_cast<uint16_t>(b), kBf16);
      default: {
        double x;
        std::memcpy(&x, &b, 8);
        return x;
      }
    }
  }

  // Stores x rounded to the dtype; returns the stored value.
  double set(int64_t row, int head, int d, double x) {
    const double r = round_to_dtype(x, dtype_);
    uint64_t b = 0;
    switch (dtype_) {
      case RINGATTN_DTYPE_FP32: {
        const float f = static_cast<float>(r);
        uint32_t u;
        std::memcpy(&u, &f, 4);
        b = u;
        break;
      }
      case RINGATTN_DTYPE_FP16: b = encode_exact(r, kHalf); break;
      case RINGATTN_DTYPE_BF16: b = encode_exact(r, kBf16); break;
      default: std::memcpy(&b, &r, 8); break;
    }
    set_bits_at(offset(row, head, d), b);
    return r;
  }

  double get(int64_t row, int head, int d) const { return value_at(offset(row, head, d)); }

  void poison() {
    for (size_t i = 0; i < num_elems_; ++i) set_bits_at(i, poison_bits(dtype_));
  }

  // Dense [rows, heads, dim] copy of the values.
  std::vector<double> dense() const {
    std::vector<double> out(static_cast<size_t>(rows_) * heads_ * dim_);
    for (int64_t r = 0; r < rows_; ++r)
      for (int h = 0; h < heads_; ++h)
        for (int d = 0; d < dim_; ++d) out[(r * heads_ + h) * dim_ + d] = get(r, h, d);
    return out;
  }

  // Which storage elements belong to the tensor (the rest is padding).
  std::vector<bool> in_tensor_mask() const {
    std::vector<bool> mask(num_elems_, false);
    for (int64_t r = 0; r < rows_; ++r)
      for (int h = 0; h < heads_; ++h)
        for (int d = 0; d < dim_; ++d) mask[offset(r, h, d)] = true;
    return mask;
  }

 private:
  unsigned char* bytes() { return reinterpret_cast<unsigned char*>(storage_.data()); }
  const unsigned char* bytes() const { return reinterpret_cast<const unsigned char*>(storage_.data()); }

  int dtype_ = RINGATTN_DTYPE_FP32;
  int64_t rows_ = 0;
  int heads_ = 1;
  int dim_ = 8;
  int64_t row_stride_ = 0;
  int64_t head_stride_ = 0;
  size_t num_elems_ = 0;
  std::vector<uint64_t> storage_;
};

// Every storage element of t (padding included) still holds the poison: nothing wrote there.
inline bool still_poisoned(const Tensor3& t) {
  for (size_t i = 0; i < t.num_elems(); ++i)
    if (t.bits_at(i) != poison_bits(t.dtype())) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// problems
// ---------------------------------------------------------------------------------------------

struct GroupSpec {
  std::vector<int> lq;         // query tokens of each sequence
  std::vector<int> seqused_k;  // keys of each sequence the group sees; empty = all (NULL)
  int extra_rows = 0;          // rows after cu_seqlens_q[B], in no sequence
};

struct CaseSpec {
  CaseSpec() = default;
  // A case with the defaults below for every optional feature: query groups `query_groups` over
  // key sequences of lengths `key_lengths`, `num_heads_q` query and `num_heads_k` key heads of
  // `head_dim` values.
  CaseSpec(std::string case_name, int num_heads_q, int num_heads_k, int head_dim, bool is_causal,
           std::vector<int> key_lengths, std::vector<GroupSpec> query_groups)
      : name(std::move(case_name)), heads_q(num_heads_q), heads_k(num_heads_k), dim(head_dim), causal(is_causal),
        lk(std::move(key_lengths)), groups(std::move(query_groups)) {}

  // Local attention with these bounds (-1 = unbounded).
  CaseSpec& with_window(int left, int right) {
    has_window = true;
    window_left = left;
    window_right = right;
    return *this;
  }

  std::string name;
  int heads_q = 2;
  int heads_k = 2;
  int dim = 64;
  bool causal = true;
  float softmax_scale = 0.0f;  // 0: default_softmax_scale (1/sqrt(dim))
  std::vector<int> lk;         // key tokens of each sequence
  std::vector<GroupSpec> groups;
  int extra_k_rows = 0;        // rows after cu_seqlens_k[B], in no sequence
  Layout q_layout = Layout::kContiguous;
  Layout kv_layout = Layout::kContiguous;
  Layout out_layout = Layout::kContiguous;   // out and dout
  Layout grad_layout = Layout::kContiguous;  // dq, dk, dv
  double q_amplitude = 1.0;  // |q| up to this: larger values give peakier softmax rows
  // Local attention (has_window = 1 with these bounds, -1 = unbounded), softcap (0 = off) and
  // sink logits ([heads_q], empty = NULL).
  bool has_window = false;
  int window_left = -1;
  int window_right = -1;
  float softcap = 0.0f;
  std::vector<float> sinks;
  // Per group, the diagonal shift of each sequence ([G][B]); empty, or an empty entry = NULL.
  std::vector<std::vector<int>> diagonal_shift;
};

// gtest prints parameters of failing tests with this.
inline void PrintTo(const CaseSpec& c, std::ostream* os) { *os << c.name; }

inline std::vector<int32_t> cumulative(const std::vector<int>& lengths) {
  std::vector<int32_t> cu(1, 0);
  for (int l : lengths) cu.push_back(cu.back() + l);
  return cu;
}

struct CaseInputs {
  CaseSpec spec;
  int dtype = RINGATTN_DTYPE_FP32;
  int64_t total_k = 0;
  std::vector<int32_t> cu_k;
  std::vector<int64_t> total_q;
  std::vector<std::vector<int32_t>> cu_q, seqused, diagonal_shift;
  Tensor3 k, v;
  std::vector<Tensor3> q, dout;
};

inline void fill_uniform(Tensor3& t, std::mt19937& rng, double amplitude) {
  std::uniform_real_distribution<double> dist(-amplitude, amplitude);
  for (int64_t r = 0; r < t.rows(); ++r)
    for (int h = 0; h < t.heads(); ++h)
      for (int d = 0; d < t.dim(); ++d) t.set(r, h, d, dist(rng));
}

inline uint32_t seed_from(const std::string& name, int dtype) {
  uint32_t h = 2166136261u;  // FNV-1a
  for (char c : name) h = (h ^ static_cast<unsigned char>(c)) * 16777619u;
  return h ^ (static_cast<uint32_t>(dtype) * 0x9e3779b9u);
}

inline CaseInputs make_inputs(const CaseSpec& spec, int dtype, uint32_t seed) {
  CaseInputs in;
  in.spec = spec;
  in.dtype = dtype;
  std::mt19937 rng(seed);
  in.cu_k = cumulative(spec.lk);
  in.total_k = in.cu_k.back() + spec.extra_k_rows;
  in.k = Tensor3(dtype, in.total_k, spec.heads_k, spec.dim, spec.kv_layout);
  in.v = Tensor3(dtype, in.total_k, spec.heads_k, spec.dim, spec.kv_layout);
  in.k.poison();
  in.v.poison();
  fill_uniform(in.k, rng, 1.0);
  fill_uniform(in.v, rng, 1.0);
  for (const GroupSpec& g : spec.groups) {
    in.cu_q.push_back(cumulative(g.lq));
    in.seqused.push_back(std::vector<int32_t>(g.seqused_k.begin(), g.seqused_k.end()));
    const size_t group = in.cu_q.size() - 1;
    const std::vector<int> shift =
        group < spec.diagonal_shift.size() ? spec.diagonal_shift[group] : std::vector<int>();
    in.diagonal_shift.push_back(std::vector<int32_t>(shift.begin(), shift.end()));
    in.total_q.push_back(in.cu_q.back().back() + g.extra_rows);
    Tensor3 q(dtype, in.total_q.back(), spec.heads_q, spec.dim, spec.q_layout);
    Tensor3 dout(dtype, in.total_q.back(), spec.heads_q, spec.dim, spec.out_layout);
    q.poison();
    dout.poison();
    fill_uniform(q, rng, spec.q_amplitude);
    fill_uniform(dout, rng, 1.0);
    in.q.push_back(std::move(q));
    in.dout.push_back(std::move(dout));
  }
  return in;
}

// Every K and V value of key rows [first, last) (all heads) becomes NaN.
inline void set_keys_to_nan(CaseInputs& in, int64_t first, int64_t last) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t key = first; key < last; ++key)
    for (int h = 0; h < in.k.heads(); ++h)
      for (int d = 0; d < in.k.dim(); ++d) {
        in.k.set(key, h, d, nan);
        in.v.set(key, h, d, nan);
      }
}

inline ringattn_problem make_problem(const CaseInputs& in) {
  ringattn_problem p{};
  p.dtype = in.dtype;
  p.batch_size = static_cast<int32_t>(in.spec.lk.size());
  p.num_heads_q = in.spec.heads_q;
  p.num_heads_k = in.spec.heads_k;
  p.head_dim = in.spec.dim;
  p.num_groups = static_cast<int32_t>(in.spec.groups.size());
  p.default_softmax_scale = in.spec.softmax_scale > 0.0f ? 0 : 1;
  p.softmax_scale = in.spec.softmax_scale > 0.0f ? in.spec.softmax_scale : 0.0f;
  p.causal = in.spec.causal ? 1 : 0;
  p.total_k = in.total_k;
  p.max_seqlen_k = in.spec.lk.empty() ? 0 : *std::max_element(in.spec.lk.begin(), in.spec.lk.end());
  p.cu_seqlens_k = in.cu_k.data();
  p.check_metadata = 1;
  p.has_window = in.spec.has_window ? 1 : 0;
  p.window_left = in.spec.window_left;
  p.window_right = in.spec.window_right;
  p.softcap = in.spec.softcap;
  p.sinks = in.spec.sinks.empty() ? nullptr : in.spec.sinks.data();
  return p;
}

inline ringattn_exec cpu_exec(int num_threads) {
  ringattn_exec e{};
  e.device_type = RINGATTN_DEVICE_CPU;
  e.num_threads = num_threads;
  return e;
}

inline int max_len(const std::vector<int>& v) { return v.empty() ? 0 : *std::max_element(v.begin(), v.end()); }

struct ForwardResult {
  ringattn_status status = RINGATTN_STATUS_INTERNAL_ERROR;
  std::string error;
  std::vector<Tensor3> out;
  std::vector<std::vector<float>> lse;  // [G][Hq * total_q]
};

// Points the tensor `name` of a call's params, K/V (ringattn_kv) or group `obj` at `data` with these
// strides (in elements): obj.name, obj.name_row_stride, obj.name_head_stride.
#define RATEST_SET_STRIDED(obj, name, data, row_stride, head_stride) \
  do {                                                                \
    (obj).name = (data);                                              \
    (obj).name##_row_stride = (row_stride);                           \
    (obj).name##_head_stride = (head_stride);                         \
  } while (0)

// The same with the strides of the test tensor `t`.
#define RATEST_SET_TENSOR(obj, name, data, t) RATEST_SET_STRIDED(obj, name, data, (t).row_stride(), (t).head_stride())

// A call's group g (ringattn_fwd_group / ringattn_bwd_group) on the host inputs of group g: q and
// its strides, cu_seqlens_q, seqused_k (NULL when the case has none), total_q, max_seqlen_q.
template <typename Group>
void set_group_queries(Group& gr, const CaseInputs& in, int g) {
  RATEST_SET_TENSOR(gr, q, in.q[g].data(), in.q[g]);
  gr.cu_seqlens_q = in.cu_q[g].data();
  gr.seqused_k = in.seqused[g].empty() ? nullptr : in.seqused[g].data();
  gr.diagonal_shift = in.diagonal_shift[g].empty() ? nullptr : in.diagonal_shift[g].data();
  gr.total_q = in.total_q[g];
  gr.max_seqlen_q = max_len(in.spec.groups[g].lq);
}

// A call's K and V (the kv of ringattn_fwd_params / ringattn_bwd_params) on the host inputs.
inline void set_keys_values(ringattn_kv& kv, const CaseInputs& in) {
  RATEST_SET_TENSOR(kv, k, in.k.data(), in.k);
  RATEST_SET_TENSOR(kv, v, in.v.data(), in.v);
}

// Queries the workspace of a forward or backward call, points the call at `allocate(bytes)`, then
// runs it into r.status (and r.error when the query or the call fails). `allocate` returns memory
// that outlives the call.
template <typename Params, typename Result, typename Allocate>
void run_with_workspace(Params& p, ringattn_status (*workspace_size)(const Params*, size_t*),
                        ringattn_status (*run)(const Params*), Result& r, Allocate&& allocate) {
  size_t ws_bytes = 0;
  r.status = workspace_size(&p, &ws_bytes);
  if (r.status != RINGATTN_STATUS_OK) {
    r.error = ringattn_last_error();
    return;
  }
  p.workspace = allocate(ws_bytes);
  p.workspace_size = ws_bytes;
  r.status = run(&p);
  if (r.status != RINGATTN_STATUS_OK) r.error = ringattn_last_error();
}

// The same with a zeroed host workspace.
template <typename Params, typename Result>
void run_with_workspace(Params& p, ringattn_status (*workspace_size)(const Params*, size_t*),
                        ringattn_status (*run)(const Params*), Result& r) {
  std::vector<uint64_t> workspace;
  run_with_workspace(p, workspace_size, run, r, [&](size_t bytes) {
    workspace.assign(bytes / 8 + 1, 0);
    return static_cast<void*>(workspace.data());
  });
}

// Calls ringattn_grouped_fwd on freshly poisoned outputs. `edit`, if given, changes the params
// (and may point outputs elsewhere) before the workspace query and the call.
inline ForwardResult run_forward(const CaseInputs& in, int num_threads,
                                 const std::function<void(ringattn_fwd_params&)>& edit = nullptr) {
  ForwardResult r;
  const int G = static_cast<int>(in.spec.groups.size());
  std::vector<ringattn_fwd_group> groups(G);
  for (int g = 0; g < G; ++g) {
    r.out.emplace_back(in.dtype, in.total_q[g], in.spec.heads_q, in.spec.dim, in.spec.out_layout);
    r.out.back().poison();
    r.lse.push_back(poisoned_floats(static_cast<size_t>(in.total_q[g]) * in.spec.heads_q + 1));  // +1: never a NULL data()
  }
  for (int g = 0; g < G; ++g) {
    ringattn_fwd_group& gr = groups[g];
    gr = ringattn_fwd_group{};
    set_group_queries(gr, in, g);
    RATEST_SET_TENSOR(gr, out, r.out[g].data(), r.out[g]);
    gr.softmax_lse = r.lse[g].data();
  }
  ringattn_fwd_params p{};
  p.problem = make_problem(in);
  p.exec = cpu_exec(num_threads);
  set_keys_values(p.kv, in);
  p.groups = groups.data();
  if (edit) edit(p);
  run_with_workspace(p, ringattn_fwd_workspace_size, ringattn_grouped_fwd, r);
  return r;
}

struct BackwardResult {
  ringattn_status status = RINGATTN_STATUS_INTERNAL_ERROR;
  std::string error;
  std::vector<Tensor3> dq;
  Tensor3 dk, dv;
};

// A BackwardResult whose dq (one per group), dk and dv are allocated in the case's gradient layout
// and poisoned (a value the call does not write shows up).
inline BackwardResult poisoned_gradients(const CaseInputs& in) {
  BackwardResult r;
  for (size_t g = 0; g < in.spec.groups.size(); ++g) {
    r.dq.emplace_back(in.dtype, in.total_q[g], in.spec.heads_q, in.spec.dim, in.spec.grad_layout);
    r.dq.back().poison();
  }
  r.dk = Tensor3(in.dtype, in.total_k, in.spec.heads_k, in.spec.dim, in.spec.grad_layout);
  r.dv = Tensor3(in.dtype, in.total_k, in.spec.heads_k, in.spec.dim, in.spec.grad_layout);
  r.dk.poison();
  r.dv.poison();
  return r;
}

// Calls ringattn_grouped_bwd with the forward's out and LSE, on freshly poisoned gradients.
// `edit` as in run_forward.
inline BackwardResult run_backward(const CaseInputs& in, const ForwardResult& fwd, int num_threads,
                                   const std::function<void(ringattn_bwd_params&)>& edit = nullptr) {
  BackwardResult r = poisoned_gradients(in);
  const int G = static_cast<int>(in.spec.groups.size());
  std::vector<ringattn_bwd_group> groups(G);
  for (int g = 0; g < G; ++g) {
    ringattn_bwd_group& gr = groups[g];
    gr = ringattn_bwd_group{};
    set_group_queries(gr, in, g);
    RATEST_SET_TENSOR(gr, out, fwd.out[g].data(), fwd.out[g]);
    RATEST_SET_TENSOR(gr, dout, in.dout[g].data(), in.dout[g]);
    gr.softmax_lse = fwd.lse[g].data();
    RATEST_SET_TENSOR(gr, dq, r.dq[g].data(), r.dq[g]);
  }
  ringattn_bwd_params p{};
  p.problem = make_problem(in);
  p.exec = cpu_exec(num_threads);
  set_keys_values(p.kv, in);
  RATEST_SET_TENSOR(p, dk, r.dk.data(), r.dk);
  RATEST_SET_TENSOR(p, dv, r.dv.data(), r.dv);
  p.groups = groups.data();
  p.deterministic = 1;
  if (edit) edit(p);
  run_with_workspace(p, ringattn_bwd_workspace_size, ringattn_grouped_bwd, r);
  return r;
}

// The naive reference on the (already rounded) inputs of a case.
inline naive::Problem naive_problem(const CaseInputs& in) {
  naive::Problem p;
  p.batch = static_cast<int>(in.spec.lk.size());
  p.heads_q = in.spec.heads_q;
  p.heads_k = in.spec.heads_k;
  p.dim = in.spec.dim;
  p.scale = static_cast<double>(in.spec.softmax_scale);
  p.causal = in.spec.causal;
  p.has_window = in.spec.has_window;
  p.window_left = in.spec.window_left;
  p.window_right = in.spec.window_right;
  p.softcap = static_cast<double>(in.spec.softcap);
  p.sinks.assign(in.spec.sinks.begin(), in.spec.sinks.end());
  p.total_k = in.total_k;
  p.cu_seqlens_k = in.cu_k;
  p.k = in.k.dense();
  p.v = in.v.dense();
  return p;
}

inline std::vector<naive::Group> naive_groups(const CaseInputs& in) {
  std::vector<naive::Group> groups;
  for (size_t g = 0; g < in.spec.groups.size(); ++g) {
    naive::Group ng;
    ng.total_q = in.total_q[g];
    ng.cu_seqlens_q = in.cu_q[g];
    ng.seqused_k = in.seqused[g];
    ng.diagonal_shift = in.diagonal_shift[g];
    ng.q = in.q[g].dense();
    ng.dout = in.dout[g].dense();
    groups.push_back(std::move(ng));
  }
  return groups;
}

// ---------------------------------------------------------------------------------------------
// checks
// ---------------------------------------------------------------------------------------------

// Tolerances relative to the largest |reference| value of the tensor being compared, plus a
// floor of 0.1 * rel: inputs are O(1), so the terms of every sum are O(0.1 .. 1) even where a
// gradient cancels to (nearly) zero, e.g. dQ of rows that see a single key.
struct Tolerance {
  double out;   // O
  double grad;  // dQ, dK, dV
  double lse;   // |lse - ref| <= lse * (1 + |ref|)
};

inline Tolerance tolerance_for(int dtype) {
  switch (dtype) {
    case RINGATTN_DTYPE_FP64: return {1e-12, 1e-12, 2e-7};  // LSE is fp32 in the ABI
    case RINGATTN_DTYPE_FP32: return {1e-5, 1e-5, 2e-6};
    case RINGATTN_DTYPE_FP16: return {2e-3, 2e-3, 2e-6};    // ~2 ulp of the largest value
    case RINGATTN_DTYPE_BF16: return {1e-2, 1e-2, 2e-6};
  }
  return {0, 0, 0};
}

// Every element of `got` within rel * max|ref| of the reference; a NaN never passes.
inline ::testing::AssertionResult close_to_reference(const std::string& what, const Tensor3& got,
                                                     const std::vector<double>& ref, double rel) {
  double max_ref = 0.0;
  for (double x : ref) max_ref = std::max(max_ref, std::fabs(x));
  const double tol = rel * max_ref + 0.1 * rel;
  int64_t bad = 0;
  double worst = 0.0;
  std::ostringstream first;
  for (int64_t r = 0; r < got.rows(); ++r)
    for (int h = 0; h < got.heads(); ++h)
      for (int d = 0; d < got.dim(); ++d) {
        const double g = got.get(r, h, d);
        const double e = ref[(r * got.heads() + h) * got.dim() + d];
        const double err = std::fabs(g - e);
        if (!(err <= tol)) {  // also catches NaN
          if (bad == 0) first << " first at [row " << r << ", head " << h << ", dim " << d << "]: got " << g
                              << ", expected " << e << ";";
          ++bad;
          worst = std::isnan(err) ? err : std::max(worst, err);
        }
      }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " element(s) off by more than " << tol << " ("
                                       << rel << " * (max|ref| " << max_ref << " + 0.1));" << first.str()
                                       << " worst error " << worst;
}

// LSE [Hq, total_q]: -inf exactly where the reference is -inf, else within rel * (1 + |ref|).
inline ::testing::AssertionResult lse_close(const std::string& what, const std::vector<float>& got,
                                            const std::vector<double>& ref, double rel) {
  int64_t bad = 0;
  std::ostringstream first;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double g = got[i];
    const double e = ref[i];
    const bool ok = std::isinf(e) ? (g == e) : (std::fabs(g - e) <= rel * (1.0 + std::fabs(e)));
    if (!ok) {
      if (bad == 0) first << " first at index " << i << ": got " << g << ", expected " << e;
      ++bad;
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " LSE value(s) wrong;" << first.str();
}

// Storage outside the tensor (stride padding) still holds the poison: nothing wrote there.
inline ::testing::AssertionResult padding_untouched(const std::string& what, const Tensor3& t) {
  const std::vector<bool> mask = t.in_tensor_mask();
  for (size_t i = 0; i < mask.size(); ++i)
    if (!mask[i] && t.bits_at(i) != poison_bits(t.dtype()))
      return ::testing::AssertionFailure() << what << ": padding element " << i << " was overwritten";
  return ::testing::AssertionSuccess();
}

// A call that returned `status` with message `error` was refused with `expected`, the message
// starting with `prefix` and, when `actual` is given, naming it.
inline void expect_refused(ringattn_status status, ringattn_status expected, const std::string& error,
                           const std::string& prefix, const std::string& actual = "") {
  EXPECT_EQ(status, expected) << error;
  EXPECT_EQ(error.rfind(prefix, 0), 0u) << "message: " << error << "\nexpected it to start with: " << prefix;
  if (!actual.empty()) {
    EXPECT_NE(error.find(actual), std::string::npos) << "message: " << error << "\nexpected it to name: " << actual;
  }
}

// A call rejected as an invalid argument, its message starting with `prefix`.
inline void expect_rejected(ringattn_status status, const std::string& error, const std::string& prefix) {
  expect_refused(status, RINGATTN_STATUS_INVALID_ARGUMENT, error, prefix);
}

inline ::testing::AssertionResult same_bits(const std::string& what, const Tensor3& a, const Tensor3& b) {
  if (a.num_elems() != b.num_elems()) return ::testing::AssertionFailure() << what << ": sizes differ";
  for (size_t i = 0; i < a.num_elems(); ++i)
    if (a.bits_at(i) != b.bits_at(i))
      return ::testing::AssertionFailure() << what << ": element " << i << " differs (" << a.value_at(i) << " vs "
                                           << b.value_at(i) << ")";
  return ::testing::AssertionSuccess();
}

inline ::testing::AssertionResult same_bits(const std::string& what, const std::vector<float>& a,
                                            const std::vector<float>& b) {
  if (a.size() != b.size() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) != 0)
    return ::testing::AssertionFailure() << what << ": LSE bits differ";
  return ::testing::AssertionSuccess();
}

// Every group's dQ, then dK and dV, within tol.grad of the float64 reference gradients, and every
// group's dQ padding untouched (G groups).
inline void expect_gradients_close(const BackwardResult& bwd, const naive::Gradients& ref, const Tolerance& tol,
                                   int G) {
  for (int g = 0; g < G; ++g) {
    const std::string tag = " (group " + std::to_string(g) + ")";
    EXPECT_TRUE(close_to_reference("dq" + tag, bwd.dq[g], ref.dq[g], tol.grad));
    EXPECT_TRUE(padding_untouched("dq" + tag, bwd.dq[g]));
  }
  EXPECT_TRUE(close_to_reference("dk", bwd.dk, ref.dk, tol.grad));
  EXPECT_TRUE(close_to_reference("dv", bwd.dv, ref.dv, tol.grad));
}

// The forward's out and LSE of every group (G groups) from 4 threads and from 1 thread, bit for bit.
inline void expect_forward_same_bits_1_vs_4_threads(const ForwardResult& fwd4, const ForwardResult& fwd1, int G) {
  for (int g = 0; g < G; ++g) {
    EXPECT_TRUE(same_bits("out, 1 vs 4 threads", fwd4.out[g], fwd1.out[g]));
    EXPECT_TRUE(same_bits("lse, 1 vs 4 threads", fwd4.lse[g], fwd1.lse[g]));
  }
}

// dQ of every group (G groups), dK and dV from 4 threads and from 1 thread, bit for bit.
inline void expect_backward_same_bits_1_vs_4_threads(const BackwardResult& bwd4, const BackwardResult& bwd1,
                                                     int G) {
  for (int g = 0; g < G; ++g) EXPECT_TRUE(same_bits("dq, 1 vs 4 threads", bwd4.dq[g], bwd1.dq[g]));
  EXPECT_TRUE(same_bits("dk, 1 vs 4 threads", bwd4.dk, bwd1.dk));
  EXPECT_TRUE(same_bits("dv, 1 vs 4 threads", bwd4.dv, bwd1.dv));
}

// The forward and backward of the CPU backend on one case in one dtype, on fresh random inputs,
// against the float64 reference on the same (rounded) inputs: every output element written and
// close, stride padding untouched, a row that sees no key exactly 0 with the LSE of its sink (or
// -inf), and 1 and 4 threads giving the same bits. Backward runs on the backend's own out and
// LSE, as autograd does.
inline void expect_cpu_matches_naive(const CaseSpec& spec, int dtype) {
  const Tolerance tol = tolerance_for(dtype);
  const CaseInputs in = make_inputs(spec, dtype, seed_from(spec.name, dtype));
  const int G = static_cast<int>(spec.groups.size());
  const naive::Problem np = naive_problem(in);
  const std::vector<naive::Group> ng = naive_groups(in);

  // ---- forward ----
  const ForwardResult fwd = run_forward(in, 4);
  ASSERT_EQ(fwd.status, RINGATTN_STATUS_OK) << fwd.error;
  int64_t rows_without_keys = 0;
  for (int g = 0; g < G; ++g) {
    const naive::Forward ref = naive::forward(np, ng[g]);
    const std::string tag = " (group " + std::to_string(g) + ")";
    EXPECT_TRUE(close_to_reference("out" + tag, fwd.out[g], ref.out, tol.out));
    EXPECT_TRUE(lse_close("lse" + tag, fwd.lse[g], ref.lse, tol.lse));
    EXPECT_TRUE(padding_untouched("out" + tag, fwd.out[g]));
    // A row whose reference LSE is -inf (no key and no sink, or a row in no sequence) is exactly
    // zero (the LSE check above requires -inf there).
    for (int h = 0; h < spec.heads_q; ++h)
      for (int64_t row = 0; row < in.total_q[g]; ++row)
        if (std::isinf(ref.lse[h * in.total_q[g] + row])) {
          for (int d = 0; d < spec.dim; ++d) ASSERT_EQ(fwd.out[g].get(row, h, d), 0.0) << "row " << row << tag;
        }
    // A row of a sequence that sees no key: out exactly 0, LSE the sink (or -inf).
    for (int b = 0; b < static_cast<int>(spec.lk.size()); ++b)
      for (int h = 0; h < spec.heads_q; ++h)
        for (int64_t i = 0; i < spec.groups[g].lq[b]; ++i) {
          if (!naive::attention_row(np, ng[g], b, h, i).keys.empty()) continue;
          ++rows_without_keys;
          const int64_t row = in.cu_q[g][b] + i;
          const float lse = fwd.lse[g][h * in.total_q[g] + row];
          if (spec.sinks.empty())
            ASSERT_TRUE(std::isinf(lse) && lse < 0) << "row " << row << tag << ": " << lse;
          else
            ASSERT_EQ(lse, spec.sinks[h]) << "row " << row << " head " << h << tag;
          for (int d = 0; d < spec.dim; ++d) ASSERT_EQ(fwd.out[g].get(row, h, d), 0.0) << "row " << row << tag;
        }
  }
  ::testing::Test::RecordProperty("rows_without_keys", static_cast<int>(rows_without_keys));

  const ForwardResult fwd1 = run_forward(in, 1);
  ASSERT_EQ(fwd1.status, RINGATTN_STATUS_OK) << fwd1.error;
  expect_forward_same_bits_1_vs_4_threads(fwd, fwd1, G);

  // ---- backward ----
  const BackwardResult bwd = run_backward(in, fwd, 4);
  ASSERT_EQ(bwd.status, RINGATTN_STATUS_OK) << bwd.error;
  const naive::Gradients ref = naive::backward(np, ng);
  expect_gradients_close(bwd, ref, tol, G);
  EXPECT_TRUE(padding_untouched("dk", bwd.dk));
  EXPECT_TRUE(padding_untouched("dv", bwd.dv));

  const BackwardResult bwd1 = run_backward(in, fwd1, 1);
  ASSERT_EQ(bwd1.status, RINGATTN_STATUS_OK) << bwd1.error;
  expect_backward_same_bits_1_vs_4_threads(bwd, bwd1, G);
}

constexpr int kAllDtypes[] = {RINGATTN_DTYPE_FP32, RINGATTN_DTYPE_FP16, RINGATTN_DTYPE_BF16, RINGATTN_DTYPE_FP64};

// A suite of cases, each run in every dtype: TEST_P(Suite, ...) on
// `class Suite : public CaseDtypeTest {};`, instantiated with every_dtype(cases) and named by
// case_dtype_name.
using CaseDtypeTest = ::testing::TestWithParam<std::tuple<CaseSpec, int>>;

inline auto every_dtype(const std::vector<CaseSpec>& cases) {
  return ::testing::Combine(::testing::ValuesIn(cases), ::testing::ValuesIn(kAllDtypes));
}

// gtest name of a (CaseSpec, dtype) parameter: "<case>_<dtype>".
inline std::string case_dtype_name(const ::testing::TestParamInfo<std::tuple<CaseSpec, int>>& info) {
  return std::get<0>(info.param).name + "_" + dtype_name(std::get<1>(info.param));
}

}  // namespace ratest
