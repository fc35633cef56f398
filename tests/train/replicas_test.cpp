// Data-parallel replicas: they share the master's weights, and a batch split over
// them on their own threads gives the whole batch's gradients (routing groups are
// kept whole, so routing, capacity and aux losses are the same as unsplit).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "support/expect_error.h"
#include "support/tiny_vmoe.h"
#include "moev/train/replicas.h"

using namespace moev;

namespace {

models::ModelConfig tiny_vmoe() {
  auto c = test::tiny_vmoe();
  c.router.capacity_factor = 0.75;  // some tokens dropped: capacity must match too
  c.router.noise_std = 0;           // deterministic routing for the comparison
  return c;
}

// Mean cross-entropy plus aux losses of the batch, its gradients left in the
// parameters of replica 0 (reduced from all replicas).
std::vector<at::Tensor> grads(models::ClassifierPtr master, const models::ModelConfig& cfg,
                              int replicas, const at::Tensor& x, const at::Tensor& y) {
  train::Replicas reps(master, cfg, replicas, 2);
  reps.train(true);
  for (auto& p : master->parameters()) p.mutable_grad() = at::Tensor();
  const auto sizes = reps.slice_sizes(x.size(0), cfg.router.group_size);
  const auto xs = x.split_with_sizes(sizes), ys = y.split_with_sizes(sizes);
  reps.run(static_cast<int>(sizes.size()), [&](int r) {
    auto loss = torch::cross_entropy_loss(reps.model(r).forward(xs[r]), ys[r]);
    for (auto& l : reps.moe_layers(r)) loss = loss + l->aux_loss();
    (loss * (double(sizes[r]) / double(x.size(0)))).backward();
  });
  std::vector<at::Tensor> out;
  for (auto& p : master->parameters()) out.push_back(p.grad().clone());
  for (const auto& g : reps.replica_grads())
    for (size_t i = 0; i < g.size(); ++i)
      if (g[i].defined()) out[i] += g[i];
  return out;
}

}  // namespace

TEST(Replicas, SplitBatchGivesTheWholeBatchGradients) {
  torch::manual_seed(3);
  const auto cfg = tiny_vmoe();
  auto master = models::build_model(cfg);
  auto x = torch::randn({32, 1, 28, 28}), y = torch::randint(0, 10, {32});
  const auto whole = grads(master, cfg, 1, x, y);
  const auto split = grads(master, cfg, 2, x, y);
  ASSERT_EQ(whole.size(), split.size());
  double max_diff = 0, max_abs = 0;
  for (size_t i = 0; i < whole.size(); ++i) {
    max_diff = std::max(max_diff, (whole[i] - split[i]).abs().max().item<double>());
    max_abs = std::max(max_abs, whole[i].abs().max().item<double>());
  }
  EXPECT_GT(max_abs, 1e-3);  // the comparison is of real gradients
  EXPECT_LT(max_diff, 1e-5 * std::max(1.0, max_abs)) << "max |diff| " << max_diff;

  // Two replicas' gradients were summed: had the second's overwritten the first's, or been lost, the split run
  // would hold half the gradient of one half of the batch, far from what it holds.
  for (int64_t half : {0, 16}) {
    const auto one = grads(master, cfg, 1, x.narrow(0, half, 16), y.narrow(0, half, 16));
    double d = 0;
    for (size_t i = 0; i < split.size(); ++i) d = std::max(d, (split[i] - one[i] * 0.5).abs().max().item<double>());
    EXPECT_GT(d, 100 * max_diff + 1e-4) << "rows " << half << "..";
  }
}

// What the step log reports of a batch cut into unequal slices is the whole
// batch's: counts summed, the dropped share weighted by each slice's
// assignments and the share of tokens without an expert by its tokens.
TEST(Replicas, SlicesReportTheWholeBatchsRoutingFigures) {
  for (const auto kind : {moe::RouterKind::kTopK, moe::RouterKind::kExpertChoice}) {
    torch::manual_seed(4);
    auto cfg = tiny_vmoe();
    cfg.router.kind = kind;
    cfg.router.capacity_factor = 0.3;  // some tokens lose both choices (top-K) or are picked by no expert (EC)
    auto master = models::build_model(cfg);
    const auto x = torch::randn({24, 1, 28, 28});
    train::Replicas reps(master, cfg, 2, 2);
    reps.train(false);
    torch::NoGradGuard ng;
    const auto xs = x.split_with_sizes({8, 16});  // whole routing groups of 4 images
    reps.run(2, [&](int r) { reps.model(r).forward(xs[r]); });
    const auto split = reps.last_stats(2);
    reps.run(1, [&](int r) { reps.model(r).forward(x); });
    const auto whole = reps.last_stats(1);
    const bool ec = kind == moe::RouterKind::kExpertChoice;
    ASSERT_EQ(split.size(), whole.size());
    for (size_t l = 0; l < whole.size(); ++l) {
      EXPECT_EQ(split[l].expert_count, whole[l].expert_count) << l << " ec " << ec;
      EXPECT_EQ(split[l].tokens, whole[l].tokens) << l;
      EXPECT_NEAR(split[l].dropped_fraction, whole[l].dropped_fraction, 1e-12) << l << " ec " << ec;
      EXPECT_NEAR(split[l].unrouted_fraction, whole[l].unrouted_fraction, 1e-12) << l << " ec " << ec;
      EXPECT_GT(whole[l].unrouted_fraction, 0) << l << " ec " << ec;
      if (ec)  // a token no expert took is both
        EXPECT_NEAR(split[l].unrouted_fraction, split[l].dropped_fraction, 1e-12) << l;
      else  // K = 2: most tokens keep one choice
        EXPECT_LT(whole[l].unrouted_fraction, whole[l].dropped_fraction) << l;
    }
  }
}

TEST(Replicas, ShareTheMastersWeightsAndSliceOnGroupBoundaries) {
  const auto cfg = tiny_vmoe();
  auto master = models::build_model(cfg);
  train::Replicas reps(master, cfg, 3, 2);
  ASSERT_EQ(reps.size(), 3);
  {
    torch::NoGradGuard no_grad;
    master->parameters()[0].add_(1.0);  // in place, as the optimizer updates
  }
  for (int r = 1; r < 3; ++r)
    EXPECT_TRUE(torch::equal(reps.model(r).parameters()[0], master->parameters()[0]));

  EXPECT_EQ(reps.slice_sizes(128, 8), (std::vector<int64_t>{40, 40, 48}));
  // Never more slices than groups: a slice smaller than a group routed with another capacity.
  EXPECT_EQ(reps.slice_sizes(2, 8), (std::vector<int64_t>{2}));
  EXPECT_EQ(reps.slice_sizes(16, 8), (std::vector<int64_t>{8, 8}));
  EXPECT_EQ(reps.slice_sizes(20, 8), (std::vector<int64_t>{8, 12}));
  EXPECT_EQ(reps.slice_sizes(10, 1), (std::vector<int64_t>{3, 3, 4}));
  EXPECT_EQ(train::resolve_replicas(0, 2, 128), 2);
  EXPECT_EQ(train::resolve_replicas(4, 2, 3), 3);
  test::expect_error([] { train::resolve_replicas(-1, 2, 128); }, {"train.replicas = -1"});
}

TEST(Replicas, AnErrorInAReplicaThreadReachesTheCaller) {
  const auto cfg = tiny_vmoe();
  auto master = models::build_model(cfg);
  train::Replicas reps(master, cfg, 2, 2);
  test::expect_error([&] {
    reps.run(2, [&](int r) {
      if (r == 1) MOEV_CHECK(false, "replica ", r, " failed");
    });
  }, {"replica 1 failed"});
}

// What is cached per weight version (nn::linear's packed weights, the experts'
// inference copies) must follow the master's updates in every replica: an
// evaluation after more training once read stale weights in replica 1, whose
// parameters shared the master's storage but not its version counter.
TEST(Replicas, InferenceAfterAnUpdateSeesTheNewWeightsInEveryReplica) {
  torch::manual_seed(4);
  const auto cfg = tiny_vmoe();
  auto master = models::build_model(cfg);
  train::Replicas reps(master, cfg, 2, 2);
  reps.train(false);
  const auto x = torch::randn({8, 1, 28, 28});
  auto eval = [&](int r) {
    torch::NoGradGuard ng;
    return reps.model(r).forward(x);
  };
  const auto before = eval(1);
  EXPECT_TRUE(torch::allclose(before, eval(0), 1e-5, 1e-6));
  {
    torch::NoGradGuard no_grad;
    for (auto& p : master->parameters()) p.add_(torch::randn_like(p), 0.2);  // in place, as the optimizer updates (the head starts at zero)
  }
  const auto after = eval(1);
  EXPECT_TRUE(torch::allclose(after, eval(0), 1e-5, 1e-6)) << (after - eval(0)).abs().max().item<double>();
  EXPECT_GT((after - before).abs().max().item<double>(), 1e-3);
  EXPECT_EQ(reps.model(1).parameters()[0]._version(), master->parameters()[0]._version());
}
