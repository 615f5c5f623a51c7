// CUDA row kernels: exact KL(p_S || p_T) per row in one pass over both logit rows, and its backward.
//
// Design note (Hopper, memory-bound; numerics in common.cuh):
// - Forward: grid (n, splits), 256 threads. Block (r, s) walks its columns of the student AND teacher rows
//   together: per step each thread issues U = 2 pack loads per row (16 B for the wider dtype) before using
//   them, i.e. 16 KiB in flight per block; per-thread state (ms, cs, rs, mt, ct, rt) floats + a in double (one
//   double add per pack: an fp32 per-pack sum, plus the exact TwoSum term of a column at the student's max),
//   one rescale per pack when either max grows, 2 exp per column pair; warp butterfly + shared-memory merge
//   (float64 workspace for the split path). Bytes moved:
//   n*v*(elt_s + elt_t) + ~20 B per row: the exact KL costs one read of each logit matrix. Few rows: the
//   row is cut into column ranges whose states a one-warp-per-row combine kernel merges (as logprob_kernels).
// - Backward: the same walk, elementwise from the global float64 (lse_s, lse_t, kl): reads both rows once, writes
//   the student gradient once (u = (zs - zt) - C with zs - zt as a TwoSum pair and C = kl + lse_s - lse_t split
//   hi + lo: ~6 extra fp32 ops per column); rows whose upstream gradient is 0 (masked rows) skip the reads and
//   write zeros.
// - Student and teacher may have different dtypes: packs hold VEC = 16 / max(elt) elements, so the wider row
//   uses 16-byte and the narrower 8-byte accesses. Rows whose pointers disagree on alignment are walked
//   scalar (correct, slower; does not happen for same-layout contiguous inputs).
// - Fused OPD epilogue (opd_full_fwd): the forward walk with one block per row (one launch, no split) and
//   A - coef * KL in thread 0; rows with mask == false are not read.
#include "common.cuh"

namespace opd_cuda {
namespace {

template <typename TS, typename TT>
constexpr int kl_vec() {
  return 16 / (sizeof(TS) > sizeof(TT) ? sizeof(TS) : sizeof(TT));
}

template <typename TS, typename TT>
struct KlVisitor {
  static constexpr int VEC = kl_vec<TS, TT>(), U = 2;
  const TS* srow;
  const TT* trow;
  float inv_t;
  KlState st;
  float bs[U][VEC], bt[U][VEC];

  __device__ __forceinline__ void load(int u, int64_t c) {
    load_pack<TS, VEC>(srow + c, bs[u]);
    load_pack<TT, VEC>(trow + c, bt[u]);
  }
  __device__ __forceinline__ void consume(int u, int64_t) { st.add(bs[u], bt[u], inv_t); }
  __device__ __forceinline__ void scalar(int64_t c) {
    const float xs[1] = {to_f32(srow[c])}, xt[1] = {to_f32(trow[c])};
    st.add(xs, xt, inv_t);
  }
};

template <typename TS>
__device__ __forceinline__ void finish_row(const TS* srow, int64_t row, int64_t v, const KlState& st,
                                           const int64_t* tokens, float inv_t, int64_t vocab_start,
                                           int64_t ignore_index, double* kl, double* lse_s, double* lse_t,
                                           float* logp_s) {
  kl[row] = st.kl();
  const float log_ds = log_mass(st.cs, st.rs);
  lse_s[row] = lse_out(st.ms, log_ds);
  lse_t[row] = lse_out(st.mt, log_mass(st.ct, st.rt));
  if (tokens != nullptr) {
    const TokenCol tc = token_col(tokens, row, v, vocab_start, ignore_index);
    logp_s[row] = tc.owned ? (to_f32(srow[tc.col]) * inv_t - st.ms) - log_ds : 0.f;
  }
}

template <typename TS, typename TT>
__global__ void __launch_bounds__(kThreads)
    kl_fwd_kernel(const TS* __restrict__ s, int64_t s_stride, const TT* __restrict__ t, int64_t t_stride, int64_t v,
                  const int64_t* __restrict__ tokens, float inv_t, int64_t vocab_start, int64_t ignore_index,
                  double* __restrict__ kl, double* __restrict__ lse_s, double* __restrict__ lse_t,
                  float* __restrict__ logp_s, double* __restrict__ workspace) {
  using Vis = KlVisitor<TS, TT>;
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y, splits = gridDim.y;
  const TS* sr = s + row * s_stride;
  const TT* tr = t + row * t_stride;
  Vis vis{sr, tr, inv_t};
  const int64_t mis = misalignment<Vis::VEC>(sr);
  walk_row(make_span<Vis::VEC>(v, mis, mis == misalignment<Vis::VEC>(tr), split, splits), vis);
  block_reduce(vis.st);
  if (threadIdx.x != 0) return;
  if (splits > 1) {
    vis.st.store(workspace + (row * splits + split) * kKlStateFloats);
  } else {
    finish_row(sr, row, v, vis.st, tokens, inv_t, vocab_start, ignore_index, kl, lse_s, lse_t, logp_s);
  }
}

template <typename TS>
__global__ void __launch_bounds__(32)
    kl_combine_kernel(const TS* __restrict__ s, int64_t s_stride, int64_t v, const int64_t* __restrict__ tokens,
                      float inv_t, int64_t vocab_start, int64_t ignore_index, double* __restrict__ kl,
                      double* __restrict__ lse_s, double* __restrict__ lse_t, float* __restrict__ logp_s,
                      const double* __restrict__ workspace, int splits) {
  const int64_t row = blockIdx.x;
  KlState st;
  for (int i = threadIdx.x; i < splits; i += 32) st.merge_from(workspace + (row * splits + i) * kKlStateFloats);
  warp_reduce(st);
  if (threadIdx.x == 0) {
    finish_row(s + row * s_stride, row, v, st, tokens, inv_t, vocab_start, ignore_index, kl, lse_s, lse_t, logp_s);
  }
}

// grad_s = inv_t * g * p_s * (log p_s - log p_t - kl) = inv_t * g * p_s * ((zs - zt) - C), C = kl + lse_s - lse_t
// formed in double and split hi + lo, zs - zt exact (TwoSum), log p_s = (zs - lse_hi) - lse_lo.
template <typename TS, typename TT>
struct KlGradVisitor {
  static constexpr int VEC = kl_vec<TS, TT>(), U = 2;
  const TS* srow;
  const TT* trow;
  TS* out;
  float inv_t, lse_hi, lse_lo, c_hi, c_lo, g_inv_t;
  bool active;  // g != 0: rows with a zero upstream gradient get exact zeros (even with NaN logits)
  float bs[U][VEC], bt[U][VEC];

  __device__ __forceinline__ float grad_at(float xs, float xt) const {
    const float zs = xs * inv_t, zt = xt * inv_t;
    const float p = fast_exp((zs - lse_hi) - lse_lo);
    const TwoDiff d = two_diff(zs, zt);
    // p == 0 (-inf logit) contributes 0, NaN stays NaN
    return p == 0.f ? 0.f : p * ((d.hi - c_hi) + (d.lo - c_lo)) * g_inv_t;
  }
  __device__ __forceinline__ void load(int u, int64_t c) {
    if (!active) return;
    load_pack<TS, VEC>(srow + c, bs[u]);
    load_pack<TT, VEC>(trow + c, bt[u]);
  }
  __device__ __forceinline__ void consume(int u, int64_t c) {
    float gr[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) gr[i] = active ? grad_at(bs[u][i], bt[u][i]) : 0.f;
    store_pack<TS, VEC>(out + c, gr);
  }
  __device__ __forceinline__ void scalar(int64_t c) {
    out[c] = from_f32<TS>(active ? grad_at(to_f32(srow[c]), to_f32(trow[c])) : 0.f);
  }
};

template <typename TS, typename TT>
__global__ void __launch_bounds__(kThreads)
    kl_bwd_kernel(const TS* s, int64_t s_stride, const TT* __restrict__ t, int64_t t_stride, int64_t v,
                  const float* __restrict__ grad_kl, const double* __restrict__ lse_s,
                  const double* __restrict__ lse_t, const double* __restrict__ kl, float inv_t,
                  TS* grad, int64_t grad_stride) {
  // s and grad may be the same rows (the in-place form): every thread reads its columns before it writes them.
  using Vis = KlGradVisitor<TS, TT>;
  const int64_t row = blockIdx.x;
  const TS* sr = s + row * s_stride;
  const TT* tr = t + row * t_stride;
  TS* gr = grad + row * grad_stride;
  const float g = grad_kl[row];
  const SplitLse l = split_lse(lse_s[row]);
  const SplitLse c = split_lse(kl[row] + (lse_s[row] - lse_t[row]));
  Vis vis{sr, tr, gr, inv_t, l.hi, l.lo, c.hi, c.lo, g * inv_t, g != 0.f};
  const int64_t mis = misalignment<Vis::VEC>(sr);
  const bool vec_ok = mis == misalignment<Vis::VEC>(tr) && mis == misalignment<Vis::VEC>(gr);
  walk_row(make_span<Vis::VEC>(v, mis, vec_ok, blockIdx.y, gridDim.y), vis);
}

// One block per row: exact KL, the student log-prob of the sampled token and the advantage update.
template <typename TS, typename TT>
__global__ void __launch_bounds__(kThreads)
    opd_full_kernel(const TS* __restrict__ s, int64_t s_stride, const TT* __restrict__ t, int64_t t_stride, int64_t v,
                    const int64_t* __restrict__ tokens, const float* __restrict__ advantages,
                    const bool* __restrict__ mask, double coef, float inv_t, float* __restrict__ adv_out,
                    float* __restrict__ kl_out, float* __restrict__ logp_out) {
  using Vis = KlVisitor<TS, TT>;
  const int64_t row = blockIdx.x;
  const bool keep = mask == nullptr || mask[row];
  const TS* sr = s + row * s_stride;
  const TT* tr = t + row * t_stride;
  Vis vis{sr, tr, inv_t};
  const int64_t mis = misalignment<Vis::VEC>(sr);
  walk_row(make_span<Vis::VEC>(keep ? v : 0, mis, mis == misalignment<Vis::VEC>(tr), 0, 1), vis);
  block_reduce(vis.st);
  if (threadIdx.x != 0) return;
  if (!keep) {  // masked out: not read, advantage kept
    adv_out[row] = advantages[row], kl_out[row] = 0.f, logp_out[row] = 0.f;
    return;
  }
  const KlState& st = vis.st;
  const double kl = st.kl();
  const int64_t tok = tokens[row];
  logp_out[row] = tok >= 0 && tok < v ? (to_f32(sr[tok]) * inv_t - st.ms) - log_mass(st.cs, st.rs) : 0.f;
  kl_out[row] = static_cast<float>(kl);
  adv_out[row] = static_cast<float>(advantages[row] - coef * kl);
}

// f(TS{}, TT{}) for the two element types.
template <class F>
cudaError_t with_dtypes(DType ds, DType dt, F&& f) {
  return with_dtype(ds, [&](auto s_tag) { return with_dtype(dt, [&](auto t_tag) { return f(s_tag, t_tag); }); });
}

}  // namespace

cudaError_t kl_fwd(Rows s, Rows t, int64_t n, int64_t v, const int64_t* tokens, float inv_t, int64_t vocab_start,
                   int64_t ignore_index, double* kl, double* lse_s, double* lse_t, float* logp_s,
                   const SplitPlan& plan, double* workspace, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(n), plan.splits);
  return with_dtypes(s.dtype, t.dtype, [&](auto s_tag, auto t_tag) {
    using TS = decltype(s_tag);
    using TT = decltype(t_tag);
    const TS* sp = static_cast<const TS*>(s.data);
    kl_fwd_kernel<TS, TT><<<grid, kThreads, 0, stream>>>(sp, s.row_stride, static_cast<const TT*>(t.data),
                                                         t.row_stride, v, tokens, inv_t, vocab_start, ignore_index,
                                                         kl, lse_s, lse_t, logp_s, workspace);
    if (plan.splits > 1) {
      kl_combine_kernel<TS><<<static_cast<unsigned>(n), 32, 0, stream>>>(
          sp, s.row_stride, v, tokens, inv_t, vocab_start, ignore_index, kl, lse_s, lse_t, logp_s, workspace,
          plan.splits);
    }
    return cudaGetLastError();
  });
}

cudaError_t kl_bwd(Rows s, Rows t, int64_t n, int64_t v, const float* grad_kl, const double* lse_s,
                   const double* lse_t, const double* kl, float inv_t, void* grad, int64_t grad_stride,
                   cudaStream_t stream) {
  if (n == 0 || v == 0) return cudaSuccess;
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  const int elem = s.dtype == DType::kFloat32 || t.dtype == DType::kFloat32 ? 4 : 2;
  const dim3 grid(static_cast<unsigned>(n), plan_forward(n, v, elem, 0, device).splits);
  return with_dtypes(s.dtype, t.dtype, [&](auto s_tag, auto t_tag) {
    using TS = decltype(s_tag);
    using TT = decltype(t_tag);
    kl_bwd_kernel<TS, TT><<<grid, kThreads, 0, stream>>>(static_cast<const TS*>(s.data), s.row_stride,
                                                         static_cast<const TT*>(t.data), t.row_stride, v, grad_kl,
                                                         lse_s, lse_t, kl, inv_t, static_cast<TS*>(grad),
                                                         grad_stride);
    return cudaGetLastError();
  });
}

cudaError_t opd_full_fwd(Rows s, Rows t, int64_t n, int64_t v, const int64_t* tokens, const float* advantages,
                         const bool* mask, double coef, float inv_t, float* adv_out, float* kl, float* logp,
                         cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return with_dtypes(s.dtype, t.dtype, [&](auto s_tag, auto t_tag) {
    using TS = decltype(s_tag);
    using TT = decltype(t_tag);
    opd_full_kernel<TS, TT><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        static_cast<const TS*>(s.data), s.row_stride, static_cast<const TT*>(t.data), t.row_stride, v, tokens,
        advantages, mask, coef, inv_t, adv_out, kl, logp);
    return cudaGetLastError();
  });
}

}  // namespace opd_cuda
