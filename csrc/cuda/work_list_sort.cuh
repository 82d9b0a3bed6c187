// Device-side pieces shared by the work-list kernels (tile_scheduler.cu for query tiles,
// bwd_scheduler.cu for K/V blocks). Each list is built by ONE block of kThreads threads. Sums over
// sequences are 64-bit and loop indices that step by kThreads towards a bound near INT32_MAX are
// 64-bit (work_list_math.h says why).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/work_list_math.h"

namespace ringattn {
namespace cuda {
namespace work_list {

constexpr int kThreads = 1024;
constexpr int kBuckets = 2048;  // costs are shifted right until the largest one fits
static_assert(kBuckets == 2 * kThreads, "two buckets per thread");

__device__ __forceinline__ int32_t clamp_i(int32_t x, int32_t lo, int32_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// In-place inclusive scan of kThreads values in shared memory (Hillis-Steele).
template <typename T>
__device__ __forceinline__ void block_inclusive_scan(T* v) {
  for (int offset = 1; offset < kThreads; offset <<= 1) {
    const T add = threadIdx.x >= offset ? v[threadIdx.x - offset] : 0;
    __syncthreads();
    v[threadIdx.x] += add;
    __syncthreads();
  }
}

// Exclusive prefix sums of count(i) (>= 0), i in [0, n), summed in 64 bits, into offsets[0..n]
// (offsets[n] = total) saturated at `cap` (saturated_offset); returns the 64-bit total. `scan` is
// kThreads int64s of shared scratch.
template <typename CountFn>
__device__ __forceinline__ int64_t block_exclusive_offsets(int64_t n, CountFn count, int32_t* offsets, int32_t cap,
                                                           int64_t* scan) {
  int64_t carry = 0;
  for (int64_t base = 0; base < n; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t c = i < n ? count(i) : 0;
    scan[threadIdx.x] = c;
    __syncthreads();
    block_inclusive_scan(scan);
    if (i < n) offsets[i] = saturated_offset(carry + scan[threadIdx.x] - c, cap);
    carry += scan[kThreads - 1];
    __syncthreads();
  }
  if (threadIdx.x == 0) offsets[n] = saturated_offset(carry, cap);
  return carry;
}

// Writes unsorted[0, n) into sorted[0, n) ordered by costs[i], largest first (a counting sort;
// the order inside one bucket is arbitrary, which only affects scheduling). Costs too large
// for the buckets are coarsened by the smallest power of two that fits the largest, so the
// order stays longest-first at any sequence length. Callers must have made unsorted/costs
// visible to the whole block (__syncthreads) before the call.
template <typename Item>
__device__ __forceinline__ void sort_by_cost_desc(const Item* unsorted, const int32_t* costs, int32_t n,
                                                  Item* sorted) {
  __shared__ int32_t scan[kThreads];
  __shared__ int32_t buckets[kBuckets];
  __shared__ int32_t max_cost;
  const int tid = threadIdx.x;
  if (tid == 0) max_cost = 0;
  for (int i = tid; i < kBuckets; i += kThreads) buckets[i] = 0;
  __syncthreads();
  for (int64_t i = tid; i < n; i += kThreads) atomicMax(&max_cost, costs[i]);
  __syncthreads();
  int shift = 0;
  while ((max_cost >> shift) >= kBuckets) ++shift;
  for (int64_t i = tid; i < n; i += kThreads) atomicAdd(&buckets[costs[i] >> shift], 1);
  __syncthreads();

  // Bucket start positions, most expensive bucket first: thread t owns the two buckets
  // counted 2t and 2t+1 from the top.
  const int top = kBuckets - 1 - 2 * tid;
  const int32_t c_hi = buckets[top];
  const int32_t c_lo = buckets[top - 1];
  scan[tid] = c_hi + c_lo;
  __syncthreads();
  block_inclusive_scan(scan);
  const int32_t start = scan[tid] - c_hi - c_lo;
  __syncthreads();
  buckets[top] = start;
  buckets[top - 1] = start + c_hi;
  __syncthreads();

  for (int64_t i = tid; i < n; i += kThreads) sorted[atomicAdd(&buckets[costs[i] >> shift], 1)] = unsorted[i];
}

}  // namespace work_list
}  // namespace cuda
}  // namespace ringattn
