// The [N, V] gradient buffers of the CPU backward kernels.
#pragma once
#include <torch/torch.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace opd::cpu {

// A fresh [N, V] gradient. The first write to a fresh allocation is page faults, and with 4 KiB pages they cost
// more than the kernel itself (a 500 MB fill: ~100-150 ms on the 2-core dev machine, ~28 ms in huge pages).
// Linux's default THP mode ("madvise") gives huge pages only to ranges that ask: ask for the 2 MiB-aligned
// interior of the buffer. Advice only: an error changes nothing.
inline at::Tensor empty_grad(int64_t N, int64_t V, const at::TensorOptions& options) {
  at::Tensor grad = at::empty({N, V}, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(grad.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + grad.nbytes()) & ~(kHuge - 1);
  if (last >= first + 4 * kHuge) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#endif
  return grad;
}

}  // namespace opd::cpu
