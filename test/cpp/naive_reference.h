// Grouped varlen attention straight from its definition, in double precision: for every query
// row the full row of scores, a full-row softmax, then the products. Masks (causal, a window,
// a diagonal shift), softcap and sinks as ringattn.h defines them. O(Lq * Lk * D) per head,
// no tiling, no online softmax, nothing shared with the library. Tests compare both backends
// against it.
//
// Tensors here are dense [rows, heads, dim] row-major vectors of double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace ratest {
namespace naive {

struct Problem {
  int batch = 1;
  int heads_q = 1;
  int heads_k = 1;
  int dim = 8;
  double scale = 0.0;  // <= 0: 1/sqrt(dim)
  bool causal = false;
  // Local attention when has_window: row i of a sequence sees key j iff
  // d - window_left <= j <= d + window_right with d = i + Lk - Lq + diagonal_shift[b]; -1 =
  // unbounded. causal bounds the right side at d.
  bool has_window = false;
  int window_left = -1;
  int window_right = -1;
  double softcap = 0.0;        // > 0: scores become softcap * tanh(score / softcap)
  std::vector<double> sinks;   // [heads_q] sink logits, or empty
  int64_t total_k = 0;
  std::vector<int32_t> cu_seqlens_k;  // [B+1]
  std::vector<double> k, v;           // [total_k, heads_k, dim]
};

struct Group {
  int64_t total_q = 0;
  std::vector<int32_t> cu_seqlens_q;  // [B+1]
  std::vector<int32_t> seqused_k;     // [B], or empty for "all keys"
  std::vector<int32_t> diagonal_shift;  // [B], or empty for no shift
  std::vector<double> q;              // [total_q, heads_q, dim]
  std::vector<double> dout;           // [total_q, heads_q, dim] (backward only)
};

struct Forward {
  std::vector<double> out;  // [total_q, heads_q, dim]
  std::vector<double> lse;  // [heads_q, total_q]
};

struct Gradients {
  std::vector<std::vector<double>> dq;  // per group, [total_q, heads_q, dim]
  std::vector<double> dk, dv;           // [total_k, heads_k, dim]
};

inline double effective_scale(const Problem& p) {
  return p.scale > 0.0 ? p.scale : 1.0 / std::sqrt(static_cast<double>(p.dim));
}

// The probabilities of one query row over the keys it sees, from the definition.
// Returns the key indices (within the sequence) and P; empty when the row sees no key.
struct Row {
  std::vector<int64_t> keys;
  std::vector<double> prob;
  std::vector<double> tanh_derivative;  // d score / d (scale * q.k): 1 - tanh^2 with a softcap, else 1
  double lse = -std::numeric_limits<double>::infinity();
};

inline Row attention_row(const Problem& p, const Group& g, int b, int h, int64_t i) {
  Row row;
  const int64_t q_row = g.cu_seqlens_q[b] + i;
  const int64_t lq = g.cu_seqlens_q[b + 1] - g.cu_seqlens_q[b];
  const int64_t k0 = p.cu_seqlens_k[b];
  const int64_t lk = g.seqused_k.empty() ? p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b] : g.seqused_k[b];
  const int hk = h / (p.heads_q / p.heads_k);
  const double scale = effective_scale(p);
  // Bottom-right aligned: row i's diagonal key, moved by the group's shift.
  const int64_t diag = i + lk - lq + (g.diagonal_shift.empty() ? 0 : g.diagonal_shift[b]);
  const int64_t left = p.has_window ? p.window_left : -1;
  const int64_t right = p.causal ? 0 : (p.has_window ? p.window_right : -1);
  std::vector<double> scores;
  for (int64_t j = 0; j < lk; ++j) {
    if (right >= 0 && j > diag + right) continue;
    if (left >= 0 && j < diag - left) continue;
    double s = 0.0;
    for (int d = 0; d < p.dim; ++d)
      s += g.q[(q_row * p.heads_q + h) * p.dim + d] * p.k[((k0 + j) * p.heads_k + hk) * p.dim + d];
    s *= scale;
    if (p.softcap > 0.0) s = p.softcap * std::tanh(s / p.softcap);
    row.keys.push_back(j);
    scores.push_back(s);
  }
  const bool sink = !p.sinks.empty();
  if (scores.empty()) {
    if (sink) row.lse = p.sinks[h];
    return row;
  }
  double mx = *std::max_element(scores.begin(), scores.end());
  if (sink) mx = std::max(mx, p.sinks[h]);
  double sum = sink ? std::exp(p.sinks[h] - mx) : 0.0;  // the sink's share of the denominator
  for (double s : scores) sum += std::exp(s - mx);
  row.lse = mx + std::log(sum);
  for (double s : scores) row.prob.push_back(std::exp(s - mx) / sum);
  row.tanh_derivative.assign(scores.size(), 1.0);
  if (p.softcap > 0.0)
    for (size_t n = 0; n < scores.size(); ++n) {
      const double t = scores[n] / p.softcap;
      row.tanh_derivative[n] = 1.0 - t * t;
    }
  return row;
}

// Calls fn(h, hk, q_row, k0, row) for every query row of group g and every query head h (hk: its
// KV head; q_row: the row in the group's packed queries; k0: the first key row of its sequence;
// row: its attention_row).
template <typename Fn>
void for_each_query_row(const Problem& p, const Group& g, Fn&& fn) {
  for (int b = 0; b < p.batch; ++b) {
    const int64_t lq = g.cu_seqlens_q[b + 1] - g.cu_seqlens_q[b];
    const int64_t k0 = p.cu_seqlens_k[b];
    for (int h = 0; h < p.heads_q; ++h) {
      const int hk = h / (p.heads_q / p.heads_k);
      for (int64_t i = 0; i < lq; ++i) fn(h, hk, g.cu_seqlens_q[b] + i, k0, attention_row(p, g, b, h, i));
    }
  }
}

inline Forward forward(const Problem& p, const Group& g) {
  Forward f;
  f.out.assign(static_cast<size_t>(g.total_q) * p.heads_q * p.dim, 0.0);
  f.lse.assign(static_cast<size_t>(g.total_q) * p.heads_q, -std::numeric_limits<double>::infinity());
  for_each_query_row(p, g, [&](int h, int hk, int64_t q_row, int64_t k0, const Row& row) {
    f.lse[h * g.total_q + q_row] = row.lse;
    for (size_t n = 0; n < row.keys.size(); ++n)
      for (int d = 0; d < p.dim; ++d)
        f.out[(q_row * p.heads_q + h) * p.dim + d] +=
            row.prob[n] * p.v[((k0 + row.keys[n]) * p.heads_k + hk) * p.dim + d];
  });
  return f;
}

// Gradients of sum(O_g * dO_g) over all groups, from the definition of the softmax Jacobian:
// dS_j = P_j (dP_j - sum_l P_l dP_l), with dP_j = dO . v_j (a sink has no value: it only lowers
// every P_j), times the softcap's 1 - tanh^2.
inline Gradients backward(const Problem& p, const std::vector<Group>& groups) {
  Gradients grads;
  const double scale = effective_scale(p);
  grads.dk.assign(static_cast<size_t>(p.total_k) * p.heads_k * p.dim, 0.0);
  grads.dv.assign(grads.dk.size(), 0.0);
  for (const Group& g : groups) {
    std::vector<double> dq(static_cast<size_t>(g.total_q) * p.heads_q * p.dim, 0.0);
    for_each_query_row(p, g, [&](int h, int hk, int64_t q_row, int64_t k0, const Row& row) {
      const double* q = &g.q[(q_row * p.heads_q + h) * p.dim];
      const double* dout = &g.dout[(q_row * p.heads_q + h) * p.dim];
      std::vector<double> dprob(row.keys.size(), 0.0);
      double weighted = 0.0;
      for (size_t n = 0; n < row.keys.size(); ++n) {
        const double* v = &p.v[((k0 + row.keys[n]) * p.heads_k + hk) * p.dim];
        for (int d = 0; d < p.dim; ++d) dprob[n] += dout[d] * v[d];
        weighted += row.prob[n] * dprob[n];
      }
      for (size_t n = 0; n < row.keys.size(); ++n) {
        const int64_t kv_row = k0 + row.keys[n];
        const double dscore = row.prob[n] * (dprob[n] - weighted) * row.tanh_derivative[n];
        const double* k = &p.k[(kv_row * p.heads_k + hk) * p.dim];
        double* dk = &grads.dk[(kv_row * p.heads_k + hk) * p.dim];
        double* dv = &grads.dv[(kv_row * p.heads_k + hk) * p.dim];
        double* dqr = &dq[(q_row * p.heads_q + h) * p.dim];
        for (int d = 0; d < p.dim; ++d) {
          dqr[d] += scale * dscore * k[d];
          dk[d] += scale * dscore * q[d];
          dv[d] += row.prob[n] * dout[d];
        }
      }
    });
    grads.dq.push_back(std::move(dq));
  }
  return grads;
}

}  // namespace naive
}  // namespace ratest
