// Corruptions of real Fashion-MNIST test images: deterministic, stronger with
// severity, each doing what its name says; bad specs are clear errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moev/data/corruptions.h"
#include "moev/data/idx_reader.h"
#include "support/expect_error.h"

using namespace moev;

namespace {
data::ImageSet first_test_images(int64_t n) {
  static const data::ImageSet all =
      data::load_fashion_mnist("/usr/share/datasets/fashion-mnist", /*train=*/false);
  data::ImageSet s = all;
  s.images = all.images.narrow(0, 0, n).contiguous();
  s.labels = all.labels.narrow(0, 0, n);
  return s;
}
double mean_abs_change(const data::ImageSet& a, const data::ImageSet& b) {
  return (a.images.to(torch::kFloat) - b.images.to(torch::kFloat)).abs().mean().item<double>();
}
}  // namespace

TEST(Corruptions, DeterministicAndStrongerWithSeverity) {
  const auto set = first_test_images(64);
  for (const auto& name : data::shift_names()) {
    SCOPED_TRACE(name);
    double prev = 0;
    for (int s = 1; s <= 5; ++s) {
      const auto c = data::corrupt(set, {name, s}, /*seed=*/3);
      ASSERT_EQ(c.images.sizes(), set.images.sizes());
      ASSERT_EQ(c.images.scalar_type(), torch::kUInt8);
      EXPECT_TRUE(c.labels.equal(set.labels));
      EXPECT_TRUE(c.images.equal(data::corrupt(set, {name, s}, 3).images));  // same pixels again
      const double change = mean_abs_change(set, c);
      EXPECT_GT(change, prev) << "severity " << s;
      prev = change;
    }
  }
  // A multi-label set keeps its tags: eval scored shifted images by their first tag alone (precision@1 0.70 clean,
  // 0.13 under every shift).
  auto tagged = set;
  tagged.targets = torch::arange(64 * 10).reshape({64, 10}).remainder(3).eq(0).to(torch::kFloat);
  const auto shifted = data::corrupt(tagged, {"blur", 1});
  ASSERT_TRUE(shifted.multilabel());
  EXPECT_TRUE(shifted.targets.equal(tagged.targets));
  // The seed changes the random ones only.
  EXPECT_FALSE(data::corrupt(set, {"gaussian_noise", 2}, 1)
                   .images.equal(data::corrupt(set, {"gaussian_noise", 2}, 2).images));
  EXPECT_TRUE(data::corrupt(set, {"blur", 2}, 1).images.equal(data::corrupt(set, {"blur", 2}, 2).images));
}

TEST(Corruptions, EachDoesWhatItsNameSays) {
  const auto set = first_test_images(32);
  auto f = [](const data::ImageSet& s) { return s.images.to(torch::kFloat); };
  const auto x = f(set);
  // Contrast: per-image spread shrinks by the severity's factor (0.3 at 3).
  const auto contrast = f(data::corrupt(set, {"contrast", 3}));
  auto spread = [](const torch::Tensor& t) {
    return (t - t.mean({1, 2, 3}, true)).abs().sum().item<double>();
  };
  const double ratio = spread(contrast) / spread(x);
  EXPECT_NEAR(ratio, 0.3, 0.05);
  // Blur keeps the mean brightness and removes high frequencies.
  const auto blur = f(data::corrupt(set, {"blur", 4}));
  EXPECT_NEAR(blur.mean().item<double>(), x.mean().item<double>(), 1.0);
  auto dx = [](const torch::Tensor& t) {
    return (t.narrow(3, 1, t.size(3) - 1) - t.narrow(3, 0, t.size(3) - 1)).abs().mean().item<double>();
  };
  EXPECT_LT(dx(blur), 0.6 * dx(x));
  // Occlusion zeroes one square of side round(0.35 * 28) = 10 per image, no more.
  const auto occ = f(data::corrupt(set, {"occlusion", 3}));
  const auto changed = (occ != x);
  EXPECT_TRUE((occ.masked_select(changed) == 0).all().item<bool>());
  const auto zero_or_same = ((occ == 0) | ~changed).all();
  EXPECT_TRUE(zero_or_same.item<bool>());
  EXPECT_LE(changed.sum().item<int64_t>(), 32 * 100);
  // Noise: zero-mean perturbation of the given strength (0.12 * 255 at 3, less
  // where clipping at 0 and 255 cuts it).
  const auto noise = f(data::corrupt(set, {"gaussian_noise", 3})) - x;
  EXPECT_GT(noise.std().item<double>(), 0.5 * 0.12 * 255);
  EXPECT_LT(noise.std().item<double>(), 1.05 * 0.12 * 255);
  // Rotation turns even images one way and odd ones the other: a 180-degree
  // symmetric check is not possible here, so compare with the mirror turn.
  const auto rot = f(data::corrupt(set, {"rotate", 5}));
  EXPECT_GT((rot - x).abs().mean().item<double>(), 10.0);
  EXPECT_NEAR(rot.sum().item<double>() / x.sum().item<double>(), 0.95, 0.1);  // corners cut off
}

TEST(Corruptions, SpecsParseOrFailClearly) {
  EXPECT_EQ(data::parse_shifts("all").size(), 25u);
  EXPECT_EQ(data::parse_shifts("blur").size(), 5u);
  const auto one = data::parse_shifts("rotate:4");
  ASSERT_EQ(one.size(), 1u);
  EXPECT_EQ(one[0].name, "rotate");
  EXPECT_EQ(one[0].severity, 4);
  test::expect_error([] { data::parse_shifts("fog:2"); }, {"fog", "gaussian_noise", "occlusion"});
  test::expect_error([] { data::parse_shifts("blur:9"); }, {"blur:9", "1..5"});
  test::expect_error([] { data::parse_shifts("blur:"); }, {"1..5"});
}
