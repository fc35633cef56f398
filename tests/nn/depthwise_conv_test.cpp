// The channels-last depthwise convolution kernel against LibTorch's grouped
// conv2d in float64: outputs and all three gradients, including images smaller
// than the kernel (the tiny ConvNeXt's last stage is 3x3 under a 7x7 kernel).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moev/nn/depthwise_conv.h"

namespace {

struct Case {
  int64_t B, H, W, C, k;
};

}  // namespace

TEST(DepthwiseConv, MatchesGroupedConv2dForwardAndBackward) {
  for (const auto& c : std::vector<Case>{{2, 5, 4, 13, 7}, {3, 3, 3, 8, 7}, {1, 14, 14, 32, 7}, {2, 6, 5, 3, 3},
                                         {4, 1, 2, 5, 5},
                                         {2, 5, 6, 100, 7}, {1, 4, 4, 64, 3}, {1, 3, 9, 150, 5}}) {
    torch::manual_seed(c.H * 100 + c.C);
    auto x = torch::randn({c.B, c.H, c.W, c.C}).requires_grad_();
    auto w = torch::randn({c.C, 1, c.k, c.k}).requires_grad_();
    auto b = torch::randn({c.C}).requires_grad_();
    auto y = moev::nn::depthwise_conv_nhwc(x, w, b);
    // The reference in float64: NCHW grouped convolution.
    auto x64 = x.detach().to(torch::kDouble).requires_grad_();
    auto w64 = w.detach().to(torch::kDouble).requires_grad_();
    auto b64 = b.detach().to(torch::kDouble).requires_grad_();
    auto r = torch::conv2d(x64.permute({0, 3, 1, 2}), w64, b64, 1, c.k / 2, 1, c.C).permute({0, 2, 3, 1});
    ASSERT_EQ(y.sizes(), r.sizes());
    EXPECT_TRUE(torch::allclose(y.to(torch::kDouble), r, 1e-4, 1e-4)) << (y.to(torch::kDouble) - r).abs().max();
    auto g = torch::randn_like(r);
    (y * g.to(torch::kFloat)).sum().backward();
    (r * g).sum().backward();
    const std::string at = "B" + std::to_string(c.B) + " H" + std::to_string(c.H) + " W" + std::to_string(c.W) +
                           " C" + std::to_string(c.C) + " k" + std::to_string(c.k);
    EXPECT_TRUE(torch::allclose(x.grad().to(torch::kDouble), x64.grad(), 1e-4, 1e-4)) << at;
    EXPECT_TRUE(torch::allclose(w.grad().to(torch::kDouble), w64.grad(), 1e-4, 1e-3)) << at;
    EXPECT_TRUE(torch::allclose(b.grad().to(torch::kDouble), b64.grad(), 1e-4, 1e-3)) << at;
    // Without autograd (inference) the same kernel gives the same output.
    torch::NoGradGuard ng;
    EXPECT_TRUE(torch::equal(moev::nn::depthwise_conv_nhwc(x, w, b), y.detach())) << at;
  }
}

TEST(DepthwiseConv, KnownAnswerCentreTapIsIdentity) {
  // A kernel that is 1 at its centre and 0 elsewhere copies its input.
  auto x = torch::randn({2, 4, 5, 6});
  auto w = torch::zeros({6, 1, 7, 7});
  w.select(2, 3).select(2, 3).fill_(1.0);
  EXPECT_TRUE(torch::equal(moev::nn::depthwise_conv_nhwc(x, w, torch::zeros({6})), x));
  // The float64 path (stock ops) agrees.
  EXPECT_TRUE(torch::allclose(moev::nn::depthwise_conv_nhwc(x.to(torch::kDouble), w.to(torch::kDouble), {}),
                              x.to(torch::kDouble)));
}

TEST(DepthwiseConv, RejectsBadShapes) {
  EXPECT_THROW(moev::nn::depthwise_conv_nhwc(torch::randn({1, 4, 4, 3}), torch::randn({4, 1, 7, 7}), {}),
               std::exception);  // channels differ
  EXPECT_THROW(moev::nn::depthwise_conv_nhwc(torch::randn({1, 4, 4, 3}), torch::randn({3, 1, 6, 6}), {}),
               std::exception);  // even kernel
}

// Inference's fused depthwise convolution + LayerNorm (each output row
// normalised while in cache) against the two calls, on the kernel sizes of the
// AVX-512 path (rows of 7 positions and their remainders, channel tails) and
// one that takes the generic path (k = 9).
TEST(DepthwiseConv, FusedLayerNormMatchesTheTwoCalls) {
  torch::NoGradGuard ng;
  for (const auto& c : std::vector<Case>{{3, 14, 14, 32, 7}, {2, 7, 7, 64, 7}, {2, 3, 3, 40, 7}, {2, 5, 9, 20, 5},
                                         {1, 6, 4, 17, 3}, {1, 5, 5, 8, 9}}) {
    const std::string at = "B" + std::to_string(c.B) + " H" + std::to_string(c.H) + " W" + std::to_string(c.W) +
                           " C" + std::to_string(c.C) + " k" + std::to_string(c.k);
    torch::manual_seed(c.W * 100 + c.C);
    const auto x = torch::randn({c.B, c.H, c.W, c.C}), w = torch::randn({c.C, 1, c.k, c.k}) * 0.2;
    const auto b = torch::randn({c.C}), lw = torch::randn({c.C}), lb = torch::randn({c.C});
    const auto ref = at::layer_norm(moev::nn::depthwise_conv_nhwc(x, w, b), {c.C}, lw, lb, 1e-6);
    const auto y = moev::nn::depthwise_conv_layer_norm_nhwc(x, w, b, lw, lb, 1e-6);
    EXPECT_TRUE(torch::allclose(y, ref, 1e-4, 1e-4)) << at << ": " << (y - ref).abs().max();
  }
}
