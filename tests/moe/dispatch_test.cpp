// The fused CPU dispatch / combine against the same maths written as LibTorch
// ops (index_select, gate weighting, index_add_): values and the gradients of
// x, the expert outputs and the gates, over routings with drops, padding rows
// and Expert-Choice (tokens with no expert, tokens with several).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moev/moe/dispatch.h"
#include "support/router_configs.h"

using namespace moev::moe;

namespace {

struct DispatchCase {
  const char* name;
  int64_t T, D, E, K, tokens_per_image;
  double capacity;
  bool bpr;
  RouterKind kind;
};

const DispatchCase kCases[] = {
    {"topk_cap105", 96, 24, 8, 2, 4, 1.05, false, RouterKind::kTopK},
    {"topk_cap05_bpr_drops", 96, 20, 8, 2, 4, 0.5, true, RouterKind::kTopK},
    {"topk_e64_sparse", 128, 16, 64, 2, 8, 1.05, false, RouterKind::kTopK},
    {"expert_choice", 72, 12, 4, 2, 3, 1.0, false, RouterKind::kExpertChoice},
    {"ragged_last_group", 50, 8, 4, 1, 5, 1.0, false, RouterKind::kTopK},
};

void PrintTo(const DispatchCase& c, std::ostream* os) { *os << c.name; }

torch::Tensor reference_combine(const torch::Tensor& yd, const torch::Tensor& gates, const RoutingResult& r) {
  auto flat = torch::cat({gates.reshape(-1), gates.new_zeros({1})});
  auto w = flat.index_select(0, r.gate_index).unsqueeze(1);
  return torch::zeros({gates.size(0), yd.size(1)}).index_add(0, r.token_index, yd * w);
}

}  // namespace

class DispatchCases : public ::testing::TestWithParam<DispatchCase> {};

TEST_P(DispatchCases, FusedEqualsTheLibTorchOpsInValuesAndGradients) {
  const DispatchCase c = GetParam();
  torch::manual_seed(11);
  const auto cfg = moev::test::router_config(c.kind, c.E, c.K, c.capacity, c.bpr, /*dropless=*/false,
                                             /*group_size=*/2);
  auto logits = torch::randn({c.T, c.E}).requires_grad_();
  const RoutingResult r = route(logits, cfg, c.tokens_per_image, /*training=*/false);
  const TokenRows tr = token_rows(r, c.T);
  const int64_t A = r.offsets.back(), R = r.token_index.size(0);

  // Token-major view: every placed row exactly once, under its own token.
  ASSERT_EQ(static_cast<int64_t>(tr.rows.size()), A);
  std::vector<int> seen(A, 0);
  for (int64_t t = 0; t < c.T; ++t)
    for (int64_t p = tr.ptr[t]; p < tr.ptr[t + 1]; ++p) {
      const int64_t a = tr.rows[p];
      ASSERT_LT(a, A);
      EXPECT_EQ(r.token_index[a].item<int64_t>(), t);
      ++seen[a];
    }
  for (int64_t a = 0; a < A; ++a) EXPECT_EQ(seen[a], 1) << "row " << a;

  auto x = torch::randn({c.T, c.D}).requires_grad_();
  auto x_ref = x.detach().clone().requires_grad_();
  auto xd = dispatch(x, r, tr);
  auto xd_ref = x_ref.index_select(0, r.token_index);
  ASSERT_EQ(xd.sizes(), xd_ref.sizes());
  EXPECT_TRUE(torch::equal(xd.narrow(0, 0, A), xd_ref.narrow(0, 0, A)));
  if (R > A) {
    EXPECT_EQ(xd.narrow(0, A, R - A).abs().max().item<float>(), 0.f) << "padding rows are zero";
  }

  // Combine an "expert output" that depends on the dispatched rows, so the
  // gradient reaches x through both functions.
  auto mix = torch::randn({c.D, c.D});
  auto gates = logits.softmax(-1);
  auto gates_ref = gates.detach().clone().requires_grad_();
  auto gates_fused = gates.detach().clone().requires_grad_();
  auto y = combine(torch::tanh(xd.matmul(mix)), gates_fused, r, tr);
  auto y_ref = reference_combine(torch::tanh(xd_ref.matmul(mix)), gates_ref, r);
  EXPECT_TRUE(torch::allclose(y, y_ref, 1e-6, 1e-6)) << (y - y_ref).abs().max().item<float>();

  auto probe = torch::randn({c.T, c.D});
  (y * probe).sum().backward();
  (y_ref * probe).sum().backward();
  EXPECT_TRUE(torch::allclose(x.grad(), x_ref.grad(), 1e-5, 1e-6))
      << (x.grad() - x_ref.grad()).abs().max().item<float>();
  EXPECT_TRUE(torch::allclose(gates_fused.grad(), gates_ref.grad(), 1e-5, 1e-6))
      << (gates_fused.grad() - gates_ref.grad()).abs().max().item<float>();
  // Tokens with no placed row get nothing and pass no gradient.
  for (int64_t t = 0; t < c.T; ++t)
    if (tr.ptr[t] == tr.ptr[t + 1]) {
      EXPECT_EQ(y[t].abs().max().item<float>(), 0.f);
      EXPECT_EQ(x.grad()[t].abs().max().item<float>(), 0.f);
    }
}

INSTANTIATE_TEST_SUITE_P(Table, DispatchCases, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(Dispatch, CombineGradientMatchesFiniteDifferences) {
  // The hand-written backward against central differences of the forward.
  torch::manual_seed(3);
  const auto cfg = moev::test::router_config(RouterKind::kTopK, 4, 2, 1.0, false, false, 1);
  const int64_t T = 12, D = 5;
  const RoutingResult r = route(torch::randn({T, 4}), cfg, /*tokens_per_image=*/3, false);
  const TokenRows tr = token_rows(r, T);
  const int64_t R = r.token_index.size(0);
  auto yd = torch::randn({R, D}, torch::requires_grad());
  auto gates = torch::rand({T, 4}, torch::requires_grad());
  auto probe = torch::randn({T, D});
  (combine(yd, gates, r, tr) * probe).sum().backward();
  auto f = [&](const torch::Tensor& a, const torch::Tensor& g) {
    torch::NoGradGuard ng;
    return (combine(a, g, r, tr).to(torch::kDouble) * probe.to(torch::kDouble)).sum().item<double>();
  };
  const double h = 1e-2;
  int64_t nonzero = 0;  // probes of a weight the combine uses (an unrouted pair has gradient 0 both ways)
  for (int64_t i = 0; i < 6; ++i) {
    const int64_t t = i * 2, e = r.assign_expert[t][i % 2].item<int64_t>();
    nonzero += r.assign_row[t][i % 2].item<int64_t>() >= 0;
    auto gp = gates.detach().clone(), gm = gates.detach().clone();
    gp[t][e] += h;
    gm[t][e] -= h;
    EXPECT_NEAR(gates.grad()[t][e].item<double>(), (f(yd.detach(), gp) - f(yd.detach(), gm)) / (2 * h), 1e-3);
    const int64_t a = i * 3 % r.offsets.back();
    auto yp = yd.detach().clone(), ym = yd.detach().clone();
    yp[a][i % D] += h;
    ym[a][i % D] -= h;
    EXPECT_NEAR(yd.grad()[a][i % D].item<double>(), (f(yp, gates.detach()) - f(ym, gates.detach())) / (2 * h), 1e-3);
  }
  EXPECT_GE(nonzero, 4);
}
