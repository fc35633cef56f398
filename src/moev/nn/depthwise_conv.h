// Depthwise 2-D convolution on channels-last activations, the spatial mixing of
// ConvNeXt blocks (7x7, stride 1, "same" padding), with a hand-written backward.
// Why: LibTorch 1.13's CPU depthwise convolution runs its backward ~12x slower
// than its forward (measured in the tiny ConvNeXt: a quarter of the training
// step), and it wants NCHW while LayerNorm and the MLP want NHWC, so every block
// paid two permute copies. Here the channel is the innermost loop: every tap is
// one vectorised multiply-add over C contiguous floats, in the layout the rest of
// the block already uses.
#pragma once

#include <ATen/core/Tensor.h>

namespace moev::nn {

// x: [B, H, W, C], weight: [C, 1, k, k] (a grouped Conv2d's, k odd), bias: [C]
// or undefined -> [B, H, W, C]: y[b,h,w,c] = bias[c] + sum_ij x[b,h+i-k/2,w+j-k/2,c]
// * weight[c,0,i,j], zero outside the image. The fused kernel for CPU float32;
// stock conv2d for other devices and dtypes (the same result).
at::Tensor depthwise_conv_nhwc(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias);

// layer_norm(depthwise_conv_nhwc(x, weight, bias), ln_weight, ln_bias, eps):
// without gradients on CPU float32 with AVX-512 each output row is normalised
// while it is in cache (at ConvNeXt's first stage every separate pass over the
// activations streams 3 MB per 128 images from L3); otherwise the two calls.
at::Tensor depthwise_conv_layer_norm_nhwc(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                          const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps);

}  // namespace moev::nn
