// E independent FFN experts (D -> H, GELU, H -> D) stored as stacked weights
// [E, D, H] and [E, H, D] so that all experts run as one batched matmul.
#pragma once

#include <cstdint>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

namespace moev::moe {

struct ExpertsOptions {
  ExpertsOptions(int64_t num_experts, int64_t dim, int64_t hidden)
      : num_experts_(num_experts), dim_(dim), hidden_(hidden) {}
  TORCH_ARG(int64_t, num_experts);  // E
  TORCH_ARG(int64_t, dim);          // D
  TORCH_ARG(int64_t, hidden);       // H
};

class ExpertsImpl : public torch::nn::Module {
 public:
  explicit ExpertsImpl(const ExpertsOptions& options);
  void reset_parameters();

  // x: [E, C, D] -> [E, C, D]; row c of expert e is processed by expert e only.
  at::Tensor forward(const at::Tensor& x);

  ExpertsOptions options;
  at::Tensor w1, b1, w2, b2;  // [E, D, H], [E, H], [E, H, D], [E, D]
};
TORCH_MODULE(Experts);

}  // namespace moev::moe
