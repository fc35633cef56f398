// ResNeSt and the multi-branch model: split attention against a loop-by-loop
// reading of the paper's definition, blur pooling against hand arithmetic,
// branch outputs, the mean-of-logits and fused outputs, and config errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "support/expect_error.h"
#include "moev/models/resnest.h"
#include "moev/nn/blur_pool.h"

using namespace moev;

TEST(BlurPool, MatchesTheBinomialFilterWithReflectPadding) {
  auto x = torch::arange(20, torch::kFloat).view({1, 1, 4, 5}) * torch::tensor({1.0f, -0.5f}).view({1, 2, 1, 1});
  auto y = nn::blur_pool2d(x);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{1, 2, 2, 3}));
  auto reflect = [](int64_t i, int64_t n) { return i < 0 ? -i : (i >= n ? 2 * n - 2 - i : i); };
  const float k[3] = {1, 2, 1};
  for (int64_t c = 0; c < 2; ++c)
    for (int64_t oy = 0; oy < 2; ++oy)
      for (int64_t ox = 0; ox < 3; ++ox) {
        double s = 0;
        for (int dy = -1; dy <= 1; ++dy)
          for (int dx = -1; dx <= 1; ++dx)
            s += k[dy + 1] * k[dx + 1] / 16.0 *
                 x[0][c][reflect(2 * oy + dy, 4)][reflect(2 * ox + dx, 5)].item<double>();
        EXPECT_NEAR(y[0][c][oy][ox].item<double>(), s, 1e-5);
      }
  // A constant image stays constant (no darkened border).
  auto flat = nn::blur_pool2d(torch::full({1, 3, 7, 7}, 2.5f));
  EXPECT_TRUE(torch::allclose(flat, torch::full({1, 3, 4, 4}, 2.5f)));
}

// The padded depthwise convolution blur pooling is defined as (and was, before
// its own kernel): reflect padding, or replicate with a 1-pixel side.
at::Tensor padded_blur_reference(const at::Tensor& x) {
  const int64_t C = x.size(1);
  auto k1 = torch::tensor({1.0, 2.0, 1.0}, x.options()) / 4.0;
  auto k = (k1.unsqueeze(1) * k1.unsqueeze(0)).expand({C, 1, 3, 3}).contiguous();
  torch::nn::functional::PadFuncOptions pad({1, 1, 1, 1});
  if (x.size(2) < 2 || x.size(3) < 2) pad.mode(torch::kReplicate);
  else pad.mode(torch::kReflect);
  return at::conv2d(torch::nn::functional::pad(x, pad), k, at::Tensor(), at::IntArrayRef{2, 2},
                    at::IntArrayRef{0, 0}, at::IntArrayRef{1, 1}, C);
}

TEST(BlurPool, ValuesAndGradientsMatchThePaddedConvolution) {
  torch::manual_seed(3);
  const int threads = at::get_num_threads();
  // 32 planes: above the kernel's grain of 16, so two threads split them.
  for (int t : {1, 2})
  for (auto [h, w] : std::vector<std::pair<int64_t, int64_t>>{
           {7, 7}, {14, 14}, {28, 28}, {4, 5}, {2, 3}, {3, 2}, {1, 6}, {5, 1}, {1, 1}, {2, 2}, {37, 70}}) {
    at::set_num_threads(t);
    auto x = torch::randn({4, 8, h, w}, torch::kDouble).requires_grad_();
    auto y = nn::blur_pool2d(x), ref = padded_blur_reference(x);
    ASSERT_EQ(y.sizes(), ref.sizes()) << h << "x" << w;
    EXPECT_TRUE(torch::allclose(y, ref, 1e-12, 1e-12)) << h << "x" << w;
    auto g = torch::randn_like(y);
    auto gx = torch::autograd::grad({y}, {x}, {g})[0];
    auto gref = torch::autograd::grad({ref}, {x}, {g})[0];
    EXPECT_TRUE(torch::allclose(gx, gref, 1e-12, 1e-12)) << h << "x" << w;
    // float, as the model runs it (its own vectorised clones); a channels-last
    // input is read correctly.
    auto xf = x.detach().to(torch::kFloat).contiguous(at::MemoryFormat::ChannelsLast).requires_grad_();
    auto yf = nn::blur_pool2d(xf), reff = padded_blur_reference(xf);
    EXPECT_TRUE(torch::allclose(yf, reff, 1e-5, 1e-6)) << h << "x" << w;
    auto gf = g.to(torch::kFloat);
    EXPECT_TRUE(torch::allclose(torch::autograd::grad({yf}, {xf}, {gf})[0],
                                torch::autograd::grad({reff}, {xf}, {gf})[0], 1e-5, 1e-6))
        << h << "x" << w;
  }
  at::set_num_threads(threads);
  {
    c10::InferenceMode g;
    auto x = torch::randn({2, 3, 9, 6});
    EXPECT_TRUE(torch::allclose(nn::blur_pool2d(x), padded_blur_reference(x), 1e-5, 1e-6));
  }
  EXPECT_EQ(nn::blur_pool2d(torch::zeros({0, 3, 5, 5})).sizes(), (std::vector<int64_t>{0, 3, 3, 3}));
  auto x = torch::randn({1, 2, 4, 4}, torch::kDouble).requires_grad_();
  EXPECT_TRUE(torch::autograd::grad({nn::blur_pool2d(x).pow(2).sum()}, {x})[0].defined());
  test::expect_error([&] { torch::autograd::grad({nn::blur_pool2d(x).pow(2).sum()}, {x}, {}, true, true); },
                     {"no double backward"});
  test::expect_error([] { nn::blur_pool2d(torch::zeros({2, 3, 4})); }, {"blur_pool2d", "[B, C, H, W]"});
  test::expect_error([] { nn::blur_pool2d(torch::zeros({1, 1, 4, 4}, torch::kLong)); }, {"float or double"});
}

TEST(SplitAttention, MatchesAPerGroupPerRadixReference) {
  torch::manual_seed(0);
  const int64_t W = 8, R = 2, G = 2, c = W / G;
  models::SplitAttentionConv sa(W, R, G);
  sa->eval();  // BatchNorm with its running statistics: a fixed function
  {
    torch::NoGradGuard ng;
    for (auto& b : sa->buffers()) if (b.is_floating_point()) b.uniform_(0.5, 1.5);
  }
  auto x = torch::randn({3, W, 5, 5});
  auto out = sa->forward(x);
  torch::NoGradGuard ng;
  auto y = torch::relu(sa->bn0->forward(sa->conv->forward(x)));  // [B, R*W, H, W]
  auto gap = torch::zeros({3, W});
  for (int64_t r = 0; r < R; ++r) gap += y.narrow(1, r * W, W).mean({2, 3});
  const int64_t inter = sa->fc1->weight.size(0), ig = inter / G;
  auto h = torch::zeros({3, inter});
  for (int64_t g = 0; g < G; ++g)  // grouped 1x1: group g reads gap's channels g*c..
    h.narrow(1, g * ig, ig).copy_(torch::matmul(gap.narrow(1, g * c, c), sa->fc1->weight.narrow(0, g * ig, ig).view({ig, c}).t()) +
                                  sa->fc1->bias.narrow(0, g * ig, ig));
  h = torch::relu(sa->bn1->forward(h.view({3, inter, 1, 1})).view({3, inter}));
  auto ref = torch::zeros_like(out);
  for (int64_t g = 0; g < G; ++g) {
    auto a = torch::matmul(h.narrow(1, g * ig, ig), sa->fc2->weight.narrow(0, g * R * c, R * c).view({R * c, ig}).t()) +
             sa->fc2->bias.narrow(0, g * R * c, R * c);  // [B, R*c]: radix r's logits at r*c..
    auto w = a.view({3, R, c}).softmax(1);
    for (int64_t r = 0; r < R; ++r)
      ref.narrow(1, g * c, c) += w.select(1, r).view({3, c, 1, 1}) * y.narrow(1, r * W + g * c, c);
  }
  EXPECT_TRUE(torch::allclose(out, ref, 1e-5, 1e-5)) << (out - ref).abs().max();
}

TEST(ResNeSt, BranchesGiveTheirOwnLogitsAndTheModelTheirMeanOrTheFusion) {
  torch::manual_seed(0);
  auto cfg = models::preset("resnest-mb-tiny");
  ASSERT_EQ(cfg.branches, 3);
  auto m = std::dynamic_pointer_cast<models::ResNeStImpl>(models::build_model(cfg));
  m->eval();
  auto x = torch::randn({4, 1, 28, 28});
  torch::NoGradGuard ng;
  auto outs = m->forward_branches(x);
  ASSERT_EQ(outs.logits.size(), 3u);
  ASSERT_EQ(outs.embeddings[0].sizes(), (std::vector<int64_t>{4, 128}));
  ASSERT_EQ(outs.logits[2].sizes(), (std::vector<int64_t>{4, 10}));
  EXPECT_FALSE(torch::allclose(outs.logits[0], outs.logits[1]));  // independent parameters
  auto mean = (outs.logits[0] + outs.logits[1] + outs.logits[2]) / 3;
  EXPECT_TRUE(torch::allclose(m->forward(x), mean, 1e-5, 1e-5));
  m->set_fused(true);
  auto fused = m->fusion->forward(torch::cat(outs.embeddings, 1));
  EXPECT_TRUE(torch::allclose(m->forward(x), fused, 1e-5, 1e-5));
  // Any input size through the global pool (test-time augmentation's larger scale).
  EXPECT_EQ(m->forward(torch::randn({2, 1, 36, 36})).sizes(), (std::vector<int64_t>{2, 10}));
}

// forward_views: branch b on views[b] only. In eval mode BatchNorm uses its
// running statistics, so each branch's logits are those of forward_branches on
// its own view; a wrong number of views is an error.
TEST(ResNeSt, ViewsRunEachBranchOnItsOwnImages) {
  torch::manual_seed(0);
  auto m = models::build_model(models::preset("resnest-mb-tiny"));
  m->eval();
  std::vector<at::Tensor> x;
  for (int v = 0; v < 3; ++v) x.push_back(torch::randn({4, 1, 28, 28}));
  torch::NoGradGuard ng;
  const auto outs = m->forward_views(x);
  ASSERT_EQ(outs.logits.size(), 3u);
  for (int b = 0; b < 3; ++b) {
    const auto own = m->forward_branches(x[b]);
    EXPECT_TRUE(torch::allclose(outs.logits[b], own.logits[b], 1e-5, 1e-5)) << b;
    EXPECT_TRUE(torch::allclose(outs.embeddings[b], own.embeddings[b], 1e-5, 1e-5)) << b;
    EXPECT_FALSE(torch::allclose(outs.logits[b], m->forward_branches(x[(b + 1) % 3]).logits[b], 1e-3, 1e-3));
  }
  test::expect_error([&] { m->forward_views({x[0], x[1]}); }, {"2 views for 3 branches"});
  test::expect_error([&] { m->forward_views({x[0], x[1], torch::randn({2, 1, 28, 28})}); }, {"expected one shape"});
  auto one = models::build_model(models::preset("resnest-tiny"));
  test::expect_error([&] { one->forward_views({x[0], x[1]}); }, {"2 views for 1 branches"});
}

TEST(ResNeSt, StochasticDepthOnlyInTraining) {
  torch::manual_seed(0);
  auto cfg = models::preset("resnest-tiny");
  cfg.drop_path = 0.5;
  auto m = models::build_model(cfg);
  auto x = torch::randn({8, 1, 28, 28});
  m->eval();
  torch::NoGradGuard ng;
  EXPECT_TRUE(torch::equal(m->forward(x), m->forward(x)));
  // In training (BatchNorm held on its running statistics, so that only the
  // drop can vary) two passes differ, and do not without it. Each block's last
  // BatchNorm starts at zero (a residual branch that adds nothing, so nothing to
  // drop); it is set to one.
  for (double p : {0.5, 0.0}) {
    cfg.drop_path = p;
    torch::manual_seed(0);
    auto t = models::build_model(cfg);
    for (auto& w : t->named_parameters())
      if (w.key().find("bn3.weight") != std::string::npos) w.value().fill_(1.0);
    t->train();
    for (auto& mod : t->modules(false))
      if (dynamic_cast<torch::nn::BatchNorm2dImpl*>(mod.get())) mod->eval();
    EXPECT_EQ(torch::equal(t->forward(x), t->forward(x)), p == 0.0) << "drop_path " << p;
  }
}

TEST(ResNeSt, HeadDropoutOnlyInTrainingAndNotInTheEmbeddings) {
  torch::manual_seed(0);
  auto cfg = models::preset("resnest-mb-tiny");
  cfg.dropout = 0.5;
  cfg.drop_path = 0.0;
  auto m = std::dynamic_pointer_cast<models::ResNeStImpl>(models::build_model(cfg));
  auto x = torch::randn({4, 1, 28, 28});
  torch::NoGradGuard ng;
  m->eval();
  const auto ref = m->forward_branches(x);
  EXPECT_TRUE(torch::equal(m->forward(x), m->forward(x)));
  // In training BatchNorm uses the batch statistics; fix them by evaluating
  // the trunk in eval mode and training only the heads' dropout.
  m->train();
  for (auto& mod : m->modules(false))
    if (dynamic_cast<torch::nn::BatchNorm2dImpl*>(mod.get())) mod->eval();
  const auto a = m->forward_branches(x), b = m->forward_branches(x);
  EXPECT_TRUE(torch::allclose(a.embeddings[0], ref.embeddings[0], 1e-5, 1e-6));  // embeddings whole
  EXPECT_FALSE(torch::allclose(a.logits[0], b.logits[0]));                    // heads see dropout
  EXPECT_FALSE(torch::allclose(a.logits[0], ref.logits[0]));
}

TEST(ResNeSt, BadConfigsAreErrors) {
  auto c = models::preset("resnest-mb-tiny");
  c.branches = 0;
  test::expect_error([&] { models::validate(c); }, {"model.branches = 0", "expected >= 1"});
  c = models::preset("resnest-tiny");
  c.shared_stages = 3;
  test::expect_error([&] { models::validate(c); }, {"model.shared_stages = 3", "expected 0..2"});
  c = models::preset("resnest-tiny");
  c.dims = {32, 64, 130};
  test::expect_error([&] { models::validate(c); }, {"divisible by 4"});
  c = models::preset("resnest-tiny");
  c.precision = "bf16";  // would silently train in fp32
  test::expect_error([&] { models::validate(c); }, {"model.precision = 'bf16'", "fp32 only"});
  auto v = models::preset("vit-tiny");
  v.branches = 3;
  test::expect_error([&] { models::validate(v); }, {"model.branches = 3", "ResNeSt"});
}
