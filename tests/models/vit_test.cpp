// ViT / V-MoE shapes, placement conventions and gradient flow.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/models/model_config.h"
#include "moev/models/placement.h"
#include "moev/models/vit.h"
#include "moev/moe/moe_layer.h"
#include "support/expect_error.h"

using namespace moev::models;

TEST(Placement, VMoEConventions) {
  EXPECT_EQ(moe_blocks(parse_placement("last-2"), 8), (std::vector<int64_t>{5, 7}));
  EXPECT_EQ(moe_blocks(parse_placement("last-2"), 6), (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(moe_blocks(parse_placement("last-2"), 7), (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(moe_blocks(parse_placement("every-2"), 8), (std::vector<int64_t>{1, 3, 5, 7}));
  EXPECT_EQ(moe_blocks(parse_placement("every-3"), 8), (std::vector<int64_t>{2, 5}));
  EXPECT_EQ(moe_blocks(parse_placement("1,4"), 6), (std::vector<int64_t>{1, 4}));
  EXPECT_TRUE(moe_blocks(parse_placement("none"), 6).empty());
  EXPECT_EQ(moe_blocks(parse_placement("all"), 3), (std::vector<int64_t>{0, 1, 2}));  // a sweep's word, in train too
  EXPECT_EQ(to_string(parse_placement("all")), "every-1");
  moev::test::expect_error([&] { moe_blocks(parse_placement("last-4"), 6); }, {"last-4", "6"});
  moev::test::expect_error([&] { moe_blocks(parse_placement("9"), 6); }, {"block 9 is outside a model of 6 blocks"});
  moev::test::expect_error([&] { parse_placement("last-x"); }, {"'last-x'", "expected every-N, last-N"});
  // Spaces on either side of a block, as TOML writers and shells leave them; an empty block is an error.
  EXPECT_EQ(moe_blocks(parse_placement(" 3, 5 "), 6), (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(moe_blocks(parse_placement("5,1"), 6), (std::vector<int64_t>{1, 5}));
  for (const char* bad : {"3,5,", "3,,5", ",3"})
    moev::test::expect_error([&] { parse_placement(bad); }, {std::string("'") + bad + "'", "a block list like 3,5"});
  // "3,3" built one MoE layer where it asked for two.
  moev::test::expect_error([&] { refuse_repeated_blocks(parse_placement("3,5,3")); }, {"block 3 is listed twice"});
  EXPECT_EQ(moe_blocks(parse_placement("3,5,3"), 6), (std::vector<int64_t>{3, 5}));  // as a saved model has it
}

TEST(ViT, ShapesParamsAndGradients) {
  torch::manual_seed(0);
  auto cfg = preset("vmoe-tiny");
  cfg.depth = 4;
  auto model = build_model(cfg);
  auto moe = moev::moe::find_moe_layers(*model);
  ASSERT_EQ(moe.size(), 2u);  // last-2 of 4 blocks: 1 and 3
  {
    torch::NoGradGuard ng;  // the head starts at zero, which would block all gradients
    for (auto& p : model->named_parameters())
      if (p.key().find("head") == 0) p.value().normal_(0, 0.1);
  }
  auto x = torch::randn({4, 1, 28, 28});
  auto y = model->forward(x);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{4, 10}));
  auto loss = torch::cross_entropy_loss(y, torch::tensor({0, 1, 2, 3})) + moe[0]->aux_loss();
  loss.backward();
  for (auto& p : model->named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
  }
  EXPECT_GT(moe[1]->router_weight.grad().abs().sum().item<double>(), 0);
  EXPECT_GT(moe[1]->experts->w2.grad().abs().sum().item<double>(), 0);
}

// The conv stem: a 3x3 conv before the patch embedding; it must be trained too.
TEST(ViT, ConvStemShapesAndGradients) {
  torch::manual_seed(0);
  auto cfg = preset("vit-tiny");
  cfg.depth = 2;
  cfg.patch = 7;
  cfg.stem_channels = 8;
  auto model = build_model(cfg);
  auto x = torch::randn({3, 1, 28, 28});
  auto y = model->forward(x);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{3, 10}));
  {
    torch::NoGradGuard ng;
    for (auto& p : model->named_parameters())
      if (p.key().find("head") == 0) p.value().normal_(0, 0.1);
  }
  torch::cross_entropy_loss(model->forward(x), torch::tensor({0, 1, 2})).backward();
  const auto params = model->named_parameters();
  ASSERT_TRUE(params.contains("stem.weight"));
  EXPECT_EQ(params["stem.weight"].sizes(), (std::vector<int64_t>{8, 1, 3, 3}));
  EXPECT_EQ(params["patch_embed.weight"].sizes(), (std::vector<int64_t>{128, 8, 7, 7}));
  EXPECT_GT(params["stem.weight"].grad().abs().sum().item<double>(), 0);
  cfg.stem_channels = -1;
  moev::test::expect_error([&] { validate(cfg); }, {"model.stem_channels = -1"});
}

// The patch embedding runs as one GEMM over gathered patches: the model's
// forward equals the same weights run through the stock Conv2d modules.
TEST(ViT, PatchGemmForwardEqualsTheStockConvolutions) {
  torch::manual_seed(0);
  for (int64_t stem : {0, 8}) {
    auto cfg = preset("vit-tiny");
    cfg.depth = 2;
    cfg.patch = 7;
    cfg.stem_channels = stem;
    auto model = std::dynamic_pointer_cast<moev::models::ViTImpl>(build_model(cfg));
    ASSERT_TRUE(model);
    model->eval();
    {
      torch::NoGradGuard ng;
      model->head->weight.normal_(0, 0.1);
    }
    auto x = torch::randn({3, 1, 28, 28});
    auto pixels = stem > 0 ? torch::gelu(model->stem->forward(x)) : x;
    auto t = model->patch_embed->forward(pixels).flatten(2).transpose(1, 2).contiguous() + model->pos_embed;
    for (auto& blk : *model->blocks) t = blk->as<moev::models::ViTBlockImpl>()->forward(t);
    auto expected = model->head->forward(model->norm->forward(t).mean(1));
    auto got = model->forward(x);
    EXPECT_TRUE(torch::allclose(got, expected, 1e-4, 1e-5))
        << "stem " << stem << ": max diff " << (got - expected).abs().max().item<double>();
  }
}

TEST(ViT, PresetsAndErrors) {
  for (auto& n : preset_names()) EXPECT_NO_THROW(validate(preset(n)));
  moev::test::expect_error([&] { preset("vit-huge"); }, {"'vit-huge'", "vit-tiny"});
  auto c = preset("vmoe-tiny");
  c.router.k = 9;
  moev::test::expect_error([&] { validate(c); }, {"moe.k = 9"});
  c = preset("vit-tiny");
  c.patch = 5;
  moev::test::expect_error([&] { validate(c); }, {"model.patch = 5"});
  // Each message names the value at fault: -64 and 0 are multiples of 4, and a
  // width of 2^32 failed in the allocator with a byte count.
  c = preset("vit-tiny");
  c.width = -64;
  moev::test::expect_error([&] { validate(c); }, {"model.width = -64", "expected >= 1"});
  c.width = 64;
  c.heads = 0;
  moev::test::expect_error([&] { validate(c); }, {"model.heads = 0", "expected >= 1"});
  c.heads = 4;
  c.width = 4294967360;
  moev::test::expect_error([&] { validate(c); }, {"model.width = 4294967360", "at most 65536"});
  c = preset("resnest-tiny");
  c.dims = {32, 64, 1 << 20};
  moev::test::expect_error([&] { validate(c); }, {"model.dims = 1048576", "at most"});
}
