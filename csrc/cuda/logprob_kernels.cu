// CUDA row kernels: log p(token | x / T) (+ entropy) per row, and the backward from the saved log-sum-exp.
//
// Design note (Hopper, memory-bound; numerics in common.cuh):
// - Forward: grid (n, splits), 256 threads. Block (r, s) walks its columns of row r once: each thread issues
//   U = 4 streaming 16-byte loads (8 bf16/fp16 or 4 fp32 logits each) before using them, so a block keeps
//   16 KiB in flight and 3-4 resident blocks per SM keep ~50-64 KiB per SM in flight (HBM3 needs ~20 KiB per
//   SM at ~3 TB/s). Per-thread online softmax state (4 floats), one rescale per pack when the max grows,
//   then a warp butterfly and a shared-memory merge of the 8 warps. Bytes moved: n*v*elt + ~16 B per row.
//   splits = 1 when there are >= 4 rows per SM; otherwise each row is cut into up to 64 column ranges, the
//   blocks write their states to a workspace and a one-warp-per-row combine kernel finishes the rows.
//   Ignored rows (token == ignore_index: padding, LM-shift gap rows) are not read (lse written as 0).
// - Fused OPD epilogue (opd_sampled_fwd): the same walk with one block per row (one launch, no split), then
//   thread 0 forms d = logp - teacher_logp, k1/k2/k3 (in double, expm1 for k3) and A - coef * k; rows with
//   mask == false are not read.
// - Backward: the same walk (grid (n, splits), 256 threads), elementwise once lse/entropy are known: reads x
//   once, writes grad once with 16-byte streaming stores; ignored rows skip the read and write zeros.
// - Alignment: any row stride and base address; a scalar head brings the row to a 16-byte boundary, the rest
//   after the last whole pack is scalar; when x and grad rows disagree on alignment the row is all scalar.
// - int64 offsets everywhere (row * row_stride exceeds 2^31 at T*V).
#include <atomic>

#include "common.cuh"

namespace opd_cuda {
namespace {

template <typename T, bool ENT>
struct LseVisitor {
  static constexpr int VEC = 16 / sizeof(T), U = 4;
  const T* row;
  float inv_t;
  LseState<ENT> st;
  float buf[U][VEC];

  __device__ __forceinline__ void load(int u, int64_t c) { load_pack<T, VEC>(row + c, buf[u]); }
  __device__ __forceinline__ void consume(int u, int64_t) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) buf[u][i] *= inv_t;
    st.add(buf[u]);
  }
  __device__ __forceinline__ void scalar(int64_t c) {
    const float y[1] = {to_f32(row[c]) * inv_t};
    st.add(y);
  }
};

template <typename T, bool ENT>
__device__ __forceinline__ void finish_row(const T* xr, int64_t row, int64_t v, const LseState<ENT>& st,
                                           const int64_t* tokens, float inv_t, int64_t vocab_start,
                                           int64_t ignore_index, float* logp, float* entropy, double* lse) {
  const float log_d = st.log_d();
  const TokenCol tc = token_col(tokens, row, v, vocab_start, ignore_index);
  lse[row] = tc.valid ? lse_out(st.m, log_d) : 0.0;  // ignored rows are not read: their lse is unspecified
  logp[row] = tc.owned ? (to_f32(xr[tc.col]) * inv_t - st.m) - log_d : 0.f;  // z - m: exact near the max
  if (ENT) entropy[row] = tc.valid ? log_d - st.b / (st.c + st.r) : 0.f;
}

template <typename T, bool ENT>
__global__ void __launch_bounds__(kThreads)
    logprob_fwd_kernel(const T* __restrict__ x, int64_t row_stride, int64_t v, const int64_t* __restrict__ tokens,
                       float inv_t, int64_t vocab_start, int64_t ignore_index, float* __restrict__ logp,
                       float* __restrict__ entropy, double* __restrict__ lse, float* __restrict__ workspace) {
  using Vis = LseVisitor<T, ENT>;
  const int64_t row = blockIdx.x;
  const int s = blockIdx.y, splits = gridDim.y;
  const T* xr = x + row * row_stride;
  Vis vis{xr, inv_t};
  const int64_t cols = tokens[row] != ignore_index ? v : 0;  // ignored rows (padding, gap rows) are not read
  walk_row(make_span<Vis::VEC>(cols, misalignment<Vis::VEC>(xr), true, s, splits), vis);
  block_reduce(vis.st);
  if (threadIdx.x != 0) return;
  if (splits > 1) {
    vis.st.store(workspace + (row * splits + s) * kLogprobStateFloats);
  } else {
    finish_row(xr, row, v, vis.st, tokens, inv_t, vocab_start, ignore_index, logp, entropy, lse);
  }
}

// One warp per row: merge the row's `splits` partial states and finish the row.
template <typename T, bool ENT>
__global__ void __launch_bounds__(32)
    logprob_combine_kernel(const T* __restrict__ x, int64_t row_stride, int64_t v, const int64_t* __restrict__ tokens,
                           float inv_t, int64_t vocab_start, int64_t ignore_index, float* __restrict__ logp,
                           float* __restrict__ entropy, double* __restrict__ lse,
                           const float* __restrict__ workspace, int splits) {
  const int64_t row = blockIdx.x;
  LseState<ENT> st;
  for (int i = threadIdx.x; i < splits; i += 32) st.merge_from(workspace + (row * splits + i) * kLogprobStateFloats);
  warp_reduce(st);
  if (threadIdx.x == 0) {
    finish_row(x + row * row_stride, row, v, st, tokens, inv_t, vocab_start, ignore_index, logp, entropy, lse);
  }
}

// grad = inv_t * (g * (onehot - p) - g_H * p * (log p + H)), log p = (z - lse_hi) - lse_lo; zeros on ignored rows.
template <typename T, bool ENT>
struct LogprobGradVisitor {
  static constexpr int VEC = 16 / sizeof(T), U = 4;
  const T* row;
  T* out;
  float inv_t, lse_hi, lse_lo, g, g_h, ent;
  int64_t tok_col;  // column of the sampled token in this shard (or outside [0, v))
  bool valid;
  float buf[U][VEC];

  __device__ __forceinline__ float grad_at(float x, int64_t c) const {
    const float logp = (x * inv_t - lse_hi) - lse_lo;
    const float p = fast_exp(logp);
    float gr = g * ((c == tok_col ? 1.f : 0.f) - p);  // onehot - p in fp32: 1 - p of the target stays exact
    if (ENT) gr -= g_h * (p == 0.f ? 0.f : p * (logp + ent));
    return valid ? gr * inv_t : 0.f;
  }
  __device__ __forceinline__ void load(int u, int64_t c) {
    if (valid) load_pack<T, VEC>(row + c, buf[u]);
  }
  __device__ __forceinline__ void consume(int u, int64_t c) {
    float gr[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) gr[i] = valid ? grad_at(buf[u][i], c + i) : 0.f;
    store_pack<T, VEC>(out + c, gr);
  }
  __device__ __forceinline__ void scalar(int64_t c) { out[c] = from_f32<T>(valid ? grad_at(to_f32(row[c]), c) : 0.f); }
};

template <typename T, bool ENT>
__global__ void __launch_bounds__(kThreads)
    logprob_bwd_kernel(const T* x, int64_t row_stride, int64_t v, const int64_t* __restrict__ tokens,
                       const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy,
                       const double* __restrict__ lse, const float* __restrict__ entropy, float inv_t,
                       int64_t vocab_start, int64_t ignore_index, T* grad, int64_t grad_stride) {
  // x and grad may be the same rows (the in-place form: no __restrict__ on them): every thread reads its
  // columns before it writes them, and the token's column is formed from the value it loaded.
  using Vis = LogprobGradVisitor<T, ENT>;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * row_stride;
  T* gr = grad + row * grad_stride;
  const TokenCol tc = token_col(tokens, row, v, vocab_start, ignore_index);
  const SplitLse l = split_lse(lse[row]);
  Vis vis{xr, gr, inv_t, l.hi, l.lo, grad_logp[row], ENT ? grad_entropy[row] : 0.f,
          ENT ? entropy[row] : 0.f, tc.owned ? tc.col : -1, tc.valid};
  const int64_t mis = misalignment<Vis::VEC>(xr);
  walk_row(make_span<Vis::VEC>(v, mis, mis == misalignment<Vis::VEC>(gr), blockIdx.y, gridDim.y), vis);
}

// One block per row: the student log-prob of the sampled token, the k1/k2/k3 term and the advantage update.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    opd_sampled_kernel(const T* __restrict__ x, int64_t row_stride, int64_t v, const int64_t* __restrict__ tokens,
                       const float* __restrict__ advantages, const float* __restrict__ teacher_logp,
                       const bool* __restrict__ mask, double coef, float inv_t, int kl_kind,
                       float* __restrict__ adv_out, float* __restrict__ kl_out, float* __restrict__ logp_out) {
  using Vis = LseVisitor<T, false>;
  const int64_t row = blockIdx.x;
  const bool keep = mask == nullptr || mask[row];
  const T* xr = x + row * row_stride;
  Vis vis{xr, inv_t};
  walk_row(make_span<Vis::VEC>(keep ? v : 0, misalignment<Vis::VEC>(xr), true, 0, 1), vis);
  block_reduce(vis.st);
  if (threadIdx.x != 0) return;
  if (!keep) {  // masked out: not read, advantage kept
    adv_out[row] = advantages[row], kl_out[row] = 0.f, logp_out[row] = 0.f;
    return;
  }
  const int64_t tok = tokens[row];
  const float lp = tok >= 0 && tok < v ? (to_f32(xr[tok]) * inv_t - vis.st.m) - vis.st.log_d() : 0.f;
  const double d = static_cast<double>(lp) - teacher_logp[row];
  const double k = kl_kind == 1 ? d : kl_kind == 2 ? 0.5 * d * d : expm1(-d) + d;
  logp_out[row] = lp;
  kl_out[row] = static_cast<float>(k);
  adv_out[row] = static_cast<float>(advantages[row] - coef * k);
}

}  // namespace

SplitPlan plan_forward(int64_t n, int64_t v, int elem_bytes, int state_elems, int device) {
  static std::atomic<int> sm_cache[64];  // SM count per device, queried once
  const bool cached = device >= 0 && device < 64;
  int sms = cached ? sm_cache[device].load(std::memory_order_relaxed) : 0;
  if (sms <= 0) {
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 132;
    if (cached) sm_cache[device].store(sms, std::memory_order_relaxed);
  }
  const int64_t target = 4LL * sms;  // resident blocks wanted: ~4 per SM
  int splits = 1;
  if (n > 0 && n < target) {
    const int64_t cols_per_step = static_cast<int64_t>(kThreads) * 64 / elem_bytes;  // 64 B per thread per step
    const int64_t most = std::max<int64_t>(1, v / cols_per_step);                      // >= one full step each
    splits = static_cast<int>(std::min<int64_t>(std::min<int64_t>((target + n - 1) / n, most), 64));
  }
  return SplitPlan{splits, splits > 1 ? n * splits * state_elems : 0};
}

cudaError_t logprob_fwd(Rows x, int64_t n, int64_t v, const int64_t* tokens, float inv_t, int64_t vocab_start,
                        int64_t ignore_index, float* logp, float* entropy, double* lse, const SplitPlan& plan,
                        float* workspace, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(n), plan.splits);
  return with_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* data = static_cast<const T*>(x.data);
    auto launch = [&](auto fwd, auto combine) {
      fwd<<<grid, kThreads, 0, stream>>>(data, x.row_stride, v, tokens, inv_t, vocab_start, ignore_index, logp,
                                         entropy, lse, workspace);
      if (plan.splits > 1) {
        combine<<<static_cast<unsigned>(n), 32, 0, stream>>>(data, x.row_stride, v, tokens, inv_t, vocab_start,
                                                             ignore_index, logp, entropy, lse, workspace, plan.splits);
      }
      return cudaGetLastError();
    };
    return entropy != nullptr ? launch(logprob_fwd_kernel<T, true>, logprob_combine_kernel<T, true>)
                              : launch(logprob_fwd_kernel<T, false>, logprob_combine_kernel<T, false>);
  });
}

cudaError_t logprob_bwd(Rows x, int64_t n, int64_t v, const int64_t* tokens, const float* grad_logp,
                        const float* grad_entropy, const double* lse, const float* entropy, float inv_t,
                        int64_t vocab_start, int64_t ignore_index, void* grad, int64_t grad_stride,
                        cudaStream_t stream) {
  if (n == 0 || v == 0) return cudaSuccess;
  int device = 0;
  if (cudaError_t err = cudaGetDevice(&device); err != cudaSuccess) return err;
  const int elem = x.dtype == DType::kFloat32 ? 4 : 2;
  const dim3 grid(static_cast<unsigned>(n), plan_forward(n, v, elem, 0, device).splits);
  return with_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = grad_entropy != nullptr ? logprob_bwd_kernel<T, true> : logprob_bwd_kernel<T, false>;
    kernel<<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x.data), x.row_stride, v, tokens, grad_logp,
                                          grad_entropy, lse, entropy, inv_t, vocab_start, ignore_index,
                                          static_cast<T*>(grad), grad_stride);
    return cudaGetLastError();
  });
}

cudaError_t opd_sampled_fwd(Rows x, int64_t n, int64_t v, const int64_t* tokens, const float* advantages,
                            const float* teacher_logp, const bool* mask, double coef, float inv_t, int kl_kind,
                            float* adv_out, float* kl, float* logp, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return with_dtype(x.dtype, [&](auto tag) {
    using T = decltype(tag);
    opd_sampled_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
        static_cast<const T*>(x.data), x.row_stride, v, tokens, advantages, teacher_logp, mask, coef, inv_t,
        kl_kind, adv_out, kl, logp);
    return cudaGetLastError();
  });
}

}  // namespace opd_cuda
