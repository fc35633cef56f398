// LayerNorm over the last dimension, the normalisation of every ViT and
// ConvNeXt block, with moev's own AVX-512 kernels for CPU float32 (forward and
// backward). Why: LibTorch 1.13's CPU layer norm costs ~1.5 ns per element on
// the narrow rows of these models (ConvNeXt's 32 and 64 channels: 14% of the
// tiny ConvNeXt-MoE's inference, more than its depthwise convolutions), where
// one row fits in a few registers.
#pragma once

#include <ATen/core/Tensor.h>

namespace moev::nn {

// x: [..., D], weight and bias: [D] -> [..., D]:
// y = (x - mean) / sqrt(var + eps) * weight + bias over the last dimension
// (biased variance, as at::layer_norm). Differentiable in x, weight and bias.
// CPU float32 on AVX-512 runs moev's kernels; elsewhere at::layer_norm.
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps);

// Whether layer_norm_rows runs here (AVX-512).
bool layer_norm_rows_supported();
// For fused callers, on raw rows: y = the normalised rows [0, rows) of x [rows,
// D] with weight and bias [D]; y may be x (in place). Needs
// layer_norm_rows_supported().
void layer_norm_rows(const float* x, const float* weight, const float* bias, float* y, int64_t rows, int64_t D,
                     float eps);

// The same with a torch::nn::LayerNorm's parameters and eps (ln: the module
// holder or a LayerNormImpl pointer), which keeps the models' parameter names.
template <typename LayerNormModule>
at::Tensor layer_norm(const LayerNormModule& ln, const at::Tensor& x) {
  return layer_norm(x, ln->weight, ln->bias, ln->options.eps());
}

}  // namespace moev::nn
