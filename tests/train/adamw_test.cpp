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

// Replica gradients passed as `extra` are summed into the update as if they had
// been added to the master's gradient first, whatever the split into parts.
TEST(AdamW, ExtraGradientsAreSummedIntoTheUpdate) {
  torch::manual_seed(1);
  auto g1 = torch::randn({7, 9}), g2 = torch::randn({7, 9}), gb = torch::randn({5});
  auto w_sum = torch::randn({7, 9}).requires_grad_(), b_sum = torch::randn({5}).requires_grad_();
  auto w_split = w_sum.detach().clone().requires_grad_(), b_split = b_sum.detach().clone().requires_grad_();
  moev::train::AdamW sum({{"w", w_sum}, {"b", b_sum}}, {});
  moev::train::AdamW split({{"w", w_split}, {"b", b_split}}, {});
  int calls = 0;
  auto serial = [&](int parts, const std::function<void(int)>& fn) {
    ++calls;
    for (int t = parts - 1; t >= 0; --t) fn(t);  // any order: the parts are independent
  };
  for (int step = 0; step < 3; ++step) {
    w_sum.mutable_grad() = g1 + g2;
    b_sum.mutable_grad() = gb.clone();
    const double n1 = sum.step(1e-2, /*max_grad_norm=*/2.0);
    split.zero_grad();
    EXPECT_FALSE(w_split.grad().defined());
    w_split.mutable_grad() = g1.clone();
    // The bias gradient exists only on the replica: the master's is none.
    const double n2 = split.step(1e-2, 2.0, {{g2, gb}}, serial, /*parts=*/4);
    EXPECT_NEAR(n1, n2, 1e-9 * n1);
    EXPECT_GT(n1, 2.0);  // clipping is active, so the norm matters
  }
  EXPECT_EQ(calls, 6);  // the norm pass and the update pass, per step
  torch::NoGradGuard no_grad;
  EXPECT_TRUE(torch::allclose(w_sum, w_split, 0, 1e-6)) << (w_sum - w_split).abs().max().item<double>();
  EXPECT_TRUE(torch::allclose(b_sum, b_split, 0, 1e-6));
  EXPECT_FALSE(torch::allclose(w_sum, w_split + 1e-3));  // the comparison can fail
}
