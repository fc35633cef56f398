#include "moev/nn/blur_pool.h"

#include <torch/torch.h>

namespace moev::nn {

at::Tensor blur_pool2d(const at::Tensor& x) {
  const int64_t C = x.size(1);
  // The filter is a constant of the op, not a parameter: nothing to save or train.
  auto k1 = torch::tensor({1.0f, 2.0f, 1.0f}, x.options()) / 4.0;
  auto k = (k1.unsqueeze(1) * k1.unsqueeze(0)).expand({C, 1, 3, 3});
  // 1x1 maps (a global-pooled stage) cannot be reflect-padded; replicate is the same there.
  const bool tiny = x.size(2) < 2 || x.size(3) < 2;
  torch::nn::functional::PadFuncOptions pad({1, 1, 1, 1});
  if (tiny) pad.mode(torch::kReplicate);
  else pad.mode(torch::kReflect);
  auto padded = torch::nn::functional::pad(x, pad);
  return at::conv2d(padded, k.contiguous(), at::Tensor(), /*stride=*/at::IntArrayRef{2, 2}, /*padding=*/at::IntArrayRef{0, 0}, /*dilation=*/at::IntArrayRef{1, 1}, /*groups=*/C);
}

}  // namespace moev::nn
