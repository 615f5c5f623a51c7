// Host-side interface of the CUDA row kernels (csrc/cuda/*_kernels.cu). Plain C++ + the CUDA runtime API only
// (no torch/ATen/c10), so the kernel files compile with a bare nvcc (tools/check_cuda.sh) and bindings.cpp
// (the torch side: checks, allocation, current stream) is the only file that knows about tensors.
//
// Every kernel reads a 2-D [n, v] view: element (r, c) of x is at x + r * row_stride + c (row_stride in
// elements, any value incl. 0; offsets are int64). Per-row arrays (tokens, lse, ...) are contiguous [n].
// The launchers return the launch's cudaError_t; they never synchronise.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

namespace opd_cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct Rows {  // a read-only [n, v] logits view
  const void* data;
  int64_t row_stride;
  DType dtype;
};

// How the forward kernels cover the vocabulary: `splits` column ranges per row (1 = one block per row). With
// splits > 1 the forward needs a workspace of workspace_elems elements (float for logprob_fwd, double for
// kl_fwd) and a second (combine) launch.
struct SplitPlan {
  int splits;
  int64_t workspace_elems;
};
SplitPlan plan_forward(int64_t n, int64_t v, int elem_bytes, int state_elems, int device);

// logp: [n] fp32; entropy: [n] fp32 or nullptr (not computed); lse: [n] float64 (the contract,
// opd_kernels/ops/README.md: an fp32 lse would cost confident rows their backward precision).
cudaError_t logprob_fwd(Rows x, int64_t n, int64_t v, const int64_t* tokens, float inv_t, int64_t vocab_start,
                        int64_t ignore_index, float* logp, float* entropy, double* lse, const SplitPlan& plan,
                        float* workspace, cudaStream_t stream);

// grad: [n, v] of x's dtype at row stride grad_stride (v for a fresh gradient; x's own rows, grad == x.data and
// grad_stride == x.row_stride, for the in-place form). grad_entropy / entropy: nullptr when the entropy has no
// gradient.
cudaError_t logprob_bwd(Rows x, int64_t n, int64_t v, const int64_t* tokens, const float* grad_logp,
                        const float* grad_entropy, const double* lse, const float* entropy, float inv_t,
                        int64_t vocab_start, int64_t ignore_index, void* grad, int64_t grad_stride,
                        cudaStream_t stream);

// kl, lse_s, lse_t: [n] float64 (they feed kl_bwd); tokens / logp_s: nullptr when no sampled tokens are given.
cudaError_t kl_fwd(Rows s, Rows t, int64_t n, int64_t v, const int64_t* tokens, float inv_t, int64_t vocab_start,
                   int64_t ignore_index, double* kl, double* lse_s, double* lse_t, float* logp_s,
                   const SplitPlan& plan, double* workspace, cudaStream_t stream);

// grad: as in logprob_bwd (s's own rows for the in-place form).
cudaError_t kl_bwd(Rows s, Rows t, int64_t n, int64_t v, const float* grad_kl, const double* lse_s,
                   const double* lse_t, const double* kl, float inv_t, void* grad, int64_t grad_stride,
                   cudaStream_t stream);

// Fused OPD epilogues (whole vocabulary, one launch, one block per row). mask: bool [n] or nullptr; rows with
// mask == false are not read and give adv_out = advantages, kl = 0, logp = 0. kl_kind 1/2/3 = k1/k2/k3 of
// d = logp - teacher_logp; opd_full_fwd uses the exact KL. Tokens outside [0, v) give logp = 0.
cudaError_t opd_sampled_fwd(Rows x, int64_t n, int64_t v, const int64_t* tokens, const float* advantages,
                            const float* teacher_logp, const bool* mask, double coef, float inv_t, int kl_kind,
                            float* adv_out, float* kl, float* logp, cudaStream_t stream);
cudaError_t opd_full_fwd(Rows s, Rows t, int64_t n, int64_t v, const int64_t* tokens, const float* advantages,
                         const bool* mask, double coef, float inv_t, float* adv_out, float* kl, float* logp,
                         cudaStream_t stream);

constexpr int kLogprobStateFloats = 4;  // m, c, r, b (floats)
constexpr int kKlStateFloats = 7;       // ms, cs, rs, mt, ct, rt, a (doubles in the split workspace)

}  // namespace opd_cuda
