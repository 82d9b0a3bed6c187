// The CPU backend against the naive double-precision reference, through the public C ABI.
//
// Every case runs forward and backward in fp32, fp16, bf16 and fp64 on fresh random inputs,
// with every output poisoned with NaN first; it checks that every output element was written
// and is close to the reference computed on the same (rounded) inputs, that stride padding
// was not touched, and that 1 and 4 threads give the same bits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/thread_pool.h"
#include "metadata_cases.h"
#include "naive_reference.h"
#include "ringattn/ringattn.h"
#include "test_util.h"

namespace ratest {
namespace {

// ---------------------------------------------------------------------------------------------
// the scenarios
// ---------------------------------------------------------------------------------------------

CaseSpec single(const std::string& name, int lq, int lk, bool causal, int hq = 2, int hk = 1, int dim = 64) {
  return CaseSpec(name, hq, hk, dim, causal, {lk}, {GroupSpec{{lq}, {}, 0}});
}

std::vector<CaseSpec> scenarios() {
  std::vector<CaseSpec> s;
  // Odd single-sequence shapes, both mask modes.
  for (bool causal : {true, false}) {
    const std::string m = causal ? "_causal" : "_full";
    s.push_back(single("len1x1" + m, 1, 1, causal));
    s.push_back(single("len113x203" + m, 113, 203, causal));
    s.push_back(single("len239x1" + m, 239, 1, causal));  // causal: only the last row sees a key
    s.push_back(single("len203x113" + m, 203, 113, causal));
  }
  s.push_back(single("square128_mha_d128", 128, 128, true, 4, 4, 128));
  s.push_back(single("hdim8", 70, 90, true, 2, 2, 8));
  s.push_back(single("hdim40_mqa", 33, 47, true, 3, 1, 40));
  s.push_back(single("hdim256", 20, 75, false, 2, 1, 256));

  // Tile edges: lengths around the 64-row tiles.
  s.push_back(CaseSpec("tile_edges_gqa", 4, 2, 32, true, {64, 129, 63, 128, 65},
                       {GroupSpec{{64, 65, 127, 129, 1}, {}, 0}}));

  // Varlen, one group: empty and single-token query sequences, an empty key sequence,
  // Lq > Lk and Lq < Lk.
  for (bool causal : {true, false})
    s.push_back(CaseSpec(causal ? "varlen_g1_causal" : "varlen_g1_full", 4, 2, 64, causal, {3, 1, 64, 50, 0, 130},
                         {GroupSpec{{0, 1, 37, 70, 5, 64}, {}, 0}}));

  // Two groups with seqused_k (including 0 keys for one sequence).
  for (bool causal : {true, false})
    s.push_back(CaseSpec(causal ? "varlen_g2_seqused_causal" : "varlen_g2_seqused_full", 2, 2, 64, causal,
                         {40, 96, 17, 70},
                         {GroupSpec{{20, 48, 1, 35}, {20, 48, 0, 35}, 0}, GroupSpec{{20, 48, 9, 0}, {40, 96, 17, 70}, 0}}));

  // Three groups, GQA, mixed NULL and explicit seqused_k, custom scale.
  {
    CaseSpec c("varlen_g3_gqa_scale", 6, 2, 48, true, {50, 0, 81},
               {GroupSpec{{10, 3, 27}, {10, 0, 27}, 0}, GroupSpec{{25, 0, 27}, {}, 0},
                GroupSpec{{50, 7, 54}, {30, 0, 81}, 0}});
    c.softmax_scale = 0.37f;
    s.push_back(c);
  }

  // MQA with several groups, non-causal.
  s.push_back(CaseSpec("varlen_g2_mqa_full", 4, 1, 32, false, {33, 7},
                       {GroupSpec{{12, 20}, {}, 0}, GroupSpec{{40, 1}, {20, 3}, 0}}));

  // The zigzag llama3 per-rank workload: N = 2 ranks, chunk c = 24, rank 0 holds chunks 0 and
  // 3 of each sequence; the early chunk sees the first (r + 1) c keys, the late one (2N - r) c.
  // Global lengths {96, 48}, divisible by 2N.
  s.push_back(CaseSpec("zigzag_llama3_rank0", 4, 2, 64, true, {96, 48},
                       {GroupSpec{{24, 12}, {24, 12}, 0}, GroupSpec{{24, 12}, {96, 48}, 0}}));

  // Strided tensors: padded heads and head-major memory, on inputs and on outputs.
  {
    CaseSpec c("strided_padded_and_headmajor", 4, 2, 40, true, {77, 20},
               {GroupSpec{{60, 33}, {}, 0}, GroupSpec{{5, 20}, {50, 20}, 0}});
    c.q_layout = Layout::kPaddedHeads;
    c.kv_layout = Layout::kHeadMajor;
    c.out_layout = Layout::kHeadMajor;
    c.grad_layout = Layout::kPaddedHeads;
    s.push_back(c);
  }

  // Rows after the last sequence (cu_seqlens[B] < total) belong to no sequence.
  {
    CaseSpec c("trailing_rows", 2, 1, 16, true, {30, 11}, {GroupSpec{{9, 14}, {}, 3}, GroupSpec{{2, 11}, {30, 5}, 1}});
    c.extra_k_rows = 5;
    s.push_back(c);
  }

  // Large logits: scores spread over tens of units, so the running max changes between key
  // tiles and the rescale matters.
  {
    CaseSpec c("large_logits", 2, 2, 64, true, {200, 90}, {GroupSpec{{150, 90}, {}, 0}});
    c.q_amplitude = 24.0;
    s.push_back(c);
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// CPU backend vs the naive reference, every scenario x every dtype
// ---------------------------------------------------------------------------------------------

class CpuVsNaive : public CaseDtypeTest {};

TEST_P(CpuVsNaive, ForwardBackward) { expect_cpu_matches_naive(std::get<0>(GetParam()), std::get<1>(GetParam())); }

INSTANTIATE_TEST_SUITE_P(AllFeatures, CpuVsNaive, every_dtype(scenarios()), case_dtype_name);

// ---------------------------------------------------------------------------------------------
// the contract's conventions on a case small enough to work out by hand
// ---------------------------------------------------------------------------------------------

// Q = 0 makes every visible key equally likely, so O is the mean of the visible V rows and
// LSE = log(#visible keys). Lq = 3, Lk = 2, causal bottom-right: row 0 sees no key, row 1 sees
// key 0, row 2 sees keys 0 and 1.
TEST(CpuBackendConventions, CausalIsBottomRightAligned) {
  CaseSpec c = single("hand", 3, 2, true, 1, 1, 8);
  CaseInputs in = make_inputs(c, RINGATTN_DTYPE_FP32, 1);
  for (int d = 0; d < 8; ++d) {
    for (int r = 0; r < 3; ++r) in.q[0].set(r, 0, d, 0.0);
    in.v.set(0, 0, d, 1.0 + d);
    in.v.set(1, 0, d, -4.0 * d);
  }
  const ForwardResult f = run_forward(in, 1);
  ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
  EXPECT_TRUE(std::isinf(f.lse[0][0]) && f.lse[0][0] < 0);
  EXPECT_FLOAT_EQ(f.lse[0][1], 0.0f);
  EXPECT_FLOAT_EQ(f.lse[0][2], std::log(2.0f));
  for (int d = 0; d < 8; ++d) {
    EXPECT_EQ(f.out[0].get(0, 0, d), 0.0);
    EXPECT_EQ(f.out[0].get(1, 0, d), 1.0 + d);
    EXPECT_FLOAT_EQ(static_cast<float>(f.out[0].get(2, 0, d)), static_cast<float>((1.0 + d - 4.0 * d) / 2));
  }
}

// Keys past seqused_k are never read: NaN there changes nothing, and their dK, dV are exactly 0.
TEST(CpuBackendConventions, KeysPastSequsedAreNeverRead) {
  const CaseSpec c("unused_keys", 2, 1, 32, true, {80, 50}, {GroupSpec{{70, 50}, {60, 50}, 0}});
  CaseInputs in = make_inputs(c, RINGATTN_DTYPE_FP32, 5);
  set_keys_to_nan(in, 60, 80);
  const Tolerance tol = tolerance_for(RINGATTN_DTYPE_FP32);
  const naive::Problem np = naive_problem(in);
  const std::vector<naive::Group> ng = naive_groups(in);
  const ForwardResult f = run_forward(in, 4);
  ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
  const naive::Forward ref = naive::forward(np, ng[0]);
  EXPECT_TRUE(close_to_reference("out", f.out[0], ref.out, tol.out));
  EXPECT_TRUE(lse_close("lse", f.lse[0], ref.lse, tol.lse));
  const BackwardResult b = run_backward(in, f, 4);
  ASSERT_EQ(b.status, RINGATTN_STATUS_OK) << b.error;
  const naive::Gradients g = naive::backward(np, ng);
  EXPECT_TRUE(close_to_reference("dq", b.dq[0], g.dq[0], tol.grad));
  EXPECT_TRUE(close_to_reference("dk", b.dk, g.dk, tol.grad));
  EXPECT_TRUE(close_to_reference("dv", b.dv, g.dv, tol.grad));
  for (int64_t row = 60; row < 80; ++row)
    for (int d = 0; d < c.dim; ++d) {
      ASSERT_EQ(b.dk.get(row, 0, d), 0.0) << "dk row " << row;
      ASSERT_EQ(b.dv.get(row, 0, d), 0.0) << "dv row " << row;
    }
}

// A causally masked key never enters a row's sum, not even as 0 * inf: with V = inf on the last
// key only the last query row (which sees it) is affected.
TEST(CpuBackendConventions, MaskedKeysNeverContribute) {
  CaseSpec c = single("masked_inf", 100, 100, true, 2, 1, 32);
  CaseInputs in = make_inputs(c, RINGATTN_DTYPE_FP32, 9);
  for (int d = 0; d < c.dim; ++d) in.v.set(99, 0, d, kInf);
  const ForwardResult f = run_forward(in, 2);
  ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
  const naive::Forward ref = naive::forward(naive_problem(in), naive_groups(in)[0]);
  for (int h = 0; h < 2; ++h)
    for (int64_t row = 0; row < 99; ++row)
      for (int d = 0; d < c.dim; ++d) {
        const double got = f.out[0].get(row, h, d);
        const double want = ref.out[(row * 2 + h) * c.dim + d];
        ASSERT_TRUE(std::fabs(got - want) <= 1e-5) << "row " << row << " head " << h << ": " << got << " vs " << want;
      }
  EXPECT_TRUE(std::isinf(f.out[0].get(99, 0, 0)));
}

// num_threads <= 0 means all hardware threads; the result does not depend on it.
TEST(CpuBackendConventions, DefaultThreadCountGivesSameBits) {
  const CaseSpec c("threads", 4, 2, 32, true, {130, 70},
                   {GroupSpec{{100, 70}, {}, 0}, GroupSpec{{30, 2}, {60, 70}, 0}});
  const CaseInputs in = make_inputs(c, RINGATTN_DTYPE_BF16, 7);
  const ForwardResult a = run_forward(in, 0);
  const ForwardResult b = run_forward(in, 3);
  ASSERT_EQ(a.status, RINGATTN_STATUS_OK) << a.error;
  ASSERT_EQ(b.status, RINGATTN_STATUS_OK) << b.error;
  for (int g = 0; g < 2; ++g) EXPECT_TRUE(same_bits("out", a.out[g], b.out[g]));
  const BackwardResult da = run_backward(in, a, 0);
  const BackwardResult db = run_backward(in, a, 3);
  ASSERT_EQ(da.status, RINGATTN_STATUS_OK) << da.error;
  ASSERT_EQ(db.status, RINGATTN_STATUS_OK) << db.error;
  EXPECT_TRUE(same_bits("dk", da.dk, db.dk));
  EXPECT_TRUE(same_bits("dv", da.dv, db.dv));
  for (int g = 0; g < 2; ++g) EXPECT_TRUE(same_bits("dq", da.dq[g], db.dq[g]));
}

// exec.num_threads is capped at the hardware threads: torch.set_num_threads(30000) used to start
// 30000 threads per call.
TEST(CpuBackendConventions, ThreadCountIsCappedAtTheHardware) {
  const unsigned hw = std::thread::hardware_concurrency();
  const int64_t limit = hw == 0 ? ringattn::cpu::kThreadsIfHardwareUnknown : static_cast<int64_t>(hw);
  const int64_t many_tasks = int64_t{1} << 20;
  EXPECT_EQ(ringattn::cpu::resolve_num_threads(30000, many_tasks), limit);
  EXPECT_EQ(ringattn::cpu::resolve_num_threads(0, many_tasks), limit);
  EXPECT_EQ(ringattn::cpu::resolve_num_threads(-3, many_tasks), limit);
  EXPECT_EQ(ringattn::cpu::resolve_num_threads(1, many_tasks), 1);
  EXPECT_EQ(ringattn::cpu::resolve_num_threads(30000, 1), 1);  // never more than the tasks
  EXPECT_EQ(ringattn::cpu::resolve_num_threads(30000, 0), 1);
}

// ---------------------------------------------------------------------------------------------
// non-finite values: IEEE propagation, as on the GPU; only a row that sees no key is "empty"
// ---------------------------------------------------------------------------------------------

class NonFinite : public ::testing::TestWithParam<int> {};

// Lq = 70, Lk = 90, causal bottom-right: query row i sees keys 0 .. i + 20.
CaseSpec non_finite_case() { return single("non_finite", 70, 90, true, 2, 1, 32); }

bool row_all_nan(const Tensor3& t, int64_t row, int head) {
  for (int d = 0; d < t.dim(); ++d)
    if (!std::isnan(t.get(row, head, d))) return false;
  return true;
}

bool row_same_bits(const Tensor3& a, const Tensor3& b, int64_t row, int head) {
  for (int d = 0; d < a.dim(); ++d)
    if (a.bits_at(a.offset(row, head, d)) != b.bits_at(b.offset(row, head, d))) return false;
  return true;
}

// Row by row, every head: a (row, head) that `reached(row, head)` names is all NaN in `got`; every
// other has the bits it has in `clean`.
template <typename Reached>
void expect_nan_exactly_where(const std::string& what, const Tensor3& got, const Tensor3& clean, Reached reached) {
  for (int h = 0; h < got.heads(); ++h)
    for (int64_t row = 0; row < got.rows(); ++row) {
      if (reached(row, h)) {
        ASSERT_TRUE(row_all_nan(got, row, h)) << what << " row " << row << " head " << h;
      } else {
        ASSERT_TRUE(row_same_bits(got, clean, row, h)) << what << " row " << row << " head " << h;
      }
    }
}

// The forward of the one group of a poisoned case (`f`) against the clean one (`fc`): out as
// expect_nan_exactly_where says, and the LSE [heads, rows] likewise NaN or the clean value.
template <typename Reached>
void expect_forward_nan_exactly_where(const ForwardResult& f, const ForwardResult& fc, Reached reached) {
  ASSERT_NO_FATAL_FAILURE(expect_nan_exactly_where("out", f.out[0], fc.out[0], reached));
  const int64_t rows = f.out[0].rows();
  for (int h = 0; h < f.out[0].heads(); ++h)
    for (int64_t row = 0; row < rows; ++row) {
      const float lse = f.lse[0][h * rows + row];
      if (reached(row, h)) {
        ASSERT_TRUE(std::isnan(lse)) << "lse row " << row << " head " << h << ": " << lse;
      } else {
        ASSERT_EQ(lse, fc.lse[0][h * rows + row]) << "lse row " << row << " head " << h;
      }
    }
}

// One NaN in one element of q: that row's O and LSE are NaN, its dQ is NaN, and so are dK and
// dV of every key it sees; every other row and key is bit for bit what it is without the NaN.
TEST_P(NonFinite, NanInQueryReachesItsRowAndItsGradients) {
  const int dtype = GetParam();
  const CaseInputs clean = make_inputs(non_finite_case(), dtype, 11);
  CaseInputs in = make_inputs(non_finite_case(), dtype, 11);
  in.q[0].set(40, 1, 3, std::numeric_limits<double>::quiet_NaN());
  const ForwardResult fc = run_forward(clean, 2), f = run_forward(in, 2);
  ASSERT_EQ(fc.status, RINGATTN_STATUS_OK) << fc.error;
  ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
  const auto row_40_head_1 = [](int64_t row, int h) { return row == 40 && h == 1; };
  ASSERT_NO_FATAL_FAILURE(expect_forward_nan_exactly_where(f, fc, row_40_head_1));
  const BackwardResult bc = run_backward(clean, fc, 2), b = run_backward(in, f, 2);
  ASSERT_EQ(bc.status, RINGATTN_STATUS_OK) << bc.error;
  ASSERT_EQ(b.status, RINGATTN_STATUS_OK) << b.error;
  ASSERT_NO_FATAL_FAILURE(expect_nan_exactly_where("dq", b.dq[0], bc.dq[0], row_40_head_1));
  const auto seen_by_row_40 = [](int64_t key, int) { return key <= 60; };
  ASSERT_NO_FATAL_FAILURE(expect_nan_exactly_where("dk key", b.dk, bc.dk, seen_by_row_40));
  ASSERT_NO_FATAL_FAILURE(expect_nan_exactly_where("dv key", b.dv, bc.dv, seen_by_row_40));
}

// One NaN, or one +inf score, in key 50: every row that sees key 50 (rows 30 ..) gets NaN O and
// LSE; rows 0 .. 29 do not see it and keep their bits.
TEST_P(NonFinite, NanOrPlusInfKeyReachesTheRowsThatSeeIt) {
  const int dtype = GetParam();
  for (const bool use_inf : {false, true}) {
    SCOPED_TRACE(use_inf ? "k = +inf with q > 0 (score +inf)" : "k = NaN");
    CaseInputs clean = make_inputs(non_finite_case(), dtype, 12);
    for (int64_t row = 0; row < 70; ++row)
      for (int h = 0; h < 2; ++h) clean.q[0].set(row, h, 0, 0.25 + 0.5 * std::fabs(clean.q[0].get(row, h, 0)));
    CaseInputs in = clean;
    in.k.set(50, 0, 0, use_inf ? kInf : std::numeric_limits<double>::quiet_NaN());
    const ForwardResult fc = run_forward(clean, 2), f = run_forward(in, 2);
    ASSERT_EQ(fc.status, RINGATTN_STATUS_OK) << fc.error;
    ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
    ASSERT_NO_FATAL_FAILURE(expect_forward_nan_exactly_where(f, fc, [](int64_t row, int) { return row >= 30; }));
    const BackwardResult b = run_backward(in, f, 2);
    ASSERT_EQ(b.status, RINGATTN_STATUS_OK) << b.error;
    EXPECT_TRUE(row_all_nan(b.dq[0], 30, 0));
    EXPECT_TRUE(row_all_nan(b.dk, 0, 0));  // seen by the NaN rows
    EXPECT_TRUE(row_all_nan(b.dv, 50, 0));
  }
}

// A -inf score is an ordinary IEEE value: the key gets weight exp(-inf) = 0, so O and LSE are
// those of the other keys (compared with the reference on the same inputs, which does the same).
TEST_P(NonFinite, MinusInfScoreGivesTheKeyZeroWeight) {
  const int dtype = GetParam();
  CaseInputs in = make_inputs(non_finite_case(), dtype, 13);
  for (int64_t row = 0; row < 70; ++row)
    for (int h = 0; h < 2; ++h) in.q[0].set(row, h, 0, 0.25 + 0.5 * std::fabs(in.q[0].get(row, h, 0)));
  in.k.set(50, 0, 0, -kInf);
  const ForwardResult f = run_forward(in, 2);
  ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
  const Tolerance tol = tolerance_for(dtype);
  const naive::Forward ref = naive::forward(naive_problem(in), naive_groups(in)[0]);
  EXPECT_TRUE(close_to_reference("out", f.out[0], ref.out, tol.out));
  EXPECT_TRUE(lse_close("lse", f.lse[0], ref.lse, tol.lse));
}

// Scores that overflow the accumulator (fp32 q and k of 1e20: q.k = 1e40 * D) give what IEEE
// arithmetic gives, not zeros: +inf scores make O and LSE NaN. A row whose every visible score is
// -inf gives every key weight 0, so it is empty like a row that sees no key at all (row 0 of a
// causal Lq = 3, Lk = 2 problem): O = 0, LSE = -inf, as on the GPU.
TEST(NonFiniteFp32, OverflowingScoresAreNotZeros) {
  CaseSpec c = single("overflow", 3, 2, true, 2, 1, 8);
  CaseInputs in = make_inputs(c, RINGATTN_DTYPE_FP32, 14);
  for (int64_t row = 0; row < 3; ++row)
    for (int d = 0; d < 8; ++d) {
      in.q[0].set(row, 0, d, 1e20);   // head 0: q.k = +1e40 * 8 -> +inf
      in.q[0].set(row, 1, d, -1e20);  // head 1: -inf
    }
  for (int64_t key = 0; key < 2; ++key)
    for (int d = 0; d < 8; ++d) in.k.set(key, 0, d, 1e20);
  const ForwardResult f = run_forward(in, 1);
  ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
  for (int h = 0; h < 2; ++h) {
    EXPECT_EQ(f.out[0].get(0, h, 0), 0.0) << "row 0 sees no key";
    EXPECT_TRUE(std::isinf(f.lse[0][h * 3]) && f.lse[0][h * 3] < 0);
  }
  for (int64_t row = 1; row < 3; ++row) {
    EXPECT_TRUE(row_all_nan(f.out[0], row, 0)) << "row " << row << " head 0 (+inf scores)";
    for (int d = 0; d < 8; ++d) EXPECT_EQ(f.out[0].get(row, 1, d), 0.0) << "row " << row << " head 1 (-inf scores)";
  }
  EXPECT_TRUE(std::isnan(f.lse[0][1]) && std::isnan(f.lse[0][2]));
  EXPECT_TRUE(std::isinf(f.lse[0][4]) && f.lse[0][4] < 0 && std::isinf(f.lse[0][5]) && f.lse[0][5] < 0);
  const BackwardResult b = run_backward(in, f, 1);
  ASSERT_EQ(b.status, RINGATTN_STATUS_OK) << b.error;
  EXPECT_TRUE(row_all_nan(b.dq[0], 2, 0)) << "dq row 2 head 0";
  EXPECT_TRUE(row_all_nan(b.dk, 0, 0));
  for (int d = 0; d < 8; ++d) {
    EXPECT_EQ(b.dq[0].get(0, 0, d), 0.0) << "dq of the row that sees no key";
    EXPECT_EQ(b.dq[0].get(2, 1, d), 0.0) << "dq of a row whose keys all weigh 0";
  }
}

INSTANTIATE_TEST_SUITE_P(AllDtypes, NonFinite, ::testing::ValuesIn(kAllDtypes),
                         [](const ::testing::TestParamInfo<int>& info) { return std::string(dtype_name(info.param)); });

// ---------------------------------------------------------------------------------------------
// host API validation of scalar arguments
// ---------------------------------------------------------------------------------------------

// The default scale has its own flag: no float value (0, negative, NaN, inf, a subnormal that a
// caller's 1e-50 would round to) is taken for "1/sqrt(head_dim)"; each is rejected, naming the
// field, before anything is written.
TEST(HostApiValidation, SoftmaxScaleDefaultHasItsOwnFlag) {
  const CaseInputs in = make_inputs(single("scale", 20, 30, true, 2, 1, 64), RINGATTN_DTYPE_FP32, 21);
  struct Bad {
    int32_t flag;
    float scale;
    const char* field;
  };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  const Bad bad[] = {{0, 0.0f, "softmax_scale"},   {0, -0.5f, "softmax_scale"},
                     {0, nan, "softmax_scale"},    {0, inf, "softmax_scale"},
                     {0, 1e-40f, "softmax_scale"}, {1, 0.125f, "softmax_scale"},
                     {2, 0.0f, "default_softmax_scale"}};
  for (const Bad& b : bad) {
    SCOPED_TRACE("default_softmax_scale " + std::to_string(b.flag) + ", softmax_scale " + std::to_string(b.scale));
    const ForwardResult f = run_forward(in, 1, [&](ringattn_fwd_params& p) {
      p.problem.default_softmax_scale = b.flag;
      p.problem.softmax_scale = b.scale;
    });
    EXPECT_EQ(f.status, RINGATTN_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(f.error.rfind(b.field, 0), 0u) << f.error;
    EXPECT_TRUE(still_poisoned(f.out[0]) && still_poisoned(f.lse[0]));
    const ForwardResult ok = run_forward(in, 1);
    ASSERT_EQ(ok.status, RINGATTN_STATUS_OK) << ok.error;
    const BackwardResult bw = run_backward(in, ok, 1, [&](ringattn_bwd_params& p) {
      p.problem.default_softmax_scale = b.flag;
      p.problem.softmax_scale = b.scale;
    });
    EXPECT_EQ(bw.status, RINGATTN_STATUS_INVALID_ARGUMENT);
    EXPECT_EQ(bw.error.rfind(b.field, 0), 0u) << bw.error;
    EXPECT_TRUE(still_poisoned(bw.dk) && still_poisoned(bw.dv) && still_poisoned(bw.dq[0]));
  }
  // The flag and the explicit 1/sqrt(64) = 0.125 give the same bits.
  const ForwardResult by_flag = run_forward(in, 1);
  const ForwardResult explicit_scale = run_forward(in, 1, [](ringattn_fwd_params& p) {
    p.problem.default_softmax_scale = 0;
    p.problem.softmax_scale = 0.125f;
  });
  ASSERT_EQ(by_flag.status, RINGATTN_STATUS_OK) << by_flag.error;
  ASSERT_EQ(explicit_scale.status, RINGATTN_STATUS_OK) << explicit_scale.error;
  EXPECT_TRUE(same_bits("out", by_flag.out[0], explicit_scale.out[0]));
  // A scale other than the default is used as given (not silently replaced).
  const ForwardResult other = run_forward(in, 1, [](ringattn_fwd_params& p) {
    p.problem.default_softmax_scale = 0;
    p.problem.softmax_scale = 0.5f;
  });
  ASSERT_EQ(other.status, RINGATTN_STATUS_OK) << other.error;
  EXPECT_FALSE(same_bits("out", by_flag.out[0], other.out[0]));
}

TEST(HostApiValidation, NegativeMaxSeqlenHintsAreRejected) {
  const CaseInputs in = make_inputs(single("hints", 20, 30, true, 2, 1, 64), RINGATTN_DTYPE_FP32, 22);
  const ForwardResult fk = run_forward(in, 1, [](ringattn_fwd_params& p) { p.problem.max_seqlen_k = -5; });
  EXPECT_EQ(fk.status, RINGATTN_STATUS_INVALID_ARGUMENT);
  EXPECT_EQ(fk.error.rfind("max_seqlen_k: expected >= 0, got -5", 0), 0u) << fk.error;
  const ForwardResult fq = run_forward(in, 1, [](ringattn_fwd_params& p) {
    const_cast<ringattn_fwd_group*>(p.groups)[0].max_seqlen_q = INT32_MIN;
  });
  EXPECT_EQ(fq.status, RINGATTN_STATUS_INVALID_ARGUMENT);
  EXPECT_EQ(fq.error.rfind("max_seqlen_q (group 0): expected >= 0", 0), 0u) << fq.error;
  EXPECT_TRUE(still_poisoned(fk.out[0]) && still_poisoned(fq.out[0]));
}

// ---------------------------------------------------------------------------------------------
// metadata error bits (exec.metadata_errors, written by GPU calls): their descriptions, and the
// CPU backend, which ignores the word and rejects malformed metadata itself
// ---------------------------------------------------------------------------------------------

TEST(MetadataErrors, EachBitHasItsOwnPhraseNamingItsArgument) {
  EXPECT_STREQ(ringattn_describe_metadata_errors(0), "");
  struct Expect {
    uint32_t bit;
    const char* argument;
  };
  const Expect expect[] = {
      {RINGATTN_METADATA_CU_SEQLENS_Q_FIRST, "cu_seqlens_q[0]"},
      {RINGATTN_METADATA_CU_SEQLENS_Q_DECREASING, "cu_seqlens_q of some group decreases"},
      {RINGATTN_METADATA_CU_SEQLENS_Q_PAST_END, "cu_seqlens_q[batch_size]"},
      {RINGATTN_METADATA_CU_SEQLENS_K_FIRST, "cu_seqlens_k[0]"},
      {RINGATTN_METADATA_CU_SEQLENS_K_DECREASING, "cu_seqlens_k decreases"},
      {RINGATTN_METADATA_CU_SEQLENS_K_PAST_END, "cu_seqlens_k[batch_size]"},
      {RINGATTN_METADATA_SEQUSED_K_RANGE, "seqused_k"},
  };
  uint32_t all = 0;
  std::set<std::string> phrases;
  for (const Expect& e : expect) {
    const std::string phrase = ringattn_describe_metadata_errors(e.bit);
    EXPECT_EQ(phrase.rfind(e.argument, 0), 0u) << "bit 0x" << std::hex << e.bit << ": " << phrase;
    EXPECT_EQ(phrase.find(';'), std::string::npos) << phrase;
    EXPECT_EQ(all & e.bit, 0u) << "bits are distinct";
    all |= e.bit;
    phrases.insert(phrase);
  }
  EXPECT_EQ(all, static_cast<uint32_t>(RINGATTN_METADATA_ALL_ERRORS));
  EXPECT_EQ(phrases.size(), std::size(expect));
  // Several bits: their phrases in bit order, joined by "; ".
  const std::string q_decreasing = ringattn_describe_metadata_errors(RINGATTN_METADATA_CU_SEQLENS_Q_DECREASING);
  const std::string seqused = ringattn_describe_metadata_errors(RINGATTN_METADATA_SEQUSED_K_RANGE);
  EXPECT_EQ(std::string(ringattn_describe_metadata_errors(RINGATTN_METADATA_SEQUSED_K_RANGE |
                                                          RINGATTN_METADATA_CU_SEQLENS_Q_DECREASING)),
            q_decreasing + "; " + seqused);
  // Bits the library does not define are named, never dropped.
  EXPECT_EQ(std::string(ringattn_describe_metadata_errors(RINGATTN_METADATA_SEQUSED_K_RANGE | 0x80000100u)),
            seqused + "; unknown bits 0x80000100");
  EXPECT_EQ(std::string(ringattn_describe_metadata_errors(0x80u)), "unknown bits 0x80");
}

// The metadata of metadata_cases.h on the CPU backend: every malformed case is rejected with the
// host check's message (forward and backward) before anything is written, every well-formed one
// runs; exec.metadata_errors is never touched on CPU.
TEST(MetadataErrors, CpuBackendRejectsEachMalformedCaseAndIgnoresTheWord) {
  const CaseSpec spec("metadata_cases", 2, 1, 64, true, {9, 7},
                      {GroupSpec{{5, 7}, {}, 0}, GroupSpec{{4, 6}, {9, 7}, 0}});
  const CaseInputs in = make_inputs(spec, RINGATTN_DTYPE_FP32, 25);
  ASSERT_EQ(in.total_q[0], kMetadataCaseTotalQ[0]);
  ASSERT_EQ(in.total_q[1], kMetadataCaseTotalQ[1]);
  ASSERT_EQ(in.total_k, kMetadataCaseTotalK);
  const ForwardResult base = run_forward(in, 1);
  ASSERT_EQ(base.status, RINGATTN_STATUS_OK) << base.error;
  constexpr uint32_t kSentinel = 0x5a5a0000u;
  for (const MetadataCase& c : metadata_cases()) {
    SCOPED_TRACE(c.name);
    uint32_t word = kSentinel;
    auto use_case = [&](auto& p) {
      p.exec.metadata_errors = &word;
      p.problem.cu_seqlens_k = c.cu_k.data();
      auto* groups = const_cast<std::remove_const_t<std::remove_pointer_t<decltype(p.groups)>>*>(p.groups);
      for (int g = 0; g < kMetadataCaseGroups; ++g) groups[g].cu_seqlens_q = c.cu_q[g].data();
      groups[1].seqused_k = c.seqused_k1.data();
    };
    const ForwardResult f = run_forward(in, 1, use_case);
    const BackwardResult b = run_backward(in, base, 1, use_case);
    if (c.bits == 0) {
      EXPECT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
      EXPECT_EQ(b.status, RINGATTN_STATUS_OK) << b.error;
    } else {
      expect_rejected(f.status, f.error, c.host_error);
      expect_rejected(b.status, b.error, "backward" + c.host_error.substr(std::string("forward").size()));
      EXPECT_TRUE(still_poisoned(f.out[0]) && still_poisoned(f.out[1]) && still_poisoned(f.lse[1]));
      EXPECT_TRUE(still_poisoned(b.dk) && still_poisoned(b.dv) && still_poisoned(b.dq[1]));
    }
    EXPECT_EQ(word, kSentinel);
  }
}

// ---------------------------------------------------------------------------------------------
// host API validation of overlapping outputs
// ---------------------------------------------------------------------------------------------

// fp32, 20 queries and 30 keys of one sequence, Hq = 4, Hk = 2, D = 16.
CaseInputs alias_case() { return make_inputs(single("alias", 20, 30, true, 4, 2, 16), RINGATTN_DTYPE_FP32, 23); }

// An output whose own strides send two (row, head) pairs to one address: rows overlapping heads
// (row stride = head_dim with 4 heads), and a subtler lattice (row stride 3 D, head stride 2 D:
// row 0 head 3 is row 2 head 0), which needs 4 heads: with Hk = 2 heads the same strides are a
// valid, non-overlapping layout.
TEST(HostApiValidation, OutputOverlappingItselfIsRejected) {
  const CaseInputs in = alias_case();
  const int D = 16;
  struct Layout3 {
    int64_t row_stride, head_stride;
    const char* what;
  };
  for (const Layout3& l : {Layout3{D, D, "rows overlap heads"}, Layout3{3 * D, 2 * D, "row 0 head 3 = row 2 head 0"}}) {
    SCOPED_TRACE(l.what);
    std::vector<float> out = poisoned_floats(64 * 64 * D);
    const ForwardResult f = run_forward(in, 1, [&](ringattn_fwd_params& p) {
      auto* g = const_cast<ringattn_fwd_group*>(p.groups);
      g[0].out = out.data();
      g[0].out_row_stride = l.row_stride;
      g[0].out_head_stride = l.head_stride;
    });
    expect_rejected(f.status, f.error, "out (group 0): expected an output whose rows and heads do not overlap");
    EXPECT_TRUE(still_poisoned(out) && still_poisoned(f.lse[0]));
  }
  // The second layout is fine for the 2 KV heads of dK: accepted, and the values are those of the
  // contiguous run.
  const ForwardResult f = run_forward(in, 1);
  ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
  const BackwardResult ref = run_backward(in, f, 1);
  ASSERT_EQ(ref.status, RINGATTN_STATUS_OK) << ref.error;
  std::vector<float> dk = poisoned_floats(30 * 3 * D + 4 * D);
  const BackwardResult b = run_backward(in, f, 1, [&](ringattn_bwd_params& p) {
    p.dk = dk.data();
    p.dk_row_stride = 3 * D;
    p.dk_head_stride = 2 * D;
  });
  ASSERT_EQ(b.status, RINGATTN_STATUS_OK) << b.error;
  for (int64_t key = 0; key < 30; ++key)
    for (int h = 0; h < 2; ++h)
      for (int d = 0; d < D; ++d) ASSERT_EQ(dk[key * 3 * D + h * 2 * D + d], ref.dk.get(key, h, d));
}

TEST(HostApiValidation, ForwardOutputsOverlappingEachOtherOrAnInputAreRejected) {
  const CaseInputs in = alias_case();
  const std::vector<uint64_t> q_before(reinterpret_cast<const uint64_t*>(in.q[0].data()),
                                       reinterpret_cast<const uint64_t*>(in.q[0].data()) + in.q[0].num_elems() / 2);
  // out written over q (same layout): an output aliasing an input.
  ForwardResult f = run_forward(in, 1, [&](ringattn_fwd_params& p) {
    auto* g = const_cast<ringattn_fwd_group*>(p.groups);
    g[0].out = const_cast<void*>(g[0].q);
  });
  expect_rejected(f.status, f.error, "out (group 0): expected an output that shares no memory with the input q (group 0)");
  EXPECT_TRUE(std::equal(q_before.begin(), q_before.end(), reinterpret_cast<const uint64_t*>(in.q[0].data())));
  // The LSE inside the output tensor.
  std::vector<float> out = poisoned_floats(20 * 4 * 16 + 4 * 20);
  f = run_forward(in, 1, [&](ringattn_fwd_params& p) {
    auto* g = const_cast<ringattn_fwd_group*>(p.groups);
    g[0].out = out.data();
    g[0].softmax_lse = out.data() + 20 * 4 * 16 - 8;  // its first 8 floats are out's last row
  });
  expect_rejected(f.status, f.error, "softmax_lse (group 0): expected an output that shares no memory with the output out (group 0)");
  EXPECT_TRUE(still_poisoned(out));
  // The output over the metadata it reads.
  f = run_forward(in, 1, [&](ringattn_fwd_params& p) {
    auto* g = const_cast<ringattn_fwd_group*>(p.groups);
    g[0].softmax_lse = const_cast<float*>(reinterpret_cast<const float*>(p.problem.cu_seqlens_k));
  });
  expect_rejected(f.status, f.error, "softmax_lse (group 0): expected an output that shares no memory with the input cu_seqlens_k");
}

TEST(HostApiValidation, BackwardGradientsOverlappingAreRejected) {
  const CaseInputs in = alias_case();
  const ForwardResult f = run_forward(in, 1);
  ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
  // dv on dk: dK would be lost.
  BackwardResult b = run_backward(in, f, 1, [](ringattn_bwd_params& p) {
    p.dv = p.dk;
    p.dv_row_stride = p.dk_row_stride;
    p.dv_head_stride = p.dk_head_stride;
  });
  expect_rejected(b.status, b.error, "dv: expected an output that shares no memory with the output dk");
  EXPECT_TRUE(still_poisoned(b.dk) && still_poisoned(b.dq[0]));
  // dk shifted by half a head inside dv's buffer: partial overlap.
  b = run_backward(in, f, 1, [](ringattn_bwd_params& p) {
    p.dk = static_cast<float*>(p.dv) + 8;
    p.dk_row_stride = p.dv_row_stride;
    p.dk_head_stride = p.dv_head_stride;
  });
  expect_rejected(b.status, b.error, "dv: expected an output that shares no memory with the output dk");
  EXPECT_TRUE(still_poisoned(b.dv) && still_poisoned(b.dq[0]));
  // dq over dout (an input).
  b = run_backward(in, f, 1, [](ringattn_bwd_params& p) {
    auto* g = const_cast<ringattn_bwd_group*>(p.groups);
    g[0].dq = const_cast<void*>(g[0].dout);
  });
  expect_rejected(b.status, b.error, "dq (group 0): expected an output that shares no memory with the input dout (group 0)");
  EXPECT_TRUE(still_poisoned(b.dk) && still_poisoned(b.dv));
}

// Views into one packed buffer interleave without sharing an element: dK and dV as the two
// halves of a [total_k, 2, Hk, D] gradient, and q, k, v read from one packed [tokens, 3, H, D]
// input (inputs may overlap). Accepted, with the values of the separate tensors.
TEST(HostApiValidation, PackedViewsThatShareNoElementAreAccepted) {
  const CaseInputs in = alias_case();
  const int D = 16, Hk = 2;
  const ForwardResult f = run_forward(in, 1);
  ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
  const BackwardResult ref = run_backward(in, f, 1);
  ASSERT_EQ(ref.status, RINGATTN_STATUS_OK) << ref.error;
  std::vector<float> dkv = poisoned_floats(30 * 2 * Hk * D);
  const BackwardResult b = run_backward(in, f, 1, [&](ringattn_bwd_params& p) {
    p.dk = dkv.data();
    p.dv = dkv.data() + Hk * D;
    p.dk_row_stride = p.dv_row_stride = 2 * Hk * D;
    p.dk_head_stride = p.dv_head_stride = D;
  });
  ASSERT_EQ(b.status, RINGATTN_STATUS_OK) << b.error;
  for (int64_t key = 0; key < 30; ++key)
    for (int h = 0; h < Hk; ++h)
      for (int d = 0; d < D; ++d) {
        ASSERT_EQ(dkv[key * 2 * Hk * D + h * D + d], ref.dk.get(key, h, d));
        ASSERT_EQ(dkv[key * 2 * Hk * D + Hk * D + h * D + d], ref.dv.get(key, h, d));
      }
  // k and v from one packed [30, 2, Hk, D] input.
  std::vector<float> kv(30 * 2 * Hk * D);
  for (int64_t key = 0; key < 30; ++key)
    for (int h = 0; h < Hk; ++h)
      for (int d = 0; d < D; ++d) {
        kv[key * 2 * Hk * D + h * D + d] = static_cast<float>(in.k.get(key, h, d));
        kv[key * 2 * Hk * D + Hk * D + h * D + d] = static_cast<float>(in.v.get(key, h, d));
      }
  const ForwardResult fp = run_forward(in, 1, [&](ringattn_fwd_params& p) {
    p.kv.k = kv.data();
    p.kv.v = kv.data() + Hk * D;
    p.kv.k_row_stride = p.kv.v_row_stride = 2 * Hk * D;
    p.kv.k_head_stride = p.kv.v_head_stride = D;
  });
  ASSERT_EQ(fp.status, RINGATTN_STATUS_OK) << fp.error;
  EXPECT_TRUE(same_bits("out", fp.out[0], f.out[0]));
}

// ---------------------------------------------------------------------------------------------
// fp16 / bf16 conversions, checked bit for bit through the ABI
// ---------------------------------------------------------------------------------------------

Format format_of(int dtype) { return dtype == RINGATTN_DTYPE_FP16 ? kHalf : kBf16; }

// A problem of `batch` sequences of one query and `keys_per_seq` keys, D = 8, Q = 0 (so every
// key gets the same weight) and K = 1.
CaseInputs uniform_weight_problem(int dtype, int batch, int keys_per_seq) {
  const CaseSpec c("convert", 1, 1, 8, false, std::vector<int>(batch, keys_per_seq),
                   {GroupSpec{std::vector<int>(batch, 1), {}, 0}});
  CaseInputs in = make_inputs(c, dtype, 3);
  for (int64_t r = 0; r < in.total_q[0]; ++r)
    for (int d = 0; d < 8; ++d) in.q[0].set(r, 0, d, 0.0);
  for (int64_t r = 0; r < in.total_k; ++r)
    for (int d = 0; d < 8; ++d) in.k.set(r, 0, d, 1.0);
  return in;
}

// With one key per sequence O = V: every one of the 65536 bit patterns survives the trip
// through the float accumulator and back (NaN stays NaN, zeros keep their value).
class Convert16 : public ::testing::TestWithParam<int> {};

TEST_P(Convert16, EveryBitPatternRoundTrips) {
  const int dtype = GetParam();
  CaseInputs in = uniform_weight_problem(dtype, 65536 / 8, 1);
  for (int64_t r = 0; r < in.total_k; ++r)
    for (int d = 0; d < 8; ++d) in.v.set_bits_at(in.v.offset(r, 0, d), static_cast<uint64_t>(r * 8 + d));
  const ForwardResult f = run_forward(in, 2);
  ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
  int bad = 0;
  for (int64_t r = 0; r < in.total_k; ++r)
    for (int d = 0; d < 8; ++d) {
      const double expected = in.v.get(r, 0, d);
      const double got = f.out[0].get(r, 0, d);
      const bool ok = std::isnan(expected) ? std::isnan(got) : (got == expected);
      if (!ok && bad++ < 5) ADD_FAILURE() << "pattern 0x" << std::hex << (r * 8 + d) << ": got " << got;
    }
  EXPECT_EQ(bad, 0);
}

// With two keys per sequence O = (v0 + v1) / 2 computed in float and rounded once to the
// 16-bit format: random finite pairs cover subnormals, ties, and (bf16) overflow to inf.
TEST_P(Convert16, RoundsToNearestEven) {
  const int dtype = GetParam();
  const Format fmt = format_of(dtype);
  const int batch = 8192;
  CaseInputs in = uniform_weight_problem(dtype, batch, 2);
  std::mt19937 rng(11);
  const uint16_t exp_mask = dtype == RINGATTN_DTYPE_FP16 ? 0x7c00 : 0x7f80;
  auto random_finite = [&]() {
    for (;;) {
      const uint16_t b = static_cast<uint16_t>(rng());
      if ((b & exp_mask) != exp_mask) return b;
    }
  };
  for (int64_t r = 0; r < in.total_k; ++r)
    for (int d = 0; d < 8; ++d) {
      uint16_t b = random_finite();
      // A quarter of the values are tiny (subnormal or near the smallest normal).
      if (d % 4 == 0) b = static_cast<uint16_t>(b & (dtype == RINGATTN_DTYPE_FP16 ? 0x87ff : 0x80ff));
      in.v.set_bits_at(in.v.offset(r, 0, d), b);
    }
  const ForwardResult f = run_forward(in, 2);
  ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
  int bad = 0;
  for (int b = 0; b < batch; ++b)
    for (int d = 0; d < 8; ++d) {
      const float v0 = static_cast<float>(in.v.get(2 * b, 0, d));
      const float v1 = static_cast<float>(in.v.get(2 * b + 1, 0, d));
      const float mean = (v0 + v1) * 0.5f;
      const double expected = round_to_format(static_cast<double>(mean), fmt);
      const double got = f.out[0].get(b, 0, d);
      if (!(got == expected) && bad++ < 5)
        ADD_FAILURE() << "mean of " << v0 << " and " << v1 << " (" << mean << "): got " << got << ", expected "
                      << expected;
    }
  EXPECT_EQ(bad, 0);
}

INSTANTIATE_TEST_SUITE_P(Formats, Convert16, ::testing::Values(RINGATTN_DTYPE_FP16, RINGATTN_DTYPE_BF16),
                         [](const ::testing::TestParamInfo<int>& info) { return std::string(dtype_name(info.param)); });

// The test-side encoder agrees with hand-picked IEEE facts, so the checks above are anchored.
TEST(TestHelpers, Float16FormatsKnownValues) {
  EXPECT_EQ(encode_exact(round_to_format(65504.0, kHalf), kHalf), 0x7bff);
  EXPECT_EQ(encode_exact(round_to_format(65520.0, kHalf), kHalf), 0x7c00);  // tie rounds up to inf
  EXPECT_EQ(encode_exact(round_to_format(65519.0, kHalf), kHalf), 0x7bff);
  EXPECT_EQ(encode_exact(round_to_format(std::ldexp(1.0, -24), kHalf), kHalf), 0x0001);
  EXPECT_EQ(encode_exact(round_to_format(std::ldexp(1.0, -25), kHalf), kHalf), 0x0000);  // tie to even: 0
  EXPECT_EQ(encode_exact(round_to_format(std::ldexp(1.5, -24), kHalf), kHalf), 0x0002);  // tie to even: 2
  EXPECT_EQ(encode_exact(round_to_format(-1.0, kHalf), kHalf), 0xbc00);
  EXPECT_EQ(encode_exact(round_to_format(1.0 + std::ldexp(1.0, -11), kHalf), kHalf), 0x3c00);  // tie to even
  EXPECT_EQ(encode_exact(round_to_format(1.0, kBf16), kBf16), 0x3f80);
  EXPECT_EQ(encode_exact(round_to_format(std::ldexp(1.0, -133), kBf16), kBf16), 0x0001);
  EXPECT_EQ(encode_exact(round_to_format(3.4e38, kBf16), kBf16), 0x7f80);  // past bf16 max: inf
  EXPECT_EQ(decode(0x7bff, kHalf), 65504.0);
  EXPECT_EQ(decode(0x0001, kHalf), std::ldexp(1.0, -24));
  EXPECT_EQ(decode(0x7f7f, kBf16), std::ldexp(255.0, 120));
  EXPECT_TRUE(std::isnan(decode(0x7e5a, kHalf)));
}

// ---------------------------------------------------------------------------------------------
// the checks can fail
// ---------------------------------------------------------------------------------------------

TEST(TestHelpers, ChecksRejectNaNAndErrorsBeyondTolerance) {
  Tensor3 t(RINGATTN_DTYPE_FP32, 2, 1, 8, Layout::kContiguous);
  std::vector<double> ref(16);
  for (int i = 0; i < 16; ++i) ref[i] = t.set(i / 8, 0, i % 8, 0.5 - 0.1 * i);
  EXPECT_TRUE(close_to_reference("exact", t, ref, 1e-5));

  t.set(1, 0, 3, ref[11] + 3e-5);  // 3e-5 > 1e-5 * (max|ref| (1.0) + 0.1)
  EXPECT_FALSE(close_to_reference("perturbed", t, ref, 1e-5));
  t.set(1, 0, 3, ref[11]);

  t.poison();  // NaN everywhere: never close, whatever the tolerance
  EXPECT_FALSE(close_to_reference("nan", t, ref, 1e30));

  std::vector<float> lse = {-std::numeric_limits<float>::infinity(), 1.0f};
  EXPECT_TRUE(lse_close("lse", lse, {-kInf, 1.0}, 1e-6));
  EXPECT_FALSE(lse_close("lse", lse, {0.0, 1.0}, 1e-6));
  lse[0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_FALSE(lse_close("lse", lse, {-kInf, 1.0}, 1e30));

  Tensor3 padded(RINGATTN_DTYPE_BF16, 3, 2, 8, Layout::kPaddedHeads);
  padded.poison();
  EXPECT_TRUE(padding_untouched("padded", padded));
  padded.set_bits_at(padded.offset(0, 0, 8), 0);  // first padding element after head 0
  EXPECT_FALSE(padding_untouched("padded", padded));
}

}  // namespace
}  // namespace ratest
