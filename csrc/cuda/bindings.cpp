// TORCH_LIBRARY_IMPL(opd_C, CUDA, m): the CUDA row kernels (csrc/cuda/*_kernels.cu) behind the schemas of
// csrc/registration.cpp. This file is the only CUDA-side one that knows about tensors: it checks inputs (clear
// errors before any launch), allocates outputs / the split workspace with the caching allocator, and launches on
// the current stream of the logits' device. Nothing here synchronises with the host.
// Built only when torch has CUDA; tools/check_cuda.sh syntax-checks it on CPU machines.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

#include "common.h"
#include "cuda/row_kernels.h"

namespace opd::cuda_impl {
namespace {

using opd_cuda::DType;
using opd_cuda::Rows;
using Triple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

DType dtype_of(const at::Tensor& x) {
  switch (x.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK_TYPE(false, "logits must be float32, bfloat16 or float16, got ", x.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

Rows rows_of(const at::Tensor& x) { return Rows{x.data_ptr(), x.stride(0), dtype_of(x)}; }

// Checks a logits view (ValueError / TypeError naming the problem) and returns its row count; grid.x holds one
// block per row. opd::check_rows (shared with the CPU kernels) stays as the last guard.
int64_t check_logits(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), name, " must be a CUDA tensor, got ", x.device());
  dtype_of(x);
  TORCH_CHECK_VALUE(x.dim() == 2, name, " must be a 2-D [N, V] view, got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(0) < (int64_t{1} << 31), name, " has ", x.size(0), " rows; at most 2^31 - 1 per call");
  TORCH_CHECK_VALUE(x.size(0) == 0 || x.size(1) > 0, name, " has an empty vocabulary dimension (shape ", x.sizes(),
                    "); every row needs >= 1 logit");
  TORCH_CHECK_VALUE(x.size(1) <= 1 || x.stride(1) == 1, name, " must have unit stride along the vocabulary (got ",
                    x.stride(1), "); call .contiguous() first");
  check_rows(x, name);
  return x.size(0);
}

// Checks a student / teacher pair of logits views (dtypes may differ) and returns the row count.
int64_t check_pair(const at::Tensor& s, const at::Tensor& t) {
  const int64_t n = check_logits(s, "student logits");
  check_logits(t, "teacher logits");
  TORCH_CHECK_VALUE(s.sizes() == t.sizes(), "student and teacher views differ in shape: ", s.sizes(), " vs ",
                    t.sizes());
  TORCH_CHECK_VALUE(s.device() == t.device(), "student and teacher logits are on different devices: ", s.device(),
                    " vs ", t.device());
  return n;
}

// A per-row input as a contiguous [n] tensor of `dtype` (no copy when it already is one).
at::Tensor per_row(const at::Tensor& t, int64_t n, at::ScalarType dtype, const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but the logits are on ", x.device());
  TORCH_CHECK_VALUE(t.numel() == n, name, " must hold one value per row (", n, "), got shape ", t.sizes());
  if (dtype == at::kLong || dtype == at::kBool) {
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  } else {
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ", t.scalar_type());
  }
  return t.reshape({n}).to(dtype).contiguous();
}

float checked_inv_t(double inv_t) {
  TORCH_CHECK_VALUE(std::isfinite(inv_t) && inv_t > 0, "inv_temperature must be finite and > 0, got ", inv_t);
  return static_cast<float>(inv_t);
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

Triple logprob_fwd(const at::Tensor& x, const at::Tensor& tokens, double inv_temperature, int64_t vocab_start,
                   int64_t ignore_index, bool with_entropy) {
  const int64_t n = check_logits(x, "logits"), v = x.size(1);
  const float inv_t = checked_inv_t(inv_temperature);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor tok = per_row(tokens, n, at::kLong, x, "tokens");
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, f32), ent = at::empty({with_entropy ? n : 0}, f32);
  at::Tensor lse = at::empty({n}, x.options().dtype(at::kDouble));  // float64: see opd_kernels/ops/README.md
  if (n == 0) return {logp, ent, lse};
  const auto plan = opd_cuda::plan_forward(n, v, static_cast<int>(x.element_size()), opd_cuda::kLogprobStateFloats,
                                           x.get_device());
  const at::Tensor ws = plan.workspace_elems > 0 ? at::empty({plan.workspace_elems}, f32) : at::Tensor();
  C10_CUDA_CHECK(opd_cuda::logprob_fwd(rows_of(x), n, v, tok.data_ptr<int64_t>(), inv_t, vocab_start, ignore_index,
                                       logp.data_ptr<float>(), with_entropy ? ent.data_ptr<float>() : nullptr,
                                       lse.data_ptr<double>(), plan, ptr_or_null<float>(ws), stream()));
  return {logp, ent, lse};
}

// The backward's checks and launch, rows written to out (its own row stride): a fresh [N, V] tensor
// (logprob_bwd) or the logits' rows themselves (logprob_bwd_inplace: the kernel reads each element before writing).
static void logprob_bwd_into(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& grad_logp,
                             const std::optional<at::Tensor>& grad_entropy, const at::Tensor& lse,
                             const at::Tensor& entropy, double inv_temperature, int64_t vocab_start,
                             int64_t ignore_index, const at::Tensor& out) {
  const int64_t n = check_logits(x, "logits"), v = x.size(1);
  const float inv_t = checked_inv_t(inv_temperature);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor tok = per_row(tokens, n, at::kLong, x, "tokens");
  const at::Tensor g = per_row(grad_logp, n, at::kFloat, x, "grad_logp");
  const at::Tensor l = per_row(lse, n, at::kDouble, x, "lse");
  at::Tensor ge, ent;
  if (grad_entropy.has_value()) {
    ge = per_row(*grad_entropy, n, at::kFloat, x, "grad_entropy");
    ent = per_row(entropy, n, at::kFloat, x, "entropy");
  }
  if (out.numel() == 0) return;
  C10_CUDA_CHECK(opd_cuda::logprob_bwd(rows_of(x), n, v, tok.data_ptr<int64_t>(), g.data_ptr<float>(),
                                       ptr_or_null<float>(ge), l.data_ptr<double>(), ptr_or_null<float>(ent), inv_t,
                                       vocab_start, ignore_index, out.data_ptr(), out.stride(0), stream()));
}

at::Tensor logprob_bwd(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& grad_logp,
                       const std::optional<at::Tensor>& grad_entropy, const at::Tensor& lse, const at::Tensor& entropy,
                       double inv_temperature, int64_t vocab_start, int64_t ignore_index) {
  at::Tensor grad = at::empty({check_logits(x, "logits"), x.size(1)}, x.options());
  logprob_bwd_into(x, tokens, grad_logp, grad_entropy, lse, entropy, inv_temperature, vocab_start, ignore_index,
                   grad);
  return grad;
}

// logprob_bwd written into the logits' own rows (no [N, V] allocation).
void logprob_bwd_inplace(at::Tensor x, const at::Tensor& tokens, const at::Tensor& grad_logp,
                         const std::optional<at::Tensor>& grad_entropy, const at::Tensor& lse,
                         const at::Tensor& entropy, double inv_temperature, int64_t vocab_start,
                         int64_t ignore_index) {
  check_logits(x, "logits");
  check_writable_rows(x, "logits");
  logprob_bwd_into(x, tokens, grad_logp, grad_entropy, lse, entropy, inv_temperature, vocab_start, ignore_index, x);
}

// logprob_fwd, then the logits overwritten with grad_logp * inv_t (onehot - p) from the shard's own lse. Two
// launches: the second re-reads the rows (from L2 while they are still there); a fused one-block-per-row kernel
// would read them from HBM once (not done: no GPU to measure it on).
Triple logprob_fwd_inplace(at::Tensor x, const at::Tensor& tokens, const std::optional<at::Tensor>& grad_logp,
                           double inv_temperature, int64_t vocab_start, int64_t ignore_index, bool with_entropy) {
  check_writable_rows(x, "logits");
  auto [logp, ent, lse] = logprob_fwd(x, tokens, inv_temperature, vocab_start, ignore_index, with_entropy);
  const at::Tensor g = grad_logp.has_value() ? *grad_logp : at::ones({x.size(0)}, x.options().dtype(at::kFloat));
  logprob_bwd_inplace(x, tokens, g, std::nullopt, lse, ent, inv_temperature, vocab_start, ignore_index);
  return {logp, ent, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kl_fwd(const at::Tensor& xs, const at::Tensor& xt,
                                                                  const std::optional<at::Tensor>& tokens,
                                                                  double inv_temperature, int64_t vocab_start,
                                                                  int64_t ignore_index) {
  const int64_t n = check_pair(xs, xt), v = xs.size(1);
  const float inv_t = checked_inv_t(inv_temperature);
  const c10::cuda::CUDAGuard guard(xs.device());
  const at::Tensor tok = tokens.has_value() ? per_row(*tokens, n, at::kLong, xs, "tokens") : at::Tensor();
  const auto f32 = xs.options().dtype(at::kFloat);
  const auto f64 = xs.options().dtype(at::kDouble);  // kl, lse_s, lse_t feed kl_bwd: float64 (ops/README.md)
  at::Tensor kl = at::empty({n}, f64), lse_s = at::empty({n}, f64), lse_t = at::empty({n}, f64);
  at::Tensor logp = at::empty({tok.defined() ? n : 0}, f32);
  if (n == 0) return {kl, lse_s, lse_t, logp};
  const int elem = static_cast<int>(std::max(xs.element_size(), xt.element_size()));
  const auto plan = opd_cuda::plan_forward(n, v, elem, opd_cuda::kKlStateFloats, xs.get_device());
  const at::Tensor ws = plan.workspace_elems > 0 ? at::empty({plan.workspace_elems}, f64) : at::Tensor();
  C10_CUDA_CHECK(opd_cuda::kl_fwd(rows_of(xs), rows_of(xt), n, v, ptr_or_null<int64_t>(tok), inv_t, vocab_start,
                                  ignore_index, kl.data_ptr<double>(), lse_s.data_ptr<double>(),
                                  lse_t.data_ptr<double>(), tok.defined() ? logp.data_ptr<float>() : nullptr, plan,
                                  ptr_or_null<double>(ws), stream()));
  return {kl, lse_s, lse_t, logp};
}

// The backward's checks and launch, rows written to out (its own row stride): a fresh [N, V] tensor (kl_bwd)
// or the student's rows themselves (kl_bwd_inplace).
static void kl_bwd_into(const at::Tensor& xs, const at::Tensor& xt, const at::Tensor& grad_kl,
                        const at::Tensor& lse_s, const at::Tensor& lse_t, const at::Tensor& kl, double inv_temperature,
                        const at::Tensor& out) {
  const int64_t n = check_pair(xs, xt), v = xs.size(1);
  const float inv_t = checked_inv_t(inv_temperature);
  const c10::cuda::CUDAGuard guard(xs.device());
  const at::Tensor g = per_row(grad_kl, n, at::kFloat, xs, "grad_kl");
  const at::Tensor ls = per_row(lse_s, n, at::kDouble, xs, "lse_s");
  const at::Tensor lt = per_row(lse_t, n, at::kDouble, xs, "lse_t");
  const at::Tensor k = per_row(kl, n, at::kDouble, xs, "kl");
  if (out.numel() == 0) return;
  C10_CUDA_CHECK(opd_cuda::kl_bwd(rows_of(xs), rows_of(xt), n, v, g.data_ptr<float>(), ls.data_ptr<double>(),
                                  lt.data_ptr<double>(), k.data_ptr<double>(), inv_t, out.data_ptr(), out.stride(0),
                                  stream()));
}

at::Tensor kl_bwd(const at::Tensor& xs, const at::Tensor& xt, const at::Tensor& grad_kl, const at::Tensor& lse_s,
                  const at::Tensor& lse_t, const at::Tensor& kl, double inv_temperature) {
  at::Tensor grad = at::empty({check_pair(xs, xt), xs.size(1)}, xs.options());
  kl_bwd_into(xs, xt, grad_kl, lse_s, lse_t, kl, inv_temperature, grad);
  return grad;
}

// kl_bwd written into the student's own rows (no [N, V] allocation).
void kl_bwd_inplace(at::Tensor xs, const at::Tensor& xt, const at::Tensor& grad_kl, const at::Tensor& lse_s,
                    const at::Tensor& lse_t, const at::Tensor& kl, double inv_temperature) {
  check_pair(xs, xt);
  check_writable_rows(xs, "student logits");
  kl_bwd_into(xs, xt, grad_kl, lse_s, lse_t, kl, inv_temperature, xs);
}

// kl_fwd, then the student overwritten with its gradient (two launches, as logprob_fwd_inplace).
Triple kl_fwd_inplace(at::Tensor xs, const at::Tensor& xt, const std::optional<at::Tensor>& grad_kl,
                      double inv_temperature) {
  check_writable_rows(xs, "student logits");
  auto [kl, lse_s, lse_t, logp] = kl_fwd(xs, xt, std::nullopt, inv_temperature, 0, -100);
  const at::Tensor g = grad_kl.has_value() ? *grad_kl : at::ones({xs.size(0)}, xs.options().dtype(at::kFloat));
  kl_bwd_inplace(xs, xt, g, lse_s, lse_t, kl, inv_temperature);
  return {kl, lse_s, lse_t};
}

Triple opd_outputs(const at::Tensor& x, int64_t n) {
  const auto f32 = x.options().dtype(at::kFloat);
  return {at::empty({n}, f32), at::empty({n}, f32), at::empty({n}, f32)};
}

Triple opd_sampled_fwd(const at::Tensor& x, const at::Tensor& tokens, const at::Tensor& advantages,
                       const at::Tensor& teacher_logp, const std::optional<at::Tensor>& mask, double coef,
                       double inv_temperature, int64_t kl_kind) {
  const int64_t n = check_logits(x, "logits"), v = x.size(1);
  const float inv_t = checked_inv_t(inv_temperature);
  TORCH_CHECK_VALUE(kl_kind >= 1 && kl_kind <= 3, "kl_kind must be 1 (k1), 2 (k2) or 3 (k3), got ", kl_kind);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor tok = per_row(tokens, n, at::kLong, x, "tokens");
  const at::Tensor adv = per_row(advantages, n, at::kFloat, x, "advantages");
  const at::Tensor tlp = per_row(teacher_logp, n, at::kFloat, x, "teacher_logp");
  const at::Tensor keep = mask.has_value() ? per_row(*mask, n, at::kBool, x, "mask") : at::Tensor();
  auto [adv_out, kl, logp] = opd_outputs(x, n);
  if (n == 0) return {adv_out, kl, logp};
  C10_CUDA_CHECK(opd_cuda::opd_sampled_fwd(rows_of(x), n, v, tok.data_ptr<int64_t>(), adv.data_ptr<float>(),
                                           tlp.data_ptr<float>(), ptr_or_null<bool>(keep), coef, inv_t,
                                           static_cast<int>(kl_kind), adv_out.data_ptr<float>(), kl.data_ptr<float>(),
                                           logp.data_ptr<float>(), stream()));
  return {adv_out, kl, logp};
}

Triple opd_full_fwd(const at::Tensor& xs, const at::Tensor& xt, const at::Tensor& tokens,
                    const at::Tensor& advantages, const std::optional<at::Tensor>& mask, double coef,
                    double inv_temperature) {
  const int64_t n = check_pair(xs, xt), v = xs.size(1);
  const float inv_t = checked_inv_t(inv_temperature);
  const c10::cuda::CUDAGuard guard(xs.device());
  const at::Tensor tok = per_row(tokens, n, at::kLong, xs, "tokens");
  const at::Tensor adv = per_row(advantages, n, at::kFloat, xs, "advantages");
  const at::Tensor keep = mask.has_value() ? per_row(*mask, n, at::kBool, xs, "mask") : at::Tensor();
  auto [adv_out, kl, logp] = opd_outputs(xs, n);
  if (n == 0) return {adv_out, kl, logp};
  C10_CUDA_CHECK(opd_cuda::opd_full_fwd(rows_of(xs), rows_of(xt), n, v, tok.data_ptr<int64_t>(),
                                        adv.data_ptr<float>(), ptr_or_null<bool>(keep), coef, inv_t,
                                        adv_out.data_ptr<float>(), kl.data_ptr<float>(), logp.data_ptr<float>(),
                                        stream()));
  return {adv_out, kl, logp};
}

}  // namespace

TORCH_LIBRARY_IMPL(opd_C, CUDA, m) {
  m.impl("logprob_fwd", &logprob_fwd);
  m.impl("logprob_bwd", &logprob_bwd);
  m.impl("kl_fwd", &kl_fwd);
  m.impl("kl_bwd", &kl_bwd);
  m.impl("logprob_fwd_inplace", &logprob_fwd_inplace);
  m.impl("logprob_bwd_inplace", &logprob_bwd_inplace);
  m.impl("kl_fwd_inplace", &kl_fwd_inplace);
  m.impl("kl_bwd_inplace", &kl_bwd_inplace);
  m.impl("opd_sampled_fwd", &opd_sampled_fwd);
  m.impl("opd_full_fwd", &opd_full_fwd);
}

}  // namespace opd::cuda_impl
