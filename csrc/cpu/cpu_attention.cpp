// The exact CPU backend of grouped varlen attention.
//
// It runs the same algorithm as the GPU kernels, on host memory: queries in tiles of
// kTileQ rows stream the keys in tiles of kTileK with an online softmax (running max,
// running sum, rescale of the partial output), so its rounding behaves like a blocked
// kernel's rather than a textbook full-row softmax. The accumulator is fp32 for fp32, fp16
// and bf16 data (inputs widened on load, outputs rounded to nearest even on store) and
// double for fp64 data (used by gradcheck).
//
// Work is split into tasks that own disjoint outputs and compute them in a fixed order, so
// results are bit-identical for any thread count:
//   forward       one task per (group, sequence, query head, query tile)
//   backward dKdV one task per (sequence, KV head, key tile): it visits every query row of
//                 every group and of every query head that reads the KV head and sees the
//                 tile, so dK/dV are summed over groups and heads without atomics
//   backward dQ   one task per (group, sequence, query head, query tile)
// The backward recomputes the probabilities in both passes rather than sharing them through
// memory: two extra GEMM-sized products buy full parallelism with no workspace and no
// synchronisation.
//
// Masks: causal and local (sliding-window) attention follow common/mask.h, with each group's
// diagonal_shift added to the diagonal. A query tile visits only the key tiles its rows' windows
// reach, and a key tile only the query rows that see one of its keys; inside a tile each row
// (key) adds exactly the keys (rows) it sees. Softcap turns each score s into
// softcap * tanh(s / softcap); the backward multiplies dS by its derivative 1 - tanh^2. Sinks
// add exp(sinks[h]) to each row's softmax denominator in the forward (so the LSE holds them);
// the backward needs nothing more, since it reads that LSE (fp64 recomputes it the same way).
//
// Rows of a tensor that lie after the last sequence (cu_seqlens[B] < total) belong to no
// sequence; they get O = 0, LSE = -inf, dQ = 0 and dK = dV = 0, so every output is defined.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <new>
#include <string>
#include <type_traits>
#include <vector>

#include "common/backends.h"
#include "common/error.h"
#include "common/mask.h"
#include "cpu/dtype_convert.h"
#include "cpu/thread_pool.h"

namespace ringattn {
namespace cpu {

bool supports_head_dim(int head_dim) { return head_dim >= 8 && head_dim <= 256 && head_dim % 8 == 0; }

namespace {

constexpr int64_t kTileQ = 64;
constexpr int64_t kTileK = 64;

template <typename A>
constexpr A neg_inf() {
  return -std::numeric_limits<A>::infinity();
}

// ---- small dense kernels on accumulator tiles ----
//
// Every sum below runs in an order fixed by the shapes alone (never by the thread count or
// by which tile an entry falls in), so results are reproducible bit for bit. Head dims are
// multiples of 8 (supports_head_dim, checked again in dispatch()).

// Register blocking: kRows x kCols accumulators fit the 16 SIMD registers of baseline x86-64.
template <typename A>
struct Blocking {
  static constexpr int kRows = sizeof(A) == 4 ? 4 : 2;
  static constexpr int kCols = 8;
};

// Sums over the head dim run in chunks of kDotChunk: each chunk in order, then the chunk sums in
// order. A plain running sum over 256 terms loses about sqrt(256) roundings of the final
// magnitude; the chunked sum about sqrt(32) + sqrt(8), three times less. With large scores (a
// softmax scale well above 1/sqrt(D), queries of large norm) that error is what P = exp(s - lse)
// amplifies into the gradients (fp32 at D = 256: dK off by 9e-5 against 1.4e-5 for PyTorch's own
// fp32 math, before the chunks). The order is fixed by the head dim alone, so results stay
// reproducible bit for bit.
constexpr int kDotChunk = 32;

// Summed in matmul_a_bt's order, chunk by chunk: Di = rowsum(dO * O) then cancels dP = dO . v
// exactly where it should (a row that sees one key has O = v and dS = 0).
template <typename A>
inline A chunked_dot(const A* a, const A* b, int n) {
  A total = 0;
  for (int d0 = 0; d0 < n; d0 += kDotChunk) {
    const int d1 = std::min(n, d0 + kDotChunk);
    A acc = 0;
    for (int d = d0; d < d1; ++d) acc += a[d] * b[d];
    total += acc;
  }
  return total;
}

// c[r * ldc + j] = sum_d a[r * dim + d] * bt[d * ldb + j], summed over d in chunks (as
// chunked_dot), for r < m, j < n. a is row-major [m, dim]; bt is the transposed right operand
// [dim, ldb]. The tile is computed in whole register blocks: rows up to m rounded up to kRows and
// columns up to n rounded up to kCols, so a, bt and c must hold that many (the scratch tiles are
// allocated at full tile size); the extra entries are never read.
template <typename A>
void matmul_a_bt(const A* a, int m, const A* bt, int ldb, int n, int dim, A* c, int ldc) {
  constexpr int R = Blocking<A>::kRows;
  constexpr int C = Blocking<A>::kCols;
  for (int r0 = 0; r0 < m; r0 += R)
    for (int j0 = 0; j0 < n; j0 += C) {
      A total[R][C] = {};
      for (int d0 = 0; d0 < dim; d0 += kDotChunk) {
        const int d1 = std::min(dim, d0 + kDotChunk);
        A acc[R][C] = {};
        for (int d = d0; d < d1; ++d) {
          const A* bd = bt + static_cast<int64_t>(d) * ldb + j0;
          for (int i = 0; i < R; ++i) {
            const A x = a[static_cast<int64_t>(r0 + i) * dim + d];
            for (int u = 0; u < C; ++u) acc[i][u] += x * bd[u];
          }
        }
        for (int i = 0; i < R; ++i)
          for (int u = 0; u < C; ++u) total[i][u] += acc[i][u];
      }
      for (int i = 0; i < R; ++i)
        for (int u = 0; u < C; ++u) c[static_cast<int64_t>(r0 + i) * ldc + j0 + u] = total[i][u];
    }
}

// out_i += sum_{start[i] <= j < end[i]} coef(i, j) * b_j, with j ascending, for i < m.
// out is [m, dim], b is [*, dim], coef(i, j) = coef[i * coef_i + j * coef_j] (so a coefficient
// tile can be used as is or transposed). Only the entries in range enter the sum: a masked
// key never contributes, not even as 0 * inf. Blocks of kRows outputs share the loads of b
// over the j range all of them need.
template <typename A>
void accumulate_rows(A* out, int m, const A* coef, int64_t coef_i, int64_t coef_j, const int* start,
                     const int* end, const A* b, int dim) {
  constexpr int R = Blocking<A>::kRows;
  constexpr int C = Blocking<A>::kCols;
  int r0 = 0;
  for (; r0 + R <= m; r0 += R) {
    int lo = start[r0], hi = end[r0];
    for (int i = 1; i < R; ++i) {
      lo = std::max(lo, start[r0 + i]);
      hi = std::min(hi, end[r0 + i]);
    }
    const bool shared = lo < hi;
    for (int d0 = 0; d0 < dim; d0 += C) {
      A acc[R][C];
      for (int i = 0; i < R; ++i)
        for (int u = 0; u < C; ++u) acc[i][u] = out[static_cast<int64_t>(r0 + i) * dim + d0 + u];
      for (int i = 0; i < R; ++i) {
        const A* ci = coef + static_cast<int64_t>(r0 + i) * coef_i;
        const int stop = shared ? lo : end[r0 + i];
        for (int j = start[r0 + i]; j < stop; ++j) {
          const A w = ci[j * coef_j];
          const A* bj = b + static_cast<int64_t>(j) * dim + d0;
          for (int u = 0; u < C; ++u) acc[i][u] += w * bj[u];
        }
      }
      if (shared) {
        for (int j = lo; j < hi; ++j) {
          const A* bj = b + static_cast<int64_t>(j) * dim + d0;
          for (int i = 0; i < R; ++i) {
            const A w = coef[static_cast<int64_t>(r0 + i) * coef_i + j * coef_j];
            for (int u = 0; u < C; ++u) acc[i][u] += w * bj[u];
          }
        }
        for (int i = 0; i < R; ++i) {
          const A* ci = coef + static_cast<int64_t>(r0 + i) * coef_i;
          for (int j = hi; j < end[r0 + i]; ++j) {
            const A w = ci[j * coef_j];
            const A* bj = b + static_cast<int64_t>(j) * dim + d0;
            for (int u = 0; u < C; ++u) acc[i][u] += w * bj[u];
          }
        }
      }
      for (int i = 0; i < R; ++i)
        for (int u = 0; u < C; ++u) out[static_cast<int64_t>(r0 + i) * dim + d0 + u] = acc[i][u];
    }
  }
  for (; r0 < m; ++r0) {  // leftover rows, one at a time, same order
    const A* ci = coef + static_cast<int64_t>(r0) * coef_i;
    for (int d0 = 0; d0 < dim; d0 += C) {
      A acc[C];
      for (int u = 0; u < C; ++u) acc[u] = out[static_cast<int64_t>(r0) * dim + d0 + u];
      for (int j = start[r0]; j < end[r0]; ++j) {
        const A w = ci[j * coef_j];
        const A* bj = b + static_cast<int64_t>(j) * dim + d0;
        for (int u = 0; u < C; ++u) acc[u] += w * bj[u];
      }
      for (int u = 0; u < C; ++u) out[static_cast<int64_t>(r0) * dim + d0 + u] = acc[u];
    }
  }
}

template <typename A>
inline void scale_in_place(A* y, A a, int n) {
  for (int d = 0; d < n; ++d) y[d] *= a;
}

// ---- strided tensors [rows, heads, head_dim], strides in elements, last dim contiguous ----

template <typename T>
struct View {
  T* data = nullptr;
  int64_t row_stride = 0;
  int64_t head_stride = 0;
  T* at(int64_t row, int64_t head) const { return data + row * row_stride + head * head_stride; }
};

template <typename T>
View<const T> const_view(const void* p, int64_t row_stride, int64_t head_stride) {
  return View<const T>{static_cast<const T*>(p), row_stride, head_stride};
}

template <typename T>
View<T> mutable_view(void* p, int64_t row_stride, int64_t head_stride) {
  return View<T>{static_cast<T*>(p), row_stride, head_stride};
}

template <typename T, typename A>
inline void load_row(const T* src, int n, A* dst) {
  for (int d = 0; d < n; ++d) dst[d] = Element<T>::load(src + d);
}

// One row of a tensor into a column of a transposed tile [n, ld] (dst points at the column).
template <typename T, typename A>
inline void load_column(const T* src, int n, A* dst, int ld) {
  for (int d = 0; d < n; ++d) dst[static_cast<int64_t>(d) * ld] = Element<T>::load(src + d);
}

template <typename T, typename A>
inline void store_row_scaled(T* dst, const A* src, A factor, int n) {
  for (int d = 0; d < n; ++d) Element<T>::store(dst + d, src[d] * factor);
}

template <typename T>
inline void store_zero_row(T* dst, int n) {
  using A = typename Element<T>::Acc;
  for (int d = 0; d < n; ++d) Element<T>::store(dst + d, A(0));
}

// ---- problem geometry ----

// One (group, sequence): where its query rows and keys start, how many queries, how many keys
// the group sees (seqused_k if given, else the whole key sequence).
struct Seq {
  int64_t q_start = 0;
  int64_t lq = 0;
  int64_t k_start = 0;
  int64_t lk = 0;
  int64_t shift = 0;  // the group's diagonal_shift[b] (0 without one, or when the mask has no bound)
};

// Which keys each query row sees: the rule of common/mask.h, in 64-bit indices. The keys a row
// sees are one run, so in a key tile they are a run [lo, hi) of the tile; the rows that see a
// key are one run too.
using SeqMask = MaskPolicy<MaskWindow, int64_t>;

struct Shape {
  int batch = 0, groups = 0, heads_q = 0, heads_k = 0, head_dim = 0, ratio = 1;
  MaskWindow window;        // the problem's: causal is a right bound of 0, a window adds its bounds
  float softcap = 0.0f;     // 0 = off
  const float* sinks = nullptr;  // [Hq] or NULL
  int64_t total_k = 0;
  int64_t keys_end = 0;                // cu_seqlens_k[B]
  std::vector<int64_t> k_start, k_len;  // [B], whole key sequences
  std::vector<int64_t> total_q;         // [G]
  std::vector<int64_t> queries_end;     // [G], cu_seqlens_q_g[B]
  std::vector<std::vector<Seq>> seq;    // [G][B]
};

// The mask of one (group, sequence) of the problem: its diagonal moved by the group's shift.
inline SeqMask mask_of(const Shape& s, const Seq& sq) {
  SeqMask mask(sq.lq, sq.lk, s.window);
  mask.diagonal += sq.shift;
  return mask;
}

// The keys of the tile [j0, j1) that row i sees, as offsets [lo, hi) into the tile; {0, 0} when none.
struct TileRange {
  int lo = 0, hi = 0;
};
inline TileRange keys_in_tile(const SeqMask& mask, int64_t i, int64_t j0, int64_t j1) {
  const int64_t lo = std::max(j0, mask.key_begin(i));
  const int64_t hi = std::min(j1, mask.key_end(i));
  return hi > lo ? TileRange{static_cast<int>(lo - j0), static_cast<int>(hi - j0)} : TileRange{};
}

// The rows of the block [i0, i0 + nq) that see key j (< seqlen_k), as offsets into the block.
inline TileRange rows_in_block(const SeqMask& mask, int64_t j, int64_t i0, int nq) {
  const int64_t lo = std::max<int64_t>(0, mask.row_begin(j) - i0);
  const int64_t hi = std::min<int64_t>(nq, mask.row_end(j) - i0);
  return hi > lo ? TileRange{static_cast<int>(lo), static_cast<int>(hi)} : TileRange{};
}

// Works for ringattn_fwd_group and ringattn_bwd_group (same metadata fields).
template <typename Group>
Shape make_shape(const ringattn_problem& p, const Group* groups) {
  Shape s;
  s.batch = p.batch_size;
  s.groups = p.num_groups;
  s.heads_q = p.num_heads_q;
  s.heads_k = p.num_heads_k;
  s.head_dim = p.head_dim;
  s.ratio = p.num_heads_q / p.num_heads_k;
  const bool causal = p.causal != 0;
  s.window = MaskWindow::of(causal ? MaskMode::kCausal : MaskMode::kNone);
  if (p.has_window != 0) {  // validated: with causal, window_right is -1 or 0
    s.window.left = p.window_left;
    s.window.right = causal ? 0 : p.window_right;
  }
  // The shift moves the diagonal, so it matters (and is read) only where a side is bounded.
  const bool bounded = s.window.left >= 0 || s.window.right >= 0;
  s.softcap = p.softcap;
  s.sinks = p.sinks;
  s.total_k = p.total_k;
  s.keys_end = p.cu_seqlens_k[s.batch];
  s.k_start.resize(s.batch);
  s.k_len.resize(s.batch);
  for (int b = 0; b < s.batch; ++b) {
    s.k_start[b] = p.cu_seqlens_k[b];
    s.k_len[b] = static_cast<int64_t>(p.cu_seqlens_k[b + 1]) - p.cu_seqlens_k[b];
  }
  s.total_q.resize(s.groups);
  s.queries_end.resize(s.groups);
  s.seq.assign(s.groups, std::vector<Seq>(s.batch));
  for (int g = 0; g < s.groups; ++g) {
    const Group& gr = groups[g];
    s.total_q[g] = gr.total_q;
    s.queries_end[g] = gr.cu_seqlens_q[s.batch];
    for (int b = 0; b < s.batch; ++b) {
      Seq& q = s.seq[g][b];
      q.q_start = gr.cu_seqlens_q[b];
      q.lq = static_cast<int64_t>(gr.cu_seqlens_q[b + 1]) - gr.cu_seqlens_q[b];
      q.k_start = s.k_start[b];
      q.lk = gr.seqused_k ? static_cast<int64_t>(gr.seqused_k[b]) : s.k_len[b];
      q.shift = bounded && gr.diagonal_shift ? static_cast<int64_t>(gr.diagonal_shift[b]) : 0;
    }
  }
  return s;
}

// The validated scale: problem.softmax_scale, or 1/sqrt(head_dim) (computed in A) when
// problem.default_softmax_scale is set.
template <typename A>
A resolve_scale(const ringattn_problem& p) {
  return p.default_softmax_scale ? A(1) / std::sqrt(static_cast<A>(p.head_dim)) : static_cast<A>(p.softmax_scale);
}

// Turns the dot products raw[lo, hi) of a row into its scores, in place: scale * q.k, capped
// to softcap * tanh(scale * q.k / softcap) when softcap > 0.
template <typename A>
inline void scores_from_dots(A* raw, int lo, int hi, A scale, A softcap) {
  if (softcap > A(0)) {
    for (int c = lo; c < hi; ++c) raw[c] = softcap * std::tanh(scale * raw[c] / softcap);
  } else {
    for (int c = lo; c < hi; ++c) raw[c] *= scale;
  }
}

// A row's LSE from its online-softmax state (max m and sum l of exp(score - m) over its keys),
// with has_keys false for a row without keys or whose every key weighs 0 (l = 0). With a sink
// logit: log(l exp(m) + exp(sink)), which is the sink alone for a row without keys.
template <typename A>
inline A row_lse(bool has_keys, A m, A l, const float* sink) {
  if (sink == nullptr) return has_keys ? m + std::log(l) : neg_inf<A>();
  const A sink_logit = static_cast<A>(*sink);
  if (!has_keys) return sink_logit;
  const A top = std::max(m, sink_logit);
  return top + std::log(l * std::exp(m - top) + std::exp(sink_logit - top));
}

// The factor that normalises a row's unnormalised output: 1 / l, or 1 / (l + exp(sink - m))
// with a sink logit (the sink takes its share of the row's probability, and no value).
template <typename A>
inline A row_normaliser(A m, A l, const float* sink) {
  if (sink == nullptr) return A(1) / l;
  return A(1) / (l + std::exp(static_cast<A>(*sink) - m));
}

// ---- task lists ----

// A tile of query rows [i0, i1) of one (group, sequence, query head).
struct QueryTask {
  int g, b, h;
  int64_t i0, i1;
  int64_t cost;
};

// A tile of key rows [j0, j1) of one (sequence, KV head).
struct KeyTask {
  int b, hk;
  int64_t j0, j1;
  int64_t cost;
};

// Calls fn(j0, j1, nk) for each tile [j0, j1) of nk <= kTileK keys that the query tile t needs,
// in key order: its first row sees the first keys and its last row the last ones. Tiles outside
// every row's window are never visited.
template <typename Fn>
void for_each_key_tile(const SeqMask& mask, const QueryTask& t, Fn&& fn) {
  const int64_t tile_key_end = mask.key_end(t.i1 - 1);
  for (int64_t j0 = mask.key_begin(t.i0); j0 < tile_key_end; j0 += kTileK) {
    const int64_t j1 = std::min(j0 + kTileK, tile_key_end);
    fn(j0, j1, static_cast<int>(j1 - j0));
  }
}

// Longest first, so the expensive tiles do not run last and leave threads idle.
template <typename Task>
void order_longest_first(std::vector<Task>& tasks) {
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& x, const Task& y) { return x.cost > y.cost; });
}

std::vector<QueryTask> make_query_tasks(const Shape& s) {
  std::vector<QueryTask> tasks;
  for (int g = 0; g < s.groups; ++g)
    for (int b = 0; b < s.batch; ++b) {
      const Seq& sq = s.seq[g][b];
      const SeqMask mask = mask_of(s, sq);
      for (int64_t i0 = 0; i0 < sq.lq; i0 += kTileQ) {
        const int64_t i1 = std::min(i0 + kTileQ, sq.lq);
        const int64_t cost = (i1 - i0) * (mask.keys_seen_in(i1 - 1, 0, sq.lk) + 1);
        for (int h = 0; h < s.heads_q; ++h) tasks.push_back(QueryTask{g, b, h, i0, i1, cost});
      }
    }
  order_longest_first(tasks);
  return tasks;
}

std::vector<KeyTask> make_key_tasks(const Shape& s) {
  std::vector<KeyTask> tasks;
  for (int b = 0; b < s.batch; ++b) {
    for (int64_t j0 = 0; j0 < s.k_len[b]; j0 += kTileK) {
      const int64_t j1 = std::min(j0 + kTileK, s.k_len[b]);
      // The query rows dkdv_key_tile visits for the tile, over every group.
      int64_t rows = 0;
      for (int g = 0; g < s.groups; ++g) {
        const Seq& sq = s.seq[g][b];
        if (j0 >= sq.lk) continue;
        const SeqMask mask = mask_of(s, sq);
        rows += std::max<int64_t>(0, mask.row_end(std::min(j1, sq.lk) - 1) - mask.row_begin(j0));
      }
      const int64_t cost = (j1 - j0) * (rows * s.ratio + 1);
      for (int hk = 0; hk < s.heads_k; ++hk) tasks.push_back(KeyTask{b, hk, j0, j1, cost});
    }
  }
  order_longest_first(tasks);
  return tasks;
}

// ---- forward ----

template <typename A>
struct ForwardScratch {
  std::vector<A> q, o, kt, v, s, m, l;  // kt: the key tile transposed, [head_dim, kTileK]
  std::vector<int> start, end;           // per row, the keys [start, end) of the tile it sees
  explicit ForwardScratch(int d)
      : q(kTileQ * d), o(kTileQ * d), kt(kTileK * d), v(kTileK * d), s(kTileQ * kTileK), m(kTileQ), l(kTileQ),
        start(kTileQ), end(kTileQ) {}
};

// The online softmax of one query tile against every key it sees. Leaves, per row r, the
// running max m[r] of the scores (scaled, and capped with a softcap), the running sum l[r] of
// exp(score - m[r]) and (unless kStatsOnly) the unnormalised output
// o[r] = sum_j exp(score_j - m[r]) v_j. Masked keys are skipped (a row that sees no key keeps
// m = -inf, l = 0, o = 0); every visible key enters in
// IEEE arithmetic, as on the GPU: the max ignores NaN scores (like fmaxf), and exp() of a NaN
// score, or of +inf - +inf, makes l and o NaN. While a row's max is still -inf (only -inf
// scores so far) the exponent subtracts 0 rather than the max, so those keys weigh exp(-inf) =
// 0, not exp(-inf - -inf) = NaN, and a later finite score starts the sum afresh.
template <bool kStatsOnly, typename T, typename A>
void attend_query_tile(const Shape& s, const View<const T>& q, const View<const T>& k, const View<const T>& v,
                       A scale, const QueryTask& t, ForwardScratch<A>& w) {
  const A softcap = static_cast<A>(s.softcap);
  const int d = s.head_dim;
  const Seq& sq = s.seq[t.g][t.b];
  const int hk = t.h / s.ratio;
  const int nq = static_cast<int>(t.i1 - t.i0);

  for (int r = 0; r < nq; ++r) load_row(q.at(sq.q_start + t.i0 + r, t.h), d, &w.q[r * d]);
  std::fill(w.m.begin(), w.m.begin() + nq, neg_inf<A>());
  std::fill(w.l.begin(), w.l.begin() + nq, A(0));
  if (!kStatsOnly) std::fill(w.o.begin(), w.o.begin() + nq * d, A(0));

  const SeqMask mask = mask_of(s, sq);
  for_each_key_tile(mask, t, [&](int64_t j0, int64_t j1, int nk) {
    for (int c = 0; c < nk; ++c) {
      load_column(k.at(sq.k_start + j0 + c, hk), d, &w.kt[c], static_cast<int>(kTileK));
      if (!kStatsOnly) load_row(v.at(sq.k_start + j0 + c, hk), d, &w.v[c * d]);
    }
    matmul_a_bt(w.q.data(), nq, w.kt.data(), static_cast<int>(kTileK), nk, d, w.s.data(), static_cast<int>(kTileK));
    for (int r = 0; r < nq; ++r) {
      const TileRange keys = keys_in_tile(mask, t.i0 + r, j0, j1);
      w.start[r] = keys.lo;
      w.end[r] = keys.hi;
      if (keys.lo == keys.hi) continue;  // the whole key tile is masked for this row
      A* sr = &w.s[r * kTileK];
      scores_from_dots(sr, keys.lo, keys.hi, scale, softcap);
      A tile_max = neg_inf<A>();
      for (int c = keys.lo; c < keys.hi; ++c) tile_max = std::max(tile_max, sr[c]);
      const A m_new = std::max(w.m[r], tile_max);
      const A base = m_new == neg_inf<A>() ? A(0) : m_new;
      const A alpha = std::exp(w.m[r] - base);  // 0 on the first tile with a score above -inf
      A sum = 0;
      for (int c = keys.lo; c < keys.hi; ++c) {
        sr[c] = std::exp(sr[c] - base);
        sum += sr[c];
      }
      if (!kStatsOnly && alpha != A(1)) scale_in_place(&w.o[r * d], alpha, d);
      w.l[r] = w.l[r] * alpha + sum;
      w.m[r] = m_new;
    }
    if (!kStatsOnly)
      accumulate_rows(w.o.data(), nq, w.s.data(), kTileK, 1, w.start.data(), w.end.data(), w.v.data(), d);
  });
}

template <typename T>
ringattn_status run_forward(const ringattn_fwd_params& p, const Shape& s) {
  using A = typename Element<T>::Acc;
  const int d = s.head_dim;
  const A scale = resolve_scale<A>(p.problem);
  const View<const T> k = const_view<T>(p.kv.k, p.kv.k_row_stride, p.kv.k_head_stride);
  const View<const T> v = const_view<T>(p.kv.v, p.kv.v_row_stride, p.kv.v_head_stride);
  std::vector<View<const T>> q(s.groups);
  std::vector<View<T>> out(s.groups);
  for (int g = 0; g < s.groups; ++g) {
    const ringattn_fwd_group& gr = p.groups[g];
    q[g] = const_view<T>(gr.q, gr.q_row_stride, gr.q_head_stride);
    out[g] = mutable_view<T>(gr.out, gr.out_row_stride, gr.out_head_stride);
  }

  const std::vector<QueryTask> tasks = make_query_tasks(s);
  const int threads = resolve_num_threads(p.exec.num_threads, static_cast<int64_t>(tasks.size()));
  const std::string error = parallel_for(
      static_cast<int64_t>(tasks.size()), threads, [&] { return ForwardScratch<A>(d); },
      [&](ForwardScratch<A>& w, int64_t index) {
        const QueryTask& t = tasks[index];
        attend_query_tile<false>(s, q[t.g], k, v, scale, t, w);
        const Seq& sq = s.seq[t.g][t.b];
        const SeqMask mask = mask_of(s, sq);
        float* lse = p.groups[t.g].softmax_lse + static_cast<int64_t>(t.h) * s.total_q[t.g];
        const float* sink = s.sinks ? s.sinks + t.h : nullptr;
        for (int64_t r = 0; r < t.i1 - t.i0; ++r) {
          const int64_t row = sq.q_start + t.i0 + r;
          T* dst = out[t.g].at(row, t.h);
          // IEEE throughout: a NaN sum gives NaN out and LSE. A row without keys, or whose
          // visible scores are all -inf (every key weighs 0, l = 0), is empty, as on the GPU:
          // out = 0, LSE = -inf (the sink logit, with sinks).
          const bool has_keys = mask.keys_seen_in(t.i0 + r, 0, sq.lk) > 0 && w.l[r] != A(0);
          if (has_keys)
            store_row_scaled(dst, &w.o[r * d], row_normaliser(w.m[r], w.l[r], sink), d);
          else
            store_zero_row(dst, d);
          lse[row] = static_cast<float>(row_lse(has_keys, w.m[r], w.l[r], sink));
        }
      });
  if (!error.empty()) return fail(RINGATTN_STATUS_INTERNAL_ERROR, "CPU backend, forward: " + error);

  // Rows after the last sequence belong to no sequence (their LSE is -inf, sinks or not).
  for (int g = 0; g < s.groups; ++g)
    for (int64_t row = s.queries_end[g]; row < s.total_q[g]; ++row)
      for (int h = 0; h < s.heads_q; ++h) {
        store_zero_row(out[g].at(row, h), d);
        p.groups[g].softmax_lse[static_cast<int64_t>(h) * s.total_q[g] + row] = neg_inf<float>();
      }
  return RINGATTN_STATUS_OK;
}

// ---- backward ----

template <typename T>
struct BackwardTensors {
  using A = typename Element<T>::Acc;
  View<const T> k, v;
  View<T> dk, dv;
  std::vector<View<const T>> q, out, dout;
  std::vector<View<T>> dq;
  std::vector<const float*> lse_given;   // [G] the forward's fp32 LSE
  std::vector<std::vector<A>> lse_exact;  // [G][Hq * total_q], fp64 data only (see below)

  // For fp64 data the backward recomputes the LSE in double: the ABI's fp32 LSE would cap
  // the gradients at fp32 accuracy, and fp64 exists for gradcheck.
  static constexpr bool kRecomputeLse = std::is_same<A, double>::value;

  A lse(const Shape& s, int g, int h, int64_t row) const {
    const int64_t index = static_cast<int64_t>(h) * s.total_q[g] + row;
    if (kRecomputeLse) return lse_exact[g][index];
    return static_cast<A>(lse_given[g][index]);
  }
};

template <typename A>
struct BackwardScratch {
  std::vector<A> k, kt, vt, dk, dv;  // a key tile (row-major and transposed), dK/dV accumulators
  std::vector<A> q, dout, o, dq;      // a query block, dO, one row of O, dQ accumulators
  std::vector<A> s, dp, di, lse;      // scores -> P, dP -> dS, per-row Di and LSE
  std::vector<int> start, end;          // per query row, the keys [start, end) of the tile it sees
  std::vector<int> col_start, col_end;  // per key of the tile, the rows [start, end) of the block that see it
  explicit BackwardScratch(int d)
      : k(kTileK * d), kt(kTileK * d), vt(kTileK * d), dk(kTileK * d), dv(kTileK * d), q(kTileQ * d),
        dout(kTileQ * d), o(d), dq(kTileQ * d), s(kTileQ * kTileK), dp(kTileQ * kTileK), di(kTileQ), lse(kTileQ),
        start(kTileQ), end(kTileQ), col_start(kTileK), col_end(kTileK) {}
};

// Loads query rows [row0, row0 + nq) of (group g, head h): Q, dO, Di = rowsum(dO * O) (from the
// forward's rounded O, like the GPU kernels) and the LSE.
template <typename T, typename A>
void load_query_block(const Shape& s, const BackwardTensors<T>& x, int g, int h, int64_t row0, int nq,
                      BackwardScratch<A>& w) {
  const int d = s.head_dim;
  for (int r = 0; r < nq; ++r) {
    const int64_t row = row0 + r;
    load_row(x.q[g].at(row, h), d, &w.q[r * d]);
    load_row(x.dout[g].at(row, h), d, &w.dout[r * d]);
    load_row(x.out[g].at(row, h), d, w.o.data());
    w.di[r] = chunked_dot(&w.dout[r * d], w.o.data(), d);
    // As the GPU backward: an LSE of -inf (a row that saw no key, or only -inf scores) becomes
    // +inf, so exp(score - LSE) is 0 for every finite score instead of exp(+inf); a NaN score,
    // LSE, O or dO still reaches dS and the gradients.
    const A lse = x.lse(s, g, h, row);
    w.lse[r] = lse == neg_inf<A>() ? -neg_inf<A>() : lse;
  }
}

// For the block of nq query rows in w.q / w.dout against the nk keys in w.kt / w.vt, with
// [w.start[r], w.end[r]) the keys row r sees: leaves P = exp(score - LSE) in w.s and
// dS = P * (dP - Di) in w.dp on visible entries, 0 on masked ones. dS is the gradient of the
// scaled dot product: with a softcap, the score is softcap * tanh(x / softcap) of x = scale * q.k,
// so dS also carries d score / dx = 1 - tanh^2.
template <typename A>
void probabilities_and_dscores(int nq, int nk, int d, A scale, A softcap, BackwardScratch<A>& w) {
  const int ld = static_cast<int>(kTileK);
  matmul_a_bt(w.q.data(), nq, w.kt.data(), ld, nk, d, w.s.data(), ld);
  matmul_a_bt(w.dout.data(), nq, w.vt.data(), ld, nk, d, w.dp.data(), ld);
  for (int r = 0; r < nq; ++r) {
    A* sr = &w.s[r * ld];
    A* dpr = &w.dp[r * ld];
    const int lo = w.start[r], hi = w.end[r];
    for (int c = 0; c < lo; ++c) sr[c] = dpr[c] = A(0);
    if (softcap > A(0)) {
      for (int c = lo; c < hi; ++c) {
        const A capped = std::tanh(scale * sr[c] / softcap);
        const A prob = std::exp(softcap * capped - w.lse[r]);
        sr[c] = prob;
        dpr[c] = prob * (dpr[c] - w.di[r]) * (A(1) - capped * capped);
      }
    } else {
      for (int c = lo; c < hi; ++c) {
        const A prob = std::exp(scale * sr[c] - w.lse[r]);
        sr[c] = prob;
        dpr[c] = prob * (dpr[c] - w.di[r]);
      }
    }
    for (int c = hi; c < nk; ++c) sr[c] = dpr[c] = A(0);
  }
}

// dK, dV of one key tile of one (sequence, KV head), summed over every group, every query head
// of the KV head and every query row that sees a key of the tile, in that fixed order.
template <typename T, typename A>
void dkdv_key_tile(const Shape& s, const BackwardTensors<T>& x, A scale, const KeyTask& t, BackwardScratch<A>& w) {
  const int d = s.head_dim;
  const A softcap = static_cast<A>(s.softcap);
  const int nk = static_cast<int>(t.j1 - t.j0);
  const int64_t key_row0 = s.k_start[t.b] + t.j0;
  for (int c = 0; c < nk; ++c) {
    load_column(x.k.at(key_row0 + c, t.hk), d, &w.kt[c], static_cast<int>(kTileK));
    load_column(x.v.at(key_row0 + c, t.hk), d, &w.vt[c], static_cast<int>(kTileK));
  }
  std::fill(w.dk.begin(), w.dk.begin() + nk * d, A(0));
  std::fill(w.dv.begin(), w.dv.begin() + nk * d, A(0));

  for (int g = 0; g < s.groups; ++g) {
    const Seq& sq = s.seq[g][t.b];
    if (sq.lq == 0 || t.j0 >= sq.lk) continue;  // keys past seqused_k are invisible to this group
    // Rows [i_first, i_end) see a key of the tile.
    const SeqMask mask = mask_of(s, sq);
    const int64_t i_first = mask.row_begin(t.j0);
    const int64_t i_end = mask.row_end(std::min(t.j1, sq.lk) - 1);
    for (int h = t.hk * s.ratio; h < (t.hk + 1) * s.ratio; ++h) {
      for (int64_t i0 = i_first; i0 < i_end; i0 += kTileQ) {
        const int nq = static_cast<int>(std::min(i0 + kTileQ, i_end) - i0);
        load_query_block(s, x, g, h, sq.q_start + i0, nq, w);
        for (int r = 0; r < nq; ++r) {
          const TileRange keys = keys_in_tile(mask, i0 + r, t.j0, t.j1);
          w.start[r] = keys.lo;
          w.end[r] = keys.hi;
        }
        // The rows of the block that see key c (none for a key past the group's seqused_k).
        for (int c = 0; c < nk; ++c) {
          const TileRange rows = t.j0 + c < sq.lk ? rows_in_block(mask, t.j0 + c, i0, nq) : TileRange{};
          w.col_start[c] = rows.lo;
          w.col_end[c] = rows.hi;
        }
        probabilities_and_dscores(nq, nk, d, scale, softcap, w);
        // dV_c += sum_r P[r][c] dO_r and dK_c += sum_r dS[r][c] Q_r: the tiles read transposed.
        accumulate_rows(w.dv.data(), nk, w.s.data(), 1, kTileK, w.col_start.data(), w.col_end.data(), w.dout.data(),
                        d);
        accumulate_rows(w.dk.data(), nk, w.dp.data(), 1, kTileK, w.col_start.data(), w.col_end.data(), w.q.data(), d);
      }
    }
  }
  for (int c = 0; c < nk; ++c) {
    store_row_scaled(x.dk.at(key_row0 + c, t.hk), &w.dk[c * d], scale, d);
    store_row_scaled(x.dv.at(key_row0 + c, t.hk), &w.dv[c * d], A(1), d);
  }
}

// dQ of one query tile: sum over the keys each row sees.
template <typename T, typename A>
void dq_query_tile(const Shape& s, const BackwardTensors<T>& x, A scale, const QueryTask& t, BackwardScratch<A>& w) {
  const int d = s.head_dim;
  const Seq& sq = s.seq[t.g][t.b];
  const int hk = t.h / s.ratio;
  const int nq = static_cast<int>(t.i1 - t.i0);
  const A softcap = static_cast<A>(s.softcap);
  load_query_block(s, x, t.g, t.h, sq.q_start + t.i0, nq, w);
  std::fill(w.dq.begin(), w.dq.begin() + nq * d, A(0));

  const SeqMask mask = mask_of(s, sq);
  for_each_key_tile(mask, t, [&](int64_t j0, int64_t j1, int nk) {
    for (int c = 0; c < nk; ++c) {
      load_row(x.k.at(sq.k_start + j0 + c, hk), d, &w.k[c * d]);
      load_column(x.k.at(sq.k_start + j0 + c, hk), d, &w.kt[c], static_cast<int>(kTileK));
      load_column(x.v.at(sq.k_start + j0 + c, hk), d, &w.vt[c], static_cast<int>(kTileK));
    }
    for (int r = 0; r < nq; ++r) {
      const TileRange keys = keys_in_tile(mask, t.i0 + r, j0, j1);
      w.start[r] = keys.lo;
      w.end[r] = keys.hi;
    }
    probabilities_and_dscores(nq, nk, d, scale, softcap, w);
    accumulate_rows(w.dq.data(), nq, w.dp.data(), kTileK, 1, w.start.data(), w.end.data(), w.k.data(), d);
  });
  for (int r = 0; r < nq; ++r)
    store_row_scaled(x.dq[t.g].at(sq.q_start + t.i0 + r, t.h), &w.dq[r * d], scale, d);
}

template <typename T>
ringattn_status run_backward(const ringattn_bwd_params& p, const Shape& s) {
  using A = typename Element<T>::Acc;
  const int d = s.head_dim;
  const A scale = resolve_scale<A>(p.problem);

  BackwardTensors<T> x;
  x.k = const_view<T>(p.kv.k, p.kv.k_row_stride, p.kv.k_head_stride);
  x.v = const_view<T>(p.kv.v, p.kv.v_row_stride, p.kv.v_head_stride);
  x.dk = mutable_view<T>(p.dk, p.dk_row_stride, p.dk_head_stride);
  x.dv = mutable_view<T>(p.dv, p.dv_row_stride, p.dv_head_stride);
  x.q.resize(s.groups);
  x.out.resize(s.groups);
  x.dout.resize(s.groups);
  x.dq.resize(s.groups);
  x.lse_given.resize(s.groups);
  for (int g = 0; g < s.groups; ++g) {
    const ringattn_bwd_group& gr = p.groups[g];
    x.q[g] = const_view<T>(gr.q, gr.q_row_stride, gr.q_head_stride);
    x.out[g] = const_view<T>(gr.out, gr.out_row_stride, gr.out_head_stride);
    x.dout[g] = const_view<T>(gr.dout, gr.dout_row_stride, gr.dout_head_stride);
    x.dq[g] = mutable_view<T>(gr.dq, gr.dq_row_stride, gr.dq_head_stride);
    x.lse_given[g] = gr.softmax_lse;
  }

  const std::vector<QueryTask> query_tasks = make_query_tasks(s);
  const std::vector<KeyTask> key_tasks = make_key_tasks(s);
  const int64_t num_query_tasks = static_cast<int64_t>(query_tasks.size());
  const int64_t num_key_tasks = static_cast<int64_t>(key_tasks.size());

  if (BackwardTensors<T>::kRecomputeLse) {
    x.lse_exact.resize(s.groups);
    for (int g = 0; g < s.groups; ++g)
      x.lse_exact[g].assign(static_cast<size_t>(s.heads_q) * static_cast<size_t>(s.total_q[g]), neg_inf<A>());
    const std::string error = parallel_for(
        num_query_tasks, resolve_num_threads(p.exec.num_threads, num_query_tasks),
        [&] { return ForwardScratch<A>(d); },
        [&](ForwardScratch<A>& w, int64_t index) {
          const QueryTask& t = query_tasks[index];
          attend_query_tile<true>(s, x.q[t.g], x.k, x.v, scale, t, w);
          const Seq& sq = s.seq[t.g][t.b];
          const SeqMask mask = mask_of(s, sq);
          A* lse = x.lse_exact[t.g].data() + static_cast<int64_t>(t.h) * s.total_q[t.g];
          const float* sink = s.sinks ? s.sinks + t.h : nullptr;
          for (int64_t r = 0; r < t.i1 - t.i0; ++r)
            lse[sq.q_start + t.i0 + r] =
                row_lse(mask.keys_seen_in(t.i0 + r, 0, sq.lk) > 0 && w.l[r] != A(0), w.m[r], w.l[r], sink);
        });
    if (!error.empty()) return fail(RINGATTN_STATUS_INTERNAL_ERROR, "CPU backend, backward (LSE): " + error);
  }

  std::string error = parallel_for(
      num_key_tasks, resolve_num_threads(p.exec.num_threads, num_key_tasks), [&] { return BackwardScratch<A>(d); },
      [&](BackwardScratch<A>& w, int64_t index) { dkdv_key_tile(s, x, scale, key_tasks[index], w); });
  if (!error.empty()) return fail(RINGATTN_STATUS_INTERNAL_ERROR, "CPU backend, backward (dK, dV): " + error);

  error = parallel_for(
      num_query_tasks, resolve_num_threads(p.exec.num_threads, num_query_tasks),
      [&] { return BackwardScratch<A>(d); },
      [&](BackwardScratch<A>& w, int64_t index) { dq_query_tile(s, x, scale, query_tasks[index], w); });
  if (!error.empty()) return fail(RINGATTN_STATUS_INTERNAL_ERROR, "CPU backend, backward (dQ): " + error);

  // Rows after the last sequence belong to no sequence.
  for (int64_t row = s.keys_end; row < s.total_k; ++row)
    for (int hk = 0; hk < s.heads_k; ++hk) {
      store_zero_row(x.dk.at(row, hk), d);
      store_zero_row(x.dv.at(row, hk), d);
    }
  for (int g = 0; g < s.groups; ++g)
    for (int64_t row = s.queries_end[g]; row < s.total_q[g]; ++row)
      for (int h = 0; h < s.heads_q; ++h) store_zero_row(x.dq[g].at(row, h), d);
  return RINGATTN_STATUS_OK;
}

// A pass of one dtype: its call params and the problem's geometry (make_shape).
template <typename Params>
using PassFn = ringattn_status (*)(const Params&, const Shape&);

// Runs the pass's instantiation for the call's dtype on the call's geometry, which every dtype shares.
template <typename Params>
ringattn_status dispatch(const Params& p, const char* pass, PassFn<Params> f32, PassFn<Params> f16,
                         PassFn<Params> bf16, PassFn<Params> f64) {
  // The tile kernels work in chunks of 8 along the head dim (supports_head_dim).
  if (!supports_head_dim(p.problem.head_dim))
    return failf(RINGATTN_STATUS_INTERNAL_ERROR, "CPU backend, %s: head_dim %d reached the backend unvalidated",
                 pass, p.problem.head_dim);
  try {
    const Shape s = make_shape(p.problem, p.groups);
    switch (p.problem.dtype) {
      case RINGATTN_DTYPE_FP32: return f32(p, s);
      case RINGATTN_DTYPE_FP16: return f16(p, s);
      case RINGATTN_DTYPE_BF16: return bf16(p, s);
      case RINGATTN_DTYPE_FP64: return f64(p, s);
      default:
        return failf(RINGATTN_STATUS_INTERNAL_ERROR, "CPU backend, %s: dtype %d reached the backend unvalidated",
                     pass, p.problem.dtype);
    }
  } catch (const std::bad_alloc&) {
    return failf(RINGATTN_STATUS_INTERNAL_ERROR, "CPU backend, %s: out of host memory", pass);
  } catch (const std::exception& e) {
    return failf(RINGATTN_STATUS_INTERNAL_ERROR, "CPU backend, %s: %s", pass, e.what());
  } catch (...) {
    return failf(RINGATTN_STATUS_INTERNAL_ERROR, "CPU backend, %s: unknown exception", pass);
  }
}

}  // namespace

ringattn_status grouped_fwd(const ringattn_fwd_params& params) {
  return dispatch(params, "forward", &run_forward<float>, &run_forward<half_t>, &run_forward<bfloat16_t>,
                  &run_forward<double>);
}

ringattn_status grouped_bwd(const ringattn_bwd_params& params) {
  return dispatch(params, "backward", &run_backward<float>, &run_backward<half_t>, &run_backward<bfloat16_t>,
                  &run_backward<double>);
}

}  // namespace cpu
}  // namespace ringattn
