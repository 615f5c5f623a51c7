// Device-side building blocks of the CUDA row kernels: dtype conversion, 8/16-byte streaming packs, the row
// walk (scalar head up to the first aligned column, aligned packs, scalar rest), and the online-softmax states
// with their warp/block merges. Pure CUDA: no torch headers (see row_kernels.h).
//
// Numerics (identical to the Triton kernels, opd_kernels/triton/_common.py): z = x * inv_t (exact at T = 1),
// every exponential is __expf(z - m) = one multiply + one ex2.approx (MUFU.EX2); the log2(e) scaling rounds the
// small z - m, not z. State per row: m = running max of z (-inf while empty), mass d = sum exp(z - m) kept as
// count-at-max + rest (below); entropy b = sum exp(z - m) (z - m); KL a = sum exp(zs - ms) ((zs - zt) - (ms - mt)),
// zs - zt exact for near-equal rows. Log-sum-exps leave as float64 and come back split into fp32 hi + lo.
// Empty states (-inf max) are never rescaled, so -inf - -inf never makes a NaN, while a NaN logit reaches d
// (fmaxf ignores it in the max, exp2(NaN) does not) and so every output of its row.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "row_kernels.h"

namespace opd_cuda {

constexpr int kThreads = 256;  // 8 warps: with <= 128 registers per thread, >= 2 blocks share an SM
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// e^x as one multiply + MUFU.EX2 (ex2.approx.ftz: ~2 ulp; e^-inf = 0, e^NaN = NaN; below 2^-126 flushes to 0).
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }

// The exponent reference of a state: its max, or 0 while the state is empty.
__device__ __forceinline__ float safe_ref(float m) { return m == -INFINITY ? 0.f : m; }

// ---------------------------------------------------------------------------------------------------------
// Packs: N elements of T loaded / stored as one 8- or 16-byte access (the pointer must be aligned to it).
// Loads are streaming (evict-first, __ldcs): each logit is read once per kernel.
// ---------------------------------------------------------------------------------------------------------
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* p, float (&out)[N]) {
  static_assert(sizeof(Pack<T, N>) == 16 || sizeof(Pack<T, N>) == 8, "packs are 8 or 16 bytes");
  Pack<T, N> pk;
  if constexpr (sizeof(Pack<T, N>) == 16) {
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(p));
    memcpy(&pk, &raw, sizeof(raw));
  } else {
    const uint2 raw = __ldcs(reinterpret_cast<const uint2*>(p));
    memcpy(&pk, &raw, sizeof(raw));
  }
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_f32(pk.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const float (&in)[N]) {
  static_assert(sizeof(Pack<T, N>) == 16 || sizeof(Pack<T, N>) == 8, "packs are 8 or 16 bytes");
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_f32<T>(in[i]);
  if constexpr (sizeof(Pack<T, N>) == 16) {
    uint4 raw;
    memcpy(&raw, &pk, sizeof(raw));
    __stcs(reinterpret_cast<uint4*>(p), raw);
  } else {
    uint2 raw;
    memcpy(&raw, &pk, sizeof(raw));
    __stcs(reinterpret_cast<uint2*>(p), raw);
  }
}

// Element offset of p past the previous VEC-element boundary (p is element-aligned, as every tensor is).
template <int VEC, typename T>
__device__ __forceinline__ int64_t misalignment(const T* p) {
  return static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % VEC);
}

// ---------------------------------------------------------------------------------------------------------
// The row walk. Columns [0, head) are scalar (head < VEC brings every pointer of the row to a pack boundary),
// packs k cover [head + k VEC, head + (k+1) VEC), columns after the last whole pack are scalar again. With
// `splits` blocks per row, block s takes the head (s == 0), its share of the packs and of the scalar rest.
// When the row's pointers disagree on alignment (vec_ok false) every column is scalar.
// ---------------------------------------------------------------------------------------------------------
__host__ __device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

struct Span {
  int64_t head_end;              // scalar columns [0, head_end)
  int64_t first;                 // column of pack 0
  int64_t pack_begin, pack_end;  // packs of this block
  int64_t rest_begin, rest_end;  // scalar columns of this block after the packs
};

template <int VEC>
__device__ __forceinline__ Span make_span(int64_t v, int64_t mis, bool vec_ok, int s, int splits) {
  const int64_t head = vec_ok ? imin((VEC - mis) % VEC, v) : 0;
  const int64_t packs = vec_ok ? (v - head) / VEC : 0;
  const int64_t rest0 = head + packs * VEC;
  const int64_t per_split = (packs + splits - 1) / splits;
  const int64_t nrest = v - rest0;
  const int64_t rest_per_split = (nrest + splits - 1) / splits;
  Span sp;
  sp.head_end = s == 0 ? head : 0;
  sp.first = head;
  sp.pack_begin = imin(s * per_split, packs);
  sp.pack_end = imin(sp.pack_begin + per_split, packs);
  sp.rest_begin = rest0 + imin(s * rest_per_split, nrest);
  sp.rest_end = rest0 + imin((s + 1) * rest_per_split, nrest);
  return sp;
}

// Visitor: VEC, U (packs in flight per thread), load(u, col), consume(u, col), scalar(col). All U loads of a
// step are issued before any is consumed, so each thread keeps U * (8..16) bytes per row in flight.
template <class Visitor>
__device__ __forceinline__ void walk_row(const Span& sp, Visitor& vis) {
  constexpr int VEC = Visitor::VEC, U = Visitor::U;
  for (int64_t c = threadIdx.x; c < sp.head_end; c += kThreads) vis.scalar(c);
  for (int64_t k0 = sp.pack_begin; k0 < sp.pack_end; k0 += static_cast<int64_t>(U) * kThreads) {
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + static_cast<int64_t>(u) * kThreads + threadIdx.x;
      ok[u] = k < sp.pack_end;
      if (ok[u]) vis.load(u, sp.first + k * VEC);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t k = k0 + static_cast<int64_t>(u) * kThreads + threadIdx.x;
      if (ok[u]) vis.consume(u, sp.first + k * VEC);
    }
  }
  for (int64_t c = sp.rest_begin + threadIdx.x; c < sp.rest_end; c += kThreads) vis.scalar(c);
}

// ---------------------------------------------------------------------------------------------------------
// Online softmax states. The mass d = sum exp(z - m) is kept as c + r: c counts the logits equal to the max m
// (each adds exactly 1), r sums exp(z - m) over the others. For a confident row r << 1 keeps its relative
// precision (a running d ~ 1 would round every small term against 1), and log d = log c + log1p(r / c) gives
// log-probs and entropies near 0 to ~1 ulp. Empty states (m = -inf) have c = 0 and r = 0 (or NaN after NaN
// logits, which must survive every merge).
// ---------------------------------------------------------------------------------------------------------
__device__ __forceinline__ float log_mass(float c, float r) { return c > 0.f ? logf(c) + log1pf(r / c) : logf(r); }

// The value a logit must equal to count at the max: the max itself, or NaN (equal to nothing) while the state
// is empty (m = -inf) or its max is +inf (an inf logit then lands in the rest as exp(inf - inf) = NaN, so the
// row is NaN as the contract says).
__device__ __forceinline__ float top_value(float m) { return isinf(m) ? NAN : m; }

// One row over z = x * inv_t; ENT adds the entropy accumulator b = sum exp(z - m) (z - m).
template <bool ENT>
struct LseState {
  using Storage = float;
  static constexpr int kSize = kLogprobStateFloats;
  float m = -INFINITY, c = 0.f, r = 0.f, b = 0.f;

  template <int N>
  __device__ __forceinline__ void add(const float (&z)[N]) {
    float mx = z[0];
#pragma unroll
    for (int i = 1; i < N; ++i) mx = fmaxf(mx, z[i]);
    if (mx > m) move_to(mx);  // one rescale per pack, and only when the max grows
    const float ref = safe_ref(m), top = top_value(m);
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float e = fast_exp(z[i] - ref);
      const bool at_max = z[i] == top;
      c += at_max ? 1.f : 0.f;
      r += at_max ? 0.f : e;
      if (ENT) b += e == 0.f ? 0.f : e * (z[i] - ref);
    }
  }

  __device__ __forceinline__ void move_to(float m_new) {  // m_new > m: everything so far falls below the max
    if (m != -INFINITY) {
      const float alpha = fast_exp(m - m_new), d = c + r;
      if (ENT) b = alpha * (b + (m - m_new) * d);
      r = alpha * d;
    }
    c = 0.f;
    m = m_new;
  }

  __device__ __forceinline__ void merge(float om, float oc, float o_r, float ob) {
    if (om > m) {
      const float tm = m, tc = c, tr = r, tb = b;
      m = om, c = oc, r = o_r, b = ob;
      om = tm, oc = tc, o_r = tr, ob = tb;
    }
    if (om == m) {  // same max (or both empty): counts add up
      c += oc, r += o_r;
      if (ENT) b += ob;
      return;
    }
    const float sc = om == -INFINITY ? 0.f : fast_exp(om - m), od = oc + o_r;
    r += od * sc;  // a NaN od survives (NaN * 0 = NaN)
    if (ENT && sc != 0.f) b += sc * (ob + (om - m) * od);
  }

  __device__ __forceinline__ void shfl_merge(int lane_mask) {
    const float om = __shfl_xor_sync(kFullMask, m, lane_mask);
    const float oc = __shfl_xor_sync(kFullMask, c, lane_mask);
    const float o_r = __shfl_xor_sync(kFullMask, r, lane_mask);
    const float ob = ENT ? __shfl_xor_sync(kFullMask, b, lane_mask) : 0.f;
    merge(om, oc, o_r, ob);
  }

  __device__ __forceinline__ void store(float* p) const { p[0] = m, p[1] = c, p[2] = r, p[3] = b; }
  __device__ __forceinline__ void merge_from(const float* p) { merge(p[0], p[1], p[2], p[3]); }
  __device__ __forceinline__ float log_d() const { return log_mass(c, r); }
};

// a - b as an exact fp32 pair hi + lo (Knuth's TwoSum of a and -b); lo = 0 when hi is infinite (a -inf teacher
// logit under student mass: the KL is +inf, not NaN).
struct TwoDiff {
  float hi, lo;
};
__device__ __forceinline__ TwoDiff two_diff(float a, float b) {
  const float hi = a - b, bb = hi - a;
  const float lo = (a - (hi - bb)) + (-b - bb);
  return TwoDiff{hi, isinf(hi) ? 0.f : lo};
}

// Two rows (student s, teacher t) and the KL accumulator a = sum exp(zs - ms) ((zs - zt) - (ms - mt)) relative
// to the current references (ms, mt), in double: where the student is confident and the teacher is not, KL ~ |z|
// and the backward's (zs - zt) - (KL + lse_s - lse_t) is a small difference of two such numbers, so a (and the
// KL the forward returns) must not carry an fp32 rounding of |z|. The columns at the student's max (weight
// exactly 1) add their term exactly (TwoSum); the others add an fp32 per-pack sum, once per pack in double.
struct KlState {
  using Storage = double;
  static constexpr int kSize = kKlStateFloats;
  float ms = -INFINITY, cs = 0.f, rs = 0.f, mt = -INFINITY, ct = 0.f, rt = 0.f;
  double a = 0.0;

  template <int N>
  __device__ __forceinline__ void add(const float (&xs)[N], const float (&xt)[N], float inv_t) {
    float ys[N], yt[N];  // z of the student / teacher
    float mxs = -INFINITY, mxt = -INFINITY;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      ys[i] = xs[i] * inv_t, yt[i] = xt[i] * inv_t;
      mxs = fmaxf(mxs, ys[i]), mxt = fmaxf(mxt, yt[i]);
    }
    if (mxs > ms || mxt > mt) move_to(fmaxf(ms, mxs), fmaxf(mt, mxt));
    const float ref_s = safe_ref(ms), ref_t = safe_ref(mt), ref_diff = ref_s - ref_t;
    const float top_s = top_value(ms), top_t = top_value(mt);
    float rest = 0.f, top_hi = 0.f, top_lo = 0.f, tops = 0.f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float es = fast_exp(ys[i] - ref_s), et = fast_exp(yt[i] - ref_t);
      const bool s_max = ys[i] == top_s, t_max = yt[i] == top_t;
      const TwoDiff d = two_diff(ys[i], yt[i]);
      tops += s_max ? 1.f : 0.f;
      rs += s_max ? 0.f : es;
      ct += t_max ? 1.f : 0.f;
      rt += t_max ? 0.f : et;
      top_hi += s_max ? d.hi : 0.f;
      top_lo += s_max ? d.lo : 0.f;
      rest += s_max || es == 0.f ? 0.f : es * (d.hi - ref_diff);
    }
    cs += tops;
    a += static_cast<double>(rest);
    if (tops > 0.f) {
      a += (static_cast<double>(top_hi) + top_lo) - tops * (static_cast<double>(ref_s) - ref_t);
    }
  }

  __device__ __forceinline__ void move_to(float ms_new, float mt_new) {  // ms_new >= ms, mt_new >= mt
    const float ss = ms == -INFINITY ? 0.f : fast_exp(ms - ms_new);
    const float st = mt == -INFINITY ? 0.f : fast_exp(mt - mt_new);
    // a's terms are relative to (ms, mt): moving the references shifts every term by the same amount
    const double shift = (static_cast<double>(safe_ref(ms)) - safe_ref(ms_new)) -
                         (static_cast<double>(safe_ref(mt)) - safe_ref(mt_new));
    if (ms != -INFINITY) a = static_cast<double>(ss) * (a + shift * static_cast<double>(cs + rs));
    if (ms_new > ms) {
      if (ms != -INFINITY) rs = ss * (cs + rs);
      cs = 0.f;
    }
    if (mt_new > mt) {
      if (mt != -INFINITY) rt = st * (ct + rt);
      ct = 0.f;
    }
    ms = ms_new, mt = mt_new;
  }

  __device__ __forceinline__ void merge(KlState o) {
    const float ms_new = fmaxf(ms, o.ms), mt_new = fmaxf(mt, o.mt);
    move_to(ms_new, mt_new);
    o.move_to(ms_new, mt_new);
    cs += o.cs, rs += o.rs, ct += o.ct, rt += o.rt, a += o.a;
  }

  __device__ __forceinline__ void shfl_merge(int lane_mask) {
    KlState o;
    o.ms = __shfl_xor_sync(kFullMask, ms, lane_mask);
    o.cs = __shfl_xor_sync(kFullMask, cs, lane_mask);
    o.rs = __shfl_xor_sync(kFullMask, rs, lane_mask);
    o.mt = __shfl_xor_sync(kFullMask, mt, lane_mask);
    o.ct = __shfl_xor_sync(kFullMask, ct, lane_mask);
    o.rt = __shfl_xor_sync(kFullMask, rt, lane_mask);
    o.a = __shfl_xor_sync(kFullMask, a, lane_mask);
    merge(o);
  }

  __device__ __forceinline__ void store(double* p) const {
    p[0] = ms, p[1] = cs, p[2] = rs, p[3] = mt, p[4] = ct, p[5] = rt, p[6] = a;
  }
  __device__ __forceinline__ void merge_from(const double* p) {
    KlState o;
    o.ms = static_cast<float>(p[0]), o.cs = static_cast<float>(p[1]), o.rs = static_cast<float>(p[2]);
    o.mt = static_cast<float>(p[3]), o.ct = static_cast<float>(p[4]), o.rt = static_cast<float>(p[5]);
    o.a = p[6];
    merge(o);
  }
  // KL = a / ds + log(dt / ds) in double, the log as log1p((dt - ds) / ds), dt - ds = (ct - cs) + (rt - rs):
  // exact for identical rows, precise for near-identical ones.
  __device__ __forceinline__ double kl() const {
    const double ds = static_cast<double>(cs) + rs;
    return a / ds + log1p((static_cast<double>(ct - cs) + (static_cast<double>(rt) - rs)) / ds);
  }
};

// The float64 log-sum-exp of the contract: m + log d summed in double (an fp32 lse rounds to eps * |lse|).
__device__ __forceinline__ double lse_out(float m, float log_d) {
  return static_cast<double>(m) + static_cast<double>(log_d);
}

// A float64 lse as fp32 hi + lo: log p = (z - hi) - lo, whose first difference is exact near the row max.
struct SplitLse {
  float hi, lo;
};
__device__ __forceinline__ SplitLse split_lse(double lse) {
  const float hi = static_cast<float>(lse);
  return SplitLse{hi, static_cast<float>(lse - static_cast<double>(hi))};
}

// Butterfly over the 32 lanes: every lane ends with the warp's merged state.
template <class State>
__device__ __forceinline__ void warp_reduce(State& st) {
#pragma unroll
  for (int lane_mask = 16; lane_mask > 0; lane_mask >>= 1) st.shfl_merge(lane_mask);
}

// The block's merged state in thread 0 (other threads: unspecified). Blocks have exactly kThreads threads.
template <class State>
__device__ __forceinline__ void block_reduce(State& st) {
  __shared__ typename State::Storage smem[kWarps][State::kSize];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  warp_reduce(st);
  if (lane == 0) st.store(smem[warp]);
  __syncthreads();
  if (warp == 0) {
    State merged;
    if (lane < kWarps) merged.merge_from(smem[lane]);
    warp_reduce(merged);
    st = merged;
  }
}

// The sampled token of a row: (valid = not ignored, owned = valid and inside this shard, its column).
struct TokenCol {
  bool valid, owned;
  int64_t col;
};
__device__ __forceinline__ TokenCol token_col(const int64_t* tokens, int64_t row, int64_t v, int64_t vocab_start,
                                              int64_t ignore_index) {
  const int64_t tok = tokens[row];
  TokenCol t;
  t.valid = tok != ignore_index;
  t.col = tok - vocab_start;
  t.owned = t.valid && t.col >= 0 && t.col < v;
  return t;
}

// Host: call f(T{}) with the element type of `dtype`.
template <class F>
cudaError_t with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace opd_cuda
