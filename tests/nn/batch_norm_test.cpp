// nn::batch_norm2d (BatchNorm2d and its ReLU fused, CPU float32) against
// LibTorch's BatchNorm2d module and torch::relu: outputs, running statistics
// and their counter, and the gradients of input, weight and bias, in training
// (batch statistics) and evaluation (running ones), with and without the ReLU,
// on an offset mean (where one-pass sums would cancel) and planes that are and
// are not multiples of 16; results independent of the thread count.
#include <gtest/gtest.h>
#include <torch/torch.h>

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

}  // namespace

TEST(BatchNorm, MatchesLibTorchInValuesStatisticsAndGradients) {
  torch::manual_seed(7);
  for (const bool training : {true, false})
    for (const bool relu : {true, false})
      for (const auto& size : {std::vector<int64_t>{8, 5, 7, 9}, std::vector<int64_t>{4, 3, 16, 16}}) {
        SCOPED_TRACE(std::string(training ? "training" : "eval") + (relu ? ", relu" : "") + ", HW=" +
                     std::to_string(size[2] * size[3]));
        const int64_t C = size[1];
        auto [ours, ref] = two_norms(C);
        ours->train(training);
        ref->train(training);
        const auto x0 = torch::randn(size) * 2 + 30;  // mean 15x the spread
        const auto x = x0.clone().requires_grad_(), xr = x0.clone().requires_grad_();
        const auto y = moev::nn::batch_norm2d(x, *ours, relu);
        auto yr = ref->forward(xr);
        if (relu) yr = torch::relu(yr);
        EXPECT_LT(rel(y, yr), 2e-6);
        EXPECT_LT(rel(ours->running_mean, ref->running_mean), 1e-6);
        EXPECT_LT(rel(ours->running_var, ref->running_var), 1e-5);
        EXPECT_EQ(ours->num_batches_tracked.item<int64_t>(), ref->num_batches_tracked.item<int64_t>());
        if (relu) {
          EXPECT_TRUE(torch::equal(y.gt(0), yr.gt(0)));
        }
        const auto dy = torch::randn(size);
        (y * dy).sum().backward();
        (yr * dy).sum().backward();
        EXPECT_LT(rel(x.grad(), xr.grad()), 1e-4);
        EXPECT_LT(rel(ours->weight.grad(), ref->weight.grad()), 1e-5);
        EXPECT_LT(rel(ours->bias.grad(), ref->bias.grad()), 1e-5);
      }
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
