// E independent FFN experts (D -> H, GELU, H -> D) stored as stacked weights
// [E, D, H] and [E, H, D]. They run as a grouped GEMM over rows sorted by expert
// (expert e owns rows offsets[e] .. offsets[e+1]): every FLOP is useful work, none
// is spent on padding, and forward/backward write into buffers allocated once
// per call rather than per expert.
#pragma once

#include <cstdint>
#include <utility>
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

  // Switching mode drops the inference copies of the weights (see below).
  void train(bool on = true) override;

  ExpertsOptions options;
  at::Tensor w1, b1, w2, b2;  // [E, D, H], [E, H], [E, H, D], [E, D]

 private:
  // Inference (eval mode, no gradient wanted) runs on copies of the weights
  // made once: in fp32 on AVX-512 CPUs packed for nn::packed_gemm ([E, P]:
  // OpenBLAS would repack them at every GEMM); on other CPUs transposed to
  // [E, H, D] and [E, D, H], so each expert's GEMM streams its weights row by
  // row (when the experts outgrow the caches, as at E = 64, the stored
  // layout's strided panels cost ~25% more per GEMM, measured); in bf16 cast
  // once instead of at every call. Rebuilt when a weight's storage or version
  // changes, and dropped by train().
  struct InferenceWeights {
    at::Tensor w1, b1, w2, b2;
    std::vector<std::pair<const void*, int64_t>> source;  // (storage, version) of w1, b1, w2, b2
    at::ScalarType dtype = at::kFloat;
  };
  const InferenceWeights& inference_weights(at::ScalarType dtype);
  InferenceWeights inference_;
};
TORCH_MODULE(Experts);

// The row count at which an expert's GEMM of n rows runs on oneDNN (bf16 on
// CPU): n itself up to 64, else n rounded up to a multiple of 2^(floor(log2 n)
// - 5), at most 1/32 more rows. oneDNN builds one primitive per GEMM shape and
// expert row counts change every step: unrounded, a run with C rows per expert
// meets ~6C shapes (past its primitive cache, which must never evict; see
// nn::parse_precision), rounded at most 64 + 32 per doubling of C.
int64_t gemm_rows(int64_t n);

}  // namespace moev::moe
