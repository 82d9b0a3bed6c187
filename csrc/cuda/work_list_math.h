// The integer arithmetic of the work-list builders (tile_scheduler.cu, bwd_scheduler.cu), header
// only and host-callable so that GoogleTest checks it at sizes near and past 2^31 without a GPU
// (test/cpp/test_work_list_math.cpp).
//
// The builders' int32 values are bounded by the call's tensors (sequence lengths, tile and block
// counts, item indices below the list's capacity, which the host keeps at or below INT32_MAX).
// What is not bounded is any sum over sequences: with malformed, overlapping cu_seqlens (reported
// through the metadata error word, then clamped to the tensors) each sequence may span the whole
// tensor, and B of them add up to B times its tiles. So the sums are 64-bit, and what goes back
// into the int32 buffers is saturated at the capacity; the per-tile and per-block arithmetic that
// adds a block size to a length near INT32_MAX is written so it cannot wrap.
#pragma once

#include <cstdint>

#include "common/mask.h"

namespace ringattn {
namespace cuda {
namespace work_list {

// Blocks of `block` (> 0) items covering [0, count): ceil(count / block), 0 for count <= 0. Not
// (count + block - 1) / block, which wraps for count past INT32_MAX - block + 1.
RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE int32_t blocks_of(int32_t count, int32_t block) {
  return count <= 0 ? 0 : count / block + (count % block != 0 ? 1 : 0);
}

// A 64-bit prefix sum (>= 0) stored into an int32 offsets buffer: saturated at `cap`, the list's
// capacity (0 <= cap <= INT32_MAX). Items at or past the capacity are never written, so an offset
// of cap or more only has to compare >= every item index, which the saturated value does.
RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE int32_t saturated_offset(int64_t offset, int32_t cap) {
  return offset < cap ? static_cast<int32_t>(offset) : cap;
}

// How many of a sequence's `count` items (tiles or blocks), placed from list index `first` (a
// saturated offset, first <= total), lie below `total` items: min(count, total - first), without
// first + count, which could pass INT32_MAX.
RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE int32_t items_below(int32_t first, int32_t count, int32_t total) {
  const int32_t room = total - first;
  return count < room ? count : room;
}

// The host's item capacity as the builders' int32 (callers refuse grids past INT32_MAX CTAs
// before this; saturated rather than truncated all the same).
inline int32_t capacity_i32(int64_t capacity) {
  return capacity < 0 ? 0 : (capacity > INT32_MAX ? INT32_MAX : static_cast<int32_t>(capacity));
}

// The last b in [0, n) with offset(b) <= i, for non-decreasing offsets with offset(0) <= i (n >= 1):
// the sequence that item i belongs to (empty sequences share their successor's offset, and the
// last of equal offsets is the one with items). lo + (hi - lo + 1) / 2, not (lo + hi + 1) / 2,
// which wraps for n past 2^30.
template <class Offsets>
RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE int32_t last_at_or_below(const Offsets& offset, int32_t n, int64_t i) {
  int32_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo + 1) / 2;
    if (offset(mid) <= i)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Whether a sequence's mask arithmetic fits int32, the kernels' own index type: rows and keys
// below 2^30 (window sides are clamped to 2^30, kernel_registry.h: call_window). Past that the
// builders use MaskPolicy<MaskWindow, int64_t>: (m + 1) * block_m, the tile's last row plus the
// diagonal offset and the like pass INT32_MAX near 2^31 rows or keys. The int32 path keeps the
// common case's divisions 32-bit (the forward's builder walks a sequence's tiles in one thread).
RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE bool mask_fits_int32(int32_t seqlen_q, int32_t seqlen_k) {
  return seqlen_q < (int32_t{1} << 30) && seqlen_k < (int32_t{1} << 30);
}

// The forward's cost of query tile m (rows [m * block_m, (m + 1) * block_m)) of a sequence: the
// key blocks it reads, [n_block_min, n_block_max) of the mask (Int: see mask_fits_int32). At most
// seqlen_k / block_n + 1 < 2^31.
template <class Int>
RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE int32_t query_tile_cost(const MaskPolicy<MaskWindow, Int>& mask, int32_t m,
                                                                  int32_t block_m, int32_t block_n) {
  const Int blocks = mask.n_block_max(m, block_m, block_n) - mask.n_block_min(m, block_m, block_n);
  return blocks > 0 ? static_cast<int32_t>(blocks) : 0;
}

// The dK/dV list's cost of the key block at key0 (block_n keys) in one group: the query tiles
// (block_m rows) holding a row that sees a key of [key0, min(key0 + block_n, seqlen_k)), as the
// kernels' cursor walks them; 0 when key0 >= seqlen_k. 64-bit: key0 + block_n and the tiles'
// rounding pass INT32_MAX near 2^31 keys or rows.
RINGATTN_HOST_DEVICE RINGATTN_FORCEINLINE int64_t key_block_tiles(const MaskPolicy<MaskWindow, int64_t>& mask,
                                                                  int64_t key0, int32_t block_n, int32_t block_m) {
  if (key0 >= mask.seqlen_k || mask.seqlen_q == 0) return 0;
  const int64_t first_row = mask.row_begin(key0);
  const int64_t last_key = (key0 + block_n < mask.seqlen_k ? key0 + block_n : mask.seqlen_k) - 1;
  const int64_t rows_end = mask.row_end(last_key);
  if (first_row >= rows_end) return 0;
  return (rows_end + block_m - 1) / block_m - first_row / block_m;
}

}  // namespace work_list
}  // namespace cuda
}  // namespace ringattn
