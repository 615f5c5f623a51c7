// One-pass (online) softmax statistics of a row, and of a student/teacher row pair, for the CPU row kernels.
//
// A row is processed in chunks of kChunk columns: a max sweep, then an exp sweep that re-reads the chunk from L1,
// so the logits stream from memory once. z = x * inv_t is rounded to fp32 first (like PyTorch's x / T), and
// everything is relative to the running max m: d = z - m is exact near the max and exactly 0 at it.
// s = sum e^d, b = sum e^d d (entropy = log s - b / s); for a pair, a = sum e^ds (ds - (zt - r)) with r the
// teacher's z at the student's argmax (KL = a / s_s - log s_s + lse_t - r). These forms never subtract two
// numbers of size |lse| in fp32, so confident rows and near-identical pairs keep their accuracy. Per-chunk sums
// are fp32 vectors; the cross-chunk merge (rescaling by e^(m_old - m_new)) is in double. A NaN or +inf logit
// makes the row NaN.
#pragma once
#include <cmath>

#include "cpu/vec.h"

namespace opd::cpu {

constexpr int64_t kChunk = 2048;
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Calls f(T{}) with T the C++ type of a float32 / bfloat16 / float16 tensor.
template <typename F>
void dispatch_float(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "unsupported logits dtype ", type);
  }
}

// Calls f(S{}, U{}) with the C++ types of a student / teacher pair of logits (dtypes may differ).
template <typename F>
void dispatch_pair(at::ScalarType student, at::ScalarType teacher, F&& f) {
  dispatch_float(student, [&](auto s) { dispatch_float(teacher, [&](auto u) { f(s, u); }); });
}

// Rows per parallel task: at least ~32k columns of work, so few-row / huge-vocabulary calls stay cheap.
inline int64_t grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// The local column of a row's token when this shard owns it, else -1.
inline int64_t owned_column(int64_t tok, int64_t vocab_start, int64_t V, int64_t ignore_index) {
  const int64_t col = tok - vocab_start;
  return (tok != ignore_index && col >= 0 && col < V) ? col : -1;
}

// e^(m_old - m_new) rescaling of a running sum whose max moves up; 0 while the sum is empty (m_old = -inf).
inline double rescale(double sum, float m_old, float m_new) { return sum > 0 ? std::exp(double(m_old) - m_new) : 0; }

// z - m with z = x * inv_t rounded first (an fma would use the exact product, so the row max would give a
// nonzero d and a V = 1 row a log-probability of a few ulps instead of exactly 0).
inline __m256 scaled_minus(__m256 x, __m256 inv_t, __m256 minus_m) {
  return _mm256_add_ps(_mm256_mul_ps(x, inv_t), minus_m);
}

// Streams the next chunk into cache while this one is swept from L1, so that its max sweep does not wait on memory
// (without it the memory reads and the exp arithmetic run one after the other). One call per 16 columns = one
// 64-byte line of fp32 (half a line of bf16 / fp16: the other half is covered by the adjacent call).
template <typename T>
inline void prefetch_next_chunk(const T* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p + kChunk), _MM_HINT_T0);
}

inline float safe_max(float m) { return m == -kInf ? 0.f : m; }  // keeps -inf - -inf out of the exp sweep

struct RowStats {
  float m;   // max of z (-inf for an all -inf row)
  double s;  // sum e^(z - m); NaN for a row with a NaN / +inf logit
  double b;  // sum e^(z - m) (z - m)
};

template <typename T, bool kEntropy>
inline void exp_sweep(const T* x, int64_t n, float inv_t, float m, double& s, double& b) {
  const __m256 vi = _mm256_set1_ps(inv_t), vm = _mm256_set1_ps(-m);
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, b0 = s0, b1 = s0;
  int64_t i = 0;
  for (; i + 2 * kLanes <= n; i += 2 * kLanes) {
    prefetch_next_chunk(x + i);
    const __m256 d0 = scaled_minus(load8(x + i), vi, vm), d1 = scaled_minus(load8(x + i + kLanes), vi, vm);
    const __m256 e0 = exp_neg(d0), e1 = exp_neg(d1);
    s0 = _mm256_add_ps(s0, e0);
    s1 = _mm256_add_ps(s1, e1);
    if constexpr (kEntropy) {
      b0 = _mm256_add_ps(b0, where_nonzero(e0, _mm256_mul_ps(e0, d0)));
      b1 = _mm256_add_ps(b1, where_nonzero(e1, _mm256_mul_ps(e1, d1)));
    }
  }
  for (; i < n; i += kLanes) {
    const __m256 v = i + kLanes <= n ? load8(x + i) : load_tail(x + i, n - i, -kInf);
    const __m256 d = scaled_minus(v, vi, vm), e = exp_neg(d);
    s0 = _mm256_add_ps(s0, e);
    if constexpr (kEntropy) b0 = _mm256_add_ps(b0, where_nonzero(e, _mm256_mul_ps(e, d)));
  }
  s += hsum(_mm256_add_ps(s0, s1));
  if constexpr (kEntropy) b += hsum(_mm256_add_ps(b0, b1));
}

template <typename T, bool kEntropy>
inline RowStats row_stats(const T* x, int64_t V, float inv_t) {
  float m = -kInf;
  double s = 0, b = 0;
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const float cmax = chunk_max(x + c0, n) * inv_t;
    if (cmax > m) {
      const double r = rescale(s, m, cmax), delta = double(m) - cmax;
      b = s > 0 ? r * (b + s * delta) : 0;
      s *= r;
      m = cmax;
    }
    if (m == -kInf) {  // every logit so far is -inf (or NaN): nothing to add, unless a NaN hides here
      if (has_nan(x + c0, n)) return {m, kNaN, kNaN};
      continue;
    }
    exp_sweep<T, kEntropy>(x + c0, n, inv_t, m, s, b);
  }
  return {m, s, b};
}

struct PairStats {
  float ms, mt;   // maxima of the student / teacher z
  float r;        // the reference teacher value: zt at the student's argmax (0 while that is -inf / unknown)
  double ss, st;  // sums of e^(z - m); NaN when either row has a NaN / +inf logit
  double a;       // sum e^(zs - ms) ((zs - ms) - (zt - r))
};

// KL = a / ss - log ss + (lse_t - r). Measuring the teacher from its value at the student's argmax (not from its
// own max) makes the dominant term of a confident student exactly 0: a stays small, so its fp32 rounding is
// small too, and the backward's (zs - zt) - (KL + lse_s - lse_t) keeps its accuracy (a KL of 40 off by
// ulp(40) would put ~4e-6 into the gradient of a column whose true gradient is ~0).
template <typename S, typename U>
inline void pair_sweep(const S* xs, const U* xt, int64_t n, float inv_t, float ms, float mt, float r,
                       PairStats& st) {
  const __m256 vi = _mm256_set1_ps(inv_t), vms = _mm256_set1_ps(-ms), vmt = _mm256_set1_ps(-mt);
  const __m256 vr = _mm256_set1_ps(-r);
  __m256 ss = _mm256_setzero_ps(), tt = ss, aa = ss;
  for (int64_t i = 0; i < n; i += kLanes) {
    if (i % (2 * kLanes) == 0) {
      prefetch_next_chunk(xs + i);
      prefetch_next_chunk(xt + i);
    }
    const bool full = i + kLanes <= n;
    const __m256 zs = _mm256_mul_ps(full ? load8(xs + i) : load_tail(xs + i, n - i, -kInf), vi);
    const __m256 zt = _mm256_mul_ps(full ? load8(xt + i) : load_tail(xt + i, n - i, -kInf), vi);
    const __m256 ds = _mm256_add_ps(zs, vms);
    const __m256 es = exp_neg(ds);
    ss = _mm256_add_ps(ss, es);
    tt = _mm256_add_ps(tt, exp_neg(_mm256_add_ps(zt, vmt)));
    aa = _mm256_add_ps(aa, where_nonzero(es, _mm256_mul_ps(es, _mm256_sub_ps(ds, _mm256_add_ps(zt, vr)))));
  }
  st.ss += hsum(ss);
  st.st += hsum(tt);
  st.a += hsum(aa);
}

// zt (z units) at the first column of the chunk holding the student's chunk max, or 0 when that is -inf.
template <typename S, typename U>
inline float teacher_at_student_max(const S* xs, const U* xt, int64_t n, float raw_s, float inv_t) {
  for (int64_t i = 0; i < n; ++i) {
    if (static_cast<float>(xs[i]) == raw_s) {
      const float zt = static_cast<float>(xt[i]) * inv_t;
      return zt == -kInf ? 0.f : zt;
    }
  }
  return 0.f;
}

// S, U: the student's and the teacher's element types (each read in its own dtype, no converted copy).
template <typename S, typename U>
inline PairStats pair_stats(const S* xs, const U* xt, int64_t V, float inv_t) {
  PairStats st{-kInf, -kInf, 0.f, 0, 0, 0};
  for (int64_t c0 = 0; c0 < V; c0 += kChunk) {
    const int64_t n = std::min(kChunk, V - c0);
    const float raw_s = chunk_max(xs + c0, n), raw_t = chunk_max(xt + c0, n);
    const float cs = raw_s * inv_t, ct = raw_t * inv_t;
    if (ct > st.mt) {
      st.st *= rescale(st.st, st.mt, ct);
      st.mt = ct;
    }
    if (cs > st.ms) {  // a new student max: rescale to it, and move the teacher reference to its column
      const float r = teacher_at_student_max(xs + c0, xt + c0, n, raw_s, inv_t);
      const double scale = rescale(st.ss, st.ms, cs), delta = double(st.ms) - cs;
      st.a = st.ss > 0 ? scale * (st.a + st.ss * delta) + scale * st.ss * (double(r) - st.r) : 0;
      st.ss *= scale;
      st.ms = cs;
      st.r = r;
    }
    if (st.ms == -kInf && st.mt == -kInf) {  // both all -inf (or NaN) so far: see row_stats
      if (has_nan(xs + c0, n) || has_nan(xt + c0, n)) return {st.ms, st.mt, st.r, kNaN, kNaN, kNaN};
      continue;
    }
    pair_sweep(xs + c0, xt + c0, n, inv_t, safe_max(st.ms), safe_max(st.mt), st.r, st);
  }
  return st;
}

}  // namespace opd::cpu
