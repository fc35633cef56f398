// The sparse MoE layer against a dense reference that runs every expert on every
// token and weights the outputs by the routing decision, over a table of cases.
#include <set>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moev/moe/moe_layer.h"
#include "moev/nn/linear.h"
#include "moev/train/adamw.h"
#include "support/expect_error.h"
#include "support/router_configs.h"

using namespace moev::moe;

namespace {

struct LayerCase {
  const char* name;
  int64_t B, N, D, H, E, K;
  double capacity;
  bool dropless, bpr, renormalize;
  RouterKind kind;
};

const LayerCase kLayerCases[] = {
    {"dropless_e4k2", 4, 6, 16, 24, 4, 2, 1.0, true, false, false, RouterKind::kTopK},
    {"dropless_e8k1_renorm", 3, 5, 8, 16, 8, 1, 1.0, true, false, true, RouterKind::kTopK},
    {"cap105_e8k2", 8, 7, 16, 32, 8, 2, 1.05, false, false, false, RouterKind::kTopK},
    {"cap05_bpr", 8, 7, 16, 32, 8, 2, 0.5, false, true, false, RouterKind::kTopK},
    {"expert_choice", 4, 9, 12, 20, 4, 2, 1.0, false, false, false, RouterKind::kExpertChoice},
    {"e64k2", 8, 16, 8, 8, 64, 2, 1.05, false, false, false, RouterKind::kTopK},
};

void PrintTo(const LayerCase& c, std::ostream* os) { *os << c.name; }

// The layer's gates computed here from its router weights, as V-MoE defines
// them (eval: no noise): softmax(x W_r^T) over the experts, divided by the sum
// of each token's K chosen ones when renormalised. Differentiable in x and W_r.
torch::Tensor reference_gates(MoELayerImpl& layer, const torch::Tensor& x, const RoutingResult& r,
                              bool renormalize) {
  auto gates = torch::softmax(torch::matmul(x.reshape({-1, x.size(2)}), layer.router_weight.t()), -1);
  if (renormalize) gates = gates / (gates.gather(1, r.assign_expert).sum(-1, /*keepdim=*/true) + 1e-9);
  return gates;
}

// y[t] = sum over placed (t, e) of gate[t, e] * FFN_e(x[t]).
torch::Tensor dense_reference(MoELayerImpl& layer, const torch::Tensor& x, const RoutingResult& r,
                              const torch::Tensor& gates) {
  const int64_t D = x.size(2), T = x.size(0) * x.size(1);
  auto xf = x.reshape({T, D});
  auto& ex = *layer.experts;
  auto full = torch::gelu(torch::matmul(xf.unsqueeze(0), ex.w1) + ex.b1.unsqueeze(1));
  full = torch::matmul(full, ex.w2) + ex.b2.unsqueeze(1);  // [E, T, D]
  auto mask = torch::zeros_like(gates);  // [T, E] placed?
  const int64_t E = gates.size(1);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t row = r.offsets[e]; row < r.offsets[e + 1]; ++row)
      mask[r.token_index[row].item<int64_t>()][e] = 1;
  auto w = (mask * gates).t().unsqueeze(-1);  // [E, T, 1]
  return (w * full).sum(0).view(x.sizes());
}

}  // namespace

class MoELayerCases : public ::testing::TestWithParam<LayerCase> {};

TEST_P(MoELayerCases, MatchesDenseReferenceAndGradientsFlow) {
  const LayerCase c = GetParam();
  torch::manual_seed(7);
  const RouterConfig rc = moev::test::router_config(c.kind, c.E, c.K, c.capacity, c.bpr,
                                                    c.dropless, /*group_size=*/2, c.renormalize);
  MoELayer layer(MoELayerOptions(c.D, c.H, rc).keep_routing(true));
  layer->eval();  // deterministic gates, so the reference sees the same routing
  {
    torch::NoGradGuard ng;  // spread router outputs so routing is not trivial
    layer->router_weight.normal_(0, 1.0);
  }
  auto x = torch::randn({c.B, c.N, c.D}, torch::requires_grad());
  auto y = layer->forward(x);
  ASSERT_EQ(y.sizes(), x.sizes());
  ASSERT_TRUE(torch::isfinite(y).all().item<bool>());
  const auto& r = layer->last_routing();
  // The gates the layer combined with are the router's as defined, not only self-consistent.
  const auto gates = reference_gates(*layer, x, r, c.renormalize && c.kind == RouterKind::kTopK);
  EXPECT_TRUE(torch::allclose(r.combine_gates, gates, 1e-5, 1e-6))
      << "max diff " << (r.combine_gates - gates).abs().max().item<double>();
  auto ref = dense_reference(*layer, x, r, gates);
  EXPECT_TRUE(torch::allclose(y, ref, 1e-4, 1e-5))
      << "max diff " << (y - ref).abs().max().item<double>();
  if (c.dropless) {
    EXPECT_EQ(layer->last_stats().dropped_fraction, 0.0);
  }

  // Gradients reach the input, the router and every expert that got a token,
  // and agree with the dense reference's gradients.
  auto proj = torch::randn_like(y);
  auto loss = (y * proj).sum();
  loss.backward({}, /*retain_graph=*/true);
  EXPECT_GT(layer->router_weight.grad().abs().sum().item<double>(), 0);
  EXPECT_GT(layer->experts->w1.grad().abs().sum().item<double>(), 0);
  EXPECT_GT(x.grad().abs().sum().item<double>(), 0);
  auto gx = x.grad().clone();
  auto gw1 = layer->experts->w1.grad().clone();
  auto gr = layer->router_weight.grad().clone();
  x.grad().zero_();
  layer->zero_grad();
  (ref * proj).sum().backward({}, /*retain_graph=*/true);  // through the reference's own gates
  EXPECT_TRUE(torch::allclose(gw1, layer->experts->w1.grad(), 1e-3, 1e-5));
  EXPECT_TRUE(torch::allclose(gx, x.grad(), 1e-3, 1e-5));
  EXPECT_TRUE(torch::allclose(gr, layer->router_weight.grad(), 1e-3, 1e-5))
      << "router weight gradient max diff " << (gr - layer->router_weight.grad()).abs().max().item<double>();
  layer->zero_grad();
  layer->train();  // aux losses exist in training only
  layer->forward(x);
  layer->aux_loss().backward();
  if (c.kind == RouterKind::kTopK) {  // load loss is smooth in the router logits
    EXPECT_GT(layer->router_weight.grad().abs().sum().item<double>(), 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Table, MoELayerCases, ::testing::ValuesIn(kLayerCases),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(MoELayer, InferenceOverridesChangeRoutingWithoutRetraining) {
  torch::manual_seed(1);
  RouterConfig rc;
  rc.num_experts = 8;
  rc.k = 2;
  MoELayer layer(MoELayerOptions(16, 32, rc));
  layer->eval();
  auto x = torch::randn({8, 10, 16});
  layer->forward(x);
  const double d105 = layer->last_stats().dropped_fraction;
  rc.capacity_factor = 0.25;
  layer->set_router(rc);
  layer->forward(x);
  EXPECT_GT(layer->last_stats().dropped_fraction, std::max(0.5, d105));
  rc.k = 9;
  moev::test::expect_error([&] { layer->set_router(rc); }, {"moe.k = 9"});
}

// Cosine logits are cos(P x, e_i) / tau: bounded by 1 / tau whatever the token
// norm, unchanged when a token is scaled, and every router parameter (projection,
// embeddings, temperature) gets a gradient through the combine weights.
TEST(MoELayer, CosineRouterIsScaleFreeBoundedAndTrainable) {
  torch::manual_seed(3);
  RouterConfig rc;
  rc.num_experts = 8;
  rc.k = 2;
  rc.logits = "cosine";
  rc.cosine_dim = 6;
  MoELayer layer(MoELayerOptions(16, 32, rc));
  ASSERT_TRUE(layer->router_proj.defined());
  EXPECT_EQ(layer->router_weight.sizes(), (std::vector<int64_t>{8, 6}));
  auto x = torch::randn({40, 16});
  auto logits = layer->router_logits(x);
  ASSERT_EQ(logits.sizes(), (std::vector<int64_t>{40, 8}));
  const double bound = std::exp(layer->router_scale.item<double>());
  EXPECT_NEAR(bound, 1 / 0.07, 1e-3);
  EXPECT_LE(logits.abs().max().item<double>(), bound * (1 + 1e-5));
  EXPECT_GT(logits.abs().max().item<double>(), 0.2 * bound);  // not collapsed to 0
  EXPECT_TRUE(torch::allclose(layer->router_logits(x * 50), logits, 1e-4, 1e-4));
  // Against the formula written out.
  auto h = layer->router_proj.matmul(x.t()).t();
  h = h / h.norm(2, 1, true);
  auto e = layer->router_weight / layer->router_weight.norm(2, 1, true);
  EXPECT_TRUE(torch::allclose(logits, h.matmul(e.t()) * bound, 1e-4, 1e-4));

  layer->train();
  auto y = layer->forward(x.view({5, 8, 16}));
  (y.pow(2).sum() + layer->aux_loss()).backward();
  for (auto* p : {&layer->router_proj, &layer->router_weight, &layer->router_scale})
    EXPECT_GT(p->grad().abs().sum().item<double>(), 0);
  // The logits are part of the architecture: eval may not switch them.
  rc.logits = "linear";
  moev::test::expect_error([&] { layer->set_router(rc); }, {"moe.router_logits", "linear"});
  rc.logits = "cosine";
  rc.cosine_dim = 7;
  moev::test::expect_error([&] { layer->set_router(rc); }, {"cosine_dim 7", "trained with", "cosine_dim 6"});
  rc.logits = "dot";
  moev::test::expect_error([&] { validate(rc); }, {"moe.router_logits = 'dot'", "expected linear or cosine"});
}

TEST(MoELayer, FindsLayersInsideModules) {
  struct Net : torch::nn::Module {
    Net() {
      register_module("a", MoELayer(MoELayerOptions(4, 8)));
      register_module("lin", torch::nn::Linear(4, 4));
      register_module("b", MoELayer(MoELayerOptions(4, 8)));
    }
  } net;
  EXPECT_EQ(find_moe_layers(net).size(), 2u);
}

TEST(Experts, GroupedGemmMatchesStockOpPathInDouble) {
  // The CPU float32 grouped GEMM (packed_gemm on AVX-512, the backward fused
  // per expert and block of rows; else raw BLAS) against the LibTorch-op path
  // other dtypes and devices use, run here in float64, on uneven expert blocks
  // (one empty) with padding rows: tiny widths, then widths off the kernel's
  // panels with experts of more rows than one block of the fused backward.
  torch::manual_seed(5);
  struct Case {
    int64_t E, D, H, R;
    std::vector<int64_t> offsets;
  };
  for (const auto& c : {Case{4, 8, 12, 23, {0, 5, 5, 12, 20}}, Case{3, 40, 96, 660, {0, 300, 300, 650}}}) {
    SCOPED_TRACE("D=" + std::to_string(c.D) + " H=" + std::to_string(c.H));
    Experts ex(ExpertsOptions(c.E, c.D, c.H));
    auto x = torch::randn({c.R, c.D}, torch::requires_grad());
    Experts ex64(ExpertsOptions(c.E, c.D, c.H));
    {
      torch::NoGradGuard ng;
      ex64->w1 = ex->w1.to(torch::kDouble).detach().requires_grad_();
      ex64->b1 = (ex->b1 + torch::randn_like(ex->b1) * 0.1).to(torch::kDouble).detach().requires_grad_();
      ex->b1.copy_(ex64->b1);
      ex64->w2 = ex->w2.to(torch::kDouble).detach().requires_grad_();
      ex64->b2 = ex->b2.to(torch::kDouble).detach().requires_grad_();
    }
    auto y = ex->forward(x, c.offsets);
    auto x64 = x.detach().to(torch::kDouble).requires_grad_();
    auto y64 = ex64->forward(x64, c.offsets);
    const int64_t A = c.offsets.back();
    EXPECT_TRUE(torch::allclose(y.to(torch::kDouble), y64, 1e-4, 1e-5));
    EXPECT_TRUE(torch::equal(y.narrow(0, A, c.R - A), torch::zeros({c.R - A, c.D})));
    auto g = torch::randn({c.R, c.D}, torch::kDouble);
    (y * g.to(torch::kFloat)).sum().backward();
    (y64 * g).sum().backward();
    EXPECT_TRUE(torch::allclose(x.grad().to(torch::kDouble), x64.grad(), 1e-4, 1e-5));
    EXPECT_TRUE(torch::equal(x.grad().narrow(0, A, c.R - A), torch::zeros({c.R - A, c.D})));
    EXPECT_TRUE(torch::allclose(ex->w1.grad().to(torch::kDouble), ex64->w1.grad(), 1e-4, 1e-5));
    EXPECT_TRUE(torch::allclose(ex->b1.grad().to(torch::kDouble), ex64->b1.grad(), 1e-4, 1e-5));
    EXPECT_TRUE(torch::allclose(ex->w2.grad().to(torch::kDouble), ex64->w2.grad(), 1e-4, 1e-5));
    EXPECT_TRUE(torch::allclose(ex->b2.grad().to(torch::kDouble), ex64->b2.grad(), 1e-4, 1e-5));
  }
}

TEST(Experts, Bf16GemmsTrackFloat32WithinBf16Rounding) {
  // Mixed precision: bf16 GEMMs on fp32 master weights. Outputs and gradients
  // stay within bf16's ~3 significant digits of the fp32 path, and the weight
  // gradients come back as fp32 on the fp32 parameters. The second layout's
  // row counts (71, 130, 135) are not gemm_rows sizes, so its GEMMs run on
  // rounded-up row counts, the last expert's past the end of the buffer.
  struct Layout {
    std::vector<int64_t> offsets;
    int64_t rows;
  };
  for (const auto& [offsets, R] : {Layout{{0, 9, 9, 30, 40}, 44}, Layout{{0, 71, 71, 201, 336}, 336}}) {
    SCOPED_TRACE(R);
    torch::manual_seed(6);
    Experts ex(ExpertsOptions(4, 32, 48));
    Experts exb(ExpertsOptions(4, 32, 48).matmul_dtype(torch::kBFloat16));
    {
      torch::NoGradGuard ng;
      exb->w1.copy_(ex->w1);
      exb->b1.copy_(ex->b1);
      exb->w2.copy_(ex->w2);
      exb->b2.copy_(ex->b2);
    }
    auto x = torch::randn({R, 32}, torch::requires_grad());
    auto xb = x.detach().clone().requires_grad_();
    auto y = ex->forward(x, offsets), yb = exb->forward(xb, offsets);
    ASSERT_EQ(yb.scalar_type(), torch::kFloat);
    auto rel = [](const at::Tensor& a, const at::Tensor& b) { return ((a - b).norm() / b.norm()).item<double>(); };
    // Expert by expert: a row taken from a neighbour would stand out against one expert's norm.
    for (int64_t e = 0; e < 4; ++e)
      if (const int64_t n = offsets[e + 1] - offsets[e]; n > 0) {
        EXPECT_LT(rel(yb.narrow(0, offsets[e], n), y.narrow(0, offsets[e], n)), 2e-2) << "expert " << e;
      }
    EXPECT_TRUE(torch::equal(yb.narrow(0, offsets[4], R - offsets[4]), torch::zeros({R - offsets[4], 32})));
    auto g = torch::randn({R, 32});
    (y * g).sum().backward();
    (yb * g).sum().backward();
    ASSERT_EQ(exb->w1.grad().scalar_type(), torch::kFloat);
    EXPECT_LT(rel(xb.grad(), x.grad()), 2e-2);
    for (int64_t e : {0, 2, 3}) {
      EXPECT_LT(rel(exb->w1.grad()[e], ex->w1.grad()[e]), 2e-2) << "expert " << e;
      EXPECT_LT(rel(exb->w2.grad()[e], ex->w2.grad()[e]), 2e-2) << "expert " << e;
      EXPECT_LT(rel(exb->b1.grad()[e], ex->b1.grad()[e]), 2e-2) << "expert " << e;
    }
    EXPECT_TRUE(torch::equal(exb->w1.grad()[1], torch::zeros({32, 48})));  // expert 1 has no rows
  }
}

TEST(Experts, GemmRowsRoundUpByAtMostOneThirtySecondToFewSizes) {
  // Each size is at least n and within 1/32 of it, a size rounds to itself,
  // and the sizes up to 2^k number at most 64 + 32 (k - 6): bounded by the
  // capacity's logarithm, not the capacity.
  std::set<int64_t> sizes;
  for (int64_t n = 0; n <= (int64_t{1} << 17); ++n) {
    const int64_t m = moev::moe::gemm_rows(n);
    ASSERT_GE(m, n);
    if (n <= 64) {
      ASSERT_EQ(m, n);
    }
    ASSERT_LE(32 * (m - n), n) << n;
    ASSERT_EQ(moev::moe::gemm_rows(m), m) << n;
    sizes.insert(m);
    if (n > 64 && (n & (n - 1)) == 0) {
      int k = 0;
      while ((int64_t{1} << k) < n) ++k;
      EXPECT_LE(static_cast<int64_t>(sizes.size()), 1 + 64 + 32 * (k - 6)) << n;  // + 1: zero rows
    }
  }
}

// Inference (eval, no gradient) runs on the experts' own copies of their
// weights: they must follow every way the weights change, and match the
// autograd path's output.
TEST(Experts, InferenceCopiesFollowEveryWeightUpdate) {
  std::vector<at::ScalarType> dtypes{torch::kFloat};
  if (moev::nn::native_bf16()) dtypes.push_back(torch::kBFloat16);
  for (auto dt : dtypes) {
    SCOPED_TRACE(dt == torch::kFloat ? "fp32" : "bf16");
    const double tol = dt == torch::kFloat ? 1e-5 : 2e-2;
    torch::manual_seed(12);
    Experts ex(ExpertsOptions(4, 16, 24).matmul_dtype(dt));
    ex->eval();
    const std::vector<int64_t> offsets{0, 7, 7, 20, 26};
    const auto x = torch::randn({30, 16});
    auto rel = [](const at::Tensor& a, const at::Tensor& b) { return ((a - b).norm() / b.norm()).item<double>(); };
    auto infer = [&] {
      torch::NoGradGuard ng;
      return ex->forward(x, offsets);
    };
    auto with_grad = [&] { return ex->forward(x.clone().requires_grad_(), offsets).detach(); };
    auto y0 = infer();
    EXPECT_LT(rel(y0, with_grad()), tol);
    EXPECT_TRUE(torch::equal(y0.narrow(0, 26, 4), torch::zeros({4, 16}))) << "padding rows";
    {  // in-place LibTorch ops on the weights and on a bias alone
      torch::NoGradGuard ng;
      ex->w1.mul_(1.5);
    }
    auto y1 = infer();
    EXPECT_GT(rel(y1, y0), 1e-2);
    EXPECT_LT(rel(y1, with_grad()), tol);
    {
      torch::NoGradGuard ng;
      ex->b2.add_(0.5);
    }
    auto y2 = infer();
    EXPECT_GT(rel(y2, y1), 1e-2);
    EXPECT_LT(rel(y2, with_grad()), tol);
    // AdamW writes through raw pointers.
    std::vector<std::pair<std::string, at::Tensor>> params;
    for (auto& p : ex->named_parameters()) params.emplace_back(p.key(), p.value());
    moev::train::AdamW opt(params, moev::train::AdamWOptions{});
    ex->train();
    (ex->forward(x, offsets) * torch::randn({30, 16})).sum().backward();
    opt.step(/*lr=*/0.05);
    ex->eval();
    auto y3 = infer();
    EXPECT_GT(rel(y3, y2), 1e-2);
    EXPECT_LT(rel(y3, with_grad()), tol);
    opt.zero_grad();
    // Another update without a mode switch (a frozen-mode caller).
    (ex->forward(x.clone().requires_grad_(), offsets) * torch::randn({30, 16})).sum().backward();
    opt.step(0.05);
    auto y4 = infer();
    EXPECT_GT(rel(y4, y3), 1e-3);
    EXPECT_LT(rel(y4, with_grad()), tol);
  }
}

// Experts built under InferenceMode (inference tensors keep no version
// counter) still infer on their packed / transposed copies, equal to the same
// experts built normally.
TEST(Experts, InferenceTensorsAsWeights) {
  const std::vector<int64_t> offsets{0, 5, 12, 12, 20};
  torch::manual_seed(13);
  Experts normal(ExpertsOptions(4, 16, 24));
  normal->eval();
  const auto x = torch::randn({22, 16});
  at::Tensor y_normal;
  {
    torch::NoGradGuard ng;
    y_normal = normal->forward(x, offsets);
  }
  c10::InferenceMode guard;
  torch::manual_seed(13);
  Experts inf(ExpertsOptions(4, 16, 24));
  inf->eval();
  ASSERT_TRUE(inf->w1.is_inference());
  EXPECT_TRUE(torch::allclose(inf->forward(x, offsets), y_normal, 1e-6, 1e-6));
}
