// Every schema of the op library on one screen. Implementations: csrc/cpu/*.cpp (CPU), csrc/cuda/* (CUDA).
// These are "row kernels" over a 2-D view [N, V_shard] of the logits (row stride arbitrary, column stride 1).
// Results are shard-local (log-sum-exp over this rank's vocabulary shard, vocab ids offset by vocab_start);
// with one shard they are the final values. Per-row outputs are fp32 except those that feed a backward (lse, lse_s,
// lse_t, and kl_fwd's kl), which are float64 so that the backwards stay exact for confident rows (ops/README.md). The Python layer (opd_kernels/ops/*) combines shards with
// all-reduces of per-row scalars, wraps everything in torch.library custom ops and autograd.
#include <torch/library.h>

TORCH_LIBRARY(opd_C, m) {
  // log p(token | logits * inv_temperature) per row (+ entropy), and the row log-sum-exp saved for backward.
  // Rows with token == ignore_index, or whose token lies outside [vocab_start, vocab_start + V), give logp 0.
  m.def("logprob_fwd(Tensor logits, Tensor tokens, float inv_temperature, int vocab_start, int ignore_index,"
        " bool with_entropy) -> (Tensor logp, Tensor entropy, Tensor lse)");
  // d/dlogits of sum(grad_logp * logp + grad_entropy * entropy), from the GLOBAL lse / entropy.
  m.def("logprob_bwd(Tensor logits, Tensor tokens, Tensor grad_logp, Tensor? grad_entropy, Tensor lse,"
        " Tensor entropy, float inv_temperature, int vocab_start, int ignore_index) -> Tensor");
  // Exact KL(p_S || p_T) per row in one pass over both rows, both log-sum-exps, and (when tokens is given)
  // the student log-prob of the sampled token.
  m.def("kl_fwd(Tensor student, Tensor teacher, Tensor? tokens, float inv_temperature, int vocab_start,"
        " int ignore_index) -> (Tensor kl, Tensor lse_s, Tensor lse_t, Tensor logp_s)");
  // d KL / d student logits = grad_kl * p_S * (log p_S - log p_T - KL) * inv_temperature (GLOBAL scalars).
  m.def("kl_bwd(Tensor student, Tensor teacher, Tensor grad_kl, Tensor lse_s, Tensor lse_t, Tensor kl,"
        " float inv_temperature) -> Tensor");
  // In-place forms (the logits buffer is overwritten with the gradient; its rows must not overlap). The _fwd_
  // ones run the forward above and then write the gradient of the shard-local values, scaled per row by
  // grad_logp / grad_kl (None = 1): with one shard, the exact gradient after one read of each row. The _bwd_
  // ones write what logprob_bwd / kl_bwd return (GLOBAL scalars) into the logits instead of a new tensor.
  m.def("logprob_fwd_inplace(Tensor(a!) logits, Tensor tokens, Tensor? grad_logp, float inv_temperature,"
        " int vocab_start, int ignore_index, bool with_entropy) -> (Tensor logp, Tensor entropy, Tensor lse)");
  m.def("logprob_bwd_inplace(Tensor(a!) logits, Tensor tokens, Tensor grad_logp, Tensor? grad_entropy, Tensor lse,"
        " Tensor entropy, float inv_temperature, int vocab_start, int ignore_index) -> ()");
  m.def("kl_fwd_inplace(Tensor(a!) student, Tensor teacher, Tensor? grad_kl, float inv_temperature)"
        " -> (Tensor kl, Tensor lse_s, Tensor lse_t)");
  m.def("kl_bwd_inplace(Tensor(a!) student, Tensor teacher, Tensor grad_kl, Tensor lse_s, Tensor lse_t, Tensor kl,"
        " float inv_temperature) -> ()");
  // logits[r, :] *= scale[r] in place (fp32 product, one rounding): the in-place backward's per-row scale. CPU only
  // (elsewhere the Python layer uses torch's mul_, which is fast there).
  m.def("scale_rows_(Tensor(a!) logits, Tensor scale) -> ()");
  // Optional fused OPD epilogues (whole vocabulary, vocab_start = 0): one launch for opd_advantages. Rows with
  // mask == false give kl = 0, logp = 0, advantages_out = advantages. kl_kind 1/2/3 = k1/k2/k3 of
  // d = logp - teacher_logp; opd_full_fwd uses the exact full-vocabulary KL. See opd_kernels/ops/README.md.
  m.def("opd_sampled_fwd(Tensor logits, Tensor tokens, Tensor advantages, Tensor teacher_logp, Tensor? mask,"
        " float coef, float inv_temperature, int kl_kind) -> (Tensor advantages_out, Tensor kl, Tensor logp)");
  m.def("opd_full_fwd(Tensor student, Tensor teacher, Tensor tokens, Tensor advantages, Tensor? mask,"
        " float coef, float inv_temperature) -> (Tensor advantages_out, Tensor kl, Tensor logp)");
}

// An empty Python module, so that `import opd_kernels._C` loads this library (and runs the registrations
// above) wherever the installer put it.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
