// The attention mask of one (group, sequence): which keys each query row sees. This header is the
// one definition of that rule. The GPU kernels (mask mode as a compile-time parameter), their
// work-list schedulers, the backward kernels' query-tile cursor and the CPU backend (window chosen
// at run time) all ask it, so every layer agrees on which (row, key) pairs exist.
//
// Geometry. A sequence has seqlen_q query rows and seqlen_k keys. Masks are aligned bottom-right:
// the last query row lines up with the last key, so row i's diagonal key is i + offset() with
// offset() = seqlen_k - seqlen_q + shift, where shift is the sequence's diagonal shift (0 unless
// the caller moves the diagonal, as context parallelism does when a query block and a key block sit
// at different positions of one sequence). A window (left, right), each -1 for unbounded, lets
// row i see key j iff
//     0 <= j < seqlen_k   and   i + offset - left <= j <= i + offset + right.
// MaskMode::kNone is the window (-1, -1) (every key), MaskMode::kCausal is (-1, 0) (keys up to the
// diagonal), both without a shift; MaskMode::kLocal takes the window and the shift at run time
// (sliding windows, causal with a shift, and the kernels of the optional features: softcap and
// sinks). The keys a row sees are one run [key_begin(i), key_end(i)) and the rows that see a
// key are one run [row_begin(j), row_end(j)); both runs only move right as i (j) grows, which is
// what the block ranges below rely on.
//
// Compiled by nvcc (device and host code) and by the host C++ compiler (CPU backend, tests).
//
// How the functions are written matters for the kernels' machine code, which this header must not
// change: nvcc simplifies each inlined function on its own before inlining it, so the shape of an
// expression here survives into the kernel. What keeps the kNone / kCausal kernels identical to
// the rule written out inline:
//   - terms of the left side are guarded by the compile-time flag kMayBoundLeft first, so the
//     front end drops them for the kernel modes;
//   - the tile and entry predicates combine their terms with the non-short-circuit `|`, and the
//     entry predicates take the row and key by const reference (keeps the comparisons' operands
//     in order);
//   - the diagonal offset is computed once, at construction;
//   - kernels write a tile's first key block as the constant 0 when kKeysStartAtZero.
// Compare the SASS before and after any change here (scripts/dev/sass_digest.py --compare).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define RINGATTN_HOST_DEVICE __host__ __device__
#define RINGATTN_FORCEINLINE __forceinline__
#else
#define RINGATTN_HOST_DEVICE
#define RINGATTN_FORCEINLINE inline
#endif

namespace ringattn {

// Mask modes the kernels are instantiated for (a template parameter of every kernel).
enum class MaskMode : int {
  kNone = 0,    // every key of the sequence
  kCausal = 1,  // bottom-right aligned: query i of Lq sees key j of Lk iff j <= i + Lk - Lq
  kLocal = 2,   // a window (left, right) chosen at run time around each row's diagonal, moved by
                // the sequence's diagonal shift; (-1, -1) is every key, (-1, 0) causal
};

// A window whose bounds are compile-time constants (-1 = unbounded).
template <int32_t kLeft, int32_t kRight>
struct FixedWindow {
  static_assert(kLeft >= -1 && kRight >= -1, "window bounds are -1 (unbounded) or >= 0");
  static constexpr int32_t left = kLeft;
  static constexpr int32_t right = kRight;
};

// A window chosen at run time (-1 = unbounded).
struct MaskWindow {
  int32_t left = -1;
  int32_t right = -1;

  // The window of a fixed kernel mode: (-1, -1) for kNone, (-1, 0) for kCausal (kLocal's window is
  // the call's, not the mode's).
  RINGATTN_HOST_DEVICE static constexpr MaskWindow of(MaskMode mode) {
    return MaskWindow{-1, mode == MaskMode::kCausal ? 0 : -1};
  }
};

// The window each kernel mode applies. A new mode is a new row here (and a value of MaskMode).
template <MaskMode kMode>
struct ModeWindow;
template <>
struct ModeWindow<MaskMode::kNone> {
  using type = FixedWindow<-1, -1>;
};
template <>
struct ModeWindow<MaskMode::kCausal> {
  using type = FixedWindow<-1, 0>;
};
template <>
struct ModeWindow<MaskMode::kLocal> {
  using type = MaskWindow;
};

// Which sides of a window can bound a row, known at compile time: a run-time window may have
// either; a fixed window has exactly the sides whose bound is not -1.
template <class Window>
struct WindowSides {
  static constexpr bool kMayBoundLeft = true;
  static constexpr bool kMayBoundRight = true;
};
template <int32_t kLeft, int32_t kRight>
struct WindowSides<FixedWindow<kLeft, kRight>> {
  static constexpr bool kMayBoundLeft = kLeft >= 0;
  static constexpr bool kMayBoundRight = kRight >= 0;
};

// Blocks of `block` items that the items [0, count) occupy (0 when count <= 0).
template <class Int>
RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE Int blocks_covering(Int count, Int block) {
  return count <= 0 ? 0 : (count + block - 1) / block;
}

// The mask of one sequence: seqlen_q query rows against seqlen_k keys under `window`. Rows and
// keys are indices within the sequence. Int is the index type (int32_t on the GPU, int64_t in the
// CPU backend). A function taking a row i expects 0 <= i, one taking a key j expects 0 <= j;
// other limits are stated per function.
template <class Window, class Int = int32_t>
struct MaskPolicy {
  Int seqlen_q;
  Int seqlen_k;
  Int diagonal;  // offset(): seqlen_k - seqlen_q (+ the diagonal shift)
  Window window;

  static constexpr bool kMayBoundLeft = WindowSides<Window>::kMayBoundLeft;
  static constexpr bool kMayBoundRight = WindowSides<Window>::kMayBoundRight;
  // Every row's keys start at key 0 (no left bound), whatever the lengths: a compile-time fact for
  // the kernel modes, so a tile's key-block range starts at block 0.
  static constexpr bool kKeysStartAtZero = !kMayBoundLeft;

  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE MaskPolicy(Int seqlen_q_, Int seqlen_k_, Window window_ = Window{})
      : seqlen_q(seqlen_q_), seqlen_k(seqlen_k_), diagonal(seqlen_k_ - seqlen_q_), window(window_) {}
  // With the diagonal moved by `shift` keys (row i's diagonal key is i + seqlen_k - seqlen_q + shift).
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE MaskPolicy(Int seqlen_q_, Int seqlen_k_, Window window_, Int shift)
      : seqlen_q(seqlen_q_), seqlen_k(seqlen_k_), diagonal(seqlen_k_ - seqlen_q_ + shift), window(window_) {}

  // Row i's diagonal key is i + offset() (bottom-right alignment, moved by the shift).
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE Int offset() const { return diagonal; }
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE bool has_left() const { return kMayBoundLeft && window.left >= 0; }
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE bool has_right() const { return kMayBoundRight && window.right >= 0; }

  // ---- the keys of one query row: [key_begin(i), key_end(i)), none when key_end <= key_begin ----

  // First key row i sees (0 without a left bound). May be >= seqlen_k.
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE Int key_begin(Int i) const {
    if (!has_left()) return 0;
    const Int first = i + offset() - window.left;
    return first > 0 ? first : 0;
  }
  // One past the last key row i sees. May be <= 0 (the row sees no key). Callers may pass a row
  // past the sequence (a tile's last row): key_end only grows with i, so it then bounds the keys
  // of every row of the tile.
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE Int key_end(Int i) const {
    Int end = seqlen_k;
    if (has_right()) {
      const Int diagonal_end = i + offset() + window.right + 1;
      end = diagonal_end < end ? diagonal_end : end;
    }
    return end;
  }
  // How many keys of [j0, j1) row i sees; they are consecutive, from max(j0, key_begin(i)).
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE Int keys_seen_in(Int i, Int j0, Int j1) const {
    const Int begin = key_begin(i);
    const Int end = key_end(i);
    const Int lo = j0 > begin ? j0 : begin;
    const Int hi = j1 < end ? j1 : end;
    return hi > lo ? hi - lo : 0;
  }

  // Row i's keys relative to key j0 (0 <= j0): key j0 + k (with 0 <= j0 + k) is visible to row i
  // iff first <= k < end, i.e. the run [key_begin(i), key_end(i)) shifted by -j0 (end clamped to
  // 0 first, so neither difference overflows; first >= end when the row sees no key). What the
  // kLocal kernels compare a block's column offsets against: two comparisons per entry instead of
  // key_masked's whole rule.
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE void key_run_from(Int i, Int j0, Int& first, Int& end) const {
    const Int begin = key_begin(i);
    const Int last_end = key_end(i);
    first = begin - j0;
    end = (last_end > 0 ? last_end : 0) - j0;
  }

  // ---- the rows that see one key: [row_begin(j), row_end(j)), none when row_end <= row_begin ----

  // First row whose window reaches key j, not clamped to the sequence: may be negative (then the
  // run starts at row 0). 0 without a right bound.
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE Int row_begin_unclamped(Int j) const {
    return has_right() ? j - offset() - window.right : 0;
  }
  // First row that sees key j. May be >= seqlen_q (no row sees it).
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE Int row_begin(Int j) const {
    const Int first = row_begin_unclamped(j);
    return first > 0 ? first : 0;
  }
  // One past the last row that sees key j (seqlen_q without a left bound). May be <= 0.
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE Int row_end(Int j) const {
    Int end = seqlen_q;
    if (has_left()) {
      const Int last_end = j - offset() + window.left + 1;
      end = last_end < end ? last_end : end;
    }
    return end;
  }

  // ---- single entries ----

  // Whether query row i does not see key j: the key is past the sequence or outside the window.
  // The row is taken to be in the sequence (callers that compute rows past it discard them).
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE bool key_masked(const Int& i, const Int& j) const {
    return (j >= seqlen_k) | (has_right() && j > i + offset() + window.right) |
           (kMayBoundLeft && has_left() && j < i + offset() - window.left);
  }
  // Whether entry (i, j) is masked, rows past the sequence included.
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE bool masked(const Int& i, const Int& j) const {
    return (j >= seqlen_k) | (i >= seqlen_q) | (has_right() && j > i + offset() + window.right) |
           (kMayBoundLeft && has_left() && j < i + offset() - window.left);
  }
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE bool visible(const Int& i, const Int& j) const { return !masked(i, j); }

  // ---- tiles ----

  // Key blocks [n_block_min, n_block_max) (blocks of block_n keys) that query tile m_block (rows
  // [m_block * block_m, (m_block + 1) * block_m), the first one in the sequence) needs; none when
  // n_block_max <= n_block_min. The rows' keys together are [key_begin(first row), key_end(last
  // row)), since consecutive rows' windows overlap or touch. The last row may lie past the
  // sequence (a partial last tile): the range then also covers the keys it would see. The range
  // is empty exactly when no row of the tile sees a key (the union of consecutive rows' runs is
  // one run). n_block_min is 0 when kKeysStartAtZero, and the kernels write that 0 as a constant.
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE Int n_block_min(Int m_block, Int block_m, Int block_n) const {
    return key_begin(m_block * block_m) / block_n;
  }
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE Int n_block_max(Int m_block, Int block_m, Int block_n) const {
    const Int end = key_end((m_block + 1) * block_m - 1);
    // With a left bound (and a diagonal shift) every row's keys may start past the sequence's
    // last key, key_begin(first row) >= end: no row sees a key, and the range must be empty.
    if (kMayBoundLeft && end <= key_begin(m_block * block_m)) return n_block_min(m_block, block_m, block_n);
    return blocks_covering(end, block_n);
  }

  // Whether the tile of rows [row0, row0 + rows) and keys [col0, col0 + cols) has an entry that a
  // row of the sequence does not see, i.e. whether its entries need key_masked() at all (if not,
  // every entry is visible). Rows past the sequence do not count.
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE bool tile_needs_key_mask(Int row0, Int rows, Int col0, Int cols) const {
    return (col0 + cols > seqlen_k) | (has_right() && col0 + cols - 1 > row0 + offset() + window.right) |
           (kMayBoundLeft && has_left() && col0 < row0 + rows - 1 + offset() - window.left);
  }
  // The same for masked(): rows past the sequence count as masked.
  RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE bool tile_needs_mask(Int row0, Int rows, Int col0, Int cols) const {
    return (col0 + cols > seqlen_k) | (row0 + rows > seqlen_q) |
           (has_right() && col0 + cols - 1 > row0 + offset() + window.right) |
           (kMayBoundLeft && has_left() && col0 < row0 + rows - 1 + offset() - window.left);
  }
};

// The mask the kernels instantiated for `kMode` apply.
template <MaskMode kMode>
using Mask = MaskPolicy<typename ModeWindow<kMode>::type, int32_t>;

}  // namespace ringattn
