// The data-efficient subset: K images per class, balanced, the same for a seed.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "support/expect_error.h"
#include "moev/data/idx_reader.h"
#include "moev/data/subset.h"

using namespace moev;

namespace {
const data::ImageSet& fmnist_train() {
  static const data::ImageSet s = data::load_fashion_mnist("/usr/share/datasets/fashion-mnist", true);
  return s;
}
}  // namespace

TEST(ClassSubset, BalancedAndDeterministicPerSeed) {
  const auto& full = fmnist_train();
  auto a = data::class_subset(full, 50, 3), b = data::class_subset(full, 50, 3), c = data::class_subset(full, 50, 4);
  ASSERT_EQ(a.size(), 500);
  auto counts = torch::bincount(a.labels, {}, 10);
  for (int64_t k = 0; k < 10; ++k) EXPECT_EQ(counts[k].item<int64_t>(), 50) << "class " << k;
  EXPECT_TRUE(torch::equal(a.images, b.images));
  EXPECT_TRUE(torch::equal(a.labels, b.labels));
  EXPECT_FALSE(torch::equal(a.images, c.images));
  // 500 different images, not some drawn twice (the counts alone pass sampling with replacement): a
  // random projection of each image's pixels, all distinct.
  torch::manual_seed(0);
  EXPECT_EQ(std::get<0>(at::_unique(a.images.view({a.size(), -1}).to(torch::kLong).mul(
                                        torch::randint(1, 1 << 20, {1, a.images[0].numel()}, torch::kLong))
                                    .sum(1)))
                .numel(),
            500);
  // Every picked image is a real training image with its own label: find each in the full set.
  auto flat = full.images.view({full.size(), -1});
  for (int64_t i = 0; i < 20; ++i) {
    auto hits = (flat == a.images[i].view({1, -1})).all(1).nonzero().view({-1});
    ASSERT_GE(hits.numel(), 1);
    EXPECT_EQ(full.labels[hits[0]].item<int64_t>(), a.labels[i].item<int64_t>());
  }
}

TEST(ClassSubset, MoreThanAClassHasIsAnError) {
  test::expect_error([] { data::class_subset(fmnist_train(), 6001, 0); },
                     {"data.per_class = 6001", "class 0 'T-shirt/top'", "only 6000"});
  test::expect_error([] { data::class_subset(fmnist_train(), 0, 0); }, {"expected >= 1"});
}
