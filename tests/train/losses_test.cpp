// The soft-target losses, the diversity loss and online distillation between
// branches and the batch mixing, against hand-computed values and their defining properties.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "moev/train/losses.h"

using namespace moev::train;

namespace {
// How far apart two branches' predictions are: the L1 distance of their softmaxes.
double gap(const at::Tensor& x, const at::Tensor& y) {
  return (torch::softmax(x, 1) - torch::softmax(y, 1)).abs().sum().item<double>();
}
}  // namespace

TEST(DiversityLoss, ZeroWhenBranchesAgree) {
  torch::manual_seed(0);
  auto l = torch::randn({8, 10});
  EXPECT_NEAR(diversity_loss({l, l.clone(), l.clone()}).item<double>(), 0.0, 1e-6);
}

TEST(DiversityLoss, MatchesHandComputedKlOfTwoBranches) {
  // p1 = (0.8, 0.2), p2 = (0.2, 0.8): the mean is uniform, and each branch's
  // KL(p_i || p_mean) = 0.8 ln 1.6 + 0.2 ln 0.4.
  auto l1 = torch::tensor({{std::log(0.8f), std::log(0.2f)}});
  auto l2 = torch::tensor({{std::log(0.2f), std::log(0.8f)}});
  const double kl = 0.8 * std::log(1.6) + 0.2 * std::log(0.4);
  EXPECT_NEAR(diversity_loss({l1, l2}).item<double>(), -2 * kl, 1e-6);
  EXPECT_LT(diversity_loss({l1, l2}).item<double>(), 0.0);  // differing branches: below 0
}

TEST(DiversityLoss, GradientStepPushesBranchesApart) {
  torch::manual_seed(1);
  auto a = (torch::randn({16, 10}) * 0.5).requires_grad_(true);
  auto b = (a.detach() + 0.3 * torch::randn({16, 10})).requires_grad_(true);
  const double before_gap = gap(a, b);
  auto loss = diversity_loss({a, b});
  loss.backward();
  torch::NoGradGuard ng;
  auto a2 = a - 0.5 * a.grad(), b2 = b - 0.5 * b.grad();
  // Descending the loss raises the summed KL and the distance between the branches' predictions.
  EXPECT_LT(diversity_loss({a2, b2}).item<double>(), loss.item<double>() - 1e-4);
  EXPECT_GT(gap(a2, b2), before_gap);
}

TEST(DiversityLoss, BoundedBelowByMinusNLogN) {
  // KL(p_i || p_mean) <= log N: the loss cannot run away however confident the branches are.
  auto l = torch::zeros({4, 3, 3});
  for (int i = 0; i < 3; ++i) l[i].select(1, i).fill_(60.0);  // branch i certain of class i
  std::vector<at::Tensor> br{l[0], l[1], l[2]};
  const double v = diversity_loss(br).item<double>();
  EXPECT_GE(v, -3 * std::log(3.0) - 1e-5);
  EXPECT_NEAR(v, -3 * std::log(3.0), 1e-4);
}

TEST(OnlineDistillLoss, ZeroWhenBranchesAgreeAndMatchesHandComputedKl) {
  torch::manual_seed(2);
  auto l = torch::randn({8, 10});
  EXPECT_NEAR(online_distill_loss({l, l.clone(), l.clone()}, 3.0).item<double>(), 0.0, 1e-6);
  // Logits (ln 0.8, ln 0.2) and (ln 0.2, ln 0.8) at T = 1: the mean logits are
  // equal, q is uniform, and each branch's KL(q || p_i) = 0.5 ln(0.5 / 0.8) + 0.5 ln(0.5 / 0.2).
  auto l1 = torch::tensor({{std::log(0.8f), std::log(0.2f)}});
  auto l2 = torch::tensor({{std::log(0.2f), std::log(0.8f)}});
  const double kl = 0.5 * std::log(0.5 / 0.8) + 0.5 * std::log(0.5 / 0.2);
  EXPECT_NEAR(online_distill_loss({l1, l2}, 1.0).item<double>(), 2 * kl, 1e-6);
  // T^2 scaling: at T = 2 the softened branches (sqrt ratios) give KL times 4.
  const double p = 2.0 / 3.0;  // softmax((ln 0.8, ln 0.2) / 2) = (2/3, 1/3)
  const double kl2 = 0.5 * std::log(0.5 / p) + 0.5 * std::log(0.5 / (1 - p));
  EXPECT_NEAR(online_distill_loss({l1, l2}, 2.0).item<double>(), 4 * 2 * kl2, 1e-5);
}

TEST(OnlineDistillLoss, GradientStepPullsBranchesTogetherAndLeavesTheTeacherAlone) {
  torch::manual_seed(3);
  auto a = (torch::randn({16, 10}) * 0.5).requires_grad_(true);
  auto b = (a.detach() + 0.5 * torch::randn({16, 10})).requires_grad_(true);
  const double before_gap = gap(a, b);
  auto loss = online_distill_loss({a, b}, 3.0);
  loss.backward();
  // The teacher (the mean) is held fixed: each branch's gradient is that of
  // T^2 KL(q || p_i) alone, T (p_i - q) per logit, mean over the batch.
  {
    torch::NoGradGuard ng;
    auto q = torch::softmax((a + b) / 6.0, 1);
    EXPECT_TRUE(torch::allclose(a.grad(), 3.0 * (torch::softmax(a / 3.0, 1) - q) / 16.0, 1e-5, 1e-7));
  }
  torch::NoGradGuard ng;
  auto a2 = a - 2.0 * a.grad(), b2 = b - 2.0 * b.grad();
  EXPECT_LT(online_distill_loss({a2, b2}, 3.0).item<double>(), loss.item<double>() - 1e-4);
  EXPECT_LT(gap(a2, b2), before_gap);
}

TEST(DiversityLoss, OffTargetIgnoresTheSupportedClasses) {
  torch::manual_seed(4);
  auto y = torch::tensor({3, 0, 7, 7, 1, 9}, torch::kInt64);
  auto a = torch::randn({6, 10}).requires_grad_(true);
  // b differs from a only at each row's label: renormalised over the other
  // classes the two branches agree exactly.
  auto b = (a.detach() + 3.0 * torch::one_hot(y, 10).to(torch::kFloat)).requires_grad_(true);
  const auto off = supported_classes(smoothed_one_hot(y, 10, 0.1));
  EXPECT_TRUE(torch::equal(off, torch::one_hot(y, 10).to(torch::kBool)));
  EXPECT_LT(diversity_loss({a, b}).item<double>(), -1e-3);  // with the label they differ
  auto loss = diversity_loss({a, b}, off);
  EXPECT_NEAR(loss.item<double>(), 0.0, 1e-6);
  // Apart elsewhere: the loss sees it, and its gradient never touches a label's logit.
  auto c = (a.detach() + 0.5 * torch::randn({6, 10})).requires_grad_(true);
  auto apart = diversity_loss({a, c}, off);
  EXPECT_LT(apart.item<double>(), -1e-3);
  apart.backward();
  EXPECT_EQ(a.grad().masked_select(off).abs().max().item<float>(), 0.0f);
  EXPECT_GT(a.grad().masked_select(off.logical_not()).abs().max().item<float>(), 0.0f);
  EXPECT_TRUE(torch::isfinite(a.grad()).all().item<bool>());
  EXPECT_THROW(diversity_loss({a, c}, off.narrow(0, 0, 3)), std::exception);
}

TEST(DiversityLoss, SupportedClassesOfMixedAndDistilledTargets) {
  // Mixup at lam 0.7 supports both labels; at lam 0.97 the faint one falls below 1/L.
  auto y = torch::tensor({2}, torch::kInt64), z = torch::tensor({5}, torch::kInt64);
  auto t = [&](double lam) { return lam * smoothed_one_hot(y, 10, 0.1) + (1 - lam) * smoothed_one_hot(z, 10, 0.1); };
  EXPECT_EQ(supported_classes(t(0.7)).sum().item<int64_t>(), 2);
  EXPECT_TRUE(supported_classes(t(0.7))[0][5].item<bool>());
  EXPECT_EQ(supported_classes(t(0.97)).sum().item<int64_t>(), 1);
  // A uniform target supports nothing, a row of any target at most L - 1 classes.
  EXPECT_EQ(supported_classes(torch::full({1, 4}, 0.25)).sum().item<int64_t>(), 0);
  torch::manual_seed(5);
  auto r = torch::softmax(torch::randn({64, 10}) * 3, 1);
  EXPECT_LE(supported_classes(r).sum(1).max().item<int64_t>(), 9);
}

TEST(SoftTargets, SmoothedOneHotCrossEntropyEqualsTorchLabelSmoothing) {
  torch::manual_seed(2);
  auto logits = torch::randn({6, 5});
  auto y = torch::tensor({0, 4, 2, 2, 1, 3}, torch::kInt64);
  auto t = smoothed_one_hot(y, 5, 0.1);
  EXPECT_TRUE(torch::allclose(t.sum(1), torch::ones({6})));
  auto ref = torch::nn::functional::cross_entropy(
      logits, y, torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(0.1));
  EXPECT_NEAR(soft_cross_entropy(logits, t).item<double>(), ref.item<double>(), 1e-6);
}

TEST(SoftTargets, CosineLossIsZeroOnlyWhenProbabilitiesPointAlongTheTarget) {
  auto target = torch::tensor({{0.7f, 0.2f, 0.1f}});
  EXPECT_NEAR(cosine_loss(target.log(), target).item<double>(), 0.0, 1e-6);
  auto wrong = torch::tensor({{0.1f, 0.2f, 0.7f}}).log();
  const double expect = 1 - (0.07 + 0.04 + 0.07) / (0.7 * 0.7 + 0.04 + 0.01);
  EXPECT_NEAR(cosine_loss(wrong, target).item<double>(), expect, 1e-5);
}

TEST(Mixing, TargetsSumToOneAndLamIsTheShareOfEachImage) {
  MixOptions o;
  o.mixup_alpha = 0.8;
  o.cutmix_alpha = 1.0;
  int mixups = 0, cutmixes = 0;
  const int64_t B = 6, H = 28, W = 28;
  for (int64_t step = 0; step < 200; ++step) {
    const Mix m = draw_mix(o, 7, step, H, W);
    ASSERT_NE(m.kind, Mix::kNone);  // prob = 1
    ASSERT_GE(m.lam, 0.0);
    ASSERT_LE(m.lam, 1.0);
    mixups += m.kind == Mix::kMixup;
    cutmixes += m.kind == Mix::kCutmix;
    // Image i is the constant i: after mixing its mean is lam i + (1 - lam)(B-1-i)
    // exactly when lam is the share of its own pixels (cutmix: the box's area).
    auto x = torch::arange(B, torch::kFloat).view({B, 1, 1, 1}).expand({B, 1, H, W}).contiguous();
    auto y = torch::arange(B, torch::kInt64) % 3;
    auto t = smoothed_one_hot(y, 3, 0.1);
    const auto own = t.clone();
    apply_mix(m, x, t);
    ASSERT_TRUE(torch::allclose(t.sum(1), torch::ones({B}), 1e-6, 1e-6));
    // ... and its target is lam of its own plus 1 - lam of its partner's (labels 0 and 2, 2 and 0, 1 and 1).
    ASSERT_TRUE(torch::allclose(t, m.lam * own + (1 - m.lam) * own.flip(0), 1e-6, 1e-6))
        << "step " << step << " kind " << m.kind << " lam " << m.lam;
    for (int64_t i = 0; i < B; ++i)
      ASSERT_NEAR(x[i].mean().item<double>(), m.lam * double(i) + (1 - m.lam) * double(B - 1 - i), 1e-4)
          << "step " << step << " kind " << m.kind;
  }
  EXPECT_GT(mixups, 60);  // switch_prob 0.5
  EXPECT_GT(cutmixes, 60);
}

TEST(Mixing, DrawIsAPureFunctionOfSeedAndStep) {
  MixOptions o;
  o.mixup_alpha = 0.4;
  o.prob = 0.5;
  int mixed = 0;
  for (int64_t step = 0; step < 100; ++step) {
    const Mix a = draw_mix(o, 3, step, 28, 28), b = draw_mix(o, 3, step, 28, 28);
    EXPECT_EQ(a.kind, b.kind);
    EXPECT_EQ(a.lam, b.lam);
    mixed += a.kind != Mix::kNone;
  }
  EXPECT_GT(mixed, 30);
  EXPECT_LT(mixed, 70);
  EXPECT_NE(draw_mix(o, 3, 0, 28, 28).lam + draw_mix(o, 3, 1, 28, 28).lam + draw_mix(o, 3, 2, 28, 28).lam,
            draw_mix(o, 4, 0, 28, 28).lam + draw_mix(o, 4, 1, 28, 28).lam + draw_mix(o, 4, 2, 28, 28).lam);
}
