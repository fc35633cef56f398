// The layer-scale residual (x + gamma * t, with stochastic depth's per-image
// factor) against LibTorch's addcmul in float64: output and the gradients of
// x, t and gamma, over several chunks of rows, with and without the factor;
// gamma's gradient bit for bit the same on one thread and on two.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moev/nn/layer_scale.h"

TEST(LayerScale, MatchesAddcmulInFp64AndItsGradients) {
  torch::manual_seed(31);
  const int64_t B = 6, H = 10, W = 10, D = 20;  // 600 rows: three chunks of the gradient's sums
  for (bool with_scale : {false, true}) {
    SCOPED_TRACE(with_scale ? "per-image factor" : "no factor");
    auto x = torch::randn({B, H, W, D}).requires_grad_(), t = torch::randn({B, H, W, D}).requires_grad_();
    auto gamma = torch::randn({D}).requires_grad_();
    const auto scale = with_scale ? torch::tensor({0.0f, 1.25f, 1.25f, 0.0f, 1.25f, 1.25f}) : at::Tensor();
    const auto gy = torch::randn({B, H, W, D});
    std::vector<at::Tensor> grads[2];
    const int threads = at::get_num_threads();
    for (int n = 1; n <= 2; ++n) {
      at::set_num_threads(n);
      auto y = moev::nn::layer_scale_residual(x, t, gamma, scale);
      grads[n - 1] = torch::autograd::grad({y}, {x, t, gamma}, {gy});
      if (n == 2) {
        auto x64 = x.detach().to(torch::kDouble).requires_grad_(), t64 = t.detach().to(torch::kDouble).requires_grad_();
        auto g64 = gamma.detach().to(torch::kDouble).requires_grad_();
        auto factor = with_scale ? g64 * scale.to(torch::kDouble).view({B, 1, 1, 1}) : g64;
        auto y64 = torch::addcmul(x64, t64, factor);
        EXPECT_TRUE(torch::allclose(y.detach().to(torch::kDouble), y64.detach(), 1e-6, 1e-6));
        const auto ref = torch::autograd::grad({y64}, {x64, t64, g64}, {gy.to(torch::kDouble)});
        for (size_t i = 0; i < 3; ++i)
          EXPECT_TRUE(torch::allclose(grads[1][i].to(torch::kDouble), ref[i], 1e-5, 1e-5)) << "gradient " << i;
      }
    }
    at::set_num_threads(threads);
    EXPECT_TRUE(torch::equal(grads[0][2], grads[1][2]));
  }
}
