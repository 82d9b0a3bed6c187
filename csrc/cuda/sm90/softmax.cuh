// Online softmax over the rows a thread holds in a wgmma accumulator (per warp 16 rows; each
// thread holds rows lane/4 and lane/4 + 8, spread over the 4 threads of a quad). Unlike the
// tier-1 version it does not touch the output accumulator: with the P*V product of the previous
// block still in flight, the caller applies the returned correction once that product lands.
#pragma once

#include <cmath>

#include "cuda/ptx.h"
#include "cuda/warp_reduce.cuh"

namespace ringattn {
namespace cuda {
namespace sm90 {

struct RowSoftmax {
  float row_max[2];  // raw scores; -inf until the row sees a key
  float row_sum[2];  // this thread's part of the row sum

  __device__ __forceinline__ RowSoftmax() {
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.f;
  }

  // s -> P in place (relative to the new running max); returns the factor the output
  // accumulator must be multiplied by, per row.
  template <int kNTiles>
  __device__ __forceinline__ void update(float (&s)[kNTiles][4], float scale_log2, float (&correction)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float m = row_max[r];
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) m = fmaxf(m, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      m = quad_max(m);
      const float base = (m == -INFINITY) ? 0.f : m * scale_log2;
      correction[r] = ptx::exp2_approx(row_max[r] * scale_log2 - base);
      row_max[r] = m;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float p = ptx::exp2_approx(fmaf(s[nt][2 * r + c], scale_log2, -base));
          s[nt][2 * r + c] = p;
          sum += p;
        }
      row_sum[r] = row_sum[r] * correction[r] + sum;
    }
  }

  // Normalises o and returns each row's natural-log LSE (-inf with o = 0 for a row with no key).
  template <int kDTiles>
  __device__ __forceinline__ void finalize(float (&o)[kDTiles][4], float softmax_scale, float (&lse)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(row_sum[r]);
      const bool empty = sum == 0.f;  // no key weighs anything; a NaN sum stays NaN (O and LSE)
      const float inv = empty ? 0.f : 1.f / sum;
      lse[r] = empty ? -INFINITY : row_max[r] * softmax_scale + logf(sum);
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o[dt][2 * r] *= inv;
        o[dt][2 * r + 1] *= inv;
      }
    }
  }

  // finalize with a sink logit (natural units; -inf for none) in every row's denominator:
  // LSE = ln(exp(sink) + sum_j exp(score_j)), O = sum_j exp(score_j - LSE) v_j. A row with no key
  // gets O = 0 and LSE = sink exactly. The sum over the keys is taken relative to the row max, as
  // in finalize; the sink joins it through a logaddexp, so a sink far above the scores cannot
  // overflow.
  template <int kDTiles>
  __device__ __forceinline__ void finalize_with_sink(float (&o)[kDTiles][4], float softmax_scale, float sink,
                                                     float (&lse)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(row_sum[r]);
      float inv = 0.f;
      if (sum == 0.f) {  // no key weighs anything
        lse[r] = sink;
      } else {  // a NaN sum gives NaN (O and LSE), as in finalize
        const float keys_lse = row_max[r] * softmax_scale + logf(sum);
        const float hi = keys_lse >= sink ? keys_lse : sink;
        lse[r] = hi + logf(expf(keys_lse - hi) + expf(sink - hi));
        inv = expf(keys_lse - lse[r]) / sum;
      }
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o[dt][2 * r] *= inv;
        o[dt][2 * r + 1] *= inv;
      }
    }
  }
};

}  // namespace sm90
}  // namespace cuda
}  // namespace ringattn
