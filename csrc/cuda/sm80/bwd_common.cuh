// Small device helpers shared by the two tier-1 backward kernels: tile loads into swizzled
// shared memory and the PTX the forward does not need (4-byte cp.async, fp32 atomics).
// The swizzle itself (swizzle<W>, SwizzledRows<W>) is the forward's, from fwd_traits.h: a tile
// of power-of-two rows of W >= 64 elements, 16-byte chunk c of row r at chunk c ^ (r & 7).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/ptx.h"
#include "cuda/sm80/fwd_traits.h"

namespace ringattn {
namespace cuda {
namespace sm80 {
namespace bwd {

// 4-byte global -> shared copy; zero-fills the destination when `valid` is false.
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}

// dst[0..3] += (a, b, c, d) in global memory, result unused; dst 16-byte aligned. One vector
// reduction on sm_90 (fewer L2 atomic operations), four scalar ones before.
__device__ __forceinline__ void red_add_v4(float* dst, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
  atomicAdd(dst + 2, c);
  atomicAdd(dst + 3, d);
#endif
}

// Adds one warp's fp32 mma C fragments of a [16 rows, kTiles * 8 columns] tile to global memory
// (a dQ accumulator). acc[dt] holds rows lane/4 and lane/4 + 8, columns dt*8 + (lane%4)*2 + {0,1};
// row_a points at this thread's first element (row lane/4, column (lane%4)*2), row8_stride elements
// separate row r from row r + 8. Lanes t and t^1 swap one pair so each holds 4 consecutive floats:
// even t columns 2t..2t+3 of tile dt, odd t columns 2t-2..2t+1 of tile dt+1; one 16-byte
// reduction per row and tile pair. Rows with row_ok[r] false are skipped (all lanes still shuffle).
template <int kTiles>
__device__ __forceinline__ void red_add_fragments(const float (&acc)[kTiles][4], float* row_a, int64_t row8_stride,
                                                  bool row_a_ok, bool row_b_ok, int lane) {
  static_assert(kTiles % 2 == 0, "tiles go in pairs");
  const bool odd = lane & 1;
#pragma unroll
  for (int dt = 0; dt < kTiles; dt += 2) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float x0 = acc[dt][2 * r], x1 = acc[dt][2 * r + 1];
      const float y0 = acc[dt + 1][2 * r], y1 = acc[dt + 1][2 * r + 1];
      const float got0 = __shfl_xor_sync(0xffffffffu, odd ? x0 : y0, 1);
      const float got1 = __shfl_xor_sync(0xffffffffu, odd ? x1 : y1, 1);
      if (r == 0 ? row_a_ok : row_b_ok) {
        float* dst = row_a + r * row8_stride + (odd ? (dt + 1) * 8 - 2 : dt * 8);
        if (odd)
          red_add_v4(dst, got0, got1, y0, y1);
        else
          red_add_v4(dst, x0, x1, got0, got1);
      }
    }
  }
}

// The 16-byte chunks of a [kRows, kHeadDim] tile that thread `tid` of kThreads handles, each as
// chunk_at(i) with i = row * (kHeadDim / 8) + chunk: consecutive threads take consecutive chunks.
// (The callers split i into row and chunk themselves: with the row computed where it is tested,
// the test compiles to the same code as in a plain loop.)
template <int kHeadDim, int kRows, int kThreads, typename ChunkAt>
__device__ __forceinline__ void for_each_chunk(int tid, const ChunkAt& chunk_at) {
  constexpr int kTotal = kRows * (kHeadDim / 8);
  static_assert(kTotal % kThreads == 0, "tile chunks divide evenly over threads");
#pragma unroll
  for (int it = 0; it < kTotal / kThreads; ++it) chunk_at(tid + it * kThreads);
}

// cp.async a [kRows, kHeadDim] tile of rows `row_stride` elements apart whose first
// `rows_valid` rows are real; the rest are zeros. All kThreads threads take part.
template <typename Element, int kHeadDim, int kRows, int kThreads>
__device__ __forceinline__ void load_rows(Element* smem, const Element* gmem, int64_t row_stride, int rows_valid,
                                          int tid) {
  for_each_chunk<kHeadDim, kRows, kThreads>(tid, [&](int i) {
    const int row = i / (kHeadDim / 8);
    const int chunk = i % (kHeadDim / 8);
    const bool valid = row < rows_valid;
    const Element* src = valid ? gmem + row * row_stride + chunk * 8 : gmem;
    ptx::cp_async_16(ptx::smem_addr(smem + swizzle<kHeadDim>(row, chunk)), src, valid);
  });
}

// cp.async kCount consecutive floats, zero past `valid`.
template <int kCount, int kThreads>
__device__ __forceinline__ void load_floats(float* smem, const float* gmem, int valid, int tid) {
  for (int i = tid; i < kCount; i += kThreads)
    cp_async_4(ptx::smem_addr(smem + i), i < valid ? gmem + i : gmem, i < valid);
}

// Writes a [kRows, kHeadDim] swizzled tile to global rows (first rows_valid), 16 bytes a thread.
template <typename Element, int kHeadDim, int kRows, int kThreads>
__device__ __forceinline__ void store_rows(Element* gmem, int64_t row_stride, const Element* smem, int rows_valid,
                                           int tid) {
  for_each_chunk<kHeadDim, kRows, kThreads>(tid, [&](int i) {
    const int row = i / (kHeadDim / 8);
    const int chunk = i % (kHeadDim / 8);
    if (row < rows_valid)
      *reinterpret_cast<uint4*>(gmem + row * row_stride + chunk * 8) =
          *reinterpret_cast<const uint4*>(smem + swizzle<kHeadDim>(row, chunk));
  });
}

}  // namespace bwd
}  // namespace sm80
}  // namespace cuda
}  // namespace ringattn
