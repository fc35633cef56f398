// Thread-scoped generators (nn/random.h): inside a GeneratorScope, dropout and
// stochastic depth draw from the scope's generator only, so two threads drawing
// at once get what each would get alone; outside any scope they draw from the
// global generator, as LibTorch's own dropout does.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <thread>

#include <ATen/CPUGeneratorImpl.h>

#include "moev/core/error.h"
#include "moev/nn/random.h"

using moev::nn::GeneratorScope;

namespace {
at::Generator seeded(uint64_t seed) { return at::detail::createCPUGenerator(seed); }

// 20 dropout masks of x in a row, from whatever generator the thread has.
std::vector<at::Tensor> masks(const at::Tensor& x) {
  std::vector<at::Tensor> out;
  for (int i = 0; i < 20; ++i) out.push_back(moev::nn::dropout(x, 0.3, /*training=*/true));
  return out;
}
}  // namespace

TEST(Random, ScopedDrawsIgnoreTheGlobalGeneratorAndOtherThreads) {
  const auto x = torch::ones({64, 33});
  std::vector<at::Tensor> alone[2];
  for (int t = 0; t < 2; ++t) {
    GeneratorScope scope(seeded(100 + t));
    alone[t] = masks(x);
  }
  // Both threads at once, while the main thread draws from the global generator.
  std::vector<at::Tensor> together[2];
  std::thread threads[2];
  for (int t = 0; t < 2; ++t)
    threads[t] = std::thread([&, t] {
      GeneratorScope scope(seeded(100 + t));
      together[t] = masks(x);
    });
  for (int i = 0; i < 200; ++i) torch::rand({64});
  for (auto& th : threads) th.join();
  for (int t = 0; t < 2; ++t)
    for (size_t i = 0; i < alone[t].size(); ++i) EXPECT_TRUE(torch::equal(alone[t][i], together[t][i])) << t << " " << i;
  EXPECT_FALSE(torch::equal(alone[0][0], alone[1][0]));  // other seeds, other masks
  // Kept elements are scaled by 1 / (1 - p), about 30% are dropped.
  const auto m = torch::stack(alone[0]);
  EXPECT_TRUE(((m == 0) | ((m - 1 / 0.7).abs() < 1e-6)).all().item<bool>());
  EXPECT_NEAR((m == 0).to(torch::kDouble).mean().item<double>(), 0.3, 0.02);
}

TEST(Random, OutsideAScopeTheGlobalGeneratorAsLibTorchDropout) {
  const auto x = torch::randn({16, 40});
  torch::manual_seed(7);
  const auto ours = moev::nn::dropout(x, 0.25, true);
  torch::manual_seed(7);
  const auto theirs = torch::dropout(x, 0.25, true);
  EXPECT_TRUE(torch::equal(ours, theirs));  // bit for bit: runs recorded before repeat
  // A scope ends by restoring the one it replaced, nested or not.
  {
    GeneratorScope outer(seeded(1));
    { GeneratorScope inner(seeded(2)); }
    ASSERT_TRUE(moev::nn::thread_generator().has_value());
    EXPECT_EQ(moev::nn::thread_generator()->current_seed(), 1u);
  }
  EXPECT_FALSE(moev::nn::thread_generator().has_value());
  // Evaluation and p = 0 pass x through untouched.
  EXPECT_TRUE(moev::nn::dropout(x, 0.25, false).is_same(x));
  EXPECT_TRUE(moev::nn::dropout(x, 0, true).is_same(x));
  EXPECT_THROW(moev::nn::dropout(x, 1.0, true), moev::Error);
}

TEST(Random, DropPathScaleKeepsTheExpectationAndFollowsTheScope) {
  GeneratorScope scope(seeded(5));
  const auto s = moev::nn::drop_path_scale(20000, 0.2, torch::kFloat);
  ASSERT_EQ(s.sizes(), (std::vector<int64_t>{20000}));
  EXPECT_TRUE(((s == 0) | (s == 1.25f)).all().item<bool>());
  EXPECT_NEAR(s.mean().item<double>(), 1.0, 0.02);
  GeneratorScope again(seeded(5));
  EXPECT_TRUE(torch::equal(moev::nn::drop_path_scale(20000, 0.2, torch::kFloat), s));
}

// Outside a scope the mask is the one the global generator gives LibTorch's own
// bernoulli_, so models written before scopes draw what they drew then.
TEST(Random, DropPathKeepOutsideAScopeDrawsAsBefore) {
  torch::manual_seed(11);
  const auto ours = moev::nn::drop_path_keep(257, 0.3, torch::kFloat);
  torch::manual_seed(11);
  const auto theirs = torch::empty({257}).bernoulli_(0.7);
  EXPECT_TRUE(torch::equal(ours, theirs));
  EXPECT_TRUE(((ours == 0) | (ours == 1)).all().item<bool>());
  EXPECT_FALSE((ours == 1).all().item<bool>());
  EXPECT_THROW(moev::nn::drop_path_keep(4, -0.1, torch::kFloat), moev::Error);
}
