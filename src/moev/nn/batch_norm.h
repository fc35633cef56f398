// BatchNorm2d with its ReLU, as two passes over the activation forward and two
// backward. LibTorch runs BatchNorm (statistics, then the transform) and ReLU
// as separate ops and saves both the input and ReLU's output: on the 28-pixel
// multi-branch ResNeSt, BatchNorm, ReLU and their backwards took 42% of a
// training step, bound by memory traffic rather than arithmetic. Here the
// statistics take one pass (shifted sums), the transform writes the activation
// once with the ReLU applied, and the backward recomputes the ReLU's mask from
// the saved input instead of keeping a second activation.
#pragma once

#include <ATen/core/Tensor.h>

namespace torch::nn {
class BatchNorm2dImpl;
}

namespace moev::nn {

// x: [B, C, H, W] -> [B, C, H, W] = bn(x), then ReLU when `relu`; the module's
// weight, bias, running statistics, eps and momentum, exactly as bn->forward
// would use and update them (training: batch statistics, the running ones
// updated with the unbiased variance and num_batches_tracked counted; eval:
// the running ones). Differentiable in x, weight and bias (no double
// backward). float CPU tensors with affine, tracked statistics and a momentum
// take the fused kernel; anything else runs bn->forward and torch::relu.
at::Tensor batch_norm2d(const at::Tensor& x, torch::nn::BatchNorm2dImpl& bn, bool relu);

// x, residual: [B, C, H, W] -> [B, C, H, W] = relu(residual + k_b bn(x)): a
// residual block's end, its last BatchNorm, stochastic depth (sample_scale k:
// [B], keep / (1 - p) per sample; undefined: 1), the shortcut's sum and the
// ReLU in two passes over the activation forward (statistics, transform) and
// two backward, where LibTorch's ops take six and five with stochastic depth.
// The backward takes its mask from the saved output, which the next block
// keeps anyway. bn as in batch_norm2d; differentiable in x,
// residual, weight and bias, not in k.
at::Tensor batch_norm2d_add_relu(const at::Tensor& x, torch::nn::BatchNorm2dImpl& bn, const at::Tensor& residual,
                                 const at::Tensor& sample_scale);

}  // namespace moev::nn
