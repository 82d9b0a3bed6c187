// Online softmax over the rows a thread holds in mma.sync C fragments: each thread holds, per
// m16 tile, two rows (lane/4 and lane/4 + 8), spread over the 4 threads of a quad. Exponentials
// in the exp2 domain with the scale folded in; row sums stay per-thread partial until the end.
#pragma once

#include <cmath>

#include "cuda/ptx.h"
#include "cuda/warp_reduce.cuh"

namespace ringattn {
namespace cuda {
namespace sm80 {

template <int kMTiles>
struct OnlineSoftmax {
  float row_max[kMTiles][2];  // raw (unscaled) scores; -inf until the row sees a key
  float row_sum[kMTiles][2];  // this thread's part of sum(exp(scale * (s - row_max)))

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        row_max[mt][r] = -INFINITY;
        row_sum[mt][r] = 0.f;
      }
  }

  // Counts a sink logit (in the scores' own units: the natural-units sink divided by the softmax
  // scale) as one more key of every row, with value 0: the rows start with it as their running max
  // and one lane of each quad with its weight 1. update() and finalize_with_sink() then give the
  // sink's LSE and output (features.cuh); a row that sees no key ends with O = 0 and LSE = the
  // sink. A sink of -inf changes nothing.
  __device__ __forceinline__ void start_with_sink(float sink_in_score_units, int lane) {
    if (sink_in_score_units == -INFINITY) return;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        row_max[mt][r] = sink_in_score_units;
        row_sum[mt][r] = (lane & 3) == 0 ? 1.f : 0.f;
      }
  }

  // Turns the scores s into probabilities P (unnormalised, relative to the new running max)
  // in place and rescales the output accumulator o by exp(old max - new max). kExactRescale
  // (the run-time window kernels, which may start rows from a sink) rounds old max * scale before
  // subtracting, so a max that did not move rescales by exactly 1: otherwise the contracted
  // fma(old max, scale, -new max * scale) leaves a rounding residual, and a row that saw no key
  // drifts from LSE = sink by an ulp per key block.
  template <int kNTiles, int kDTiles, bool kExactRescale = false>
  __device__ __forceinline__ void update(float (&s)[kMTiles][kNTiles][4], float (&o)[kMTiles][kDTiles][4],
                                         float scale_log2) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float m = row_max[mt][r];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) m = fmaxf(m, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        m = quad_max(m);
        // A row that has seen no key yet keeps max -inf: subtract 0 so exp2 gives 0, not NaN.
        const float base = (m == -INFINITY) ? 0.f : m * scale_log2;
        const float correction = ptx::exp2_approx(
            kExactRescale ? __fsub_rn(__fmul_rn(row_max[mt][r], scale_log2), base) : row_max[mt][r] * scale_log2 - base);
        row_max[mt][r] = m;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float p = ptx::exp2_approx(fmaf(s[mt][nt][2 * r + c], scale_log2, -base));
            s[mt][nt][2 * r + c] = p;
            sum += p;
          }
        row_sum[mt][r] = row_sum[mt][r] * correction + sum;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          o[mt][dt][2 * r] *= correction;
          o[mt][dt][2 * r + 1] *= correction;
        }
      }
  }

  // Normalises o and returns the natural-log LSE of each row (-inf, with o = 0, for a row that
  // saw no key).
  template <int kDTiles>
  __device__ __forceinline__ void finalize(float (&o)[kMTiles][kDTiles][4], float softmax_scale,
                                           float (&lse)[kMTiles][2]) {
    normalize</*kWithSink=*/false>(o, softmax_scale, 0.f, 0.f, lse);
  }

  // finalize() for rows that started with a sink (start_with_sink; `sink` in natural units and
  // `sink_in_score_units` the value given there, -inf for none): a row whose running max is still
  // the sink's takes its LSE from the sink's own value, so a row that saw no key gets exactly
  // LSE = sink (and O = 0).
  template <int kDTiles>
  __device__ __forceinline__ void finalize_with_sink(float (&o)[kMTiles][kDTiles][4], float softmax_scale,
                                                     float sink, float sink_in_score_units,
                                                     float (&lse)[kMTiles][2]) {
    normalize</*kWithSink=*/true>(o, softmax_scale, sink, sink_in_score_units, lse);
  }

 private:
  // The body of both finalizes: o /= the row's sum and LSE = (running max in natural units) +
  // log(sum). The sink's row max is picked before the empty-row test and the plain one inside
  // it, as each finalize was first written (the machine code of both depends on that order).
  template <bool kWithSink, int kDTiles>
  __device__ __forceinline__ void normalize(float (&o)[kMTiles][kDTiles][4], float softmax_scale, float sink,
                                            float sink_in_score_units, float (&lse)[kMTiles][2]) {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const float sum = quad_sum(row_sum[mt][r]);
        const bool empty = sum == 0.f;  // no key weighs anything; a NaN sum stays NaN (O and LSE)
        const float inv = empty ? 0.f : 1.f / sum;
        if constexpr (kWithSink) {
          const float max_natural = row_max[mt][r] == sink_in_score_units ? sink : row_max[mt][r] * softmax_scale;
          lse[mt][r] = empty ? -INFINITY : max_natural + logf(sum);
        } else {
          lse[mt][r] = empty ? -INFINITY : row_max[mt][r] * softmax_scale + logf(sum);
        }
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          o[mt][dt][2 * r] *= inv;
          o[mt][dt][2 * r + 1] *= inv;
        }
      }
  }
};

}  // namespace sm80
}  // namespace cuda
}  // namespace ringattn
