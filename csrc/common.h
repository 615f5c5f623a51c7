// Shared input checks and helpers for the CPU and CUDA op implementations.
#pragma once
#include <torch/torch.h>

namespace opd {

// The row kernels read a 2-D [N, V] view with unit column stride; any row stride is allowed.
inline void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, name, " must be a 2-D [N, V] view, got ", x.dim(), " dims");
  TORCH_CHECK(x.size(1) == 0 || x.stride(1) == 1, name, " must have unit stride along the vocabulary");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              name, " must be float32, bfloat16 or float16, got ", x.scalar_type());
}

}  // namespace opd
