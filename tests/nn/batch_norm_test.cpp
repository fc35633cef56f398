// nn::batch_norm2d (BatchNorm2d and its ReLU fused, CPU float32) against
// LibTorch's BatchNorm2d module and torch::relu: outputs, running statistics
// and their counter, and the gradients of input, weight and bias, in training
// (batch statistics) and evaluation (running ones), with and without the ReLU,
// on an offset mean (where one-pass sums would cancel) and planes that are and
// are not multiples of 16; results independent of the thread count.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <tuple>

#include "moev/nn/batch_norm.h"

namespace {

double rel(const at::Tensor& a, const at::Tensor& b) { return ((a - b).norm() / b.norm()).item<double>(); }

// A BatchNorm of C channels with weights, biases and running statistics away
// from their defaults (and some weights negative or zero, which flip or close
// the ReLU's mask), and its copy.
std::pair<torch::nn::BatchNorm2d, torch::nn::BatchNorm2d> two_norms(int64_t C) {
  torch::nn::BatchNorm2d a(C), b(C);
  torch::NoGradGuard ng;
  a->weight.copy_(torch::randn({C}));
  a->weight[0] = 0;
  a->bias.copy_(torch::randn({C}) * 0.5);
  a->running_mean.copy_(torch::randn({C}));
  a->running_var.copy_(torch::rand({C}) + 0.5);
  for (const auto& p : a->named_parameters()) b->named_parameters()[p.key()].copy_(p.value());
  for (const auto& p : a->named_buffers()) b->named_buffers()[p.key()].copy_(p.value());
  return {a, b};
}

// Ours against LibTorch's: outputs y / yr, running statistics and their counter,
// then, after one backward of the same dy, the gradients of x / xr, weight and bias.
void expect_as_libtorch(torch::nn::BatchNorm2d& ours, torch::nn::BatchNorm2d& ref, const at::Tensor& y,
                        const at::Tensor& yr, const at::Tensor& x, const at::Tensor& xr) {
  EXPECT_LT(rel(y, yr), 2e-6);
  EXPECT_LT(rel(ours->running_mean, ref->running_mean), 1e-6);
  EXPECT_LT(rel(ours->running_var, ref->running_var), 1e-5);
  EXPECT_EQ(ours->num_batches_tracked.item<int64_t>(), ref->num_batches_tracked.item<int64_t>());
  const auto dy = torch::randn(y.sizes());
  (y * dy).sum().backward();
  (yr * dy).sum().backward();
  EXPECT_LT(rel(x.grad(), xr.grad()), 1e-4);
  EXPECT_LT(rel(ours->weight.grad(), ref->weight.grad()), 1e-5);
  EXPECT_LT(rel(ours->bias.grad(), ref->bias.grad()), 1e-5);
}

}  // namespace

TEST(BatchNorm, MatchesLibTorchInValuesStatisticsAndGradients) {
  torch::manual_seed(7);
  for (const bool training : {true, false})
    for (const bool relu : {true, false})
      // Sizes, spread and mean: a mean 15x the spread (one-pass sums would cancel), planes of 63 and 256
      // values, a spread so small that eps weighs (var 1e-6, eps 1e-5), and planes of one value.
      for (const auto& [size, spread, mean] : {std::make_tuple(std::vector<int64_t>{8, 5, 7, 9}, 2.0, 30.0),
                                               std::make_tuple(std::vector<int64_t>{4, 3, 16, 16}, 2.0, 30.0),
                                               std::make_tuple(std::vector<int64_t>{6, 4, 3, 3}, 1e-3, 0.01),
                                               std::make_tuple(std::vector<int64_t>{32, 5, 1, 1}, 1.0, 0.0)}) {
        SCOPED_TRACE(std::string(training ? "training" : "eval") + (relu ? ", relu" : "") + ", HW=" +
                     std::to_string(size[2] * size[3]) + ", spread " + std::to_string(spread));
        const int64_t C = size[1];
        auto [ours, ref] = two_norms(C);
        ours->train(training);
        ref->train(training);
        const auto x0 = torch::randn(size) * spread + mean;
        const auto x = x0.clone().requires_grad_(), xr = x0.clone().requires_grad_();
        const auto y = moev::nn::batch_norm2d(x, *ours, relu);
        auto yr = ref->forward(xr);
        if (relu) yr = torch::relu(yr);
        if (relu) {
          EXPECT_TRUE(torch::equal(y.gt(0), yr.gt(0)));
        }
        expect_as_libtorch(ours, ref, y, yr, x, xr);
      }
}

// The backward's ReLU mask is the forward's, also where x * scale + shift is 0
// up to rounding (x = the running mean: 0 without an FMA, its rounding error
// with one), on planes of 63 values, which the AVX-512 loops end in an 8-wide
// remainder: the bias gradient sums dy where the output is positive.
TEST(BatchNorm, TheBackwardsReluMaskIsTheForwards) {
  torch::manual_seed(11);
  torch::nn::BatchNorm2d bn(3);
  bn->eval();
  {
    torch::NoGradGuard ng;
    bn->weight.copy_(torch::tensor({0.3f, -0.7f, 1.1f}));
    bn->bias.zero_();
    bn->running_mean.copy_(torch::tensor({0.37f, -1.23f, 2.9f}));
    bn->running_var.fill_(0.5f);
  }
  const auto x = bn->running_mean.detach().view({1, 3, 1, 1}).expand({4, 3, 7, 9}).contiguous().requires_grad_();
  const auto y = moev::nn::batch_norm2d(x, *bn, /*relu=*/true);
  const auto dy = torch::randn({4, 3, 7, 9});
  (y * dy).sum().backward();
  const auto want = (dy * y.detach().gt(0)).sum({0, 2, 3});
  EXPECT_TRUE(torch::allclose(bn->bias.grad(), want, 1e-5, 1e-5)) << bn->bias.grad() << want;
  EXPECT_TRUE(torch::equal(x.grad().ne(0), y.detach().gt(0).logical_and(dy.ne(0))));
}

TEST(BatchNorm, ResultsDoNotDependOnTheThreads) {
  torch::manual_seed(8);
  const int threads = at::get_num_threads();
  std::vector<at::Tensor> out;
  const auto x0 = torch::randn({16, 12, 14, 14});
  const auto dy = torch::randn({16, 12, 14, 14});
  for (const int t : {1, 2}) {
    at::set_num_threads(t);
    torch::manual_seed(9);
    auto [bn, unused] = two_norms(12);
    const auto x = x0.clone().requires_grad_();
    const auto y = moev::nn::batch_norm2d(x, *bn, /*relu=*/true);
    (y * dy).sum().backward();
    out.push_back(torch::cat({y.flatten(), x.grad().flatten(), bn->weight.grad(), bn->bias.grad(),
                              bn->running_mean, bn->running_var}));
  }
  at::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(out[0], out[1]));
}

// Frozen input (a trunk run without gradients), trained BatchNorm: only the
// weight and bias gradients, as LibTorch's.
TEST(BatchNorm, GradientsOfTheParametersAlone) {
  torch::manual_seed(12);
  auto [ours, ref] = two_norms(4);
  const auto x = torch::randn({5, 4, 6, 6}) + 1;
  const auto dy = torch::randn({5, 4, 6, 6});
  (moev::nn::batch_norm2d(x, *ours, true) * dy).sum().backward();
  (torch::relu(ref->forward(x)) * dy).sum().backward();
  EXPECT_LT(rel(ours->weight.grad(), ref->weight.grad()), 1e-5);
  EXPECT_LT(rel(ours->bias.grad(), ref->bias.grad()), 1e-5);
}

// What the fused kernel does not take runs LibTorch's module: double tensors,
// and a BatchNorm without affine parameters.
TEST(BatchNorm, OtherTypesAndOptionsRunTheModule) {
  torch::manual_seed(10);
  torch::nn::BatchNorm2d plain(torch::nn::BatchNorm2dOptions(3).affine(false));
  const auto x = torch::randn({4, 3, 5, 5}) + 2;
  const auto y = moev::nn::batch_norm2d(x, *plain, true);
  EXPECT_NEAR(y.min().item<double>(), 0.0, 0.0);
  auto d = torch::nn::BatchNorm2d(3);
  d->to(torch::kDouble);
  const auto yd = moev::nn::batch_norm2d(x.to(torch::kDouble), *d, false);
  EXPECT_EQ(yd.scalar_type(), torch::kDouble);
  EXPECT_LT(yd.mean({0, 2, 3}).abs().max().item<double>(), 1e-12);
}

// A residual block's end, relu(r + k_b bn(x)), against LibTorch's module, a
// multiply by the sample scales, the sum and torch::relu: values, running
// statistics and the gradients of x, r, weight and bias, in training and
// evaluation, with sample scales (some 0: dropped samples, whose inputs get
// only the batch statistics' share of the gradient) and without, with a residual that does and does not need a
// gradient, on planes of 49 values (an AVX-512 remainder) and of one.
TEST(BatchNorm, TheBlockEndMatchesLibTorchsOps) {
  torch::manual_seed(13);
  for (const bool training : {true, false})
    for (const bool scaled : {true, false})
      for (const bool residual_grad : {true, false})
        for (const auto& size : {std::vector<int64_t>{6, 5, 7, 7}, std::vector<int64_t>{16, 3, 1, 1}}) {
          SCOPED_TRACE(std::string(training ? "training" : "eval") + (scaled ? ", scaled" : "") +
                       (residual_grad ? ", residual grad" : "") + ", HW=" + std::to_string(size[2] * size[3]));
          const int64_t B = size[0], C = size[1];
          auto [ours, ref] = two_norms(C);
          ours->train(training);
          ref->train(training);
          const auto x0 = torch::randn(size) * 2 + 3, r0 = torch::randn(size);
          at::Tensor k;
          if (scaled) {
            k = (torch::rand({B}) < 0.7).to(torch::kFloat) / 0.7;
            k[0] = 0;
            k[1] = 1 / 0.7;
          }
          const auto x = x0.clone().requires_grad_(), xr = x0.clone().requires_grad_();
          const auto r = r0.clone().requires_grad_(residual_grad), rr = r0.clone().requires_grad_(residual_grad);
          const auto y = moev::nn::batch_norm2d_add_relu(x, *ours, r, k);
          auto t = ref->forward(xr);
          if (scaled) t = t * k.view({-1, 1, 1, 1});
          const auto yr = torch::relu(rr + t);
          expect_as_libtorch(ours, ref, y, yr, x, xr);
          if (residual_grad) {
            EXPECT_TRUE(torch::equal(r.grad(), rr.grad()));
          } else {
            EXPECT_FALSE(r.grad().defined());
          }
        }
}

// The block end's results and gradients do not depend on the thread count either.
TEST(BatchNorm, TheBlockEndDoesNotDependOnTheThreads) {
  torch::manual_seed(14);
  const int threads = at::get_num_threads();
  const auto x0 = torch::randn({16, 12, 14, 14}), r0 = torch::randn({16, 12, 14, 14});
  const auto dy = torch::randn({16, 12, 14, 14});
  const auto k = (torch::rand({16}) < 0.8).to(torch::kFloat) / 0.8;
  std::vector<at::Tensor> out;
  for (const int t : {1, 2}) {
    at::set_num_threads(t);
    torch::manual_seed(15);
    auto [bn, unused] = two_norms(12);
    const auto x = x0.clone().requires_grad_(), r = r0.clone().requires_grad_();
    const auto y = moev::nn::batch_norm2d_add_relu(x, *bn, r, k);
    (y * dy).sum().backward();
    out.push_back(torch::cat({y.flatten(), x.grad().flatten(), r.grad().flatten(), bn->weight.grad(),
                              bn->bias.grad(), bn->running_mean, bn->running_var}));
  }
  at::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(out[0], out[1]));
}
