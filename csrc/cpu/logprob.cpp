// CPU row kernels: logprob_fwd, logprob_bwd and the fused sampled-token OPD epilogue (opd_sampled_fwd).
// Contract: opd_kernels/ops/README.md. Rows run in parallel (at::parallel_for: PyTorch's OpenMP pool, so
// torch.set_num_threads applies); each row streams its logits once (softmax.h). Offsets are int64.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/alloc.h"
#include "cpu/softmax.h"

namespace opd::cpu {
namespace {

struct RowResult {
  float logp, entropy;
  double lse;
};

template <typename T, bool kEntropy>
inline RowResult logprob_row(const T* row, int64_t V, float inv_t, int64_t col) {
  const RowStats st = row_stats<T, kEntropy>(row, V, inv_t);
  const double log_s = std::log(st.s);
  const double logp = col >= 0 ? (double(static_cast<float>(row[col]) * inv_t) - st.m) - log_s : 0.0;
  const double entropy = kEntropy ? log_s - st.b / st.s : 0.0;
  return {float(logp), float(entropy), st.m + log_s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_fwd(const at::Tensor& x, const at::Tensor& tokens,
                                                           double inv_temperature, int64_t vocab_start,
                                                           int64_t ignore_index, bool with_entropy) {
  check_rows(x, "logits");
  check_inv_temperature(inv_temperature);
  const int64_t N = x.size(0), V = x.size(1), stride = x.stride(0);
  check_row_vector(tokens, N, at::kLong, x, "tokens");
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, opts), lse = at::empty({N}, opts.dtype(at::kDouble));
  at::Tensor entropy = at::empty({with_entropy ? N : 0}, opts);
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  float *lp = logp.data_ptr<float>(), *en = entropy.data_ptr<float>();
  double* ls = lse.data_ptr<double>();
  const float inv_t = float(inv_temperature);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* base = x.const_data_ptr<T>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (tok[r] == ignore_index) {  // nothing to read: logp = entropy = 0 (lse unused)
          lp[r] = 0.f;
          ls[r] = 0.0;
          if (with_entropy) en[r] = 0.f;
          continue;
        }
        const T* row = base + r * stride;
        const int64_t col = owned_column(tok[r], vocab_start, V, ignore_index);
        const RowResult res = with_entropy ? logprob_row<T, true>(row, V, inv_t, col)
                                           : logprob_row<T, false>(row, V, inv_t, col);
        lp[r] = res.logp;
        ls[r] = res.lse;
        if (with_entropy) en[r] = res.entropy;
      }
    });
  });
  return {logp, entropy, lse};
}

// grad = inv_t (g onehot - p (g + ge (log p + H))), p = e^(z - lse): one read of the row, one write.
// lse is double, split into hi + lo: z - hi is exact near the row max (Sterbenz), so p ~ 1 keeps its accuracy
// (an fp32 lse alone would carry an error of eps |lse| into 1 - p of a confident token).
// out may be x itself (the in-place kernels): every element is read before it is written, and the token's logit
// is read before the sweep overwrites it.
template <typename T>
inline void logprob_bwd_row(const T* x, T* out, int64_t V, float inv_t, double lse, float g, float ge, float H,
                            int64_t col) {
  const float hi = float(lse), lo = float(lse - hi);
  const float x_col = col >= 0 ? static_cast<float>(x[col]) : 0.f;
  const __m256 vi = _mm256_set1_ps(inv_t), vl = _mm256_set1_ps(-hi), vlo = _mm256_set1_ps(lo);
  const __m256 vg = _mm256_set1_ps(g);
  const __m256 vge = _mm256_set1_ps(ge), vh = _mm256_set1_ps(H), scale = _mm256_set1_ps(-inv_t);
  for (int64_t i = 0; i < V; i += kLanes) {
    const bool full = i + kLanes <= V;
    const __m256 d =
        _mm256_sub_ps(scaled_minus(full ? load8(x + i) : load_tail(x + i, V - i, -kInf), vi, vl), vlo);
    const __m256 p = exp_neg(d);
    const __m256 c = _mm256_fmadd_ps(vge, _mm256_add_ps(d, vh), vg);
    const __m256 grad = _mm256_mul_ps(scale, where_nonzero(p, _mm256_mul_ps(p, c)));
    if (full) {
      store8(out + i, grad);
    } else {
      store_tail(out + i, grad, V - i);
    }
  }
  if (col >= 0) {  // the token's column, recomputed with the one-hot term: g (1 - p) = -g expm1(log p)
    const float d = (x_col * inv_t - hi) - lo, p = std::exp(d);
    const float entropy_term = p != 0.f ? ge * p * (d + H) : 0.f;
    out[col] = static_cast<T>(inv_t * (-g * std::expm1(d) - entropy_term));
  }
}

// The backward's checks and row loop, rows written to out (its own row stride): a fresh [N, V] tensor
// (logprob_bwd) or the logits' rows themselves (logprob_bwd_inplace; see logprob_bwd_row on aliasing).
static void logprob_bwd_into(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& grad_logp,
                             const std::optional<at::Tensor>& grad_entropy, const at::Tensor& lse,
                             const at::Tensor& entropy, double inv_temperature, int64_t vocab_start,
                             int64_t ignore_index, at::Tensor& out) {
  check_rows(x, "logits");
  check_inv_temperature(inv_temperature);
  const int64_t N = x.size(0), V = x.size(1), stride = x.stride(0), out_stride = out.stride(0);
  check_row_vector(tokens, N, at::kLong, x, "tokens");
  check_row_vector(grad_logp, N, at::kFloat, x, "grad_logp");
  check_row_vector(lse, N, at::kDouble, x, "lse");
  if (grad_entropy) {
    check_row_vector(*grad_entropy, N, at::kFloat, x, "grad_entropy");
    check_row_vector(entropy, N, at::kFloat, x, "entropy");
  }
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const float* g = grad_logp.const_data_ptr<float>();
  const double* ls = lse.const_data_ptr<double>();
  const float* ge = grad_entropy ? grad_entropy->const_data_ptr<float>() : nullptr;
  const float* en = grad_entropy ? entropy.const_data_ptr<float>() : nullptr;
  const float inv_t = float(inv_temperature);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* base = x.const_data_ptr<T>();
    T* out_base = out.data_ptr<T>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* out_row = out_base + r * out_stride;
        if (tok[r] == ignore_index) {
          std::memset(static_cast<void*>(out_row), 0, sizeof(T) * V);  // +0 in every float format
          continue;
        }
        logprob_bwd_row(base + r * stride, out_row, V, inv_t, ls[r], g[r], ge ? ge[r] : 0.f, en ? en[r] : 0.f,
                        owned_column(tok[r], vocab_start, V, ignore_index));
      }
    });
  });
}

at::Tensor logprob_bwd(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& grad_logp,
                       const std::optional<at::Tensor>& grad_entropy, const at::Tensor& lse,
                       const at::Tensor& entropy, double inv_temperature, int64_t vocab_start, int64_t ignore_index) {
  check_rows(x, "logits");
  at::Tensor grad = empty_grad(x.size(0), x.size(1), x.options());
  logprob_bwd_into(x, tokens, grad_logp, grad_entropy, lse, entropy, inv_temperature, vocab_start, ignore_index,
                   grad);
  return grad;
}

// logprob_fwd, then the row overwritten with grad_logp[r] * inv_t (onehot - p) from the shard's own lse: the row
// streams from memory once and is re-read from cache (a row of V = 151936 fp32 is 600 KB; L2 holds it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> logprob_fwd_inplace(at::Tensor x, const at::Tensor& tokens,
                                                                   const std::optional<at::Tensor>& grad_logp,
                                                                   double inv_temperature, int64_t vocab_start,
                                                                   int64_t ignore_index, bool with_entropy) {
  check_rows(x, "logits");
  check_writable_rows(x, "logits");
  check_inv_temperature(inv_temperature);
  const int64_t N = x.size(0), V = x.size(1), stride = x.stride(0);
  check_row_vector(tokens, N, at::kLong, x, "tokens");
  if (grad_logp) check_row_vector(*grad_logp, N, at::kFloat, x, "grad_logp");
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, opts), lse = at::empty({N}, opts.dtype(at::kDouble));
  at::Tensor entropy = at::empty({with_entropy ? N : 0}, opts);
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const float* g = grad_logp ? grad_logp->const_data_ptr<float>() : nullptr;
  float *lp = logp.data_ptr<float>(), *en = entropy.data_ptr<float>();
  double* ls = lse.data_ptr<double>();
  const float inv_t = float(inv_temperature);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* base = x.data_ptr<T>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* row = base + r * stride;
        if (tok[r] == ignore_index) {  // not read; zero gradient
          lp[r] = 0.f;
          ls[r] = 0.0;
          if (with_entropy) en[r] = 0.f;
          std::memset(static_cast<void*>(row), 0, sizeof(T) * V);
          continue;
        }
        const int64_t col = owned_column(tok[r], vocab_start, V, ignore_index);
        const RowResult res = with_entropy ? logprob_row<T, true>(row, V, inv_t, col)
                                           : logprob_row<T, false>(row, V, inv_t, col);
        lp[r] = res.logp;
        ls[r] = res.lse;
        if (with_entropy) en[r] = res.entropy;
        logprob_bwd_row(row, row, V, inv_t, res.lse, g ? g[r] : 1.f, 0.f, 0.f, col);
      }
    });
  });
  return {logp, entropy, lse};
}

// logprob_bwd written into the logits' own rows (row stride kept): nothing of size [N, V] is allocated.
void logprob_bwd_inplace(at::Tensor x, const at::Tensor& tokens, const at::Tensor& grad_logp,
                         const std::optional<at::Tensor>& grad_entropy, const at::Tensor& lse,
                         const at::Tensor& entropy, double inv_temperature, int64_t vocab_start,
                         int64_t ignore_index) {
  check_rows(x, "logits");
  check_writable_rows(x, "logits");
  logprob_bwd_into(x, tokens, grad_logp, grad_entropy, lse, entropy, inv_temperature, vocab_start, ignore_index, x);
}

// x[r, :] *= scale[r] (fp32 product, one rounding to x's dtype): the in-place backward's per-row scale. PyTorch's
// mul_ of a bf16 / fp16 tensor by an fp32 one takes a non-vectorised mixed-dtype path (~20x a copy on CPU).
void scale_rows_(at::Tensor x, const at::Tensor& scale) {
  check_rows(x, "logits");
  check_writable_rows(x, "logits");
  const int64_t N = x.size(0), V = x.size(1), stride = x.stride(0);
  check_row_vector(scale, N, at::kFloat, x, "scale");
  const float* g = scale.const_data_ptr<float>();
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* base = x.data_ptr<T>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* row = base + r * stride;
        const __m256 vg = _mm256_set1_ps(g[r]);
        for (int64_t i = 0; i < V; i += kLanes) {
          if (i + kLanes <= V) {
            store8(row + i, _mm256_mul_ps(load8(row + i), vg));
          } else {
            store_tail(row + i, _mm256_mul_ps(load_tail(row + i, V - i, 0.f), vg), V - i);
          }
        }
      }
    });
  });
}

// The sampled-token estimators of d = logp_student - logp_teacher (expm1 keeps k3 accurate for small d).
inline double sampled_kl(double d, int64_t kl_kind) {
  return kl_kind == 1 ? d : kl_kind == 2 ? 0.5 * d * d : std::expm1(-d) + d;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> opd_sampled_fwd(const at::Tensor& x, const at::Tensor& tokens,
                                                               const at::Tensor& advantages,
                                                               const at::Tensor& teacher_logp,
                                                               const std::optional<at::Tensor>& mask, double coef,
                                                               double inv_temperature, int64_t kl_kind) {
  check_rows(x, "logits");
  check_inv_temperature(inv_temperature);
  check_kl_kind(kl_kind);
  const int64_t N = x.size(0), V = x.size(1), stride = x.stride(0);
  check_row_vector(tokens, N, at::kLong, x, "tokens");
  check_row_vector(advantages, N, at::kFloat, x, "advantages");
  check_row_vector(teacher_logp, N, at::kFloat, x, "teacher_logp");
  if (mask) check_row_vector(*mask, N, at::kBool, x, "mask");
  const auto opts = x.options().dtype(at::kFloat);
  at::Tensor adv_out = at::empty({N}, opts), kl = at::empty({N}, opts), logp = at::empty({N}, opts);
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const float *adv = advantages.const_data_ptr<float>(), *tlp = teacher_logp.const_data_ptr<float>();
  const bool* keep = mask ? mask->const_data_ptr<bool>() : nullptr;
  float *ao = adv_out.data_ptr<float>(), *ko = kl.data_ptr<float>(), *lo = logp.data_ptr<float>();
  const float inv_t = float(inv_temperature);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* base = x.const_data_ptr<T>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (keep && !keep[r]) {  // masked out: not read, advantage kept
          ao[r] = adv[r];
          ko[r] = lo[r] = 0.f;
          continue;
        }
        const int64_t col = owned_column(tok[r], 0, V, std::numeric_limits<int64_t>::min());
        const float lp = logprob_row<T, false>(base + r * stride, V, inv_t, col).logp;
        const double k = sampled_kl(double(lp) - tlp[r], kl_kind);
        lo[r] = lp;
        ko[r] = float(k);
        ao[r] = float(adv[r] - coef * k);
      }
    });
  });
  return {adv_out, kl, logp};
}

}  // namespace

TORCH_LIBRARY_IMPL(opd_C, CPU, m) {
  m.impl("logprob_fwd", &logprob_fwd);
  m.impl("logprob_bwd", &logprob_bwd);
  m.impl("logprob_fwd_inplace", &logprob_fwd_inplace);
  m.impl("logprob_bwd_inplace", &logprob_bwd_inplace);
  m.impl("scale_rows_", &scale_rows_);
  m.impl("opd_sampled_fwd", &opd_sampled_fwd);
}

}  // namespace opd::cpu
