// nn::layer_norm (moev's AVX-512 kernels on CPU float32) against
// at::layer_norm in values and in the gradients of input, weight and bias, on
// row widths that are and are not multiples of 16, strided input, and more
// rows than one gradient chunk; weight gradients independent of the threads.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moev/nn/layer_norm.h"
#include "support/same_bits.h"

namespace {
double rel(const at::Tensor& a, const at::Tensor& b) { return ((a - b).norm() / b.norm()).item<double>(); }
}  // namespace

TEST(LayerNorm, MatchesLibTorchInValuesAndGradients) {
  torch::manual_seed(31);
  for (int64_t D : {32, 64, 100, 128, 7}) {
    SCOPED_TRACE("D=" + std::to_string(D));
    const auto big = torch::randn({3, 301, D + 3}) * 3 + 1.5;  // an offset mean: centring matters
    const auto x = big.narrow(2, 1, D).clone().requires_grad_();
    const auto xs = big.narrow(2, 1, D);  // strided rows
    const auto w = (torch::randn({D}) * 0.5 + 1).requires_grad_(), b = torch::randn({D}).requires_grad_();
    {
      torch::NoGradGuard ng;
      EXPECT_LT(rel(moev::nn::layer_norm(xs, w, b, 1e-6), at::layer_norm(xs, {D}, w, b, 1e-6)), 1e-6);
    }
    const auto y = moev::nn::layer_norm(x, w, b, 1e-5);
    const auto ref = at::layer_norm(x, {D}, w, b, 1e-5);
    ASSERT_EQ(y.sizes(), x.sizes());
    EXPECT_LT(rel(y, ref), 1e-6);
    const auto gy = torch::randn_like(y);
    const auto g = torch::autograd::grad({y}, {x, w, b}, {gy});
    const auto gr = torch::autograd::grad({ref}, {x, w, b}, {gy});
    for (int i = 0; i < 3; ++i) EXPECT_LT(rel(g[i], gr[i]), 1e-5) << "gradient " << i;
  }
}

TEST(LayerNorm, InputOnlyGradientAndThreadIndependentWeightGradients) {
  torch::manual_seed(32);
  const auto x = torch::randn({1000, 48}).requires_grad_();
  const auto w = torch::randn({48}), b = torch::randn({48});
  const auto gx = torch::autograd::grad({moev::nn::layer_norm(x, w, b, 1e-6)}, {x}, {torch::ones({1000, 48})})[0];
  const auto gref = torch::autograd::grad({at::layer_norm(x, {48}, w, b, 1e-6)}, {x}, {torch::ones({1000, 48})})[0];
  EXPECT_LT((gx - gref).abs().max().item<double>(), 1e-5);

  const auto wg = w.clone().requires_grad_();
  const auto gy = torch::randn({1000, 48});
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const auto g1 = torch::autograd::grad({moev::nn::layer_norm(x, wg, b, 1e-6)}, {wg}, {gy})[0];
  at::set_num_threads(2);
  const auto g2 = torch::autograd::grad({moev::nn::layer_norm(x, wg, b, 1e-6)}, {wg}, {gy})[0];
  at::set_num_threads(threads);
  EXPECT_TRUE(moev::test::same_bits_or_rounding(g1, g2));
}
