// Multi-label metrics and losses against values computed by hand.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "moev/train/multilabel.h"

using namespace moev::train;

TEST(MultiLabelMetrics, MatchHandComputedValues) {
  // 3 images, 4 tags.
  auto scores = torch::tensor({{0.9, 0.8, 0.1, 0.3}, {0.2, 0.7, 0.6, 0.1}, {0.5, 0.1, 0.2, 0.4}});
  auto y = torch::tensor({{1, 0, 0, 1}, {0, 0, 1, 0}, {0, 1, 0, 0}});
  auto m = multilabel_metrics(scores, y, 2);
  // top-1: tag 0 (hit), tag 1 (miss), tag 0 (miss) -> 1/3.
  EXPECT_NEAR(m.precision_at_1, 1.0 / 3, 1e-12);
  // top-2: {0, 1} -> 1 hit; {1, 2} -> 1; {0, 3} -> 0: (0.5 + 0.5 + 0) / 3.
  EXPECT_NEAR(m.precision_at_k, 1.0 / 3, 1e-12);
  // recall@2: 1/2, 1/1, 0/1 -> 0.5.
  EXPECT_NEAR(m.recall_at_k, 0.5, 1e-12);
  // AP per tag. Tag 0: ranks by score 0.9 (img 0, +), 0.5 (img 2), 0.2 -> AP 1.
  // Tag 1: 0.8 (img 0), 0.7 (img 1), 0.1 (img 2, +) -> 1/3.
  // Tag 2: 0.6 (img 1, +) -> 1. Tag 3: 0.4 (img 2), 0.3 (img 0, +) -> 1/2.
  EXPECT_NEAR(m.mean_ap, (1 + 1.0 / 3 + 1 + 0.5) / 4, 1e-12);
}

TEST(MultiLabelMetrics, TagsWithoutPositivesAreLeftOutOfTheMean) {
  auto scores = torch::tensor({{0.9, 0.1, 0.5}, {0.2, 0.8, 0.3}});
  auto y = torch::tensor({{1, 0, 0}, {0, 0, 0}});  // tag 1 and 2 never occur; image 1 has no tag
  auto m = multilabel_metrics(scores, y, 1);
  EXPECT_NEAR(m.mean_ap, 1.0, 1e-12);
  EXPECT_NEAR(m.recall_at_k, 1.0, 1e-12);   // over image 0 only
  EXPECT_NEAR(m.precision_at_1, 0.5, 1e-12);
}

TEST(MultiLabelLosses, MatchTheirDefinitions) {
  auto logits = torch::tensor({{2.0, -1.0, 0.5}});
  auto y = torch::tensor({{1.0, 0.0, 1.0}});
  auto sig = [](double v) { return 1 / (1 + std::exp(-v)); };
  const double bce = -(std::log(sig(2.0)) + std::log(1 - sig(-1.0)) + std::log(sig(0.5))) / 3;
  EXPECT_NEAR(sigmoid_bce(logits, y).item<double>(), bce, 1e-6);
  const double lse = std::log(std::exp(2.0) + std::exp(-1.0) + std::exp(0.5));
  EXPECT_NEAR(softmax_over_tags(logits, y).item<double>(), -0.5 * ((2.0 - lse) + (0.5 - lse)), 1e-6);
}
