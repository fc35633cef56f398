// The end of a ConvNeXt block's residual branch: x + gamma * t, with gamma the
// layer scale (one learned factor per channel) and, in training, a factor per
// image for stochastic depth (0, or 1 / (1 - p) for the kept images). On CPU
// float32 one fused pass forward and one backward pass that gives both d t and
// d gamma; LibTorch's addcmul with a broadcast [B, 1, 1, D] factor cost 4% of
// the tiny ConvNeXt-MoE's fp32 training step, most of it in its backward's
// broadcast multiplies and sums.
#pragma once

#include <ATen/core/Tensor.h>

namespace moev::nn {

// x, t: [B, ..., D], gamma: [D], image_scale: [B] or undefined (all ones)
// -> [B, ..., D] = x + t * gamma * image_scale[b]. Differentiable in x, t and
// gamma (image_scale is a constant); gamma's gradient does not depend on the
// thread count.
at::Tensor layer_scale_residual(const at::Tensor& x, const at::Tensor& t, const at::Tensor& gamma,
                                const at::Tensor& image_scale = {});

}  // namespace moev::nn
