// ConvNeXt / ConvNeXt-MoE: shapes of both forms, where the MoE layers go and how
// many tokens they see, layer scale and stochastic depth, gradients, and the
// config errors users hit.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/models/convnext.h"
#include "moev/models/model_config.h"
#include "moev/moe/moe_layer.h"
#include "moev/nn/linear.h"
#include "support/expect_error.h"

using namespace moev::models;

TEST(ConvNeXt, HierarchicalShapesPlacementAndTokens) {
  torch::manual_seed(0);
  auto cfg = preset("convnext-moe-tiny");
  EXPECT_EQ(num_blocks(cfg), 8);
  EXPECT_EQ(moe_blocks(cfg.moe, num_blocks(cfg)), (std::vector<int64_t>{6, 7}));
  auto model = build_model(cfg);
  auto moe = moev::moe::find_moe_layers(*model);
  ASSERT_EQ(moe.size(), 2u);
  auto& net = dynamic_cast<ConvNeXtImpl&>(*model);
  ASSERT_EQ(net.stages->size(), 3u);
  // The last stage (128 wide, 3x3 after 28 -> 14 -> 7 -> 3) holds both MoE blocks.
  auto last = net.stages[2]->as<torch::nn::ModuleListImpl>();
  ASSERT_EQ(last->size(), 4u);
  EXPECT_FALSE((*last)[1]->as<ConvNeXtBlockImpl>()->moe);
  EXPECT_TRUE((*last)[2]->as<ConvNeXtBlockImpl>()->moe);
  EXPECT_TRUE((*last)[3]->as<ConvNeXtBlockImpl>()->moe);

  model->eval();
  auto y = model->forward(torch::randn({5, 1, 28, 28}));
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{5, 10}));
  // Every spatial position is a token: 5 images x 3 x 3 positions x K = 2.
  const auto& st = moe[0]->last_stats();
  int64_t placed = 0;
  for (auto c : st.expert_count) placed += c;
  EXPECT_EQ(placed + std::llround(st.dropped_fraction * 5 * 9 * 2), 5 * 9 * 2);
}

// The early 3x3 convolution (model.stem_channels) runs as a GEMM over unfolded
// windows: the model's stem equals stock Conv2d modules on the same weights, and
// the early convolution is trained.
TEST(ConvNeXt, EarlyConvolutionEqualsStockConvolutionsAndTrains) {
  torch::manual_seed(0);
  auto cfg = preset("convnext-moe-tiny");
  cfg.stem_channels = 8;
  auto model = std::dynamic_pointer_cast<ConvNeXtImpl>(build_model(cfg));
  ASSERT_TRUE(model && model->early_conv);
  EXPECT_EQ(model->early_conv->weight.sizes(), (std::vector<int64_t>{8, 1, 3, 3}));
  EXPECT_EQ(model->stem->weight.sizes(), (std::vector<int64_t>{32, 8, 2, 2}));
  {
    torch::NoGradGuard ng;
    model->early_conv->bias.normal_(0, 0.1);
  }
  auto x = torch::randn({3, 1, 28, 28});
  // The stem's output through stock modules: conv, GELU, patchify conv, LayerNorm.
  auto expected = model->stem_norm->forward(
      model->stem->forward(torch::gelu(model->early_conv->forward(x))).permute({0, 2, 3, 1}));
  auto pixels = moev::nn::conv3x3_gelu_nhwc(x, model->early_conv->weight, model->early_conv->bias, at::kFloat);
  auto got = model->stem_norm->forward(moev::nn::patchify_nhwc(pixels, model->stem->weight, model->stem->bias, at::kFloat));
  EXPECT_TRUE(torch::allclose(got, expected, 1e-4, 1e-5)) << (got - expected).abs().max().item<float>();

  model->train();
  {
    torch::NoGradGuard ng;
    model->head->weight.normal_(0, 0.1);
  }
  torch::cross_entropy_loss(model->forward(x), torch::tensor({0, 1, 2})).backward();
  EXPECT_GT(model->early_conv->weight.grad().abs().sum().item<double>(), 0);
  cfg.stem_channels = -1;
  moev::test::expect_error([&] { validate(cfg); }, {"model.stem_channels = -1"});
}

// model.pad_odd: a 2x2 downsampling of the 7x7 map drops its last row and
// column unless the map is padded first. With every block an identity
// (gamma = 0) the unpadded model never sees pixel rows 24-27; the padded one
// does, and its MoE blocks route 4 x 4 tokens per image.
TEST(ConvNeXt, PadOddKeepsTheLastRowAndColumn) {
  auto x = torch::randn({5, 1, 28, 28});
  auto x_edge = x.clone();
  x_edge.slice(2, 24, 28).normal_();  // new bottom rows
  for (bool pad : {false, true}) {
    torch::manual_seed(3);
    auto cfg = preset("convnext-moe-tiny");
    cfg.pad_odd = pad;
    auto model = build_model(cfg);
    auto& net = dynamic_cast<ConvNeXtImpl&>(*model);
    {
      torch::NoGradGuard ng;
      for (auto& stage : *net.stages)
        for (auto& blk : *stage->as<torch::nn::ModuleListImpl>()) blk->as<ConvNeXtBlockImpl>()->gamma.zero_();
    }
    model->eval();
    torch::NoGradGuard ng;
    const double moved = (model->forward(x) - model->forward(x_edge)).abs().max().item<double>();
    if (pad)
      EXPECT_GT(moved, 1e-3);
    else
      EXPECT_EQ(moved, 0.0);
    const auto& st = moev::moe::find_moe_layers(*model)[0]->last_stats();
    int64_t placed = 0;
    for (auto c : st.expert_count) placed += c;
    const int64_t side = pad ? 4 : 3;
    EXPECT_EQ(placed + std::llround(st.dropped_fraction * 5 * side * side * 2), 5 * side * side * 2);
  }
}

TEST(ConvNeXt, IsotropicShapesAndTokens) {
  torch::manual_seed(0);
  auto cfg = preset("convnext-iso-moe-tiny");
  cfg.depth = 4;
  cfg.moe.blocks = {2, 3};
  cfg.router.dropless = true;
  auto model = build_model(cfg);
  model->eval();
  auto y = model->forward(torch::randn({3, 1, 28, 28}));
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{3, 10}));
  auto moe = moev::moe::find_moe_layers(*model);
  ASSERT_EQ(moe.size(), 2u);
  int64_t placed = 0;
  for (auto c : moe[1]->last_stats().expert_count) placed += c;
  EXPECT_EQ(placed, 3 * 7 * 7 * 2);  // patch 4: 7 x 7 tokens per image, dropless, K = 2
}

TEST(ConvNeXt, LayerScaleStartsNearIdentityAndDropPathIsPerImage) {
  torch::manual_seed(1);
  auto cfg = preset("convnext-tiny");
  ConvNeXtBlock blk(cfg, 16, /*use_moe=*/false, /*drop_path=*/0.5);
  auto x = torch::randn({64, 5, 5, 16});  // channels-last [B, H, W, D]
  blk->eval();
  // gamma = 1e-6: the residual branch is negligible at initialisation.
  EXPECT_LT((blk->forward(x) - x).abs().max().item<double>(), 1e-4);
  {
    torch::NoGradGuard ng;
    blk->gamma.fill_(1.0);
  }
  blk->train();
  auto y = blk->forward(x);
  // Each image either skipped the branch (y == x) or took it scaled by 1 / (1 - p).
  auto same = (y - x).abs().flatten(1).amax(1).lt(1e-7);
  const int64_t skipped = same.sum().item<int64_t>();
  EXPECT_GT(skipped, 10);
  EXPECT_LT(skipped, 54);
  blk->eval();
  EXPECT_TRUE(torch::equal(blk->forward(x), blk->forward(x)));
}

TEST(ConvNeXt, GradientsReachEveryParameter) {
  torch::manual_seed(2);
  auto cfg = preset("convnext-moe-tiny");
  cfg.layer_scale = 0.5;  // so gradients through the branches are not ~1e-6
  auto model = build_model(cfg);
  auto loss = torch::cross_entropy_loss(model->forward(torch::randn({8, 1, 28, 28})),
                                        torch::arange(8) % 10);
  for (auto& l : moev::moe::find_moe_layers(*model)) loss = loss + l->aux_loss();
  loss.backward();
  for (auto& p : model->named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    if (p.key().find("experts") != std::string::npos) continue;  // an expert may get no token
    EXPECT_GT(p.value().grad().abs().sum().item<double>(), 0) << p.key();
  }
}

TEST(ConvNeXt, ConfigErrorsNameTheField) {
  auto cfg = preset("convnext-tiny");
  cfg.depths = {2, 2};
  moev::test::expect_error([&] { validate(cfg); }, {"model.dims", "model.depths", "3", "2"});
  cfg = preset("convnext-tiny");
  cfg.dims = {32, 64, 128, 256, 512};
  cfg.depths = {1, 1, 1, 1, 1};
  moev::test::expect_error([&] { validate(cfg); }, {"too small", "5 stages"});
  cfg = preset("convnext-moe-tiny");
  cfg.moe.blocks = {8};
  moev::test::expect_error([&] { validate(cfg); }, {"8"});
  cfg = preset("convnext-tiny");
  cfg.family = "resnet";
  moev::test::expect_error([&] { validate(cfg); }, {"model.family", "resnet", "convnext"});
}

TEST(ConvNeXt, ChannelsLastForwardMatchesTheNchwModel) {
  // The model runs channels-last (patchify GEMMs, the depthwise kernel); the
  // same weights through stock NCHW Conv2d modules must give the same logits.
  torch::manual_seed(3);
  auto cfg = preset("convnext-tiny");
  cfg.layer_scale = 0.5;  // make the blocks matter
  auto model = std::dynamic_pointer_cast<ConvNeXtImpl>(build_model(cfg));
  model->eval();
  auto images = torch::randn({2, 1, 28, 28});
  auto ln = [](torch::nn::LayerNormImpl& n, const at::Tensor& x) {  // over C of NCHW
    return n.forward(x.permute({0, 2, 3, 1})).permute({0, 3, 1, 2});
  };
  torch::NoGradGuard ng;
  auto reference = [&] {
    auto x = ln(*model->stem_norm, model->stem->forward(images));
    for (size_t s = 0; s < model->stages->size(); ++s) {
      if (s > 0)
        x = model->down_convs[s - 1]->as<torch::nn::Conv2dImpl>()->forward(
            ln(*model->down_norms[s - 1]->as<torch::nn::LayerNormImpl>(), x));
      for (auto& m : *model->stages[s]->as<torch::nn::ModuleListImpl>()) {
        auto* blk = m->as<ConvNeXtBlockImpl>();
        auto t = ln(*blk->norm, blk->dwconv->forward(x)).permute({0, 2, 3, 1});
        t = blk->fc2->forward(torch::gelu(blk->fc1->forward(t))) * blk->gamma;
        x = x + t.permute({0, 3, 1, 2});
      }
    }
    EXPECT_EQ(x.size(2), 3);  // 28 -> 14 -> 7 -> 3: the last downsampling drops a row and a column
    return model->head->forward(model->head_norm->forward(x.mean({2, 3})));
  };
  auto got = model->forward(images);
  EXPECT_TRUE(torch::allclose(got, reference(), 1e-4, 1e-5)) << (got - reference()).abs().max().item<double>();
  // The patchify convolutions' packed copies follow in-place weight updates.
  model->stem->weight.mul_(-0.5);
  model->down_convs[0]->as<torch::nn::Conv2dImpl>()->weight.mul_(1.5);
  got = model->forward(images);
  EXPECT_TRUE(torch::allclose(got, reference(), 1e-4, 1e-5)) << (got - reference()).abs().max().item<double>();
}
