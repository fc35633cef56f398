// Anti-aliased downsampling (Zhang 2019, "Making convolutional networks
// shift-invariant again"): low-pass filter with the 3x3 binomial kernel
// [1 2 1]^T [1 2 1] / 16, then subsample by 2. Strided pooling and convolution
// alias high frequencies, so a one-pixel shift of the input can change the
// output a lot; blurring first keeps small shifts small. Sun et al. use it in
// their ResNeSt backbone for the same reason.
#pragma once

#include <ATen/core/Tensor.h>

namespace moev::nn {

// x: [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]; reflect padding of 1 (H, W >= 2;
// replicate when a side is 1 pixel), so edges are not darkened by zeros.
// float or double; differentiable (its own backward, the filter's adjoint).
at::Tensor blur_pool2d(const at::Tensor& x);

}  // namespace moev::nn
