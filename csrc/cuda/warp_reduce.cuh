// Reductions across the lanes of a warp with __shfl_xor_sync (butterfly: after the call every
// lane of an aligned group of kLanes lanes holds the group's result). Used by both kernel tiers'
// online softmax (the 4 lanes of a quad share the rows of an mma/wgmma accumulator) and by the
// backward preprocess (the lanes that share one row of O and dO).
#pragma once

namespace ringattn {
namespace cuda {

// The order in which partners are combined. It fixes the rounding of a floating-point sum, so a
// caller keeps the order it was validated with.
enum class XorOrder {
  kNearestFirst,   // partner at distance 1, then 2, 4, ...
  kFarthestFirst,  // partner at distance kLanes / 2, then kLanes / 4, ..., 1
};

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// Combines x over each aligned group of kLanes lanes: x = combine(x, x of the partner lane) once
// per power of two below kLanes. `mask` names the lanes that take part (all lanes of each
// participating group must call it).
template <int kLanes, XorOrder kOrder, typename Combine>
__device__ __forceinline__ float butterfly_reduce(float x, unsigned mask, Combine combine) {
  static_assert(kLanes >= 1 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0,
                "butterfly_reduce: kLanes must be a power of two from 1 to 32");
#pragma unroll
  for (int step = 1; step < kLanes; step <<= 1) {
    const int offset = kOrder == XorOrder::kNearestFirst ? step : kLanes / (2 * step);
    x = combine(x, __shfl_xor_sync(mask, x, offset));
  }
  return x;
}

// The lanes of this thread's aligned group of kLanes lanes, as a shuffle mask.
template <int kLanes>
__device__ __forceinline__ unsigned lane_group_mask() {
  static_assert(kLanes >= 1 && kLanes <= 32 && (kLanes & (kLanes - 1)) == 0,
                "lane_group_mask: kLanes must be a power of two from 1 to 32");
  if (kLanes == 32) return 0xffffffffu;
  return ((1u << (kLanes % 32)) - 1u) << ((threadIdx.x & 31) & ~(kLanes - 1));
}

// Max / sum over the 4 lanes of a quad (the threads that hold one row of an m16n8 or wgmma
// accumulator fragment); the whole warp calls it.
__device__ __forceinline__ float quad_max(float x) {
  return butterfly_reduce<4, XorOrder::kNearestFirst>(x, 0xffffffffu, MaxOp{});
}
__device__ __forceinline__ float quad_sum(float x) {
  return butterfly_reduce<4, XorOrder::kNearestFirst>(x, 0xffffffffu, SumOp{});
}

// Sum over this thread's aligned group of kLanes lanes (kLanes < 32: only the group's lanes
// need to call it).
template <int kLanes>
__device__ __forceinline__ float lane_group_sum(float x) {
  return butterfly_reduce<kLanes, XorOrder::kFarthestFirst>(x, lane_group_mask<kLanes>(), SumOp{});
}

}  // namespace cuda
}  // namespace ringattn
