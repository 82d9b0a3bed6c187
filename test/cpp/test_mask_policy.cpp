// The mask policy (csrc/common/mask.h) against a brute-force predicate.
//
// Every range the policy gives (a row's keys, a key's rows, a query tile's key blocks, whether a
// tile needs the element mask) is checked against the same question answered by testing every
// (row, key) pair with the definition: query row i of Lq sees key j of Lk iff 0 <= j < Lk and
// d - left <= j <= d + right with d = i + Lk - Lq + shift, -1 meaning unbounded. Lengths include 0,
// Lq > Lk, Lq < Lk and lengths that are not multiples of the blocks; windows are the kernel modes',
// a few fixed ones and random ones, with and without a diagonal shift.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "common/mask.h"

namespace ratest {
namespace {

using ringattn::FixedWindow;
using ringattn::Mask;
using ringattn::MaskMode;
using ringattn::MaskPolicy;
using ringattn::MaskWindow;

// The window test alone (rows past the sequence allowed), for key_masked().
bool brute_key_visible(int64_t lq, int64_t lk, int64_t left, int64_t right, int64_t i, int64_t j, int64_t shift) {
  if (j < 0 || j >= lk) return false;
  const int64_t diagonal = i + lk - lq + shift;
  if (left >= 0 && j < diagonal - left) return false;
  if (right >= 0 && j > diagonal + right) return false;
  return true;
}

// The definition, one pair at a time: a row of the sequence and the window test.
bool brute_visible(int64_t lq, int64_t lk, int64_t left, int64_t right, int64_t i, int64_t j, int64_t shift) {
  return i >= 0 && i < lq && brute_key_visible(lq, lk, left, right, i, j, shift);
}

struct Blocks {
  int m, n;
};

constexpr Blocks kBlocks[] = {{1, 1}, {5, 7}, {16, 16}, {64, 64}, {64, 128}, {128, 32}, {128, 64}, {128, 128}};

std::string describe(int64_t lq, int64_t lk, int64_t left, int64_t right, int64_t shift) {
  return "Lq=" + std::to_string(lq) + " Lk=" + std::to_string(lk) + " window=(" + std::to_string(left) + ", " +
         std::to_string(right) + ") shift=" + std::to_string(shift);
}

// Checks one mask (any window type, any index type) of lengths (lq, lk) against the definition
// with window (left, right) and diagonal shift `shift`.
template <class M>
void check_mask(const M& mask, int64_t lq, int64_t lk, int64_t left, int64_t right, int64_t shift = 0) {
  SCOPED_TRACE(describe(lq, lk, left, right, shift));
  using Int = decltype(mask.seqlen_q);
  // The brute-force predicates with this mask's window and shift.
  auto brute_visible = [&](int64_t lq_, int64_t lk_, int64_t left_, int64_t right_, int64_t i, int64_t j) {
    return ratest::brute_visible(lq_, lk_, left_, right_, i, j, shift);
  };
  auto brute_key_visible = [&](int64_t lq_, int64_t lk_, int64_t left_, int64_t right_, int64_t i, int64_t j) {
    return ratest::brute_key_visible(lq_, lk_, left_, right_, i, j, shift);
  };
  ASSERT_EQ(static_cast<int64_t>(mask.offset()), lk - lq + shift);
  ASSERT_EQ(mask.has_left(), left >= 0);
  ASSERT_EQ(mask.has_right(), right >= 0);

  // Single entries, including rows and keys past the sequence.
  for (int64_t i = 0; i < lq + 3; ++i)
    for (int64_t j = 0; j < lk + 3; ++j) {
      const bool want = brute_visible(lq, lk, left, right, i, j);
      ASSERT_EQ(mask.visible(static_cast<Int>(i), static_cast<Int>(j)), want) << "i=" << i << " j=" << j;
      ASSERT_EQ(mask.masked(static_cast<Int>(i), static_cast<Int>(j)), !want) << "i=" << i << " j=" << j;
      ASSERT_EQ(mask.key_masked(static_cast<Int>(i), static_cast<Int>(j)), !brute_key_visible(lq, lk, left, right, i, j))
          << "i=" << i << " j=" << j;
    }

  // A row's keys: one run [key_begin, key_end), growing with the row; keys_seen_in counts them.
  int64_t prev_begin = 0, prev_end = -(int64_t{1} << 40);
  for (int64_t i = 0; i < lq; ++i) {
    const int64_t begin = mask.key_begin(static_cast<Int>(i));
    const int64_t end = mask.key_end(static_cast<Int>(i));
    ASSERT_GE(begin, 0) << "i=" << i;
    ASSERT_LE(end, lk) << "i=" << i;
    ASSERT_GE(begin, prev_begin) << "i=" << i;
    ASSERT_GE(end, prev_end) << "i=" << i;
    prev_begin = begin;
    prev_end = end;
    for (int64_t j = 0; j < lk; ++j)
      ASSERT_EQ(begin <= j && j < end, brute_visible(lq, lk, left, right, i, j)) << "i=" << i << " j=" << j;
    // The same run relative to a block's first key j0 (what the kLocal kernels compare column
    // offsets against): key j0 + k is visible iff first <= k < end, keys past the sequence
    // included (masked).
    for (int64_t j0 = 0; j0 <= lk + 2; j0 += 3) {
      Int first = 0, run_end = 0;
      mask.key_run_from(static_cast<Int>(i), static_cast<Int>(j0), first, run_end);
      for (int64_t k = -j0; j0 + k < lk + 3; ++k)
        ASSERT_EQ(first <= k && k < run_end, brute_key_visible(lq, lk, left, right, i, j0 + k))
            << "i=" << i << " j0=" << j0 << " k=" << k;
    }
    std::vector<int64_t> seen_before(lk + 3, 0);  // visible keys of the row below j
    for (int64_t j = 0; j + 1 < lk + 3; ++j) seen_before[j + 1] = seen_before[j] + brute_visible(lq, lk, left, right, i, j);
    for (int64_t j0 = 0; j0 <= lk; j0 += 3)
      for (int64_t j1 = j0; j1 <= lk + 2; j1 += 5)
        ASSERT_EQ(static_cast<int64_t>(mask.keys_seen_in(static_cast<Int>(i), static_cast<Int>(j0), static_cast<Int>(j1))),
                  seen_before[j1] - seen_before[j0])
            << "i=" << i << " [" << j0 << ", " << j1 << ")";
  }

  // A key's rows: one run [row_begin, row_end); row_begin_unclamped is the first row whose window
  // reaches the key (the smallest i, of any sign, with j <= i + offset + right).
  for (int64_t j = 0; j < lk; ++j) {
    const int64_t begin = mask.row_begin(static_cast<Int>(j));
    const int64_t end = mask.row_end(static_cast<Int>(j));
    ASSERT_GE(begin, 0) << "j=" << j;
    ASSERT_LE(end, lq) << "j=" << j;
    for (int64_t i = 0; i < lq; ++i)
      ASSERT_EQ(begin <= i && i < end, brute_visible(lq, lk, left, right, i, j)) << "i=" << i << " j=" << j;
    const int64_t unclamped = mask.row_begin_unclamped(static_cast<Int>(j));
    ASSERT_EQ(std::max<int64_t>(unclamped, 0), begin) << "j=" << j;
    if (right >= 0) {
      ASSERT_EQ(unclamped, j - (lk - lq + shift) - right) << "j=" << j;
    }
  }

  for (const Blocks& blk : kBlocks) {
    SCOPED_TRACE("blocks " + std::to_string(blk.m) + "x" + std::to_string(blk.n));
    const int64_t tiles = (lq + blk.m - 1) / blk.m;
    for (int64_t m = 0; m < tiles; ++m) {
      const int64_t row0 = m * blk.m;
      const int64_t rows_in_seq = std::min<int64_t>(blk.m, lq - row0);
      // Key blocks with a visible entry: of the tile's rows in the sequence, and of all its rows
      // (the range may cover the keys a partial last tile's rows past the sequence would see).
      int64_t lo_in = -1, hi_in = -1, lo_all = -1, hi_all = -1;
      for (int64_t r = 0; r < blk.m; ++r)
        for (int64_t j = 0; j < lk; ++j) {
          if (!brute_key_visible(lq, lk, left, right, row0 + r, j)) continue;
          const int64_t n = j / blk.n;
          if (lo_all < 0 || n < lo_all) lo_all = n;
          hi_all = std::max(hi_all, n + 1);
          if (r < rows_in_seq) {
            if (lo_in < 0 || n < lo_in) lo_in = n;
            hi_in = std::max(hi_in, n + 1);
          }
        }
      const int64_t n_min = mask.n_block_min(static_cast<Int>(m), static_cast<Int>(blk.m), static_cast<Int>(blk.n));
      const int64_t n_max = mask.n_block_max(static_cast<Int>(m), static_cast<Int>(blk.m), static_cast<Int>(blk.n));
      if (lo_all < 0) {
        ASSERT_LE(n_max, n_min) << "m=" << m << ": no row sees a key, the range must be empty";
      } else {
        ASSERT_EQ(n_min, lo_all) << "m=" << m;
        ASSERT_EQ(n_max, hi_all) << "m=" << m;
        if (lo_in >= 0) {
          ASSERT_LE(n_min, lo_in) << "m=" << m;
          ASSERT_GE(n_max, hi_in) << "m=" << m;
        }
      }
      if (rows_in_seq == blk.m) {  // a full tile: the range is exactly its rows' blocks
        ASSERT_EQ(lo_in, lo_all) << "m=" << m;
        ASSERT_EQ(hi_in, hi_all) << "m=" << m;
      }
      if (M::kKeysStartAtZero) {
        ASSERT_TRUE(n_min == 0 || n_max <= n_min) << "m=" << m;
      }

      // Whether each key block of the tile (and one past its range) needs the element mask.
      const int64_t n_end = std::max<int64_t>(n_max, 0) + 1;
      for (int64_t n = std::max<int64_t>(n_min, 0); n < n_end; ++n) {
        const int64_t col0 = n * blk.n;
        bool any_masked_in_seq = false, any_masked = false;
        for (int64_t r = 0; r < blk.m; ++r)
          for (int64_t c = 0; c < blk.n; ++c) {
            const bool masked_entry = !brute_visible(lq, lk, left, right, row0 + r, col0 + c);
            any_masked |= masked_entry;
            if (r < rows_in_seq) any_masked_in_seq |= masked_entry;
          }
        const bool needs = mask.tile_needs_mask(static_cast<Int>(row0), static_cast<Int>(blk.m), static_cast<Int>(col0),
                                                static_cast<Int>(blk.n));
        ASSERT_EQ(needs, any_masked) << "m=" << m << " n=" << n;
        const bool needs_key = mask.tile_needs_key_mask(static_cast<Int>(row0), static_cast<Int>(blk.m),
                                                        static_cast<Int>(col0), static_cast<Int>(blk.n));
        if (rows_in_seq == blk.m) {
          ASSERT_EQ(needs_key, any_masked_in_seq) << "m=" << m << " n=" << n;
        } else if (!needs_key) {  // may over-report past the sequence, never under-report
          ASSERT_FALSE(any_masked_in_seq) << "m=" << m << " n=" << n;
        }
      }
    }
  }
}

// Lengths: empty, tiny, equal, Lq > Lk, Lq < Lk, not multiples of any block, a few block multiples.
const std::vector<std::pair<int, int>>& length_pairs() {
  static const std::vector<std::pair<int, int>> pairs = [] {
    std::vector<std::pair<int, int>> p;
    const int sizes[] = {0, 1, 2, 7, 16, 63, 64, 65, 127, 130, 200};
    for (int lq : sizes)
      for (int lk : sizes) p.emplace_back(lq, lk);
    return p;
  }();
  return pairs;
}

TEST(MaskPolicy, NoneMatchesDefinition) {
  for (const auto& [lq, lk] : length_pairs()) {
    check_mask(Mask<MaskMode::kNone>(lq, lk), lq, lk, -1, -1);
    check_mask(MaskPolicy<MaskWindow, int64_t>(lq, lk, MaskWindow::of(MaskMode::kNone)), lq, lk, -1, -1);
  }
}

TEST(MaskPolicy, CausalMatchesDefinition) {
  for (const auto& [lq, lk] : length_pairs()) {
    check_mask(Mask<MaskMode::kCausal>(lq, lk), lq, lk, -1, 0);
    check_mask(MaskPolicy<MaskWindow, int64_t>(lq, lk, MaskWindow::of(MaskMode::kCausal)), lq, lk, -1, 0);
  }
}

TEST(MaskPolicy, ModeWindows) {
  EXPECT_EQ(MaskWindow::of(MaskMode::kNone).left, -1);
  EXPECT_EQ(MaskWindow::of(MaskMode::kNone).right, -1);
  EXPECT_EQ(MaskWindow::of(MaskMode::kCausal).left, -1);
  EXPECT_EQ(MaskWindow::of(MaskMode::kCausal).right, 0);
  static_assert(Mask<MaskMode::kNone>::kKeysStartAtZero && Mask<MaskMode::kCausal>::kKeysStartAtZero,
                "the kernel modes have no left bound");
  static_assert(!Mask<MaskMode::kNone>::kMayBoundRight && Mask<MaskMode::kCausal>::kMayBoundRight,
                "only causal bounds the right side");
  static_assert(!MaskPolicy<MaskWindow>::kKeysStartAtZero, "a run-time window may bound the left side");
}

TEST(MaskPolicy, FixedWindowsMatchRunTimeWindows) {
  for (const auto& [lq, lk] : length_pairs()) {
    check_mask(MaskPolicy<FixedWindow<3, 2>>(lq, lk), lq, lk, 3, 2);
    check_mask(MaskPolicy<FixedWindow<0, -1>>(lq, lk), lq, lk, 0, -1);
    check_mask(MaskPolicy<FixedWindow<0, 0>, int64_t>(lq, lk), lq, lk, 0, 0);
    check_mask(MaskPolicy<MaskWindow>(lq, lk, MaskWindow{3, 2}), lq, lk, 3, 2);
  }
}

// Random lengths up to a maximum each and a random window for them.
struct RandomWindowCase {
  int lq, lk;
  int span;  // 2 max(lq, lk) + 2: every bound and shift is drawn within it
  MaskWindow window;
};

// Draws lq, then lk, then the window's left and right bounds: a quarter of the bounds unbounded,
// the rest anywhere from 0 to past both lengths.
RandomWindowCase random_window_case(std::mt19937& rng, int max_length) {
  std::uniform_int_distribution<int> length(0, max_length);
  RandomWindowCase c;
  c.lq = length(rng);
  c.lk = length(rng);
  c.span = 2 * std::max(c.lq, c.lk) + 2;
  std::uniform_int_distribution<int> bound(-1, c.span);
  auto draw = [&] { return rng() % 4 == 0 ? -1 : bound(rng); };
  c.window = MaskWindow{draw(), draw()};
  return c;
}

TEST(MaskPolicy, RandomWindowsMatchDefinition) {
  std::mt19937 rng(20261207);
  for (int trial = 0; trial < 200; ++trial) {
    const auto [lq, lk, span, window] = random_window_case(rng, 150);
    check_mask(MaskPolicy<MaskWindow>(lq, lk, window), lq, lk, window.left, window.right);
    check_mask(MaskPolicy<MaskWindow, int64_t>(lq, lk, window), lq, lk, window.left, window.right);
  }
}

TEST(MaskPolicy, LocalModeIsARunTimeWindow) {
  static_assert(std::is_same_v<Mask<MaskMode::kLocal>, MaskPolicy<MaskWindow, int32_t>>,
                "kLocal takes its window at run time");
  static_assert(!Mask<MaskMode::kLocal>::kKeysStartAtZero, "kLocal may bound the left side");
  for (const auto& [lq, lk] : length_pairs()) {
    check_mask(Mask<MaskMode::kLocal>(lq, lk, MaskWindow{-1, -1}, 0), lq, lk, -1, -1);
    check_mask(Mask<MaskMode::kLocal>(lq, lk, MaskWindow{-1, 0}, 0), lq, lk, -1, 0);
    check_mask(Mask<MaskMode::kLocal>(lq, lk, MaskWindow{5, 0}, 0), lq, lk, 5, 0);
  }
}

TEST(MaskPolicy, ShiftedWindowsMatchDefinition) {
  std::mt19937 rng(20260331);
  for (int trial = 0; trial < 200; ++trial) {
    const auto [lq, lk, span, window] = random_window_case(rng, 130);
    const int shift = std::uniform_int_distribution<int>(-span, span)(rng);
    check_mask(MaskPolicy<MaskWindow>(lq, lk, window, shift), lq, lk, window.left, window.right, shift);
    check_mask(MaskPolicy<MaskWindow, int64_t>(lq, lk, window, shift), lq, lk, window.left, window.right, shift);
    // Causal with a shift: the right bound 0 of the moved diagonal.
    check_mask(Mask<MaskMode::kLocal>(lq, lk, MaskWindow{-1, 0}, shift), lq, lk, -1, 0, shift);
  }
}

// Sides at 2^30, where call_window (cuda/kernel_registry.h) clamps larger ones (INT32_MAX spells
// "unbounded"): the int32 policy's arithmetic (row + diagonal + side, the runs relative to a
// block's first key) must not wrap.
TEST(MaskPolicy, ClampedSidesMatchDefinition) {
  constexpr int kSide = 1 << 30;
  for (const auto& [lq, lk] : length_pairs())
    for (int shift : {-250, 0, 130}) {
      check_mask(MaskPolicy<MaskWindow>(lq, lk, MaskWindow{kSide, kSide}, shift), lq, lk, kSide, kSide, shift);
      check_mask(MaskPolicy<MaskWindow>(lq, lk, MaskWindow{64, kSide}, shift), lq, lk, 64, kSide, shift);
      check_mask(MaskPolicy<MaskWindow>(lq, lk, MaskWindow{kSide, 3}, shift), lq, lk, kSide, 3, shift);
    }
}

TEST(MaskPolicy, BlocksCovering) {
  EXPECT_EQ(ringattn::blocks_covering(0, 64), 0);
  EXPECT_EQ(ringattn::blocks_covering(-5, 64), 0);
  EXPECT_EQ(ringattn::blocks_covering(1, 64), 1);
  EXPECT_EQ(ringattn::blocks_covering(64, 64), 1);
  EXPECT_EQ(ringattn::blocks_covering(65, 64), 2);
  EXPECT_EQ(ringattn::blocks_covering(int64_t{1} << 33, int64_t{128}), int64_t{1} << 26);
}

}  // namespace
}  // namespace ratest
