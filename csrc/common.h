// Shared input checks for the CPU and CUDA row kernels (the contract: opd_kernels/ops/README.md).
#pragma once
#include <torch/torch.h>

#include <cmath>

namespace opd {

// The row kernels read a 2-D [N, V] view with unit column stride; any row stride (0 included) is allowed.
inline void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, name, " must be a 2-D [N, V] view, got ", x.dim(), " dims");
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, name, " must have unit stride along the vocabulary");
  TORCH_CHECK(x.size(0) == 0 || x.size(1) > 0, name, " has an empty vocabulary dimension");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
}

// The in-place kernels write into the logits' own rows: they must not overlap (a broadcast row, stride 0, would be
// written N times with different gradients).
inline void check_writable_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.size(0) <= 1 || x.stride(0) >= x.size(1), name, " rows overlap (row stride ", x.stride(0),
              " < V = ", x.size(1), "); the in-place kernels need distinct rows");
}

// The dtypes may differ (a bf16 teacher for an fp32 student): each row is read in its own dtype.
inline void check_same_rows(const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(student.sizes() == teacher.sizes(), "student and teacher views differ in shape: ", student.sizes(),
              " vs ", teacher.sizes());
  TORCH_CHECK(student.device() == teacher.device(), "student and teacher logits are on different devices");
}

// A per-row input [N]: contiguous, on the logits' device, of the given dtype.
inline void check_row_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const at::Tensor& x,
                             const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must be a 1-D tensor of ", n, " rows, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but the logits are on ", x.device());
}

inline void check_inv_temperature(double inv_t) {
  TORCH_CHECK(std::isfinite(inv_t) && inv_t > 0, "inv_temperature must be finite and > 0, got ", inv_t);
}

inline void check_kl_kind(int64_t kl_kind) {
  TORCH_CHECK(kl_kind >= 1 && kl_kind <= 3, "kl_kind must be 1 (k1), 2 (k2) or 3 (k3), got ", kl_kind);
}

}  // namespace opd
