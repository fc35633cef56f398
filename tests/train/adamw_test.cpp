// Our AdamW against torch::optim::AdamW on the same problem, and clipping.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moev/train/adamw.h"

TEST(AdamW, MatchesTorchAdamWOnAMatrix) {
  torch::manual_seed(0);
  auto target = torch::randn({6, 5});
  auto a = torch::randn({6, 5}).requires_grad_();
  auto b = a.detach().clone().requires_grad_();
  moev::train::AdamWOptions o;
  o.weight_decay = 0.1;
  moev::train::AdamW ours({{"w", a}}, o);
  torch::optim::AdamW ref({b}, torch::optim::AdamWOptions(1e-2).betas({0.9, 0.999}).eps(1e-8).weight_decay(0.1));
  for (int step = 0; step < 25; ++step) {
    ours.zero_grad();
    ref.zero_grad();
    (a - target).pow(3).abs().sum().backward();
    (b - target).pow(3).abs().sum().backward();
    ours.step(1e-2);
    ref.step();
  }
  EXPECT_TRUE(torch::allclose(a, b, 1e-5, 1e-6)) << (a - b).abs().max().item<double>();
  EXPECT_EQ(ours.steps(), 25);
}

TEST(AdamW, ClipsToMaxNormAndSkipsDecayOnVectors) {
  auto w = torch::ones({4, 4}).requires_grad_();
  auto bias = torch::ones({4}).requires_grad_();
  moev::train::AdamWOptions o;
  o.weight_decay = 0.5;
  moev::train::AdamW opt({{"w", w}, {"bias", bias}}, o);
  (w * 300).sum().backward();  // grad 300 everywhere: norm 1200 over w
  bias.mutable_grad() = torch::zeros({4});
  const double norm = opt.step(/*lr=*/0.1, /*max_grad_norm=*/1.0);
  EXPECT_NEAR(norm, 1200.0, 1e-3);
  // Decay applies to the matrix, not to the bias (zero gradient: unchanged).
  EXPECT_TRUE(torch::allclose(bias, torch::ones({4})));
  // First Adam step moves each weight by ~lr regardless of scale, plus decay.
  EXPECT_NEAR(w[0][0].item<double>(), 1.0 * (1 - 0.1 * 0.5) - 0.1, 1e-4);
  auto st = opt.state();
  // Clipped gradient 300 * 1/1200 = 0.25 -> exp_avg = 0.1 * 0.25.
  EXPECT_NEAR(st.at("w.exp_avg")[0][0].item<double>(), 0.025, 1e-5);
}
