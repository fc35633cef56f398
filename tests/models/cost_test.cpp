// The analytic cost model against the built models: parameter counts must equal
// the modules' numel sums, and FLOPs must follow the MoE arithmetic (K of E).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moev/models/cost.h"
#include "moev/models/model_config.h"

using namespace moev::models;

namespace {
int64_t numel(const ModelConfig& c) {
  auto m = build_model(c);
  int64_t n = 0;
  for (const auto& p : m->parameters()) n += p.numel();
  return n;
}
}  // namespace

TEST(ModelCost, ParamsMatchTheBuiltModels) {
  for (const auto& name : preset_names()) {
    if (name == "vit-s32" || name == "vmoe-s32") continue;  // large; same code path as tiny
    SCOPED_TRACE(name);
    const auto c = preset(name);
    EXPECT_EQ(model_cost(c).params, numel(c));
  }
  auto c = preset("convnext-moe-tiny");
  c.router.logits = "cosine";
  c.router.cosine_dim = 8;
  EXPECT_EQ(model_cost(c).params, numel(c));
  auto s = preset("vmoe-tiny");
  s.patch = 7;
  s.stem_channels = 24;
  EXPECT_EQ(model_cost(s).params, numel(s));
  s.stem_channels = 0;
  const double plain = model_cost(s).flops;
  s.stem_channels = 24;  // 28*28 pixels x 3x3x1x24 MACs, and the patch embedding sees 24 channels
  EXPECT_NEAR(model_cost(s).flops - plain, 2.0 * 784 * 9 * 24 + 2.0 * 16 * 49 * 23 * 128, 1.0);
  auto cn = preset("convnext-moe-tiny");  // the same early conv before ConvNeXt's 2x2 stem
  cn.stem_channels = 16;
  EXPECT_EQ(model_cost(cn).params, numel(cn));
  const double with_conv = model_cost(cn).flops;
  cn.stem_channels = 0;
  EXPECT_NEAR(with_conv - model_cost(cn).flops, 2.0 * 784 * 9 * 16 + 2.0 * 196 * 4 * 15 * 32, 1.0);
}

TEST(ModelCost, ActiveParamsAndFlopsFollowKOfE) {
  auto dense = preset("vit-tiny");
  auto moe = preset("vmoe-tiny");  // E = 8, K = 2 in 2 blocks
  const auto cd = model_cost(dense), cm = model_cost(moe);
  const int64_t D = dense.width, H = dense.mlp_dim;
  const int64_t expert = D * H + H + H * D + D, router = 8 * D;
  EXPECT_EQ(cm.params - cd.params, 2 * (7 * expert + router));
  EXPECT_EQ(cm.active_params - cd.active_params, 2 * (expert + router));
  const double tokens = 49;  // 28 / 4 squared
  EXPECT_NEAR(cm.flops - cd.flops, 2 * 2 * tokens * (2.0 * D * H + 8.0 * D), 1e-6);
  moe.router.k = 1;  // K = 1 costs the dense MLP plus the router
  EXPECT_NEAR(model_cost(moe).flops, cd.flops + 2 * 2 * tokens * 8.0 * D, 1e-6);
  EXPECT_GT(cd.flops, 1e6);
}
