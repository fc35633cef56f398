// Router invariants over many random cases, known answers for priority and BPR,
// dropless equal to a dense weighted-sum reference, and aux-loss ordering.
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <set>

#include "moev/core/error.h"
#include "moev/moe/router.h"
#include "support/expect_error.h"
#include "support/router_configs.h"

using namespace moev::moe;

namespace {

struct Case {
  const char* name;
  int64_t E, K, images, tokens_per_image, group_size;
  double capacity;
  bool bpr, dropless;
  RouterKind kind;
};

const Case kCases[] = {
    {"e4k1", 4, 1, 8, 5, 4, 1.0, false, false, RouterKind::kTopK},
    {"e8k2", 8, 2, 8, 7, 2, 1.05, false, false, RouterKind::kTopK},
    {"e8k2_bpr", 8, 2, 8, 7, 2, 0.5, true, false, RouterKind::kTopK},
    {"e16k2_short", 16, 2, 6, 9, 4, 0.25, false, false, RouterKind::kTopK},  // ragged last group
    {"e8k4_dropless", 8, 4, 5, 3, 2, 1.0, false, true, RouterKind::kTopK},
    {"e3k3", 3, 3, 4, 4, 8, 2.0, true, false, RouterKind::kTopK},
    {"ec_e8", 8, 2, 8, 7, 2, 1.0, false, false, RouterKind::kExpertChoice},
    {"ec_e4_ragged", 4, 1, 5, 6, 2, 0.5, false, false, RouterKind::kExpertChoice},
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

RouterConfig config_of(const Case& c) {
  return moev::test::router_config(c.kind, c.E, c.K, c.capacity, c.bpr, c.dropless, c.group_size);
}

}  // namespace

class RouterInvariants : public ::testing::TestWithParam<Case> {};

TEST_P(RouterInvariants, SlotsConsistentNoOverflowEveryAssignmentPlacedOrDropped) {
  const Case c = GetParam();
  const RouterConfig cfg = config_of(c);
  for (int seed = 0; seed < 20; ++seed) {
    torch::manual_seed(seed);
    const int64_t T = c.images * c.tokens_per_image;
    auto logits = torch::randn({T, c.E}) * 2;
    auto r = route(logits, cfg, c.tokens_per_image, /*training=*/seed % 2 == 0);
    const int64_t S = c.group_size * c.tokens_per_image;
    const int64_t G = (T + S - 1) / S;
    ASSERT_EQ(r.groups, G);
    ASSERT_EQ(static_cast<int64_t>(r.offsets.size()), c.E + 1);
    const int64_t A = r.offsets.back();
    ASSERT_GE(r.token_index.size(0), A);
    if (c.kind == RouterKind::kTopK) {
      const int64_t bound = c.dropless ? T * c.K : std::min(T * c.K, c.E * r.capacity * G);
      ASSERT_EQ(r.token_index.size(0), bound) << "top-K buffers have a fixed size";
    }
    for (int64_t row = A; row < r.token_index.size(0); ++row)
      ASSERT_EQ(r.gate_index[row].item<int64_t>(), T * c.E) << "padding points at the zero weight";
    ASSERT_FALSE(torch::isnan(r.combine_gates).any().item<bool>());
    for (auto* l : {&r.aux.importance, &r.aux.load, &r.aux.switch_lb, &r.aux.z})
      ASSERT_TRUE(torch::isfinite(*l).item<bool>());
    auto ti = r.token_index.accessor<int64_t, 1>();
    auto gi = r.gate_index.accessor<int64_t, 1>();
    std::set<std::pair<int64_t, int64_t>> seen;  // (token, expert)
    for (int64_t e = 0; e < c.E; ++e) {
      ASSERT_LE(r.offsets[e], r.offsets[e + 1]);
      std::vector<int64_t> per_group(G, 0);
      for (int64_t row = r.offsets[e]; row < r.offsets[e + 1]; ++row) {
        const int64_t t = ti[row];
        ASSERT_TRUE(t >= 0 && t < T);
        ASSERT_EQ(gi[row], t * c.E + e);
        ASSERT_TRUE(seen.insert({t, e}).second) << "token placed twice in one expert";
        ++per_group[t / S];
      }
      for (int64_t g = 0; g < G && !c.dropless; ++g) {
        const int64_t Sg = std::min(S, T - g * S);
        ASSERT_LE(per_group[g], expert_capacity(cfg, Sg)) << "expert " << e << " over capacity";
      }
      ASSERT_EQ(r.expert_count[e].item<int64_t>(), r.offsets[e + 1] - r.offsets[e]);
    }
    if (c.kind == RouterKind::kExpertChoice) {
      // Each expert fills its capacity in every group (it picks; nobody is turned away), and a token no expert
      // picked is the dropped share.
      for (int64_t e = 0; e < c.E; ++e) {
        int64_t want = 0;
        for (int64_t g = 0; g < G; ++g) want += expert_capacity(cfg, std::min(S, T - g * S));
        ASSERT_EQ(r.offsets[e + 1] - r.offsets[e], want) << "expert " << e;
      }
      std::set<int64_t> placed;
      for (const auto& [t, e] : seen) placed.insert(t);
      ASSERT_NEAR(r.dropped_fraction, 1.0 - double(placed.size()) / double(T), 1e-12);
      ASSERT_NEAR(r.unrouted_fraction, 1.0 - double(placed.size()) / double(T), 1e-12);
      continue;
    }
    // Every (token, choice) is either in the row assign_row names, or dropped.
    auto ae = r.assign_expert.accessor<int64_t, 2>();
    auto ar = r.assign_row.accessor<int64_t, 2>();
    int64_t dropped = 0, unrouted = 0;
    for (int64_t t = 0; t < T; ++t) {
      int64_t lost = 0;  // of this token's K choices
      for (int64_t k = 0; k < c.K; ++k) lost += ar[t][k] < 0;
      unrouted += lost == c.K;
      for (int64_t k = 0; k < c.K; ++k) {
        if (ar[t][k] < 0) { ++dropped; continue; }
        const int64_t e = ae[t][k];
        ASSERT_TRUE(ar[t][k] >= r.offsets[e] && ar[t][k] < r.offsets[e + 1]);
        ASSERT_EQ(ti[ar[t][k]], t);
      }
    }
    ASSERT_EQ(dropped + A, T * c.K);
    ASSERT_NEAR(r.dropped_fraction, double(dropped) / double(T * c.K), 1e-12);
    ASSERT_NEAR(r.unrouted_fraction, double(unrouted) / double(T), 1e-12);
    if (c.dropless) {
      ASSERT_EQ(dropped, 0);
    }
  }
}

// Tokens expert e received, in placement order.
static std::vector<int64_t> tokens_of(const RoutingResult& r, int64_t e) {
  std::vector<int64_t> out;
  for (int64_t row = r.offsets[e]; row < r.offsets[e + 1]; ++row)
    out.push_back(r.token_index[row].item<int64_t>());
  return out;
}

INSTANTIATE_TEST_SUITE_P(Cases, RouterInvariants, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(Router, CapacityFormula) {
  RouterConfig cfg;
  cfg.num_experts = 8;
  cfg.k = 2;
  cfg.capacity_factor = 1.05;
  EXPECT_EQ(expert_capacity(cfg, 8 * 49), 103);  // ceil(2*392*1.05/8) = ceil(102.9)
  cfg.capacity_factor = 0.01;
  EXPECT_EQ(expert_capacity(cfg, 10), 1);
  // At most the group's tokens (an expert takes each once): 1e17 overflowed int64 and dropped every token.
  for (double c : {8.0, 1e17, 1e300}) {
    cfg.capacity_factor = c;
    EXPECT_EQ(expert_capacity(cfg, 392), 392) << c;
  }
}

TEST(Router, KMajorPriorityFirstChoicesBeforeSecond) {
  // 4 tokens, 2 experts, K=2, capacity ceil(2*4*0.5/2)=2 per expert. Every token
  // prefers expert 0, so expert 0 takes tokens 0,1 as first choices and expert 1
  // takes tokens 0,1 as second choices... unless K-major: all first choices
  // (0,1 placed in e0; 2,3 dropped from e0) come before second choices (e1 gets 0,1).
  RouterConfig cfg;
  cfg.num_experts = 2;
  cfg.k = 2;
  cfg.capacity_factor = 0.5;
  cfg.group_size = 4;
  auto logits = torch::tensor({{3.f, 0.f}, {2.f, 0.f}, {1.f, 0.f}, {0.5f, 0.f}});
  auto r = route(logits, cfg, 1, false);
  EXPECT_EQ(r.capacity, 2);
  EXPECT_EQ(tokens_of(r, 0), (std::vector<int64_t>{0, 1}));
  EXPECT_EQ(tokens_of(r, 1), (std::vector<int64_t>{0, 1}));
  // Now make token 3 prefer expert 1 as first choice: it must beat the second
  // choices of tokens 0 and 1 for expert 1.
  logits[3][1] = 5.f;
  r = route(logits, cfg, 1, false);
  EXPECT_EQ(tokens_of(r, 1), (std::vector<int64_t>{3, 0}));
}

// Known answer, with the most confident tokens last so that token order and
// batch priority place different tokens. Token t prefers expert e(t) by margin
// m(t) (gate sigmoid(m)); expert 0: tokens 0 2 3 5 7 with margins rising, expert
// 1: tokens 1 4 6 rising; 2 slots each.
TEST(Router, BprKeepsHighestGateTokensWhenCapacityShort) {
  RouterConfig cfg;
  cfg.num_experts = 2;
  cfg.k = 1;
  cfg.capacity_factor = 0.5;  // 8 tokens, 2 experts: ceil(8 * 0.5 / 2) = 2 slots each
  cfg.group_size = 8;
  const int64_t expert[8] = {0, 1, 0, 0, 1, 0, 1, 0};
  const float margin[8] = {0.2f, 0.1f, 0.5f, 1.0f, 1.5f, 2.0f, 2.5f, 3.0f};
  auto logits = torch::zeros({8, 2});
  for (int64_t t = 0; t < 8; ++t) logits[t][expert[t]] = margin[t];
  for (bool bpr : {true, false}) {
    cfg.bpr = bpr;
    const auto r = route(logits, cfg, 1, false);
    ASSERT_EQ(r.capacity, 2);
    // BPR: each expert's two most confident tokens, the most confident first; else the first two in token order.
    EXPECT_EQ(tokens_of(r, 0), bpr ? (std::vector<int64_t>{7, 5}) : (std::vector<int64_t>{0, 2})) << bpr;
    EXPECT_EQ(tokens_of(r, 1), bpr ? (std::vector<int64_t>{6, 4}) : (std::vector<int64_t>{1, 4})) << bpr;
    EXPECT_DOUBLE_EQ(r.dropped_fraction, 0.5);
    EXPECT_DOUBLE_EQ(r.unrouted_fraction, 0.5);  // K = 1: a dropped assignment is a token without an expert
    const std::set<int64_t> dropped = bpr ? std::set<int64_t>{0, 1, 2, 3} : std::set<int64_t>{3, 5, 6, 7};
    for (int64_t t = 0; t < 8; ++t)
      EXPECT_EQ(r.assign_row[t][0].item<int64_t>() < 0, dropped.count(t) == 1) << "token " << t << " bpr " << bpr;
  }
}

// Top-2 with one slot per expert: first choices claim the slots before any
// second. Tokens 0 and 2 take them; tokens 1 and 3 lose both choices and pass
// by their residual alone. 6 of 8 assignments dropped, 2 of 4 tokens unrouted.
TEST(Router, TopTwoCountsTokensThatLostEveryChoice) {
  RouterConfig cfg;
  cfg.num_experts = 2;
  cfg.k = 2;
  cfg.group_size = 4;
  cfg.capacity_factor = 0.25;  // ceil(2 * 4 * 0.25 / 2) = 1 slot per expert
  const int64_t first[4] = {0, 0, 1, 1};
  auto logits = torch::zeros({4, 2});
  for (int64_t t = 0; t < 4; ++t) logits[t][first[t]] = 1.0f;
  const auto r = route(logits, cfg, 1, false);
  ASSERT_EQ(r.capacity, 1);
  EXPECT_EQ(tokens_of(r, 0), (std::vector<int64_t>{0}));
  EXPECT_EQ(tokens_of(r, 1), (std::vector<int64_t>{2}));
  EXPECT_DOUBLE_EQ(r.dropped_fraction, 6.0 / 8.0);
  EXPECT_DOUBLE_EQ(r.unrouted_fraction, 2.0 / 4.0);
  cfg.capacity_factor = 1.0;  // four slots each: every choice placed
  const auto roomy = route(logits, cfg, 1, false);
  EXPECT_DOUBLE_EQ(roomy.dropped_fraction, 0.0);
  EXPECT_DOUBLE_EQ(roomy.unrouted_fraction, 0.0);
}

// Known answer for Expert-Choice: each expert takes the `capacity` tokens of the
// group with its highest gates, highest first, whatever the tokens' own top
// choice; a token no expert took is dropped. The second group (tokens 6-8) is
// ragged and gets the capacity of its 3 tokens.
TEST(Router, ExpertChoiceTakesEachExpertsHighestGateTokensPerGroup) {
  RouterConfig cfg;
  cfg.kind = RouterKind::kExpertChoice;
  cfg.num_experts = 2;
  cfg.k = 1;
  cfg.group_size = 6;
  // Expert 1's logit is 0, so expert 0's gate rises with its logit and expert 1's falls.
  const float l0[9] = {2.0f, -1.0f, 0.5f, 3.0f, -2.0f, 0.0f, 1.0f, -0.5f, 0.2f};
  auto logits = torch::zeros({9, 2});
  for (int64_t t = 0; t < 9; ++t) logits[t][0] = l0[t];
  cfg.capacity_factor = 1.0;  // ceil(6 / 2) = 3 per expert in group 0, ceil(3 / 2) = 2 in group 1
  auto r = route(logits, cfg, 1, false);
  EXPECT_EQ(tokens_of(r, 0), (std::vector<int64_t>{3, 0, 2, 6, 8}));
  EXPECT_EQ(tokens_of(r, 1), (std::vector<int64_t>{4, 1, 5, 7, 8}));
  EXPECT_DOUBLE_EQ(r.dropped_fraction, 0.0);
  cfg.capacity_factor = 0.5;  // 2 per expert in group 0, 1 in group 1: tokens 2, 5 and 8 go nowhere
  r = route(logits, cfg, 1, false);
  EXPECT_EQ(tokens_of(r, 0), (std::vector<int64_t>{3, 0, 6}));
  EXPECT_EQ(tokens_of(r, 1), (std::vector<int64_t>{4, 1, 7}));
  EXPECT_DOUBLE_EQ(r.dropped_fraction, 3.0 / 9.0);
  EXPECT_EQ(r.expert_count[0].item<int64_t>(), 3);
}

TEST(Router, RenormalizeMakesSelectedWeightsSumToOne) {
  RouterConfig cfg;
  cfg.num_experts = 6;
  cfg.k = 2;
  cfg.renormalize = true;
  cfg.dropless = true;
  auto logits = torch::randn({20, 6});
  auto r = route(logits, cfg, 5, false);
  auto w = r.combine_gates.gather(1, r.assign_expert).sum(-1);
  EXPECT_TRUE(torch::allclose(w, torch::ones({20}), 1e-5, 1e-5));
  cfg.renormalize = false;
  r = route(logits, cfg, 5, false);
  EXPECT_TRUE((r.combine_gates.gather(1, r.assign_expert).sum(-1) < 1).all().item<bool>());
}

TEST(Router, AuxLossesLargerForImbalancedRouting) {
  RouterConfig cfg;
  cfg.num_experts = 8;
  cfg.k = 2;
  torch::manual_seed(0);
  auto balanced = torch::randn({256, 8}) * 0.1;
  auto skewed = balanced.clone();
  skewed.select(1, 0) += 4.0;  // every token wants expert 0
  skewed.select(1, 1) += 3.0;
  auto rb = route(balanced, cfg, 16, true);
  auto rs = route(skewed, cfg, 16, true);
  EXPECT_GT(rs.aux.importance.item<double>(), 10 * rb.aux.importance.item<double>());
  EXPECT_GT(rs.aux.load.item<double>(), 10 * rb.aux.load.item<double>());
  EXPECT_GT(rs.aux.switch_lb.item<double>(), rb.aux.switch_lb.item<double>() + 0.5);
  EXPECT_NEAR(rb.aux.switch_lb.item<double>(), 1.0, 0.2);  // E * sum(1/E * 1/E) = 1 when uniform
  EXPECT_GT(rs.aux.z.item<double>(), rb.aux.z.item<double>());
}

TEST(Router, AuxLossesHaveGradients) {
  RouterConfig cfg;
  cfg.num_experts = 4;
  cfg.k = 2;
  auto logits = torch::randn({32, 4}, torch::requires_grad());
  auto r = route(logits, cfg, 4, true);
  for (auto* l : {&r.aux.importance, &r.aux.load, &r.aux.switch_lb, &r.aux.z}) {
    auto g = torch::autograd::grad({*l}, {logits}, {}, /*retain_graph=*/true)[0];
    EXPECT_GT(g.abs().sum().item<double>(), 0);
  }
}

TEST(Router, AuxLossesOnlyInTraining) {
  RouterConfig cfg;
  cfg.num_experts = 4;
  auto logits = torch::randn({32, 4}) * 3;
  auto r = route(logits, cfg, 4, /*training=*/false);
  for (auto* l : {&r.aux.importance, &r.aux.load, &r.aux.switch_lb, &r.aux.z})
    EXPECT_EQ(l->item<double>(), 0.0);
  EXPECT_GT(route(logits, cfg, 4, true).aux.z.item<double>(), 0.0);
}

TEST(Router, NoiseOnlyInTraining) {
  RouterConfig cfg;
  cfg.num_experts = 4;
  cfg.k = 1;
  auto logits = torch::randn({16, 4});
  auto a = route(logits, cfg, 4, false), b = route(logits, cfg, 4, false);
  EXPECT_TRUE(torch::equal(a.combine_gates, b.combine_gates));
  EXPECT_TRUE(torch::allclose(a.combine_gates, torch::softmax(logits, -1)));
  auto c = route(logits, cfg, 4, true);
  EXPECT_FALSE(torch::equal(a.combine_gates, c.combine_gates));
}

// Known answers for the auxiliary losses of 2 tokens and 2 experts, the
// training noise drawn from a generator the test draws the same numbers from:
// noise N(0, (noise_std / E)^2), importance and load as CV^2 (population) of
// per-expert sums, load with vmoe's P(logit + own noise > the noisy K-th
// logit), Switch's E * sum frac_top1 * mean gate, z = mean logsumexp^2.
TEST(Router, AuxLossesKnownAnswer) {
  RouterConfig cfg;
  cfg.num_experts = 2;
  cfg.k = 1;
  cfg.noise_std = 1.0;  // sigma = 1 / E = 0.5
  cfg.group_size = 1;
  const double l[2][2] = {{std::log(3.0), 0.0}, {std::log(2.0), 0.0}};  // clean gates 3/4 1/4, 2/3 1/3
  auto logits = torch::tensor({{l[0][0], l[0][1]}, {l[1][0], l[1][1]}}, torch::kFloat);
  auto gen = at::detail::createCPUGenerator(11), same = at::detail::createCPUGenerator(11);
  const auto r = route(logits, cfg, /*tokens_per_image=*/2, /*training=*/true, gen);
  const auto n = at::randn({2, 2}, same, torch::kFloat);
  const double sigma = 0.5;
  double noisy[2][2], gate[2][2], load_sum[2] = {0, 0}, gate_sum[2] = {0, 0}, top1_count[2] = {0, 0};
  for (int t = 0; t < 2; ++t) {
    for (int e = 0; e < 2; ++e) noisy[t][e] = l[t][e] + sigma * n[t][e].item<double>();
    const double m = std::max(noisy[t][0], noisy[t][1]);
    const double z = std::exp(noisy[t][0] - m) + std::exp(noisy[t][1] - m);
    for (int e = 0; e < 2; ++e) {
      gate[t][e] = std::exp(noisy[t][e] - m) / z;
      gate_sum[e] += gate[t][e];
      load_sum[e] += 0.5 * std::erfc((m - l[t][e]) / (sigma * std::sqrt(2.0)));  // 1 - Phi((thr - l) / sigma)
    }
    top1_count[noisy[t][1] > noisy[t][0] ? 1 : 0] += 1;
  }
  auto cv2 = [](const double* v) {
    const double mean = (v[0] + v[1]) / 2, d = v[0] - mean;
    return d * d / (mean * mean);  // population variance of two values: d^2
  };
  for (int t = 0; t < 2; ++t)
    for (int e = 0; e < 2; ++e) EXPECT_NEAR(r.combine_gates[t][e].item<double>(), gate[t][e], 1e-6);
  EXPECT_NEAR(r.aux.importance.item<double>(), 25.0 / 144.0, 1e-6);  // sums 17/12 and 7/12
  EXPECT_NEAR(r.aux.z.item<double>(), (std::pow(std::log(4.0), 2) + std::pow(std::log(3.0), 2)) / 2, 1e-5);
  EXPECT_NEAR(r.aux.load.item<double>(), cv2(load_sum), 1e-5);
  EXPECT_NEAR(r.aux.switch_lb.item<double>(),
              2 * (top1_count[0] / 2 * gate_sum[0] / 2 + top1_count[1] / 2 * gate_sum[1] / 2), 1e-6);
  EXPECT_GT(r.aux.load.item<double>(), 1e-3);  // the noise did not make the case trivial
}

TEST(Router, BadConfigsRejectedWithFieldName) {
  RouterConfig cfg;
  cfg.num_experts = 4;
  cfg.k = 5;
  try {
    validate(cfg);
    FAIL();
  } catch (const moev::Error& e) {
    EXPECT_NE(std::string(e.what()).find("moe.k = 5"), std::string::npos) << e.what();
  }
  cfg.k = 2;
  cfg.capacity_factor = 0;
  moev::test::expect_error([&] { validate(cfg); }, {"moe.capacity = 0", "expected a capacity ratio > 0"});
  cfg.capacity_factor = -1;
  moev::test::expect_error([&] { validate(cfg); }, {"moe.capacity = -1"});
  moev::test::expect_error([&] { parse_router_kind("nearest"); }, {"'nearest'", "topk or expert_choice"});
  // Expert-Choice has no use for top-K's dropless mode, BPR or renormalised gates: set, they were ignored.
  // (Refused for a new run only: validate() passes them, so saved models load.)
  cfg.capacity_factor = 1;
  cfg.kind = RouterKind::kExpertChoice;
  refuse_unused_topk_settings(cfg);
  for (bool RouterConfig::*flag : {&RouterConfig::dropless, &RouterConfig::bpr, &RouterConfig::renormalize}) {
    auto bad = cfg;
    bad.*flag = true;
    validate(bad);
    moev::test::expect_error([&] { refuse_unused_topk_settings(bad); }, {" = true with moe.router = expert_choice"});
  }
  cfg.kind = RouterKind::kTopK;
  cfg.dropless = cfg.renormalize = true;
  refuse_unused_topk_settings(cfg);
  // BPR orders tokens for a capacity dropless routing does not have: eval refused the pair, train took it.
  cfg.bpr = true;
  moev::test::expect_error([&] { refuse_unused_topk_settings(cfg); }, {"moe.bpr = true with moe.dropless = true"});
}
