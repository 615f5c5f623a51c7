// CPU row kernels: kl_fwd, kl_bwd and the fused full-vocabulary OPD epilogue (opd_full_fwd).
// Contract: opd_kernels/ops/README.md. One pass over both rows per row (softmax.h: pair_stats); rows in parallel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"
#include "cpu/alloc.h"
#include "cpu/softmax.h"

namespace opd::cpu {
namespace {

struct KlResult {
  double kl, lse_s, lse_t;
  float logp;
};

// col: the student token's local column, or -1 (logp = 0).
template <typename S, typename U>
inline KlResult kl_row(const S* xs, const U* xt, int64_t V, float inv_t, int64_t col) {
  const PairStats st = pair_stats(xs, xt, V, inv_t);
  const double log_ss = std::log(st.ss), log_st = std::log(st.st);
  const double logp = col >= 0 ? (double(static_cast<float>(xs[col]) * inv_t) - st.ms) - log_ss : 0.0;
  const double lse_t = st.mt + log_st;
  return {st.a / st.ss - log_ss + (lse_t - st.r), st.ms + log_ss, lse_t, float(logp)};
}


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_fwd(const at::Tensor& xs, const at::Tensor& xt,
                                                                  const std::optional<at::Tensor>& tokens,
                                                                  double inv_temperature, int64_t vocab_start,
                                                                  int64_t ignore_index) {
  check_rows(xs, "student");
  check_rows(xt, "teacher");
  check_same_rows(xs, xt);
  check_inv_temperature(inv_temperature);
  const int64_t N = xs.size(0), V = xs.size(1), ss = xs.stride(0), st = xt.stride(0);
  if (tokens) check_row_vector(*tokens, N, at::kLong, xs, "tokens");
  const auto opts = xs.options().dtype(at::kFloat);
  const auto f64 = opts.dtype(at::kDouble);
  at::Tensor kl = at::empty({N}, f64), lse_s = at::empty({N}, f64), lse_t = at::empty({N}, f64);
  at::Tensor logp = at::empty({tokens ? N : 0}, opts);
  const int64_t* tok = tokens ? tokens->const_data_ptr<int64_t>() : nullptr;
  double *ko = kl.data_ptr<double>(), *lso = lse_s.data_ptr<double>(), *lto = lse_t.data_ptr<double>();
  float* lpo = logp.data_ptr<float>();
  const float inv_t = float(inv_temperature);
  dispatch_pair(xs.scalar_type(), xt.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using U = decltype(t_tag);
    const S* bs = xs.const_data_ptr<S>();
    const U* bt = xt.const_data_ptr<U>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t col = tok ? owned_column(tok[r], vocab_start, V, ignore_index) : -1;
        const KlResult res = kl_row(bs + r * ss, bt + r * st, V, inv_t, col);
        ko[r] = res.kl;
        lso[r] = res.lse_s;
        lto[r] = res.lse_t;
        if (tok) lpo[r] = res.logp;
      }
    });
  });
  return {kl, lse_s, lse_t, logp};
}

// grad = inv_t g p_s (log p_s - log p_t - KL); rows with g == 0 are written as zeros (masked rows may be NaN).
// log p_s - log p_t - KL = (zs - zt) - C with the row constant C = KL + lse_s - lse_t (double, split hi + lo) and
// zs - zt formed exactly (TwoSum): where the student is confident and the teacher is not, zs - zt and C are
// both ~|lse| while their difference is small, so one fp32 rounding of zs - zt would cost eps |lse|.
// out may be xs itself (the in-place kernels): every element is read before it is written.
template <typename S, typename U>
inline void kl_bwd_row(const S* xs, const U* xt, S* out, int64_t V, float inv_t, float g, double lse_s,
                       double lse_t, double kl) {
  if (g == 0.f) {
    std::memset(static_cast<void*>(out), 0, sizeof(S) * V);
    return;
  }
  const double c = kl + lse_s - lse_t;
  const float hs = float(lse_s), chi = float(c);
  const __m256 vi = _mm256_set1_ps(inv_t), vls = _mm256_set1_ps(-hs), vlo_s = _mm256_set1_ps(float(lse_s - hs));
  const __m256 vchi = _mm256_set1_ps(chi), vclo = _mm256_set1_ps(float(c - chi)), scale = _mm256_set1_ps(inv_t * g);
  for (int64_t i = 0; i < V; i += kLanes) {
    const bool full = i + kLanes <= V;
    const __m256 zs = _mm256_mul_ps(full ? load8(xs + i) : load_tail(xs + i, V - i, -kInf), vi);
    const __m256 zt = _mm256_mul_ps(full ? load8(xt + i) : load_tail(xt + i, V - i, -kInf), vi);
    const __m256 p = exp_neg(_mm256_sub_ps(_mm256_add_ps(zs, vls), vlo_s));
    const __m256 diff = _mm256_sub_ps(zs, zt);  // TwoSum(zs, -zt): diff + err == zs - zt exactly
    const __m256 bp = _mm256_sub_ps(diff, zs), ap = _mm256_sub_ps(diff, bp);
    const __m256 err = _mm256_sub_ps(_mm256_sub_ps(zs, ap), _mm256_add_ps(zt, bp));
    const __m256 u = _mm256_add_ps(_mm256_sub_ps(diff, vchi), _mm256_sub_ps(err, vclo));
    const __m256 grad = _mm256_mul_ps(scale, where_nonzero(p, _mm256_mul_ps(p, u)));
    if (full) {
      store8(out + i, grad);
    } else {
      store_tail(out + i, grad, V - i);
    }
  }
}

// The backward's checks and row loop, rows written to out (its own row stride): a fresh [N, V] tensor (kl_bwd) or
// the student's rows themselves (kl_bwd_inplace; kl_bwd_row reads each element before writing it).
static void kl_bwd_into(const at::Tensor& xs, const at::Tensor& xt, const at::Tensor& grad_kl,
                        const at::Tensor& lse_s, const at::Tensor& lse_t, const at::Tensor& kl, double inv_temperature,
                        at::Tensor& out) {
  check_rows(xs, "student");
  check_rows(xt, "teacher");
  check_same_rows(xs, xt);
  check_inv_temperature(inv_temperature);
  const int64_t N = xs.size(0), V = xs.size(1), ss = xs.stride(0), st = xt.stride(0), so = out.stride(0);
  check_row_vector(grad_kl, N, at::kFloat, xs, "grad_kl");
  check_row_vector(lse_s, N, at::kDouble, xs, "lse_s");
  check_row_vector(lse_t, N, at::kDouble, xs, "lse_t");
  check_row_vector(kl, N, at::kDouble, xs, "kl");
  const float* g = grad_kl.const_data_ptr<float>();
  const double *ls = lse_s.const_data_ptr<double>(), *lt = lse_t.const_data_ptr<double>();
  const double* k = kl.const_data_ptr<double>();
  const float inv_t = float(inv_temperature);
  dispatch_pair(xs.scalar_type(), xt.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using U = decltype(t_tag);
    const S* bs = xs.const_data_ptr<S>();
    const U* bt = xt.const_data_ptr<U>();
    S* bo = out.data_ptr<S>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        kl_bwd_row(bs + r * ss, bt + r * st, bo + r * so, V, inv_t, g[r], ls[r], lt[r], k[r]);
      }
    });
  });
}

at::Tensor kl_bwd(const at::Tensor& xs, const at::Tensor& xt, const at::Tensor& grad_kl, const at::Tensor& lse_s,
                  const at::Tensor& lse_t, const at::Tensor& kl, double inv_temperature) {
  check_rows(xs, "student");
  at::Tensor grad = empty_grad(xs.size(0), xs.size(1), xs.options());
  kl_bwd_into(xs, xt, grad_kl, lse_s, lse_t, kl, inv_temperature, grad);
  return grad;
}

// kl_fwd, then the student row overwritten with its gradient grad_kl[r] * inv_t p_s (log p_s - log p_t - KL) from
// the row's own scalars: both rows stream from memory once and are re-read from cache. The forward values are
// computed for every row; a row with grad_kl == 0 gets exact zeros (kl_bwd_row).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_fwd_inplace(at::Tensor xs, const at::Tensor& xt,
                                                              const std::optional<at::Tensor>& grad_kl,
                                                              double inv_temperature) {
  check_rows(xs, "student");
  check_rows(xt, "teacher");
  check_same_rows(xs, xt);
  check_writable_rows(xs, "student");
  check_inv_temperature(inv_temperature);
  const int64_t N = xs.size(0), V = xs.size(1), ss = xs.stride(0), st = xt.stride(0);
  if (grad_kl) check_row_vector(*grad_kl, N, at::kFloat, xs, "grad_kl");
  const auto f64 = xs.options().dtype(at::kDouble);
  at::Tensor kl = at::empty({N}, f64), lse_s = at::empty({N}, f64), lse_t = at::empty({N}, f64);
  const float* g = grad_kl ? grad_kl->const_data_ptr<float>() : nullptr;
  double *ko = kl.data_ptr<double>(), *lso = lse_s.data_ptr<double>(), *lto = lse_t.data_ptr<double>();
  const float inv_t = float(inv_temperature);
  dispatch_pair(xs.scalar_type(), xt.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using U = decltype(t_tag);
    S* bs = xs.data_ptr<S>();
    const U* bt = xt.const_data_ptr<U>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        S* row = bs + r * ss;
        const KlResult res = kl_row(row, bt + r * st, V, inv_t, -1);
        ko[r] = res.kl;
        lso[r] = res.lse_s;
        lto[r] = res.lse_t;
        kl_bwd_row(row, bt + r * st, row, V, inv_t, g ? g[r] : 1.f, res.lse_s, res.lse_t, res.kl);
      }
    });
  });
  return {kl, lse_s, lse_t};
}

// kl_bwd written into the student's own rows (row stride kept): nothing of size [N, V] is allocated.
void kl_bwd_inplace(at::Tensor xs, const at::Tensor& xt, const at::Tensor& grad_kl, const at::Tensor& lse_s,
                    const at::Tensor& lse_t, const at::Tensor& kl, double inv_temperature) {
  check_rows(xs, "student");
  check_writable_rows(xs, "student");
  kl_bwd_into(xs, xt, grad_kl, lse_s, lse_t, kl, inv_temperature, xs);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> opd_full_fwd(const at::Tensor& xs, const at::Tensor& xt,
                                                            const at::Tensor& tokens, const at::Tensor& advantages,
                                                            const std::optional<at::Tensor>& mask, double coef,
                                                            double inv_temperature) {
  check_rows(xs, "student");
  check_rows(xt, "teacher");
  check_same_rows(xs, xt);
  check_inv_temperature(inv_temperature);
  const int64_t N = xs.size(0), V = xs.size(1), ss = xs.stride(0), st = xt.stride(0);
  check_row_vector(tokens, N, at::kLong, xs, "tokens");
  check_row_vector(advantages, N, at::kFloat, xs, "advantages");
  if (mask) check_row_vector(*mask, N, at::kBool, xs, "mask");
  const auto opts = xs.options().dtype(at::kFloat);
  at::Tensor adv_out = at::empty({N}, opts), kl = at::empty({N}, opts), logp = at::empty({N}, opts);
  const int64_t* tok = tokens.const_data_ptr<int64_t>();
  const float* adv = advantages.const_data_ptr<float>();
  const bool* keep = mask ? mask->const_data_ptr<bool>() : nullptr;
  float *ao = adv_out.data_ptr<float>(), *ko = kl.data_ptr<float>(), *lo = logp.data_ptr<float>();
  const float inv_t = float(inv_temperature);
  dispatch_pair(xs.scalar_type(), xt.scalar_type(), [&](auto s_tag, auto t_tag) {
    using S = decltype(s_tag);
    using U = decltype(t_tag);
    const S* bs = xs.const_data_ptr<S>();
    const U* bt = xt.const_data_ptr<U>();
    at::parallel_for(0, N, grain(V), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (keep && !keep[r]) {  // masked out: not read, advantage kept
          ao[r] = adv[r];
          ko[r] = lo[r] = 0.f;
          continue;
        }
        const int64_t col = owned_column(tok[r], 0, V, std::numeric_limits<int64_t>::min());
        const KlResult res = kl_row(bs + r * ss, bt + r * st, V, inv_t, col);
        lo[r] = res.logp;
        ko[r] = float(res.kl);
        ao[r] = float(adv[r] - coef * res.kl);
      }
    });
  });
  return {adv_out, kl, logp};
}

}  // namespace

TORCH_LIBRARY_IMPL(opd_C, CPU, m) {
  m.impl("kl_fwd", &kl_fwd);
  m.impl("kl_bwd", &kl_bwd);
  m.impl("kl_fwd_inplace", &kl_fwd_inplace);
  m.impl("kl_bwd_inplace", &kl_bwd_inplace);
  m.impl("opd_full_fwd", &opd_full_fwd);
}

}  // namespace opd::cpu
