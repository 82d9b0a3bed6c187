// Local (sliding-window) attention, diagonal shifts, logit softcap and sink logits: the CPU
// backend against the naive double-precision reference, through the public C ABI, and the host
// API's checks of the new fields.
//
// Every case runs forward and backward in fp32, fp16, bf16 and fp64 on fresh random inputs with
// every output poisoned first, as the main CPU suite does, and checks 1 vs 4 threads bit for bit.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "common/backends.h"
#include "naive_reference.h"
#include "ringattn/ringattn.h"
#include "test_util.h"

namespace ratest {
namespace {

CaseSpec one_sequence(const std::string& name, int lq, int lk, bool causal, int left, int right, int hq = 2,
                      int hk = 1, int dim = 32) {
  return CaseSpec(name, hq, hk, dim, causal, {lk}, {GroupSpec{{lq}, {}, 0}}).with_window(left, right);
}

std::vector<CaseSpec> scenarios() {
  std::vector<CaseSpec> s;
  // Windows on one sequence, several key tiles (64 keys) per row tile.
  s.push_back(one_sequence("window_0_0", 70, 90, false, 0, 0));  // each row sees its diagonal key only
  s.push_back(one_sequence("window_1_1", 70, 90, false, 1, 1));
  s.push_back(one_sequence("window_small_symmetric", 150, 170, false, 20, 20, 4, 2));
  s.push_back(one_sequence("window_asymmetric", 200, 180, false, 37, 5, 4, 2));  // Lq > Lk: early rows see few keys
  s.push_back(one_sequence("window_left_only", 130, 160, false, 45, -1));
  s.push_back(one_sequence("window_right_only", 130, 160, false, -1, 9));
  s.push_back(one_sequence("window_wider_than_sequence", 60, 80, false, 500, 300));
  s.push_back(one_sequence("window_unbounded_both", 60, 80, false, -1, -1));
  s.push_back(one_sequence("causal_window_left", 200, 200, true, 70, 0, 2, 2, 64));
  s.push_back(one_sequence("causal_window_left_right_unbounded", 90, 150, true, 33, -1));
  s.push_back(one_sequence("causal_window_0", 70, 70, true, 0, 0));
  s.push_back(one_sequence("causal_window_wider_than_sequence", 50, 70, true, 1000, -1));

  // Diagonal shifts: causal alone (a bound), a window, positive and negative; varlen, GQA.
  {
    CaseSpec c("shift_causal_varlen_gqa", 4, 2, 32, true, {100, 64, 30, 0}, {GroupSpec{{80, 64, 40, 5}, {}, 0}});
    c.diagonal_shift = {{-30, 17, 0, 3}};
    s.push_back(c);
  }
  {
    CaseSpec c("shift_window_varlen", 2, 2, 40, false, {150, 70, 20}, {GroupSpec{{100, 70, 20}, {}, 2}});
    c.with_window(25, 10);
    c.diagonal_shift = {{-60, 45, 500}};  // the last moves past every key
    s.push_back(c);
  }

  // Softcap: large scores so the cap bends them (tanh saturates), causal and full.
  for (bool causal : {true, false}) {
    CaseSpec c(causal ? "softcap_causal" : "softcap_full", 2, 1, 64, causal, {130, 40}, {GroupSpec{{100, 45}, {}, 0}});
    c.softcap = causal ? 5.0f : 30.0f;
    c.q_amplitude = 8.0;
    s.push_back(c);
  }

  // Sinks: rows without keys (causal, Lq > Lk) get LSE = the sink; a sink above every score.
  {
    CaseSpec c("sinks_causal_rows_without_keys", 4, 2, 32, true, {40, 70}, {GroupSpec{{90, 70}, {}, 1}});
    c.sinks = {0.5f, -1.25f, 3.0f, 9.0f};
    s.push_back(c);
  }

  // Everything at once: two groups over one K/V stream, seqused_k, per-group shifts, a causal
  // window, softcap and sinks, GQA, strided layouts.
  {
    CaseSpec c("window_shift_softcap_sinks_g2_seqused", 6, 2, 48, true, {120, 33, 90},
               {GroupSpec{{60, 33, 70}, {120, 20, 90}, 0}, GroupSpec{{120, 10, 45}, {60, 33, 0}, 3}});
    c.with_window(40, -1);
    c.softcap = 7.5f;
    c.sinks = {0.3f, -0.7f, 1.1f, 2.5f, -3.0f, 0.0f};
    c.q_amplitude = 3.0;
    c.diagonal_shift = {{-60, 0, 10}, {}};
    c.q_layout = Layout::kPaddedHeads;
    c.kv_layout = Layout::kHeadMajor;
    s.push_back(c);
  }
  // The same without causal: a two-sided window and shifts of both signs.
  {
    CaseSpec c("window_shift_softcap_sinks_g2_full", 2, 1, 32, false, {140, 64},
               {GroupSpec{{100, 64}, {}, 0}, GroupSpec{{70, 30}, {130, 64}, 0}});
    c.with_window(12, 70);
    c.softcap = 2.0f;
    c.sinks = {-0.5f, 1.5f};
    c.diagonal_shift = {{25, -80}, {-25, 5}};
    s.push_back(c);
  }
  return s;
}

class WindowSoftcapSinksVsNaive : public CaseDtypeTest {};

TEST_P(WindowSoftcapSinksVsNaive, ForwardBackward) {
  expect_cpu_matches_naive(std::get<0>(GetParam()), std::get<1>(GetParam()));
}

INSTANTIATE_TEST_SUITE_P(CpuBackend, WindowSoftcapSinksVsNaive, every_dtype(scenarios()), case_dtype_name);

// ---------------------------------------------------------------------------------------------
// conventions, small enough to check by hand
// ---------------------------------------------------------------------------------------------

// Q = 0 makes every visible key equally likely: O is the mean of the visible V rows and
// LSE = log(#visible keys). Lq = 4, Lk = 6, window (1, 0) (no causal): row i's diagonal key is
// i + 2, it sees keys i + 1 and i + 2. With diagonal shift -3 it is i - 1: row 0 sees no key,
// row 1 key 0, row 2 keys 0 and 1.
TEST(WindowConventions, WindowAndShiftAreBottomRightAligned) {
  CaseSpec c = one_sequence("hand_window", 4, 6, false, 1, 0, 1, 1, 8);
  for (const int shift : {0, -3}) {
    SCOPED_TRACE("shift " + std::to_string(shift));
    if (shift != 0) c.diagonal_shift = {{shift}};
    CaseInputs in = make_inputs(c, RINGATTN_DTYPE_FP64, 3);
    for (int d = 0; d < 8; ++d) {
      for (int r = 0; r < 4; ++r) in.q[0].set(r, 0, d, 0.0);
      for (int j = 0; j < 6; ++j) in.v.set(j, 0, d, 10.0 * j + d);
    }
    const ForwardResult f = run_forward(in, 1);
    ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
    for (int i = 0; i < 4; ++i) {
      const int diag = i + 2 + shift;
      const int first = std::max(diag - 1, 0), last = std::min(diag, 5);
      if (last < first) {
        EXPECT_TRUE(std::isinf(f.lse[0][i]) && f.lse[0][i] < 0) << "row " << i;
        for (int d = 0; d < 8; ++d) EXPECT_EQ(f.out[0].get(i, 0, d), 0.0) << "row " << i;
        continue;
      }
      EXPECT_FLOAT_EQ(f.lse[0][i], std::log(static_cast<float>(last - first + 1))) << "row " << i;
      for (int d = 0; d < 8; ++d) EXPECT_DOUBLE_EQ(f.out[0].get(i, 0, d), 5.0 * (first + last) + d) << "row " << i;
    }
  }
}

// A sink adds exp(sink) to the denominator: with Q = 0 and n visible keys, LSE = log(n + e^sink)
// and O = (sum of the visible V rows) / (n + e^sink); a row without keys has LSE = sink, O = 0.
TEST(SinkConventions, SinkJoinsTheDenominatorNotTheOutput) {
  // Row 0 sees no key, row 1 key 0, row 2 keys 0 and 1.
  CaseSpec c("hand_sink", 2, 1, 8, true, {2}, {GroupSpec{{3}, {}, 0}});
  c.sinks = {0.0f, std::log(3.0f)};
  CaseInputs in = make_inputs(c, RINGATTN_DTYPE_FP64, 4);
  for (int d = 0; d < 8; ++d) {
    for (int r = 0; r < 3; ++r)
      for (int h = 0; h < 2; ++h) in.q[0].set(r, h, d, 0.0);
    in.v.set(0, 0, d, 1.0 + d);
    in.v.set(1, 0, d, 2.0 - d);
  }
  const ForwardResult f = run_forward(in, 1);
  ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
  for (int h = 0; h < 2; ++h) {
    const double e_sink = std::exp(static_cast<double>(c.sinks[h]));
    EXPECT_EQ(f.lse[0][h * 3 + 0], c.sinks[h]) << "head " << h;
    EXPECT_FLOAT_EQ(f.lse[0][h * 3 + 1], static_cast<float>(std::log(1.0 + e_sink))) << "head " << h;
    EXPECT_FLOAT_EQ(f.lse[0][h * 3 + 2], static_cast<float>(std::log(2.0 + e_sink))) << "head " << h;
    for (int d = 0; d < 8; ++d) {
      EXPECT_EQ(f.out[0].get(0, h, d), 0.0);
      EXPECT_NEAR(f.out[0].get(1, h, d), (1.0 + d) / (1.0 + e_sink), 1e-14);
      EXPECT_NEAR(f.out[0].get(2, h, d), (3.0) / (2.0 + e_sink), 1e-14);
    }
  }
}

// A softcap bounds every score to (-softcap, softcap): with q.k = +-huge the capped scores are
// +-softcap, so a row of two keys weighs them e^c : e^-c whatever their magnitude.
TEST(SoftcapConventions, ScoresAreCappedBeforeTheSoftmax) {
  CaseSpec c("hand_softcap", 1, 1, 8, false, {2}, {GroupSpec{{1}, {}, 0}});
  c.softcap = 1.5f;
  c.softmax_scale = 1.0f;
  CaseInputs in = make_inputs(c, RINGATTN_DTYPE_FP64, 5);
  for (int d = 0; d < 8; ++d) {
    in.q[0].set(0, 0, d, d == 0 ? 1.0 : 0.0);
    in.k.set(0, 0, d, d == 0 ? 1e4 : 0.0);
    in.k.set(1, 0, d, d == 0 ? -1e4 : 0.0);
    in.v.set(0, 0, d, 1.0);
    in.v.set(1, 0, d, 0.0);
  }
  const ForwardResult f = run_forward(in, 1);
  ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
  const double cap = 1.5;
  EXPECT_NEAR(f.out[0].get(0, 0, 0), std::exp(cap) / (std::exp(cap) + std::exp(-cap)), 1e-14);
  EXPECT_FLOAT_EQ(f.lse[0][0], static_cast<float>(std::log(std::exp(cap) + std::exp(-cap))));
}

// Keys outside every window of a sequence are never read: NaN there changes nothing, and their
// dK, dV are exactly 0 (key tiles outside a query tile's window are skipped, and inside a tile no
// masked key enters a sum, not even as 0 * NaN).
TEST(WindowConventions, KeysOutsideTheWindowAreNeverRead) {
  // Lq = 100, Lk = 300, window (20, 10), shift -200: row i's diagonal key is i, so it sees keys
  // max(0, i - 20) .. i + 10, and keys 110 .. 299 (three key tiles and a part) are seen by no row.
  CaseSpec c = one_sequence("unread_keys", 100, 300, false, 20, 10, 2, 1, 32);
  c.diagonal_shift = {{-200}};  // row i's diagonal key is i
  for (const int dtype : {RINGATTN_DTYPE_FP32, RINGATTN_DTYPE_BF16}) {
    SCOPED_TRACE(dtype_name(dtype));
    const CaseInputs clean = make_inputs(c, dtype, 6);
    CaseInputs in = make_inputs(c, dtype, 6);
    set_keys_to_nan(in, 110, 300);
    const ForwardResult fc = run_forward(clean, 2), f = run_forward(in, 2);
    ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
    EXPECT_TRUE(same_bits("out", f.out[0], fc.out[0]));
    EXPECT_TRUE(same_bits("lse", f.lse[0], fc.lse[0]));
    const BackwardResult bc = run_backward(clean, fc, 2), b = run_backward(in, f, 2);
    ASSERT_EQ(b.status, RINGATTN_STATUS_OK) << b.error;
    EXPECT_TRUE(same_bits("dq", b.dq[0], bc.dq[0]));
    for (int64_t key = 0; key < 300; ++key)
      for (int d = 0; d < c.dim; ++d) {
        if (key >= 110) {
          ASSERT_EQ(b.dk.get(key, 0, d), 0.0) << "dk key " << key;
          ASSERT_EQ(b.dv.get(key, 0, d), 0.0) << "dv key " << key;
        } else {
          ASSERT_EQ(b.dk.bits_at(b.dk.offset(key, 0, d)), bc.dk.bits_at(bc.dk.offset(key, 0, d))) << "dk key " << key;
          ASSERT_EQ(b.dv.bits_at(b.dv.offset(key, 0, d)), bc.dv.bits_at(bc.dv.offset(key, 0, d))) << "dv key " << key;
        }
      }
  }
}

// A window (-1, -1), or a shift without any bound, is no mask at all: the same bits as the plain
// call. A shift is not read then (an unaligned or dangling pointer would be refused or crash).
TEST(WindowConventions, UnboundedWindowAndUnreadShiftChangeNothing) {
  CaseSpec plain = one_sequence("unbounded", 90, 120, false, -1, -1, 2, 1, 32);
  plain.has_window = false;
  const CaseInputs in = make_inputs(plain, RINGATTN_DTYPE_FP32, 7);
  const ForwardResult base = run_forward(in, 2);
  ASSERT_EQ(base.status, RINGATTN_STATUS_OK) << base.error;
  std::vector<int32_t> shift = {37};
  const ForwardResult windowed = run_forward(in, 2, [&](ringattn_fwd_params& p) {
    p.problem.has_window = 1;
    p.problem.window_left = -1;
    p.problem.window_right = -1;
    const_cast<ringattn_fwd_group*>(p.groups)[0].diagonal_shift = shift.data();
  });
  ASSERT_EQ(windowed.status, RINGATTN_STATUS_OK) << windowed.error;
  EXPECT_TRUE(same_bits("out", base.out[0], windowed.out[0]));
  EXPECT_TRUE(same_bits("lse", base.lse[0], windowed.lse[0]));
  // A sink of -inf weighs nothing: the same bits too.
  const float minus_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> sinks = {minus_inf, minus_inf};
  const ForwardResult sunk = run_forward(in, 2, [&](ringattn_fwd_params& p) { p.problem.sinks = sinks.data(); });
  ASSERT_EQ(sunk.status, RINGATTN_STATUS_OK) << sunk.error;
  EXPECT_TRUE(same_bits("out", base.out[0], sunk.out[0]));
  EXPECT_TRUE(same_bits("lse", base.lse[0], sunk.lse[0]));
}

// A NaN sink makes its head's LSE and O NaN (never mistaken for "no sink"); the other head keeps
// its bits.
TEST(SinkConventions, NanSinkReachesItsHeadOnly) {
  CaseSpec c = one_sequence("nan_sink", 40, 50, true, -1, -1, 2, 1, 16);
  c.has_window = false;
  c.sinks = {0.25f, 0.75f};
  const CaseInputs in = make_inputs(c, RINGATTN_DTYPE_FP32, 8);
  const ForwardResult clean = run_forward(in, 1);
  std::vector<float> sinks = {0.25f, std::numeric_limits<float>::quiet_NaN()};
  const ForwardResult f = run_forward(in, 1, [&](ringattn_fwd_params& p) { p.problem.sinks = sinks.data(); });
  ASSERT_EQ(f.status, RINGATTN_STATUS_OK) << f.error;
  for (int64_t row = 0; row < 40; ++row) {
    EXPECT_EQ(f.lse[0][row], clean.lse[0][row]);
    EXPECT_TRUE(std::isnan(f.lse[0][40 + row])) << "row " << row;
    for (int d = 0; d < 16; ++d) {
      EXPECT_EQ(f.out[0].get(row, 0, d), clean.out[0].get(row, 0, d));
      EXPECT_TRUE(std::isnan(f.out[0].get(row, 1, d))) << "row " << row;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// host API checks of the new fields
// ---------------------------------------------------------------------------------------------

// Each bad value is refused, naming the field, what it expects and what it got; nothing is written
// (forward outputs and backward gradients stay poisoned).
TEST(WindowSoftcapSinksValidation, BadValuesAreRefusedNamingTheField) {
  const CaseInputs in = make_inputs(one_sequence("bad", 20, 30, true, 5, 0, 2, 1, 16), RINGATTN_DTYPE_FP32, 9);
  const ForwardResult ok = run_forward(in, 1);
  ASSERT_EQ(ok.status, RINGATTN_STATUS_OK) << ok.error;
  alignas(8) static float sink_storage[4] = {0.f, 0.f, 0.f, 0.f};
  alignas(8) static int32_t shift_storage[2] = {0, 0};
  const float* misaligned_sinks =
      reinterpret_cast<const float*>(reinterpret_cast<const char*>(sink_storage) + 2);
  const int32_t* misaligned_shift =
      reinterpret_cast<const int32_t*>(reinterpret_cast<const char*>(shift_storage) + 1);
  struct Bad {
    const char* what;
    std::function<void(ringattn_problem&, const int32_t*&)> edit;
    const char* prefix;
    const char* actual;
  };
  const std::vector<Bad> bad = {
      {"has_window 2", [](ringattn_problem& p, const int32_t*&) { p.has_window = 2; }, "has_window: expected 0 or 1",
       "got 2"},
      {"window_left -2", [](ringattn_problem& p, const int32_t*&) { p.window_left = -2; },
       "window_left: expected -1 (unbounded) or >= 0", "got -2"},
      {"window_right -7", [](ringattn_problem& p, const int32_t*&) { p.window_right = -7; },
       "window_right: expected -1 (unbounded) or >= 0", "got -7"},
      {"causal with window_right 3", [](ringattn_problem& p, const int32_t*&) { p.window_right = 3; },
       "window_right: expected -1 or 0 with causal = 1", "got 3"},
      {"softcap -1", [](ringattn_problem& p, const int32_t*&) { p.softcap = -1.0f; },
       "softcap: expected a finite float32 >= 0 (0 = off)", "got -1"},
      {"softcap nan",
       [](ringattn_problem& p, const int32_t*&) { p.softcap = std::numeric_limits<float>::quiet_NaN(); },
       "softcap: expected a finite float32 >= 0 (0 = off)", "got nan"},
      {"softcap inf",
       [](ringattn_problem& p, const int32_t*&) { p.softcap = std::numeric_limits<float>::infinity(); },
       "softcap: expected a finite float32 >= 0 (0 = off)", "got inf"},
      {"softcap subnormal", [](ringattn_problem& p, const int32_t*&) { p.softcap = 1e-40f; },
       "softcap: expected 0 (off) or a float32 >=", "(positive, not subnormal), got"},
      {"sinks misaligned", [&](ringattn_problem& p, const int32_t*&) { p.sinks = misaligned_sinks; },
       "sinks: expected NULL or a 4-byte aligned pointer to num_heads_q (2) float32 values", "got address"},
      {"diagonal_shift misaligned", [&](ringattn_problem&, const int32_t*& s) { s = misaligned_shift; },
       "diagonal_shift (group 0): expected NULL or a 4-byte aligned pointer to batch_size int32 values",
       "got address"},
  };
  for (const Bad& b : bad) {
    SCOPED_TRACE(b.what);
    const ForwardResult f = run_forward(in, 1, [&](ringattn_fwd_params& p) {
      const int32_t* shift = nullptr;
      b.edit(p.problem, shift);
      if (shift) const_cast<ringattn_fwd_group*>(p.groups)[0].diagonal_shift = shift;
    });
    expect_refused(f.status, RINGATTN_STATUS_INVALID_ARGUMENT, f.error, b.prefix, b.actual);
    EXPECT_TRUE(still_poisoned(f.out[0]) && still_poisoned(f.lse[0]));
    const BackwardResult bw = run_backward(in, ok, 1, [&](ringattn_bwd_params& p) {
      const int32_t* shift = nullptr;
      b.edit(p.problem, shift);
      if (shift) const_cast<ringattn_bwd_group*>(p.groups)[0].diagonal_shift = shift;
    });
    expect_refused(bw.status, RINGATTN_STATUS_INVALID_ARGUMENT, bw.error, b.prefix, b.actual);
    EXPECT_TRUE(still_poisoned(bw.dq[0]) && still_poisoned(bw.dk) && still_poisoned(bw.dv));
  }
}

// sinks and diagonal_shift are inputs of the call: an output over them is refused.
TEST(WindowSoftcapSinksValidation, OutputsOverSinksOrShiftsAreRefused) {
  CaseSpec c = one_sequence("overlap", 20, 30, true, 5, 0, 2, 1, 16);
  const CaseInputs in = make_inputs(c, RINGATTN_DTYPE_FP32, 10);
  // The LSE buffer [2, 20]: the sinks are its first two floats, the shift its last one.
  std::vector<float> lse(2 * 20 + 1, 0.0f);
  ForwardResult f = run_forward(in, 1, [&](ringattn_fwd_params& p) {
    const_cast<ringattn_fwd_group*>(p.groups)[0].softmax_lse = lse.data();
    p.problem.sinks = lse.data();
  });
  expect_refused(f.status, RINGATTN_STATUS_INVALID_ARGUMENT, f.error,
                 "softmax_lse (group 0): expected an output that shares no memory with the input sinks", "bytes");
  f = run_forward(in, 1, [&](ringattn_fwd_params& p) {
    auto* g = const_cast<ringattn_fwd_group*>(p.groups);
    g[0].softmax_lse = lse.data();
    g[0].diagonal_shift = reinterpret_cast<const int32_t*>(lse.data() + 39);
  });
  expect_refused(f.status, RINGATTN_STATUS_INVALID_ARGUMENT, f.error,
                 "softmax_lse (group 0): expected an output that shares no memory with the input diagonal_shift "
                 "(group 0)",
                 "bytes");
}

// The CUDA backend refuses each feature its kernels do not implement (cuda::kSupports*; today all
// are implemented, so each is accepted), in
// the workspace-size query as in the call, naming the field; the query needs no GPU. Needs a
// library built with CUDA: without it every CUDA call is refused before its fields are read.
#ifdef RINGATTN_TEST_CUDA
TEST(WindowSoftcapSinksValidation, CudaRefusesWhatItsKernelsLack) {
  CaseSpec c = one_sequence("cuda_refusal", 64, 64, true, -1, -1, 2, 1, 64);
  c.has_window = false;
  const CaseInputs in = make_inputs(c, RINGATTN_DTYPE_BF16, 11);
  std::vector<float> sinks = {0.5f, 0.5f};
  std::vector<int32_t> shift = {0};
  struct Feature {
    const char* field;
    bool supported;
    std::function<void(ringattn_fwd_params&)> edit;
  };
  const std::vector<Feature> features = {
      {"window_left/window_right", ringattn::cuda::kSupportsWindow,
       [](ringattn_fwd_params& p) {
         p.problem.has_window = 1;
         p.problem.window_left = 16;
       }},
      {"softcap", ringattn::cuda::kSupportsSoftcap, [](ringattn_fwd_params& p) { p.problem.softcap = 30.0f; }},
      {"sinks", ringattn::cuda::kSupportsSinks, [&](ringattn_fwd_params& p) { p.problem.sinks = sinks.data(); }},
      {"diagonal_shift (group 0)", ringattn::cuda::kSupportsDiagonalShift,
       [&](ringattn_fwd_params& p) { const_cast<ringattn_fwd_group*>(p.groups)[0].diagonal_shift = shift.data(); }},
  };
  for (const Feature& feature : features) {
    SCOPED_TRACE(feature.field);
    std::vector<ringattn_fwd_group> groups(1);
    set_group_queries(groups[0], in, 0);
    // The output's layout (the query's; data pointers may be NULL in the workspace query).
    groups[0].out_row_stride = groups[0].q_row_stride;
    groups[0].out_head_stride = groups[0].q_head_stride;
    ringattn_fwd_params p{};
    p.problem = make_problem(in);
    p.exec.device_type = RINGATTN_DEVICE_CUDA;
    set_keys_values(p.kv, in);
    p.groups = groups.data();
    feature.edit(p);
    size_t bytes = 0;
    const ringattn_status status = ringattn_fwd_workspace_size(&p, &bytes);
    const std::string error = ringattn_last_error();
    if (feature.supported) {
      EXPECT_EQ(status, RINGATTN_STATUS_OK) << error;
    } else {
      expect_refused(status, RINGATTN_STATUS_UNSUPPORTED, error, std::string(feature.field) + ": expected", "CUDA");
    }
  }
}
#endif

}  // namespace
}  // namespace ratest
