// Routing by class as `moev analyze` measures it, on a tiny V-MoE and real
// Fashion-MNIST test images: with dropless top-K routing and renormalised
// gates every token places K assignments whose weights sum to one, so the
// per-class tallies have known totals.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moev/io/run_config.h"
#include "moev/models/model_config.h"
#include "moev/train/datasets.h"
#include "moev/train/evaluate.h"
#include "support/tiny_vmoe.h"

using namespace moev;

namespace {

// A fresh tiny V-MoE with experts in every block, dropless top-2 routing,
// evaluated with routing tallied by class on the first `images` test images.
io::RunConfig routed_run(int64_t depth, bool renormalize, int64_t images) {
  io::RunConfig c;
  c.model = test::tiny_vmoe(depth, "every-1");
  c.model.router.k = 2;
  c.model.router.dropless = true;
  c.model.router.renormalize = renormalize;
  c.data.test_limit = images;
  c.data.mean = {0.2860f};
  c.data.std = {0.3530f};
  return c;
}

train::EvalResult evaluate_by_class(const io::RunConfig& c) {
  torch::manual_seed(0);
  auto model = models::build_model(c.model);
  auto ds = train::open_datasets(c.data, c.model, /*load_train=*/false);
  return train::evaluate(*model, ds.test, ds.mean, ds.std, 32, torch::kCPU, nullptr, false,
                         /*routing_by_class=*/true);
}

}  // namespace

TEST(Evaluate, RoutingByClassTalliesEveryTokenAndItsGates) {
  const auto c = routed_run(2, /*renormalize=*/true, 96);
  auto ds = train::open_datasets(c.data, c.model, /*load_train=*/false);
  const auto r = evaluate_by_class(c);
  const int64_t classes = 10, tokens_per_image = (28 / c.model.patch) * (28 / c.model.patch);
  auto images_of = torch::bincount(ds.test.labels, {}, classes);
  ASSERT_EQ(r.class_gate_sums.size(), 2u);
  ASSERT_EQ(r.class_tokens.size(), 2u);
  for (size_t l = 0; l < 2; ++l) {
    ASSERT_EQ(r.class_gate_sums[l].size(), 4u);
    for (int64_t cl = 0; cl < classes; ++cl) {
      const double tokens = static_cast<double>(images_of[cl].item<int64_t>() * tokens_per_image);
      EXPECT_DOUBLE_EQ(r.class_tokens[l][cl], tokens) << "layer " << l << " class " << cl;
      double gates = 0;
      int64_t placed = 0;
      for (int64_t e = 0; e < 4; ++e) {
        gates += r.class_gate_sums[l][e][cl];
        placed += r.class_counts[l][e][cl];
        EXPECT_GE(r.class_gate_sums[l][e][cl], 0.0);
      }
      EXPECT_EQ(placed, 2 * int64_t(tokens)) << "layer " << l << " class " << cl;  // K per token, none dropped
      EXPECT_NEAR(gates, tokens, 1e-3 * tokens + 1e-9) << "layer " << l << " class " << cl;
    }
  }
}

TEST(Evaluate, RoutingWeightsAreThePlacedGatesOnly) {
  // Without renormalisation a token's top-2 of 4 softmax gates sum to less than
  // 1: the tally must hold those, not the whole softmax row (which sums to 1).
  const auto r = evaluate_by_class(routed_run(1, /*renormalize=*/false, 32));
  double gates = 0, tokens = 0;
  for (const auto& row : r.class_gate_sums.at(0))
    for (double g : row) gates += g;
  for (double t : r.class_tokens.at(0)) tokens += t;
  EXPECT_GT(gates, 0.5 * tokens);  // the top 2 of 4 gates hold at least half
  EXPECT_LT(gates, 0.999 * tokens);
}

// A stop asked during an evaluation ends it before the next batch: the figures
// are those of the batches done, as an evaluation of just those images gives.
TEST(Evaluate, AStopEndsItAtABatchWithTheFiguresOfTheImagesDone) {
  auto c = routed_run(1, /*renormalize=*/true, 96);
  torch::manual_seed(0);
  auto model = models::build_model(c.model);
  auto ds = train::open_datasets(c.data, c.model, /*load_train=*/false);
  int asked = 0;
  const auto part = train::evaluate(*model, ds.test, ds.mean, ds.std, 32, torch::kCPU, nullptr, false, false, false,
                                    [&] { return ++asked > 2; });
  EXPECT_EQ(asked, 3);
  EXPECT_TRUE(part.stopped);
  EXPECT_EQ(part.images, 64);
  c.data.test_limit = 64;
  auto first = train::open_datasets(c.data, c.model, /*load_train=*/false);
  const auto whole = train::evaluate(*model, first.test, ds.mean, ds.std, 32, torch::kCPU, nullptr, false, false,
                                     false, [] { return false; });
  EXPECT_FALSE(whole.stopped);
  EXPECT_EQ(whole.images, 64);
  EXPECT_DOUBLE_EQ(part.top1, whole.top1);
  EXPECT_DOUBLE_EQ(part.loss, whole.loss);
  EXPECT_EQ(part.expert_load, whole.expert_load);
}

// A batch size that is not a multiple of the routing group ends each batch in a smaller group, whose capacity
// drops other tokens: the figures moved with --batch-size (13 against 16). Batches now hold whole groups.
TEST(Evaluate, FiguresDoNotDependOnTheBatchSize) {
  auto c = routed_run(1, /*renormalize=*/true, 104);
  c.model.router.dropless = false;
  c.model.router.k = 1;
  c.model.router.capacity_factor = 0.5;  // drops, which differ with the groups
  c.model.router.group_size = 8;
  torch::manual_seed(0);
  auto model = models::build_model(c.model);
  auto ds = train::open_datasets(c.data, c.model, /*load_train=*/false);
  auto at = [&](int64_t batch) { return train::evaluate(*model, ds.test, ds.mean, ds.std, batch, torch::kCPU); };
  EXPECT_EQ(train::eval_batch_size(13, 8), 8);
  EXPECT_EQ(train::eval_batch_size(5, 8), 8);
  EXPECT_EQ(train::eval_batch_size(13, 1), 13);
  const auto whole = at(16), odd = at(13), small = at(3);
  EXPECT_DOUBLE_EQ(odd.loss, whole.loss);
  EXPECT_DOUBLE_EQ(small.loss, whole.loss);
  ASSERT_EQ(odd.dropped.size(), whole.dropped.size());
  EXPECT_GT(whole.dropped[0], 0.1);  // the capacity drops: the groups matter
  EXPECT_NEAR(odd.dropped[0], whole.dropped[0], 1e-12);  // summed over other batches
  // analyze's experts per image by chance dealt each position's tokens within a batch: it moved with the batch
  // size (7.31 experts at 8, 7.51 at 1000). They are dealt over all the test images now.
  auto routed_at = [&](int64_t batch) {
    return train::evaluate(*model, ds.test, ds.mean, ds.std, batch, torch::kCPU, nullptr, false,
                           /*routing_by_class=*/true);
  };
  const auto by8 = routed_at(8), by104 = routed_at(104);
  ASSERT_EQ(by8.chance_image_bits.size(), 1u);
  EXPECT_GT(by8.chance_image_bits[0], 0.1);
  EXPECT_NEAR(by8.chance_image_bits[0], by104.chance_image_bits[0], 1e-12);
  EXPECT_NEAR(by8.image_bits[0], by104.image_bits[0], 1e-12);
}

// With 5 classes or fewer every class is in the top 5: a 3-class model reported top-5 1.0000. It is undefined
// (NaN, null in JSON) there, and a count over more classes is kept.
TEST(Evaluate, TopFiveIsUndefinedWithFiveClassesOrFewer) {
  auto c = routed_run(1, /*renormalize=*/true, 200);
  auto ds = train::open_datasets(c.data, c.model, /*load_train=*/false);
  c.model.num_classes = 3;
  torch::manual_seed(0);
  auto model = models::build_model(c.model);
  const auto keep = ds.test.labels.lt(3).nonzero().view(-1);
  data::ImageSet three = ds.test;
  three.images = ds.test.images.index_select(0, keep).contiguous();
  three.labels = ds.test.labels.index_select(0, keep);
  three.class_names.resize(3);
  ASSERT_GT(three.size(), 30);
  const auto r = train::evaluate(*model, three, ds.mean, ds.std, 32, torch::kCPU);
  EXPECT_TRUE(std::isnan(r.top5));
  EXPECT_GE(r.top1, 0.0);
  EXPECT_EQ(train::top5_text(r.top5), "");
  EXPECT_EQ(train::top5_text(0.81234, ", "), ", top-5 0.8123");
  EXPECT_TRUE(std::isnan(train::top5_or_nan(3, 4, 5)));
  EXPECT_DOUBLE_EQ(train::top5_or_nan(3, 4, 6), 0.75);
}
