// Pre- and postprocess of the GPU backward. Each (token, head) row of a group is handled by
// kLanesPerRow consecutive threads, each owning every kLanesPerRow-th 16-byte chunk of the row.
#include "cuda/bwd_prepost.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "cuda/warp_reduce.cuh"

namespace ringattn {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kLanesPerRow = 8;
constexpr int kRowsPerBlock = kThreads / kLanesPerRow;
constexpr int kMaxBlocksX = 1 << 16;  // grid-stride beyond this

__device__ __forceinline__ float2 to_float2(uint32_t x, __half*) {
  return __half22float2(*reinterpret_cast<const __half2*>(&x));
}
__device__ __forceinline__ float2 to_float2(uint32_t x, __nv_bfloat16*) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x));
}
__device__ __forceinline__ uint32_t from_float2(float a, float b, __half*) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t from_float2(float a, float b, __nv_bfloat16*) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

// Grid-stride walk of a thread's rows among `rows` (token, head) rows, kLanesPerRow threads to
// a row: f(r, token, head) with r = token * heads + head. The lanes of a row take the same trip
// count, so shuffles among them stay legal.
struct RowWalk {
  int64_t row_in_block = threadIdx.x / kLanesPerRow;
  int64_t row_step = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;

  template <typename F>
  __device__ __forceinline__ void operator()(int64_t rows, int heads, F&& f) const {
    for (int64_t r = blockIdx.x * kRowsPerBlock + row_in_block; r < rows; r += row_step) f(r, r / heads, r % heads);
  }
};

// Dot product of two 8-element chunks in fp32.
template <typename Element>
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
  const uint32_t* pa = reinterpret_cast<const uint32_t*>(&a);
  const uint32_t* pb = reinterpret_cast<const uint32_t*>(&b);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = to_float2(pa[i], static_cast<Element*>(nullptr));
    const float2 y = to_float2(pb[i], static_cast<Element*>(nullptr));
    s = fmaf(x.x, y.x, s);
    s = fmaf(x.y, y.y, s);
  }
  return s;
}

template <typename Element>
__global__ void __launch_bounds__(kThreads) bwd_preprocess_kernel(const __grid_constant__ BwdPrepParams params) {
  const int lane = threadIdx.x % kLanesPerRow;
  const RowWalk for_each_row;
  const int chunks = params.head_dim / 8;

  if (static_cast<int>(blockIdx.y) == params.num_groups) {
    // Key rows after the last sequence: dK = dV = 0.
    const int32_t end = params.cu_seqlens_k[params.batch_size];
    const int64_t keys_end = end < 0 ? 0 : (end > params.total_k ? params.total_k : end);
    const int64_t rows = (static_cast<int64_t>(params.total_k) - keys_end) * params.num_heads_k;
    for_each_row(rows, params.num_heads_k, [&](int64_t, int64_t tail_token, int64_t h) {
      const int64_t token = keys_end + tail_token;
      Element* dk = static_cast<Element*>(params.dk) + token * params.dk_row_stride + h * params.dk_head_stride;
      Element* dv = static_cast<Element*>(params.dv) + token * params.dv_row_stride + h * params.dv_head_stride;
      for (int c = lane; c < chunks; c += kLanesPerRow) {
        *reinterpret_cast<uint4*>(dk + c * 8) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(dv + c * 8) = make_uint4(0, 0, 0, 0);
      }
    });
    return;
  }

  const BwdPrepGroupArgs& g = params.groups[blockIdx.y];
  const int hq = params.num_heads_q;
  const int64_t rows = static_cast<int64_t>(g.total_q) * hq;
  for_each_row(rows, hq, [&](int64_t r, int64_t token, int64_t h) {
    const Element* o = static_cast<const Element*>(g.out) + token * g.out_row_stride + h * g.out_head_stride;
    const Element* d = static_cast<const Element*>(g.dout) + token * g.dout_row_stride + h * g.dout_head_stride;
    float* acc = g.ws.dq_accum + r * params.head_dim;
    float sum = 0.f;
    for (int c = lane; c < chunks; c += kLanesPerRow) {
      sum += dot8<Element>(*reinterpret_cast<const uint4*>(o + c * 8), *reinterpret_cast<const uint4*>(d + c * 8));
      *reinterpret_cast<float4*>(acc + c * 8) = make_float4(0.f, 0.f, 0.f, 0.f);
      *reinterpret_cast<float4*>(acc + c * 8 + 4) = make_float4(0.f, 0.f, 0.f, 0.f);
    }
    sum = lane_group_sum<kLanesPerRow>(sum);
    if (lane == 0) {
      const float lse = g.lse[h * g.total_q + token];                // the forward's [Hq, total_q]
      const int64_t idx = g.stat_row(static_cast<int>(h)) + token;  // rows padded (bwd_params.h)
      // A row that saw no key has LSE = -inf; +inf makes every P = exp2(s - lse) of it 0.
      g.ws.lse_log2[idx] = lse == -INFINITY ? INFINITY : lse * 1.4426950408889634f;
      g.ws.di[idx] = sum;
    }
  });
}

template <typename Element>
__global__ void __launch_bounds__(kThreads) bwd_postprocess_kernel(const __grid_constant__ BwdPrepParams params) {
  const int lane = threadIdx.x % kLanesPerRow;
  const RowWalk for_each_row;
  const int chunks = params.head_dim / 8;
  const BwdPrepGroupArgs& g = params.groups[blockIdx.y];
  const int hq = params.num_heads_q;
  const float scale = params.softmax_scale;
  const int64_t rows = static_cast<int64_t>(g.total_q) * hq;
  for_each_row(rows, hq, [&](int64_t r, int64_t token, int64_t h) {
    Element* dq = static_cast<Element*>(g.dq) + token * g.dq_row_stride + h * g.dq_head_stride;
    const float* acc = g.ws.dq_accum + r * params.head_dim;
    for (int c = lane; c < chunks; c += kLanesPerRow) {
      const float4 x = *reinterpret_cast<const float4*>(acc + c * 8);
      const float4 y = *reinterpret_cast<const float4*>(acc + c * 8 + 4);
      uint4 packed;
      packed.x = from_float2(x.x * scale, x.y * scale, static_cast<Element*>(nullptr));
      packed.y = from_float2(x.z * scale, x.w * scale, static_cast<Element*>(nullptr));
      packed.z = from_float2(y.x * scale, y.y * scale, static_cast<Element*>(nullptr));
      packed.w = from_float2(y.z * scale, y.w * scale, static_cast<Element*>(nullptr));
      *reinterpret_cast<uint4*>(dq + c * 8) = packed;
    }
  });
}

int64_t max_rows(const BwdPrepParams& p) {
  int64_t m = 0;
  for (int g = 0; g < p.num_groups; ++g) {
    const int64_t r = static_cast<int64_t>(p.groups[g].total_q) * p.num_heads_q;
    m = r > m ? r : m;
  }
  return m;
}

unsigned blocks_for(int64_t rows) {
  const int64_t b = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  return static_cast<unsigned>(b < 1 ? 1 : (b > kMaxBlocksX ? kMaxBlocksX : b));
}

}  // namespace

template <typename Element>
cudaError_t launch_bwd_preprocess(const BwdPrepParams& params, cudaStream_t stream) {
  // One more grid row (blockIdx.y == num_groups) for the key rows after the last sequence
  // (at most total_k of them; usually none).
  int64_t rows = max_rows(params);
  const int64_t tail = static_cast<int64_t>(params.total_k) * params.num_heads_k;
  rows = tail > rows ? tail : rows;
  const dim3 grid(blocks_for(rows), params.num_groups + 1);
  bwd_preprocess_kernel<Element><<<grid, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

template <typename Element>
cudaError_t launch_bwd_postprocess(const BwdPrepParams& params, cudaStream_t stream) {
  const dim3 grid(blocks_for(max_rows(params)), params.num_groups);
  bwd_postprocess_kernel<Element><<<grid, kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

template cudaError_t launch_bwd_preprocess<__half>(const BwdPrepParams&, cudaStream_t);
template cudaError_t launch_bwd_preprocess<__nv_bfloat16>(const BwdPrepParams&, cudaStream_t);
template cudaError_t launch_bwd_postprocess<__half>(const BwdPrepParams&, cudaStream_t);
template cudaError_t launch_bwd_postprocess<__nv_bfloat16>(const BwdPrepParams&, cudaStream_t);

}  // namespace cuda
}  // namespace ringattn
