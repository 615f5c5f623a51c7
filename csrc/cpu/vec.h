// AVX2 + FMA helpers of the CPU row kernels: 8-lane fp32 loads from fp32 / bf16 / fp16, stores back (round to
// nearest even), a fast exp for non-positive arguments, horizontal sums.
//
// Why not at::vec::Vectorized<float>::exp(): it is Sleef's u10 exp (~2x the instructions of the one below, which
// is accurate to ~1.3 ulp on the arguments the kernels use), and exp_u20 turns NaN into a finite number. A
// scalar std::exp loop is ~10x slower than this (SPEC section 4). Every kernel is memory-bound only when the exp
// costs a few cycles per 8 lanes.
#pragma once
#include <immintrin.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <limits>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the opd CPU kernels need AVX2, FMA and F16C (CMakeLists.txt passes -mavx2 -mfma -mf16c)"
#endif

namespace opd::cpu {

constexpr int64_t kLanes = 8;
constexpr float kInf = std::numeric_limits<float>::infinity();

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const c10::BFloat16* p) {  // bf16 = the high half of an fp32
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The last n < 8 elements, the other lanes set to `fill` (-inf: neutral for max, exp gives 0).
template <typename T>
inline __m256 load_tail(const T* p, int64_t n, float fill) {
  alignas(32) float buf[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) buf[i] = i < n ? static_cast<float>(p[i]) : fill;
  return _mm256_load_ps(buf);
}

inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }

inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

inline void store8(c10::BFloat16* p, __m256 v) {
  // Round to nearest even on the bit pattern; NaN stays a quiet NaN (rounding could carry it into inf).
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_or_si256(bits, _mm256_set1_epi32(0x400000)), nan);
  const __m256i high = _mm256_srli_epi32(rounded, 16);  // each value now fits 16 bits: packus is exact
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

template <typename T>
inline void store_tail(T* p, __m256 v, int64_t n) {
  alignas(32) float buf[kLanes];
  _mm256_store_ps(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(buf[i]);  // c10 conversions round to nearest even
}

// e^d for d <= 0 (also -inf -> 0 and NaN -> NaN): e^d = 2^n 2^f, n = round(d log2 e), f in [-1/2, 1/2],
// 2^f by a degree-6 near-minimax polynomial (max relative error 8e-8 in fp32 Horner, fitted for this file).
// Results below 2^-126 flush to 0 (they are < 1e-38 of the row's largest term).
inline __m256 exp_neg(__m256 d) {
  __m256 t = _mm256_mul_ps(d, _mm256_set1_ps(1.44269504088896341f));
  t = _mm256_max_ps(_mm256_set1_ps(-127.f), t);  // operand order: max_ps returns t when t is NaN
  const __m256 underflow = _mm256_cmp_ps(t, _mm256_set1_ps(-126.f), _CMP_LT_OQ);
  const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(t, n);
  __m256 p = _mm256_set1_ps(1.534581242594868e-04f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3399930903688073e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618489071726799e-03f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550328642129898e-02f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022646248340607e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931471824645996e-01f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  // p * 2^n by adding n to p's exponent field (an integer add instead of a multiply on the busy FMA pipes);
  // p is in [0.7, 1.42] and n >= -126 here, so the exponent stays in range (at n = -126 the result, < 1.2e-38,
  // may come out as a denormal of the wrong size: irrelevant next to the row's largest term, which is 1).
  const __m256i e = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23));
  return _mm256_andnot_ps(underflow, _mm256_castsi256_ps(e));
}

// v where p != 0 (NaN included), else +0: p log p := 0 at p = 0, so a -inf logit never makes 0 * -inf = NaN.
inline __m256 where_nonzero(__m256 p, __m256 v) {
  return _mm256_and_ps(_mm256_cmp_ps(p, _mm256_setzero_ps(), _CMP_NEQ_UQ), v);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Max of n values. A NaN may be dropped here (max_ps returns its second operand when either is NaN); the exp
// sweep that follows still turns it into a NaN sum. The one chunk no sweep reads (every value so far -inf) is
// checked with has_nan instead. +inf comes out as the max and makes the sweep NaN (inf - inf).
template <typename T>
inline float chunk_max(const T* x, int64_t n) {
  __m256 m0 = _mm256_set1_ps(-kInf), m1 = m0, m2 = m0, m3 = m0;
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {
    m0 = _mm256_max_ps(m0, load8(x + i));
    m1 = _mm256_max_ps(m1, load8(x + i + kLanes));
    m2 = _mm256_max_ps(m2, load8(x + i + 2 * kLanes));
    m3 = _mm256_max_ps(m3, load8(x + i + 3 * kLanes));
  }
  for (; i < n; i += kLanes) m0 = _mm256_max_ps(m0, i + kLanes <= n ? load8(x + i) : load_tail(x + i, n - i, -kInf));
  return hmax(_mm256_max_ps(_mm256_max_ps(m0, m1), _mm256_max_ps(m2, m3)));
}

template <typename T>
inline bool has_nan(const T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(static_cast<float>(x[i]))) return true;
  }
  return false;
}

}  // namespace opd::cpu
