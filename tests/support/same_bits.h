// Bit-equality where moev's own fp32 kernels run, closeness where LibTorch's do. The kernels (packed GEMM, layer
// norm, GELU) need AVX-512 and sum in one order whatever the thread count or memory layout; on a CPU without it
// (an AVX2 EPYC) these ops fall back to LibTorch, whose sums follow its thread split and vector path.
#pragma once

#include <torch/torch.h>

#include "moev/nn/kernels.h"

namespace moev::test {

inline bool same_bits_or_rounding(const at::Tensor& a, const at::Tensor& b) {
  if (moev::nn::cpu_has_avx512()) return torch::equal(a, b);
  // Sums of thousands of terms: element-wise, a value near 0 may differ relatively much; the whole hardly.
  return a.sizes() == b.sizes() &&
         (a.to(torch::kDouble) - b.to(torch::kDouble)).norm().item<double>() <=
             1e-6 * b.to(torch::kDouble).norm().item<double>() + 1e-12;
}

}  // namespace moev::test
