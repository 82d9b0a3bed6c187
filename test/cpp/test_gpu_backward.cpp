// GPU backward kernels against the CPU backend, through the public C ABI. Skipped when the
// library has no CUDA or the machine has no usable GPU (cudaGetDeviceCount fails or is 0).
//
// Every case: the CPU forward gives O and the LSE; the CPU backward (exact, fp32 accumulation)
// and the GPU backward both consume them. dQ, dK and dV are poisoned with NaN before the GPU
// call and checked fully written (no NaN left, stride padding untouched), within a tolerance
// relative to max|reference|, and exactly zero on rows the reference has all zero (keys no
// query sees, queries that see no key). Deterministic mode is run three times and must give
// the same bits.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "ringattn/ringattn.h"
#include "test_util.h"

#ifdef RINGATTN_TEST_CUDA
#include <cuda_runtime.h>

namespace {

using ratest::BackwardResult;
using ratest::CaseInputs;
using ratest::CaseSpec;
using ratest::ForwardResult;
using ratest::GroupSpec;
using ratest::Layout;
using ratest::Tensor3;

bool gpu_available() {
  if (!ringattn_cuda_compiled()) return false;
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

// Device copies that free themselves.
class DeviceMemory {
 public:
  ~DeviceMemory() {
    for (void* p : ptrs_) cudaFree(p);
  }
  void* upload(const void* src, size_t bytes) {
    void* d = nullptr;
    EXPECT_EQ(cudaMalloc(&d, bytes < 16 ? 16 : bytes), cudaSuccess);
    if (bytes) {
      EXPECT_EQ(cudaMemcpy(d, src, bytes, cudaMemcpyHostToDevice), cudaSuccess);
    }
    ptrs_.push_back(d);
    return d;
  }
  void* upload(const Tensor3& t) { return upload(t.data(), t.num_elems() * ratest::dtype_size(t.dtype())); }
  template <typename T>
  const T* upload(const std::vector<T>& v) {
    return static_cast<const T*>(upload(v.data(), v.size() * sizeof(T)));
  }

 private:
  std::vector<void*> ptrs_;
};

void download(Tensor3& t, const void* d) {
  ASSERT_EQ(cudaMemcpy(t.data(), d, t.num_elems() * ratest::dtype_size(t.dtype()), cudaMemcpyDeviceToHost),
            cudaSuccess);
}

// ringattn_grouped_bwd on the GPU with the forward's O and LSE, on poisoned gradients.
BackwardResult run_backward_gpu(const CaseInputs& in, const ForwardResult& fwd, int deterministic) {
  BackwardResult r = ratest::poisoned_gradients(in);
  const int G = static_cast<int>(in.spec.groups.size());
  DeviceMemory mem;

  std::vector<ringattn_bwd_group> groups(G);
  std::vector<void*> d_dq(G);
  for (int g = 0; g < G; ++g) {
    ringattn_bwd_group& gr = groups[g];
    gr = ringattn_bwd_group{};
    RATEST_SET_TENSOR(gr, q, mem.upload(in.q[g]), in.q[g]);
    RATEST_SET_TENSOR(gr, out, mem.upload(fwd.out[g]), fwd.out[g]);
    RATEST_SET_TENSOR(gr, dout, mem.upload(in.dout[g]), in.dout[g]);
    gr.softmax_lse = mem.upload(fwd.lse[g]);
    d_dq[g] = mem.upload(r.dq[g]);
    RATEST_SET_TENSOR(gr, dq, d_dq[g], r.dq[g]);
    gr.cu_seqlens_q = mem.upload(in.cu_q[g]);
    gr.seqused_k = in.seqused[g].empty() ? nullptr : mem.upload(in.seqused[g]);
    gr.total_q = in.total_q[g];
    gr.max_seqlen_q = ratest::max_len(in.spec.groups[g].lq);
  }
  ringattn_bwd_params p{};
  p.problem = ratest::make_problem(in);
  p.problem.cu_seqlens_k = mem.upload(in.cu_k);
  p.exec.device_type = RINGATTN_DEVICE_CUDA;
  p.exec.device_index = 0;
  RATEST_SET_TENSOR(p.kv, k, mem.upload(in.k), in.k);
  RATEST_SET_TENSOR(p.kv, v, mem.upload(in.v), in.v);
  void* d_dk = mem.upload(r.dk);
  void* d_dv = mem.upload(r.dv);
  RATEST_SET_TENSOR(p, dk, d_dk, r.dk);
  RATEST_SET_TENSOR(p, dv, d_dv, r.dv);
  p.groups = groups.data();
  p.deterministic = deterministic;

  size_t ws_bytes = 0;
  r.status = ringattn_bwd_workspace_size(&p, &ws_bytes);
  if (r.status != RINGATTN_STATUS_OK) {
    r.error = ringattn_last_error();
    return r;
  }
  // Garbage in the workspace: the kernels must not rely on it being zero.
  p.workspace = ws_bytes ? mem.upload(std::vector<char>(ws_bytes, 0x5a).data(), ws_bytes) : nullptr;
  p.workspace_size = ws_bytes;
  r.status = ringattn_grouped_bwd(&p);
  if (r.status != RINGATTN_STATUS_OK) {
    r.error = ringattn_last_error();
    return r;
  }
  const cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    r.status = RINGATTN_STATUS_CUDA_ERROR;
    r.error = cudaGetErrorString(err);
    return r;
  }
  for (int g = 0; g < G; ++g) download(r.dq[g], d_dq[g]);
  download(r.dk, d_dk);
  download(r.dv, d_dv);
  return r;
}

// Rows (token, head) with structurally zero gradients must be exactly zero: dQ of a query that
// sees no key (LSE = -inf, or a row in no sequence), dK and dV of a key no query sees (its dV
// reference row is all zero: dV = sum P dO is non-zero as soon as one query sees the key).
// Rows that are zero only by cancellation (e.g. dQ of a row seeing one key) are left to the
// tolerance check.
::testing::AssertionResult zero_rows_exact(const std::string& what, const Tensor3& got,
                                           const std::vector<bool>& structural_zero) {
  int64_t bad = 0;
  std::string first;
  for (int64_t r = 0; r < got.rows(); ++r)
    for (int h = 0; h < got.heads(); ++h) {
      if (!structural_zero[r * got.heads() + h]) continue;
      bool zero = true;
      for (int d = 0; d < got.dim(); ++d) zero = zero && got.get(r, h, d) == 0.0;
      if (!zero && bad++ == 0) first = "row " + std::to_string(r) + ", head " + std::to_string(h);
    }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": " << bad << " row(s) should be exactly 0, first at " << first;
}

std::vector<bool> rows_without_keys(const std::vector<float>& lse, int64_t total_q, int heads) {
  std::vector<bool> z(static_cast<size_t>(total_q) * heads);
  for (int64_t r = 0; r < total_q; ++r)
    for (int h = 0; h < heads; ++h) z[r * heads + h] = std::isinf(lse[h * total_q + r]) && lse[h * total_q + r] < 0;
  return z;
}

std::vector<bool> all_zero_rows(const Tensor3& t) {
  std::vector<bool> z(static_cast<size_t>(t.rows()) * t.heads());
  for (int64_t r = 0; r < t.rows(); ++r)
    for (int h = 0; h < t.heads(); ++h) {
      bool zero = true;
      for (int d = 0; d < t.dim(); ++d) zero = zero && t.get(r, h, d) == 0.0;
      z[r * t.heads() + h] = zero;
    }
  return z;
}

double grad_tolerance(int dtype) { return dtype == RINGATTN_DTYPE_BF16 ? 3e-2 : 5e-3; }

void expect_matches(const std::string& name, const BackwardResult& got, const BackwardResult& ref,
                    const ForwardResult& fwd, int dtype) {
  const double tol = grad_tolerance(dtype);
  for (size_t g = 0; g < ref.dq.size(); ++g) {
    const std::string what = name + " dq (group " + std::to_string(g) + ")";
    EXPECT_TRUE(ratest::close_to_reference(what, got.dq[g], ref.dq[g].dense(), tol));
    EXPECT_TRUE(zero_rows_exact(what, got.dq[g], rows_without_keys(fwd.lse[g], ref.dq[g].rows(), ref.dq[g].heads())));
    EXPECT_TRUE(ratest::padding_untouched(what, got.dq[g]));
  }
  EXPECT_TRUE(ratest::close_to_reference(name + " dk", got.dk, ref.dk.dense(), tol));
  EXPECT_TRUE(ratest::close_to_reference(name + " dv", got.dv, ref.dv.dense(), tol));
  const std::vector<bool> unseen_keys = all_zero_rows(ref.dv);
  EXPECT_TRUE(zero_rows_exact(name + " dk", got.dk, unseen_keys));
  EXPECT_TRUE(zero_rows_exact(name + " dv", got.dv, unseen_keys));
  EXPECT_TRUE(ratest::padding_untouched(name + " dk", got.dk));
  EXPECT_TRUE(ratest::padding_untouched(name + " dv", got.dv));
}

std::string dtype_suffix(int dtype) { return dtype == RINGATTN_DTYPE_BF16 ? "_bf16" : "_fp16"; }

// Runs one case: GPU (atomic dQ) vs CPU; with `deterministic`, also three deterministic GPU
// runs that must match the CPU and each other bit for bit.
void check_case(const CaseSpec& spec, int dtype, bool deterministic) {
  const std::string name = spec.name + dtype_suffix(dtype);
  SCOPED_TRACE(name);
  const CaseInputs in = ratest::make_inputs(spec, dtype, ratest::seed_from(spec.name, dtype));
  const ForwardResult fwd = ratest::run_forward(in, 0);
  ASSERT_EQ(fwd.status, RINGATTN_STATUS_OK) << fwd.error;
  const BackwardResult ref = ratest::run_backward(in, fwd, 0);
  ASSERT_EQ(ref.status, RINGATTN_STATUS_OK) << ref.error;

  const BackwardResult gpu = run_backward_gpu(in, fwd, 0);
  ASSERT_EQ(gpu.status, RINGATTN_STATUS_OK) << gpu.error;
  expect_matches(name, gpu, ref, fwd, dtype);

  if (!deterministic) return;
  const BackwardResult d0 = run_backward_gpu(in, fwd, 1);
  ASSERT_EQ(d0.status, RINGATTN_STATUS_OK) << d0.error;
  expect_matches(name + " deterministic", d0, ref, fwd, dtype);
  for (int rep = 1; rep < 3; ++rep) {
    const BackwardResult d = run_backward_gpu(in, fwd, 1);
    ASSERT_EQ(d.status, RINGATTN_STATUS_OK) << d.error;
    const std::string what = name + " deterministic run " + std::to_string(rep);
    for (size_t g = 0; g < d.dq.size(); ++g)
      EXPECT_TRUE(ratest::same_bits(what + " dq (group " + std::to_string(g) + ")", d.dq[g], d0.dq[g]));
    EXPECT_TRUE(ratest::same_bits(what + " dk", d.dk, d0.dk));
    EXPECT_TRUE(ratest::same_bits(what + " dv", d.dv, d0.dv));
  }
}

std::string shape_name(const char* base, int d, bool causal) {
  return std::string(base) + "_d" + std::to_string(d) + (causal ? "_causal" : "_full");
}

class GpuBackward : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!gpu_available()) GTEST_SKIP() << "no CUDA build or no usable GPU";
  }
};

// Three groups over one K/V with different seqused_k (one of them 0), GQA 8:2, strided K/V
// and gradients; then a single group with odd lengths (1, 113, 239) and MQA.
TEST_F(GpuBackward, MatchesCpuBackendAcrossShapes) {
  for (int dtype : {RINGATTN_DTYPE_FP16, RINGATTN_DTYPE_BF16})
    for (int d : {64, 128, 256})
      for (bool causal : {false, true}) {
        CaseSpec groups(shape_name("groups", d, causal), 8, 2, d, causal, {256, 203},
                        {GroupSpec{{128, 37}, {128, 150}, 0}, GroupSpec{{128, 113}, {}, 0},
                         GroupSpec{{5, 64}, {0, 17}, 0}});
        groups.kv_layout = Layout::kPaddedHeads;
        groups.grad_layout = Layout::kPaddedHeads;
        check_case(groups, dtype, /*deterministic=*/true);

        CaseSpec odd(shape_name("odd_mqa", d, causal), 4, 1, d, causal, {1, 203, 239},
                     {GroupSpec{{1, 113, 239}, {}, 0}});
        odd.q_layout = Layout::kPaddedHeads;
        odd.out_layout = Layout::kPaddedHeads;
        check_case(odd, dtype, /*deterministic=*/false);
      }
}

// Four groups; Lq > Lk makes leading causal rows see no key (dQ = 0); seqused_k = 0 and a
// sequence without keys give keys nobody sees (dK = dV = 0) and queries that see nothing; rows
// after the last sequence in Q and in K/V; a softmax scale other than 1/sqrt(D).
TEST_F(GpuBackward, ManyGroupsEmptyRowsAndTails) {
  for (bool causal : {true, false}) {
    CaseSpec c(std::string("many_groups") + (causal ? "_causal" : "_full"), 8, 8, 128, causal, {100, 0, 64},
               {GroupSpec{{300, 7, 64}, {}, 3}, GroupSpec{{64, 0, 1}, {0, 0, 64}, 0}, GroupSpec{{200, 3, 5}, {}, 0},
                GroupSpec{{17, 0, 64}, {100, 0, 3}, 9}});
    c.softmax_scale = causal ? 0.0f : 0.05f;
    c.extra_k_rows = 5;
    c.grad_layout = Layout::kPaddedHeads;
    check_case(c, RINGATTN_DTYPE_BF16, /*deterministic=*/true);
    check_case(c, RINGATTN_DTYPE_FP16, /*deterministic=*/false);
  }
}

// Small shapes covering both kernels, both Q/dO pipelines (one and two stages) and masking;
// quick enough for compute-sanitizer (memcheck, racecheck).
TEST_F(GpuBackward, SmallCases) {
  for (int d : {64, 256}) {
    const CaseSpec c(shape_name("small", d, true), 2, 1, d, true, {70, 33},
                     {GroupSpec{{80, 9}, {}, 0}, GroupSpec{{17, 33}, {40, 0}, 0}});
    check_case(c, RINGATTN_DTYPE_BF16, /*deterministic=*/true);
    check_case(c, RINGATTN_DTYPE_BF16, /*deterministic=*/false);  // dQ by TMA reduce-add on tier 2
  }
}

// Longer sequences: many query tiles per K/V block (dK/dV accumulate across tiles, heads and
// groups in registers), two groups seeing overlapping key ranges (a zigzag rank's halves); head
// dim 256 too (on sm90 cards tier 2's head-split loop, its stages and buffers wrapping many times).
TEST_F(GpuBackward, LongSequencesTwoGroups) {
  for (int d : {128, 256})
    for (int dtype : {RINGATTN_DTYPE_BF16, RINGATTN_DTYPE_FP16}) {
      const CaseSpec c(shape_name("long_zigzag", d, true), 8, 2, d, true, {1024},
                       {GroupSpec{{512}, {512}, 0}, GroupSpec{{512}, {}, 0}});
      check_case(c, dtype, /*deterministic=*/true);
      if (d == 256) check_case(c, dtype, /*deterministic=*/false);
    }
}

}  // namespace

#else
TEST(GpuBackward, SkippedWithoutCudaToolkit) { GTEST_SKIP() << "built without CUDA"; }
#endif
