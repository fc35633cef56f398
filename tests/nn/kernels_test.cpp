// The vectorised element-wise kernels against the standard library and the
// stock softmax, including the edges of the float range.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <vector>

#include "moev/nn/kernels.h"

TEST(Kernels, ExpMatchesStdExpOverTheFloatRange) {
  std::vector<float> x;
  for (float v = -87.0f; v <= 88.0f; v += 0.0137f) x.push_back(v);
  for (float v : {0.0f, -0.0f, 1e-30f, -1e-30f, 0.5f * std::log(2.0f), -0.5f * std::log(2.0f), 88.0f})
    x.push_back(v);
  std::vector<float> y(x.size());
  moev::nn::exp_array(x.data(), y.data(), static_cast<int64_t>(x.size()));
  double worst = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double ref = std::exp(static_cast<double>(x[i]));
    worst = std::max(worst, std::abs(y[i] - ref) / ref);
  }
  EXPECT_LT(worst, 2e-7);
}

TEST(Kernels, ExpClampsBothEndsWithoutNaN) {
  std::vector<float> x = {-1000.0f, -100.0f, -std::numeric_limits<float>::infinity(), 1000.0f};
  std::vector<float> y(x.size());
  moev::nn::exp_array(x.data(), y.data(), static_cast<int64_t>(x.size()));
  EXPECT_LT(y[0], 1e-37f);
  EXPECT_LT(y[1], 1e-37f);
  EXPECT_LT(y[2], 1e-37f);
  EXPECT_GT(y[3], 1e38f);  // saturates at e^88: finite, never NaN
  EXPECT_TRUE(std::isfinite(y[3]));
  for (float v : y) EXPECT_FALSE(std::isnan(v));
}

TEST(Kernels, SoftmaxRowsMatchesTorchSoftmaxAndBackward) {
  // Odd lengths exercise the tails of the 16-wide loops and each register-held
  // row length (up to 16, 32, 64) against the general loop; ld > n the strides.
  for (int64_t n : {1, 7, 16, 17, 32, 33, 49, 50, 64, 65, 100}) {
    torch::manual_seed(n);
    const int64_t rows = 5, ld = n + 3;
    auto x = torch::randn({rows, ld}) * 10;
    auto ref = torch::softmax(x.narrow(1, 0, n), 1);
    auto y = x.clone();
    moev::nn::softmax_rows(y.data_ptr<float>(), rows, n, ld);
    EXPECT_TRUE(torch::allclose(y.narrow(1, 0, n), ref, 1e-6, 1e-7)) << "n=" << n;
    EXPECT_TRUE(torch::equal(y.narrow(1, n, ld - n), x.narrow(1, n, ld - n)));  // padding untouched

    auto dp = torch::randn({rows, ld});
    auto xr = x.narrow(1, 0, n).clone().requires_grad_();
    torch::softmax(xr, 1).backward(dp.narrow(1, 0, n));
    moev::nn::softmax_backward_rows(y.data_ptr<float>(), dp.data_ptr<float>(), rows, n, ld);
    EXPECT_TRUE(torch::allclose(dp.narrow(1, 0, n), xr.grad(), 1e-5, 1e-6)) << "n=" << n;
  }
}

TEST(Kernels, GeluRowsMatchesExactGeluAcrossTheRange) {
  // Both tails (where 1 + erf cancels for a naive formula) and the middle,
  // against LibTorch's exact GELU in double precision.
  auto x = torch::cat({torch::linspace(-12, 12, 4801), torch::randn({1000}) * 3}).to(torch::kFloat);
  auto y = x.clone();
  moev::nn::gelu_rows(y.data_ptr<float>(), 1, y.numel(), y.numel());
  const auto ref = torch::gelu(x.to(torch::kDouble));
  const auto err = (y.to(torch::kDouble) - ref).abs();
  // Absolute error within 2e-7 |x| (erf's 1.5e-7 times |x| / 2, plus rounding).
  EXPECT_TRUE((err <= 2e-7 * x.to(torch::kDouble).abs() + 1e-7).all().item<bool>())
      << "worst " << err.max().item<double>();
  // Ignoring a stride's worth of padding: rows of 7 in a stride of 9.
  auto m = torch::randn({3, 9});
  auto before = m.clone();
  moev::nn::gelu_rows(m.data_ptr<float>(), 3, 7, 9);
  EXPECT_TRUE(torch::allclose(m.narrow(1, 0, 7), torch::gelu(before.narrow(1, 0, 7)), 1e-6, 1e-6));
  EXPECT_TRUE(torch::equal(m.narrow(1, 7, 2), before.narrow(1, 7, 2)));
}
