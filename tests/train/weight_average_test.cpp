// The weight average (train.ema_decay) against answers worked out by hand: the
// decay's warm-up, the average after known weight sequences, integer buffers
// copied rather than averaged, and the swap in and out for evaluation.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <stdexcept>

#include "support/expect_error.h"
#include "moev/train/checkpoint.h"
#include "moev/train/weight_average.h"

using namespace moev;

namespace {

struct Tiny : torch::nn::Module {
  Tiny() {
    w = register_parameter("w", torch::zeros({2, 2}));
    count = register_buffer("count", torch::zeros({1}, torch::kLong));
  }
  at::Tensor w, count;
};

}  // namespace

TEST(WeightAverage, DecayWarmsUpToItsValue) {
  Tiny m;
  train::WeightAverage avg(m, 0.99);
  EXPECT_DOUBLE_EQ(avg.decay_at(0), 0.1);        // 1 / 10
  EXPECT_DOUBLE_EQ(avg.decay_at(8), 0.5);        // 9 / 18
  EXPECT_DOUBLE_EQ(avg.decay_at(980), 0.99);     // 981 / 990 > 0.99
  EXPECT_DOUBLE_EQ(avg.decay_at(1000000), 0.99);
}

TEST(WeightAverage, AveragesFloatsByHandAndCopiesCounters) {
  Tiny m;
  train::WeightAverage avg(m, 0.5);  // starts at w = 0
  torch::NoGradGuard ng;
  // step 0: d = 0.1 -> 0.1 * 0 + 0.9 * 10 = 9
  m.w.fill_(10);
  m.count.fill_(3);
  avg.update(0);
  EXPECT_FLOAT_EQ(avg.tensors().at("w")[0][0].item<float>(), 9.0f);
  EXPECT_EQ(avg.tensors().at("count").item<int64_t>(), 3);
  // step 20: d = min(0.5, 21 / 30) = 0.5 -> 0.5 * 9 + 0.5 * 1 = 5
  m.w.fill_(1);
  m.count.fill_(7);
  avg.update(20);
  EXPECT_FLOAT_EQ(avg.tensors().at("w")[1][1].item<float>(), 5.0f);
  EXPECT_EQ(avg.tensors().at("count").item<int64_t>(), 7);
  // The model's own weights are untouched by the average.
  EXPECT_FLOAT_EQ(m.w[0][1].item<float>(), 1.0f);
}

TEST(WeightAverage, SwapsTheAverageInForEvaluationAndBackAfterwards) {
  Tiny m;
  train::WeightAverage avg(m, 0.5);
  torch::NoGradGuard ng;
  m.w.fill_(4);
  avg.update(100);  // 0.5 * 0 + 0.5 * 4 = 2
  float seen = 0;
  avg.with_average([&] { seen = m.w[0][0].item<float>(); });
  EXPECT_FLOAT_EQ(seen, 2.0f);
  EXPECT_FLOAT_EQ(m.w[0][0].item<float>(), 4.0f);
  // Also when the evaluation fails: training must not continue from the average.
  EXPECT_THROW(avg.with_average([] { throw std::runtime_error("eval failed"); }), std::runtime_error);
  EXPECT_FLOAT_EQ(m.w[1][0].item<float>(), 4.0f);
}

TEST(WeightAverage, LoadRestoresASavedAverageAndRefusesAnotherShape) {
  Tiny a, b;
  train::WeightAverage avg_a(a, 0.5), avg_b(b, 0.5);
  {
    torch::NoGradGuard ng;
    a.w.fill_(6);
  }
  avg_a.update(50);  // 3
  avg_b.load(avg_a.tensors(), "saved.pt");
  EXPECT_TRUE(torch::equal(avg_b.tensors().at("w"), avg_a.tensors().at("w")));

  auto wrong = avg_a.tensors();
  wrong["w"] = torch::zeros({3});
  test::expect_error([&] { avg_b.load(wrong, "saved.pt"); }, {"saved.pt", "'w'", "shape"});
  auto extra = avg_a.tensors();
  extra["v"] = torch::zeros({1});
  test::expect_error([&] { avg_b.load(extra, "saved.pt"); }, {"saved.pt", "another architecture"});
}
