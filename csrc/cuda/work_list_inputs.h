// What both work-list builders (tile_scheduler.h: query tiles; bwd_scheduler.h: K/V blocks) share:
// the inputs they read of a call (its groups' sequence metadata as device pointers, the kernels'
// mask and block sizes, the item capacity, the metadata error word), the buffers they fill in the
// call's workspace, and the host-side sizing and carving of those buffers.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/mask.h"
#include "ringattn/ringattn.h"

namespace ringattn {
namespace cuda {

struct WorkListInputs {
  const int32_t* cu_seqlens_q[RINGATTN_MAX_GROUPS];
  const int32_t* seqused_k[RINGATTN_MAX_GROUPS];
  // Per group, the diagonal shift of each sequence ([B]) or nullptr (0); nullptr when the window
  // bounds no side.
  const int32_t* diagonal_shift[RINGATTN_MAX_GROUPS];
  int32_t total_q[RINGATTN_MAX_GROUPS];
  const int32_t* cu_seqlens_k;
  int32_t total_k;
  int32_t num_groups;
  int32_t batch_size;
  int32_t block_m;  // query rows per tile (forward, dQ) or per inner step of the dK/dV kernel
  int32_t block_n;  // keys per block
  MaskWindow window;  // the kernels' mask (common/mask.h): (-1, -1) none, (-1, 0) causal
  int32_t capacity;  // upper bound on the number of items (host-computed, <= INT32_MAX)
  uint32_t* metadata_errors;  // ringattn_exec.metadata_errors (NULL: no report)
};

// A work-list builder's arguments: the inputs, and the buffers of a work list of `Item`s in the
// call's workspace: per-sequence (or per (group, sequence)) exclusive prefix sums of the item
// counts, each item's cost, the items before and after the sort, and the number of items.
// (Derived from WorkListInputs alone: a second base class changes the builders' machine code.)
template <typename Item>
struct WorkListArgs : WorkListInputs {
  int32_t* offsets;  // [num_offsets], saturated at capacity (sums of 64 bits: work_list_math.h)
  int32_t* costs;    // [capacity]
  Item* unsorted;    // [capacity]
  Item* sorted;      // [capacity] (output)
  int32_t* count;    // [1] (output)
};

// Bytes of those buffers, each starting at a multiple of `align` bytes (a power of two).
template <typename Item>
size_t work_list_bytes(size_t num_offsets, size_t capacity, size_t align) {
  const auto up = [align](size_t x) { return (x + align - 1) & ~(align - 1); };
  return up(num_offsets * sizeof(int32_t)) + up(capacity * sizeof(int32_t)) + 2 * up(capacity * sizeof(Item)) +
         up(sizeof(int32_t));
}

// Points the buffers of `b` into `workspace` (work_list_bytes of it), in the order of WorkListArgs.
template <typename Item>
void carve_work_list(void* workspace, size_t num_offsets, size_t capacity, size_t align, WorkListArgs<Item>* b) {
  const auto up = [align](size_t x) { return (x + align - 1) & ~(align - 1); };
  char* p = static_cast<char*>(workspace);
  b->offsets = reinterpret_cast<int32_t*>(p);
  p += up(num_offsets * sizeof(int32_t));
  b->costs = reinterpret_cast<int32_t*>(p);
  p += up(capacity * sizeof(int32_t));
  b->unsorted = reinterpret_cast<Item*>(p);
  p += up(capacity * sizeof(Item));
  b->sorted = reinterpret_cast<Item*>(p);
  p += up(capacity * sizeof(Item));
  b->count = reinterpret_cast<int32_t*>(p);
}

}  // namespace cuda
}  // namespace ringattn
