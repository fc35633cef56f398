// E independent FFN experts (D -> H, GELU, H -> D) stored as stacked weights
// [E, D, H] and [E, H, D]. They run as a grouped GEMM over rows sorted by expert
// (expert e owns rows offsets[e] .. offsets[e+1]): every FLOP is useful work, none
// is spent on padding, and forward/backward write into buffers allocated once
// per call rather than per expert.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

namespace moev::moe {

struct ExpertsOptions {
  ExpertsOptions(int64_t num_experts, int64_t dim, int64_t hidden)
      : num_experts_(num_experts), dim_(dim), hidden_(hidden) {}
  TORCH_ARG(int64_t, num_experts);  // E
  TORCH_ARG(int64_t, dim);          // D
  TORCH_ARG(int64_t, hidden);       // H
  TORCH_ARG(at::ScalarType, matmul_dtype) = at::kFloat;  // GEMMs: kFloat or kBFloat16
};

class ExpertsImpl : public torch::nn::Module {
 public:
  explicit ExpertsImpl(const ExpertsOptions& options);
  void reset_parameters();

  // x: [R, D] rows sorted by expert, offsets: E + 1 row offsets -> [R, D]; rows
  // past offsets[E] are padding and come out as zeros.
  at::Tensor forward(const at::Tensor& x, const std::vector<int64_t>& offsets);

  ExpertsOptions options;
  at::Tensor w1, b1, w2, b2;  // [E, D, H], [E, H], [E, H, D], [E, D]
};
TORCH_MODULE(Experts);

}  // namespace moev::moe
