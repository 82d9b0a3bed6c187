// exec.metadata_errors through the public C ABI. On a GPU: the work-list kernels of the forward
// and of the backward set exactly the bits of metadata_cases.h in the caller's word (ORed into
// what is there, stream-ordered, no host sync), a well-formed call leaves it alone and computes
// the same bits as without a word, and check_metadata = 1 rejects exactly the malformed cases,
// with the host check's message. The validation tests need a CUDA build but no GPU: the calls
// they make are rejected before anything reaches a device.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "metadata_cases.h"
#include "ringattn/ringattn.h"
#include "test_util.h"

#ifdef RINGATTN_TEST_CUDA
#include <cuda_runtime.h>

namespace ratest {
namespace {

constexpr int kHq = 2, kHk = 1, kD = 64;
constexpr int32_t kMaxSeqlenQ = 12, kMaxSeqlenK = 16;
constexpr int kB = kMetadataCaseBatch, kG = kMetadataCaseGroups;
// Already in the word before a call: a call ORs its bits in and never clears others.
constexpr uint32_t kPresetBit = 1u << 20;

bool gpu_available() {
  if (!ringattn_cuda_compiled()) return false;
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

// Finite, non-zero fp16 values in +-[0.25, 2): random sign, exponent and mantissa bits.
std::vector<uint16_t> random_half(size_t n, std::mt19937& rng) {
  std::vector<uint16_t> v(n);
  for (uint16_t& x : v) {
    const uint32_t r = rng();
    x = static_cast<uint16_t>(((r & 1u) << 15) | ((13u + (r >> 1) % 3u) << 10) | ((r >> 8) & 0x3ffu));
  }
  return v;
}

// Device memory, freed with the object.
class DeviceMemory {
 public:
  DeviceMemory() = default;
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  ~DeviceMemory() {
    for (void* p : blocks_) cudaFree(p);
  }
  void* alloc(size_t bytes) {
    void* p = nullptr;
    if (cudaMalloc(&p, bytes > 0 ? bytes : 16) != cudaSuccess) {
      ok_ = false;
      return nullptr;
    }
    blocks_.push_back(p);
    return p;
  }
  template <typename T>
  T* upload(const std::vector<T>& host) {
    T* d = static_cast<T*>(alloc(host.size() * sizeof(T)));
    if (d != nullptr && !host.empty() &&
        cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) != cudaSuccess)
      ok_ = false;
    return d;
  }
  bool ok() const { return ok_; }

 private:
  std::vector<void*> blocks_;
  bool ok_ = true;
};

// The tensors of the metadata_cases.h shape on the device (fp16, Hq = 2, Hk = 1, D = 64).
struct Tensors {
  void *k, *v, *dk, *dv;
  void *q[kG], *out[kG], *dout[kG], *dq[kG];
  float* lse[kG];
};

Tensors make_tensors(DeviceMemory& mem, uint32_t seed) {
  std::mt19937 rng(seed);
  Tensors t{};
  const size_t kv = static_cast<size_t>(kMetadataCaseTotalK) * kHk * kD;
  t.k = mem.upload(random_half(kv, rng));
  t.v = mem.upload(random_half(kv, rng));
  t.dk = mem.alloc(kv * 2);
  t.dv = mem.alloc(kv * 2);
  for (int g = 0; g < kG; ++g) {
    const size_t n = static_cast<size_t>(kMetadataCaseTotalQ[g]) * kHq * kD;
    t.q[g] = mem.upload(random_half(n, rng));
    t.dout[g] = mem.upload(random_half(n, rng));
    t.out[g] = mem.alloc(n * 2);
    t.dq[g] = mem.alloc(n * 2);
    t.lse[g] = static_cast<float*>(mem.alloc(static_cast<size_t>(kMetadataCaseTotalQ[g]) * kHq * 4));
  }
  return t;
}

// A case's metadata on the device.
struct Metadata {
  const int32_t* cu_k;
  const int32_t* cu_q[kG];
  const int32_t* seqused_k1;
};

Metadata upload_metadata(DeviceMemory& mem, const MetadataCase& c) {
  Metadata m{};
  m.cu_k = mem.upload(c.cu_k);
  for (int g = 0; g < kG; ++g) m.cu_q[g] = mem.upload(c.cu_q[g]);
  m.seqused_k1 = mem.upload(c.seqused_k1);
  return m;
}

ringattn_problem make_problem(const Metadata& m, int check_metadata) {
  ringattn_problem p{};
  p.dtype = RINGATTN_DTYPE_FP16;
  p.batch_size = kB;
  p.num_heads_q = kHq;
  p.num_heads_k = kHk;
  p.head_dim = kD;
  p.num_groups = kG;
  p.default_softmax_scale = 1;
  p.causal = 1;
  p.total_k = kMetadataCaseTotalK;
  p.max_seqlen_k = kMaxSeqlenK;
  p.cu_seqlens_k = m.cu_k;
  p.check_metadata = check_metadata;
  return p;
}

ringattn_exec make_exec(int tier, uint32_t* word) {
  ringattn_exec e{};
  e.device_type = RINGATTN_DEVICE_CUDA;
  e.device_index = 0;
  e.tier = tier;
  e.metadata_errors = word;
  return e;
}

struct CallResult {
  ringattn_status status = RINGATTN_STATUS_INTERNAL_ERROR;
  std::string error;
};

// The fields forward and backward groups share: q, out and the LSE of group g, its metadata.
template <typename Group>
void set_group(Group& gr, const Tensors& t, const Metadata& m, int g) {
  RATEST_SET_STRIDED(gr, q, t.q[g], kHq * kD, kD);
  RATEST_SET_STRIDED(gr, out, t.out[g], kHq * kD, kD);
  gr.softmax_lse = t.lse[g];
  gr.cu_seqlens_q = m.cu_q[g];
  gr.seqused_k = g == 1 ? m.seqused_k1 : nullptr;
  gr.total_q = kMetadataCaseTotalQ[g];
  gr.max_seqlen_q = kMaxSeqlenQ;
}

// The fields forward and backward params share: the problem, exec, K, V and the groups.
template <typename Params, typename Group>
void set_params(Params& p, const Group* groups, const Tensors& t, const Metadata& m, int tier, int check_metadata,
                uint32_t* word) {
  p.problem = make_problem(m, check_metadata);
  p.exec = make_exec(tier, word);
  RATEST_SET_STRIDED(p.kv, k, t.k, kHk * kD, kD);
  RATEST_SET_STRIDED(p.kv, v, t.v, kHk * kD, kD);
  p.groups = groups;
}

CallResult run_forward(DeviceMemory& mem, const Tensors& t, const Metadata& m, int tier, int check_metadata,
                       uint32_t* word) {
  ringattn_fwd_group groups[kG] = {};
  for (int g = 0; g < kG; ++g) set_group(groups[g], t, m, g);
  ringattn_fwd_params p{};
  set_params(p, groups, t, m, tier, check_metadata, word);
  CallResult r;
  run_with_workspace(p, ringattn_fwd_workspace_size, ringattn_grouped_fwd, r,
                     [&](size_t bytes) { return mem.alloc(bytes); });
  return r;
}

CallResult run_backward(DeviceMemory& mem, const Tensors& t, const Metadata& m, int tier, int check_metadata,
                        int deterministic, uint32_t* word) {
  ringattn_bwd_group groups[kG] = {};
  for (int g = 0; g < kG; ++g) {
    set_group(groups[g], t, m, g);
    RATEST_SET_STRIDED(groups[g], dout, t.dout[g], kHq * kD, kD);
    RATEST_SET_STRIDED(groups[g], dq, t.dq[g], kHq * kD, kD);
  }
  ringattn_bwd_params p{};
  set_params(p, groups, t, m, tier, check_metadata, word);
  RATEST_SET_STRIDED(p, dk, t.dk, kHk * kD, kD);
  RATEST_SET_STRIDED(p, dv, t.dv, kHk * kD, kD);
  p.deterministic = deterministic;
  CallResult r;
  run_with_workspace(p, ringattn_bwd_workspace_size, ringattn_grouped_bwd, r,
                     [&](size_t bytes) { return mem.alloc(bytes); });
  return r;
}

void set_word(uint32_t* word, uint32_t value) {
  ASSERT_EQ(cudaMemcpy(word, &value, 4, cudaMemcpyHostToDevice), cudaSuccess);
}

uint32_t read_word(const uint32_t* word) {
  uint32_t value = 0xffffffffu;
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(cudaMemcpy(&value, word, 4, cudaMemcpyDeviceToHost), cudaSuccess);
  return value;
}

std::string describe(uint32_t bits) { return ringattn_describe_metadata_errors(bits); }

std::vector<uint16_t> download_half(const void* d, size_t n) {
  std::vector<uint16_t> h(n);
  EXPECT_EQ(cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  return h;
}

class GpuMetadataErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!gpu_available()) GTEST_SKIP() << "no usable GPU";
  }
};

TEST_F(GpuMetadataErrors, EachCaseSetsItsBitsInForwardAndBackward) {
  DeviceMemory mem;
  const Tensors t = make_tensors(mem, 31);
  uint32_t* word = static_cast<uint32_t*>(mem.alloc(4));
  ASSERT_TRUE(mem.ok());
  for (int tier : {RINGATTN_TIER_AUTO, RINGATTN_TIER_SM80})
    for (const MetadataCase& c : metadata_cases()) {
      SCOPED_TRACE(c.name + (tier == RINGATTN_TIER_SM80 ? " (tier 1)" : " (tier auto)"));
      const Metadata m = upload_metadata(mem, c);
      ASSERT_TRUE(mem.ok());
      const uint32_t expected = kPresetBit | c.bits;
      // Without the host check: the call runs (clamping) and reports through the word.
      set_word(word, kPresetBit);
      CallResult r = run_forward(mem, t, m, tier, 0, word);
      ASSERT_EQ(r.status, RINGATTN_STATUS_OK) << r.error;
      EXPECT_EQ(read_word(word), expected) << "forward: got " << describe(read_word(word)) << "; expected "
                                           << describe(expected);
      for (int deterministic : {0, 1}) {
        set_word(word, kPresetBit);
        r = run_backward(mem, t, m, tier, 0, deterministic, word);
        ASSERT_EQ(r.status, RINGATTN_STATUS_OK) << r.error;
        EXPECT_EQ(read_word(word), expected) << "backward (deterministic " << deterministic << "): got "
                                             << describe(read_word(word)) << "; expected " << describe(expected);
      }
      // With it: rejected exactly when bits are set, with the host check's message (the CPU
      // suite checks the same messages), and the word is not touched.
      set_word(word, kPresetBit);
      r = run_forward(mem, t, m, tier, 1, word);
      const CallResult rb = run_backward(mem, t, m, tier, 1, 0, word);
      if (c.bits == 0) {
        EXPECT_EQ(r.status, RINGATTN_STATUS_OK) << r.error;
        EXPECT_EQ(rb.status, RINGATTN_STATUS_OK) << rb.error;
      } else {
        EXPECT_EQ(r.status, RINGATTN_STATUS_INVALID_ARGUMENT);
        EXPECT_EQ(r.error.rfind(c.host_error, 0), 0u) << r.error;
        EXPECT_EQ(rb.status, RINGATTN_STATUS_INVALID_ARGUMENT);
        EXPECT_EQ(rb.error.rfind("backward" + c.host_error.substr(std::string("forward").size()), 0), 0u) << rb.error;
      }
      EXPECT_EQ(read_word(word), kPresetBit);
    }
}

// The word changes nothing else: a well-formed forward gives the same bits with and without it.
TEST_F(GpuMetadataErrors, WellFormedCallComputesTheSameWithTheWord) {
  DeviceMemory mem;
  const Tensors t = make_tensors(mem, 32);
  uint32_t* word = static_cast<uint32_t*>(mem.alloc(4));
  const Metadata m = upload_metadata(mem, metadata_cases().front());
  ASSERT_TRUE(mem.ok());
  ASSERT_EQ(metadata_cases().front().bits, 0u);
  for (int tier : {RINGATTN_TIER_AUTO, RINGATTN_TIER_SM80}) {
    SCOPED_TRACE(tier);
    const size_t n0 = static_cast<size_t>(kMetadataCaseTotalQ[0]) * kHq * kD;
    CallResult r = run_forward(mem, t, m, tier, 0, nullptr);
    ASSERT_EQ(r.status, RINGATTN_STATUS_OK) << r.error;
    const std::vector<uint16_t> without = download_half(t.out[0], n0);
    ASSERT_EQ(cudaMemset(t.out[0], 0xff, n0 * 2), cudaSuccess);  // NaN: an unwritten element shows
    set_word(word, 0);
    r = run_forward(mem, t, m, tier, 0, word);
    ASSERT_EQ(r.status, RINGATTN_STATUS_OK) << r.error;
    EXPECT_EQ(read_word(word), 0u);
    const std::vector<uint16_t> with = download_half(t.out[0], n0);
    EXPECT_TRUE(with == without);
    int nonzero = 0;
    for (uint16_t x : with) nonzero += (x & 0x7fffu) != 0;
    EXPECT_GT(nonzero, static_cast<int>(n0 / 2)) << "the output is mostly zeros: the test would not see a change";
  }
}

}  // namespace
}  // namespace ratest

#endif  // RINGATTN_TEST_CUDA

// ---- validation of the word (no GPU needed; a CUDA build) ----

namespace ratest {
namespace {

#ifdef RINGATTN_TEST_CUDA
// Host buffers standing in for device tensors: validation checks pointers and layouts only, and
// these calls are rejected before anything reaches a device.
struct HostStandIns {
  std::vector<uint16_t> q, k, v, out;
  std::vector<float> lse;
  std::vector<int32_t> cu_k{0, 8}, cu_q{0, 8};
  ringattn_fwd_group group{};
  ringattn_fwd_params params{};

  HostStandIns() : q(8 * 64), k(8 * 64), v(8 * 64), out(8 * 64), lse(8) {
    group.q = q.data();
    group.q_row_stride = group.q_head_stride = 64;
    group.out = out.data();
    group.out_row_stride = group.out_head_stride = 64;
    group.softmax_lse = lse.data();
    group.cu_seqlens_q = cu_q.data();
    group.total_q = 8;
    group.max_seqlen_q = 8;
    params.problem.dtype = RINGATTN_DTYPE_FP16;
    params.problem.batch_size = 1;
    params.problem.num_heads_q = params.problem.num_heads_k = 1;
    params.problem.head_dim = 64;
    params.problem.num_groups = 1;
    params.problem.default_softmax_scale = 1;
    params.problem.total_k = 8;
    params.problem.max_seqlen_k = 8;
    params.problem.cu_seqlens_k = cu_k.data();
    params.exec.device_type = RINGATTN_DEVICE_CUDA;
    params.kv.k = k.data();
    params.kv.k_row_stride = params.kv.k_head_stride = 64;
    params.kv.v = v.data();
    params.kv.v_row_stride = params.kv.v_head_stride = 64;
    params.groups = &group;
  }
};

// The call that returned `status` (the last one) was rejected, its message starting with `prefix`.
void expect_rejected_with(ringattn_status status, const std::string& prefix) {
  expect_rejected(status, ringattn_last_error(), prefix);
}

TEST(MetadataErrorsValidation, MisalignedWordIsRejected) {
  HostStandIns h;
  alignas(8) unsigned char storage[8] = {};
  h.params.exec.metadata_errors = reinterpret_cast<uint32_t*>(storage + 2);
  size_t bytes = 0;
  expect_rejected_with(ringattn_fwd_workspace_size(&h.params, &bytes),
                       "exec.metadata_errors: expected NULL or a 4-byte aligned pointer");
  expect_rejected_with(ringattn_grouped_fwd(&h.params),
                       "exec.metadata_errors: expected NULL or a 4-byte aligned pointer");
  EXPECT_EQ(std::memcmp(storage, "\0\0\0\0\0\0\0\0", 8), 0);
}

TEST(MetadataErrorsValidation, WordInsideAnOutputOrAnInputIsRejected) {
  HostStandIns h;
  h.params.exec.metadata_errors = reinterpret_cast<uint32_t*>(h.out.data() + 64);
  expect_rejected_with(ringattn_grouped_fwd(&h.params),
                       "exec.metadata_errors: expected an output that shares no memory with the output out (group 0)");
  h.params.exec.metadata_errors = reinterpret_cast<uint32_t*>(h.cu_k.data());
  expect_rejected_with(ringattn_grouped_fwd(&h.params),
                       "exec.metadata_errors: expected an output that shares no memory with the input cu_seqlens_k");
  EXPECT_EQ(h.cu_k, (std::vector<int32_t>{0, 8}));
}
#else
TEST(MetadataErrorsValidation, SkippedWithoutCudaToolkit) { GTEST_SKIP() << "built without CUDA"; }
#endif

}  // namespace
}  // namespace ratest
