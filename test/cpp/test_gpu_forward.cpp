// GPU forward kernels against the CPU backend, through the public C ABI. Skipped when the
// library has no CUDA or the machine has no usable GPU (cudaGetDeviceCount fails or is 0).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "ringattn/ringattn.h"

#ifdef RINGATTN_TEST_CUDA
#include <cuda_runtime.h>

namespace {

uint16_t to_half_bits(float f, int dtype) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if (dtype == RINGATTN_DTYPE_BF16) {
    const uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
    return static_cast<uint16_t>((x + rounding) >> 16);
  }
  // fp16, round to nearest even (normal range only: test data stays in it).
  const uint32_t sign = (x >> 16) & 0x8000u;
  const int exp = static_cast<int>((x >> 23) & 0xff) - 127 + 15;
  uint32_t mant = x & 0x7fffffu;
  if (exp <= 0) return static_cast<uint16_t>(sign);  // flush tiny values (never produced here)
  uint32_t h = sign | (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(h);
}

float from_half_bits(uint16_t h, int dtype) {
  if (dtype == RINGATTN_DTYPE_BF16) {
    uint32_t x = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
  }
  const uint32_t sign = (h & 0x8000u) << 16;
  const int exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ffu;
  uint32_t x;
  if (exp == 0) {
    if (mant == 0) {
      x = sign;
    } else {
      float f = std::ldexp(static_cast<float>(mant), -24);
      return sign ? -f : f;
    }
  } else if (exp == 31) {
    x = sign | 0x7f800000u | (mant << 13);
  } else {
    x = sign | (static_cast<uint32_t>(exp - 15 + 127) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}

bool gpu_available() {
  if (!ringattn_cuda_compiled()) return false;
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

struct Case {
  int dtype;
  int head_dim;
  int hq, hk;
  bool causal;
  std::vector<std::vector<int>> seqlens_q;  // [group][b]
  std::vector<int> seqlens_k;               // [b]
  std::vector<std::vector<int>> seqused_k;  // [group][b], empty = all keys
  // The GPU's output with padded strides (head stride D + 8, row stride Hq (D + 8) + 16): the
  // padding must stay as poisoned, and the tier-2 persistent kernel's TMA stores of O must
  // follow both strides.
  bool padded_out = false;
};

std::string name_of(const Case& c) {
  std::string s = c.dtype == RINGATTN_DTYPE_BF16 ? "bf16" : "fp16";
  s += "_d" + std::to_string(c.head_dim) + "_h" + std::to_string(c.hq) + "x" + std::to_string(c.hk);
  s += c.causal ? "_causal" : "_full";
  s += "_g" + std::to_string(c.seqlens_q.size());
  return s;
}

// Runs the case on CPU and GPU and compares O and LSE.
void run_case(const Case& c, uint32_t seed) {
  const int G = static_cast<int>(c.seqlens_q.size());
  const int B = static_cast<int>(c.seqlens_k.size());
  const int D = c.head_dim;
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);

  std::vector<int32_t> cu_k(B + 1, 0);
  for (int b = 0; b < B; ++b) cu_k[b + 1] = cu_k[b] + c.seqlens_k[b];
  const int64_t total_k = cu_k[B];
  // K/V with a padded head stride (strided input, no copy).
  const int64_t kv_head_stride = D + 8;
  const int64_t kv_row_stride = c.hk * kv_head_stride;
  std::vector<uint16_t> k(total_k * kv_row_stride), v(total_k * kv_row_stride);
  for (auto& x : k) x = to_half_bits(normal(rng), c.dtype);
  for (auto& x : v) x = to_half_bits(normal(rng), c.dtype);

  std::vector<std::vector<int32_t>> cu_q(G), used(G);
  std::vector<std::vector<uint16_t>> q(G);
  std::vector<int64_t> total_q(G);
  for (int g = 0; g < G; ++g) {
    cu_q[g].assign(B + 1, 0);
    for (int b = 0; b < B; ++b) cu_q[g][b + 1] = cu_q[g][b] + c.seqlens_q[g][b];
    total_q[g] = cu_q[g][B];
    q[g].resize(std::max<int64_t>(total_q[g], 1) * c.hq * D);
    for (auto& x : q[g]) x = to_half_bits(normal(rng), c.dtype);
    if (!c.seqused_k.empty() && !c.seqused_k[g].empty()) used[g] = c.seqused_k[g];
  }

  // ---- CPU reference (the exact backend) ----
  std::vector<std::vector<uint16_t>> out_cpu(G);
  std::vector<std::vector<float>> lse_cpu(G);
  std::vector<ringattn_fwd_group> groups(G);
  ringattn_fwd_params p{};
  p.problem.dtype = c.dtype;
  p.problem.batch_size = B;
  p.problem.num_heads_q = c.hq;
  p.problem.num_heads_k = c.hk;
  p.problem.head_dim = D;
  p.problem.num_groups = G;
  p.problem.causal = c.causal;
  p.problem.default_softmax_scale = 1;  // 1/sqrt(D)
  p.problem.total_k = total_k;
  p.problem.max_seqlen_k = *std::max_element(c.seqlens_k.begin(), c.seqlens_k.end());
  p.kv.k_row_stride = p.kv.v_row_stride = kv_row_stride;
  p.kv.k_head_stride = p.kv.v_head_stride = kv_head_stride;
  for (int g = 0; g < G; ++g) {
    out_cpu[g].assign(q[g].size(), 0x7fff);
    lse_cpu[g].assign(std::max<int64_t>(total_q[g], 1) * c.hq, NAN);
    ringattn_fwd_group& gr = groups[g];
    gr.q = q[g].data();
    gr.q_row_stride = gr.out_row_stride = c.hq * D;
    gr.q_head_stride = gr.out_head_stride = D;
    gr.out = out_cpu[g].data();
    gr.softmax_lse = lse_cpu[g].data();
    gr.cu_seqlens_q = cu_q[g].data();
    gr.seqused_k = used[g].empty() ? nullptr : used[g].data();
    gr.total_q = total_q[g];
    gr.max_seqlen_q = *std::max_element(c.seqlens_q[g].begin(), c.seqlens_q[g].end());
  }
  p.exec.device_type = RINGATTN_DEVICE_CPU;
  p.kv.k = k.data();
  p.kv.v = v.data();
  p.problem.cu_seqlens_k = cu_k.data();
  p.groups = groups.data();
  ASSERT_EQ(ringattn_grouped_fwd(&p), RINGATTN_STATUS_OK) << ringattn_last_error();

  // ---- GPU ----
  std::vector<void*> allocations;
  auto upload = [&](const void* src, size_t bytes) -> void* {
    void* d = nullptr;
    EXPECT_EQ(cudaMalloc(&d, std::max<size_t>(bytes, 16)), cudaSuccess);
    if (bytes) EXPECT_EQ(cudaMemcpy(d, src, bytes, cudaMemcpyHostToDevice), cudaSuccess);
    allocations.push_back(d);
    return d;
  };
  std::vector<ringattn_fwd_group> dgroups = groups;
  std::vector<void*> d_out(G), d_lse(G);
  const int64_t out_head_stride = c.padded_out ? D + 8 : D;
  const int64_t out_row_stride = c.padded_out ? c.hq * out_head_stride + 16 : c.hq * D;
  std::vector<size_t> out_elems(G);
  for (int g = 0; g < G; ++g) {
    ringattn_fwd_group& gr = dgroups[g];
    gr.q = upload(q[g].data(), q[g].size() * 2);
    // Poison: 0xFFFF is NaN in both fp16 and bf16.
    out_elems[g] = static_cast<size_t>(std::max<int64_t>(total_q[g], 1) * out_row_stride);
    std::vector<uint16_t> poison(out_elems[g], 0xffff);
    d_out[g] = upload(poison.data(), poison.size() * 2);
    gr.out_row_stride = out_row_stride;
    gr.out_head_stride = out_head_stride;
    std::vector<float> lpoison(lse_cpu[g].size(), NAN);
    d_lse[g] = upload(lpoison.data(), lpoison.size() * 4);
    gr.out = d_out[g];
    gr.softmax_lse = static_cast<float*>(d_lse[g]);
    gr.cu_seqlens_q = static_cast<const int32_t*>(upload(cu_q[g].data(), cu_q[g].size() * 4));
    gr.seqused_k = used[g].empty() ? nullptr : static_cast<const int32_t*>(upload(used[g].data(), used[g].size() * 4));
  }
  p.exec.device_type = RINGATTN_DEVICE_CUDA;
  p.exec.device_index = 0;
  p.kv.k = upload(k.data(), k.size() * 2);
  p.kv.v = upload(v.data(), v.size() * 2);
  p.problem.cu_seqlens_k = static_cast<const int32_t*>(upload(cu_k.data(), cu_k.size() * 4));
  p.problem.check_metadata = 1;
  p.groups = dgroups.data();
  size_t ws = 0;
  ASSERT_EQ(ringattn_fwd_workspace_size(&p, &ws), RINGATTN_STATUS_OK) << ringattn_last_error();
  p.workspace = ws ? upload(std::vector<char>(ws, 0x5a).data(), ws) : nullptr;
  p.workspace_size = ws;
  ASSERT_EQ(ringattn_grouped_fwd(&p), RINGATTN_STATUS_OK) << ringattn_last_error();
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  const float tol = c.dtype == RINGATTN_DTYPE_BF16 ? 2e-2f : 4e-3f;
  for (int g = 0; g < G; ++g) {
    std::vector<uint16_t> out_gpu(out_elems[g]);
    std::vector<float> lse_gpu(lse_cpu[g].size());
    ASSERT_EQ(cudaMemcpy(out_gpu.data(), d_out[g], out_gpu.size() * 2, cudaMemcpyDeviceToHost), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(lse_gpu.data(), d_lse[g], lse_gpu.size() * 4, cudaMemcpyDeviceToHost), cudaSuccess);
    float max_ref = 0.f, max_err = 0.f;
    std::vector<bool> written(out_elems[g], false);
    for (int64_t i = 0; i < total_q[g] * c.hq * D; ++i) {
      const int64_t t = i / (c.hq * D), h = (i / D) % c.hq, d = i % D;
      const int64_t at = t * out_row_stride + h * out_head_stride + d;
      written[at] = true;
      const float ref = from_half_bits(out_cpu[g][i], c.dtype);
      const float got = from_half_bits(out_gpu[at], c.dtype);
      ASSERT_FALSE(std::isnan(got)) << name_of(c) << " group " << g << " output " << i << " not written / NaN";
      max_ref = std::max(max_ref, std::fabs(ref));
      max_err = std::max(max_err, std::fabs(got - ref));
    }
    EXPECT_LE(max_err, tol * std::max(max_ref, 1e-3f)) << name_of(c) << " group " << g;
    for (size_t i = 0; i < out_elems[g]; ++i)
      if (!written[i]) ASSERT_EQ(out_gpu[i], 0xffff) << name_of(c) << " group " << g << " padding element " << i << " written";
    for (int64_t i = 0; i < total_q[g] * c.hq; ++i) {
      const int64_t h = i / std::max<int64_t>(total_q[g], 1);
      const int64_t t = i % std::max<int64_t>(total_q[g], 1);
      const float ref = lse_cpu[g][h * total_q[g] + t];
      const float got = lse_gpu[h * total_q[g] + t];
      ASSERT_FALSE(std::isnan(got)) << name_of(c) << " lse " << i;
      if (std::isinf(ref)) {
        EXPECT_TRUE(std::isinf(got) && got < 0) << name_of(c) << " lse " << i << " expected -inf, got " << got;
      } else {
        EXPECT_NEAR(got, ref, 1e-3f * std::max(1.f, std::fabs(ref))) << name_of(c) << " lse " << i;
      }
    }
  }
  for (void* d : allocations) cudaFree(d);
}

class GpuForward : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!gpu_available()) GTEST_SKIP() << "no CUDA build or no usable GPU";
  }
};

TEST_F(GpuForward, MatchesCpuBackendAcrossShapes) {
  uint32_t seed = 1234;
  for (int dtype : {RINGATTN_DTYPE_FP16, RINGATTN_DTYPE_BF16})
    for (int d : {64, 128, 256})
      for (bool causal : {false, true}) {
        // Two groups over one K/V: zigzag-like (early / late), plus a second, ragged sequence.
        Case c{dtype, d, 8, 2, causal, {{128, 37}, {128, 113}}, {256, 203}, {{128, 150}, {}}};
        run_case(c, seed++);
        // Single group, odd lengths, MQA.
        Case s{dtype, d, 4, 1, causal, {{1, 113, 239}}, {1, 203, 1}, {}};
        run_case(s, seed++);
      }
}

TEST_F(GpuForward, ManyGroupsAndEmptyRows) {
  // Four groups; Lq > Lk makes leading causal rows see no key (O = 0, LSE = -inf); seqused_k = 0.
  Case c{RINGATTN_DTYPE_BF16, 128, 8, 8, true, {{300, 64}, {64, 1}, {200, 5}, {17, 64}}, {100, 64},
         {{}, {0, 64}, {}, {100, 3}}};
  run_case(c, 99);
  Case f = c;
  f.causal = false;
  run_case(f, 100);
}

TEST_F(GpuForward, PersistentPartialTilesNextToFullOnesAndPaddedOutput) {
  // Many short tiles (16 heads: more tiles than SMs, so tier 2 takes its persistent kernel, whose
  // full 64-row halves of a tile go out by TMA stores), where sequences end inside a tile right
  // before a full tile of the next sequence (200 = 128 + 64 + 8, 77 < 64 + 64, 64 = one half,
  // 1), into an output with padded head and row strides.
  // (Head dims 64 and 128: those of the persistent kernel.)
  for (int d : {64, 128})
    for (bool causal : {false, true}) {
      Case c{RINGATTN_DTYPE_BF16, d, 16, 4, causal,
             {{200, 256, 77, 64, 1, 300, 129, 191}, {128, 65, 200, 3, 256, 64, 400, 127}},
             {256, 300, 77, 128, 40, 300, 200, 191}, {{}, {256, 0, 70, 128, 40, 299, 200, 1}}};
      c.padded_out = true;
      run_case(c, 500 + d + causal);
    }
}

}  // namespace

#else
TEST(GpuForward, SkippedWithoutCudaToolkit) { GTEST_SKIP() << "built without CUDA"; }
#endif
