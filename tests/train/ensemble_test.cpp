// Test-time augmentation and weighted ensembles: views averaged as defined,
// scores against hand-computed values, weights honoured, bad configs refused.
#include <algorithm>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include "support/expect_error.h"
#include "support/temp_dir.h"
#include "support/toy_resnest.h"
#include "moev/data/batch_loader.h"
#include "moev/train/checkpoint.h"
#include "moev/train/datasets.h"
#include "moev/train/ensemble.h"
#include "moev/train/teacher.h"
#include "moev/train/trained_model.h"
#include "moev/train/trainer.h"

using namespace moev;

namespace {
models::ClassifierPtr tiny_resnest() {
  torch::manual_seed(0);
  auto c = models::preset("resnest-tiny");
  c.dims = {16, 32, 64};
  c.stem_channels = 16;
  auto m = models::build_model(c);
  m->eval();
  return m;
}
}  // namespace

TEST(Tta, ViewsAreAveragedAsDefined) {
  auto m = tiny_resnest();
  auto u8 = torch::randint(0, 256, {3, 1, 28, 28}).to(torch::kUInt8);
  const std::vector<float> mean{0.3f}, std{0.35f};
  auto x = data::normalize_images(u8, mean, std);
  torch::NoGradGuard ng;
  train::TtaOptions off;
  EXPECT_TRUE(torch::allclose(train::predict_probs(*m, u8, mean, std, off), torch::softmax(m->forward(x), 1)));
  train::TtaOptions flip;
  flip.enabled = true;
  flip.shift = 0;
  flip.scale = 0;
  auto want = (torch::softmax(m->forward(x), 1) + torch::softmax(m->forward(x.flip(3).contiguous()), 1)) / 2;
  EXPECT_TRUE(torch::allclose(train::predict_probs(*m, u8, mean, std, flip), want, 1e-5, 1e-6));
  // A shifted crop pads with black: the view shifted by (-2, -2) is the image moved down-right.
  train::TtaOptions full;
  full.enabled = true;
  auto p = train::predict_probs(*m, u8, mean, std, full);
  EXPECT_TRUE(torch::allclose(p.sum(1), torch::ones({3}), 1e-5, 1e-5));
  auto shifted = torch::zeros_like(u8);
  shifted.narrow(2, 2, 26).narrow(3, 2, 26).copy_(u8.narrow(2, 0, 26).narrow(3, 0, 26));
  auto xs = data::normalize_images(shifted, mean, std);
  auto up = torch::nn::functional::interpolate(
      x, torch::nn::functional::InterpolateFuncOptions().size(std::vector<int64_t>{32, 32}).mode(torch::kBilinear).align_corners(false));
  // Recompute the 12 views by hand: 5 crops and the 1.15x (32 px) image, each plain and mirrored.
  at::Tensor sum = torch::zeros({3, 10});
  auto bg = torch::full({1, 1, 1, 1}, -0.3f / 0.35f);
  auto padded = torch::constant_pad_nd(x - bg, {2, 2, 2, 2}) + bg;
  for (auto [dy, dx] : std::vector<std::pair<int, int>>{{0, 0}, {-2, -2}, {-2, 2}, {2, -2}, {2, 2}}) {
    auto v = padded.narrow(2, 2 + dy, 28).narrow(3, 2 + dx, 28).contiguous();
    if (dy == -2 && dx == -2) { EXPECT_TRUE(torch::allclose(v, xs, 1e-6, 1e-6)); }
    sum += torch::softmax(m->forward(v), 1) + torch::softmax(m->forward(v.flip(3).contiguous()), 1);
  }
  sum += torch::softmax(m->forward(up), 1) + torch::softmax(m->forward(up.flip(3).contiguous()), 1);
  EXPECT_TRUE(torch::allclose(p, sum / 12, 1e-5, 1e-6));
}

// `moev eval --tta` shows a model only the views its training did.
TEST(Tta, AsTrainedFollowsTheTrainingAugmentation) {
  moev::train::DataConfig d;  // defaults: crops with 2 px padding and flips
  auto t = moev::train::tta_as_trained(d, "convnext");
  EXPECT_TRUE(t.enabled);
  EXPECT_EQ(t.shift, 2);
  EXPECT_TRUE(t.flip);
  EXPECT_GT(t.scale, 1.0);
  d.crop_padding = 0;  // flips only, as the 15-minute V-MoE trains
  t = moev::train::tta_as_trained(d, "vit");
  EXPECT_EQ(t.shift, 0);
  EXPECT_TRUE(t.flip);
  EXPECT_EQ(t.scale, 0);
  d.crop_padding = 1;
  d.hflip = false;
  t = moev::train::tta_as_trained(d, "convnext");
  EXPECT_EQ(t.shift, 1);
  EXPECT_FALSE(t.flip);
  d.augment = false;
  d.hflip = true;
  t = moev::train::tta_as_trained(d, "convnext");
  EXPECT_EQ(t.shift, 0);
  EXPECT_FALSE(t.flip);
}

TEST(Ensemble, ScoresMatchHandCountsAndWeightsAreHonoured) {
  auto probs = torch::tensor({{0.1f, 0.7f, 0.2f}, {0.5f, 0.1f, 0.4f}, {0.3f, 0.3f, 0.4f}});
  auto y = torch::tensor({1, 2, 2}, torch::kInt64);
  auto r = train::score_probs(probs, y);
  EXPECT_NEAR(r.top1, 2.0 / 3.0, 1e-9);
  EXPECT_NEAR(r.loss, -(std::log(0.7) + std::log(0.4) + std::log(0.4)) / 3, 1e-6);
  EXPECT_TRUE(std::isnan(r.top5));  // 3 classes: all in the top 5
  auto six = torch::tensor({{0.3f, 0.25f, 0.2f, 0.12f, 0.08f, 0.05f}, {0.3f, 0.25f, 0.2f, 0.12f, 0.08f, 0.05f}});
  EXPECT_NEAR(train::score_probs(six, torch::tensor({4, 5}, torch::kInt64)).top5, 0.5, 1e-9);

  test::TempDir dir;
  auto run = [&](const std::string& name, uint64_t seed) {
    train::train_model(test::toy_resnest_run(dir.file(name), 1, seed), {});
    return dir.file(name) + "/checkpoint.pt";
  };
  const auto a = run("a", 1), b = run("b", 2);
  train::EnsembleConfig e;
  e.members = {{a, 1.0}, {b, 0.0}};  // weight 0: the ensemble is member a
  auto res = train::evaluate_ensemble(e, 100, 32, nullptr, false);
  ASSERT_EQ(res.members.size(), 2u);
  EXPECT_DOUBLE_EQ(res.ensemble.top1, res.members[0].top1);
  EXPECT_NEAR(res.ensemble.loss, res.members[0].loss, 1e-6);
  e.members = {{a, 3.0}, {b, 1.0}};
  res = train::evaluate_ensemble(e, 100, 32, nullptr, false);
  EXPECT_NE(res.ensemble.loss, res.members[0].loss);
  // 3 : 1 is 0.75 of a's probabilities and 0.25 of b's, here from each member on its own.
  const auto ta = train::load_trained(a, c10::Device(c10::kCPU)), tb = train::load_trained(b, c10::Device(c10::kCPU));
  auto data = ta.cfg.data;
  data.test_limit = 100;
  const auto ds = train::open_datasets(data, ta.cfg.model, /*load_train=*/false);
  const auto member_probs = [&](const train::TrainedModel& t) {
    return train::predict_probs(*t.model, ds.test.images, t.cfg.data.mean, t.cfg.data.std, {});
  };
  const auto want = train::score_probs(0.75 * member_probs(ta) + 0.25 * member_probs(tb), ds.test.labels);
  EXPECT_NEAR(res.ensemble.loss, want.loss, 1e-6);
  EXPECT_DOUBLE_EQ(res.ensemble.top1, want.top1);
  const auto swapped = train::score_probs(0.25 * member_probs(ta) + 0.75 * member_probs(tb), ds.test.labels);
  EXPECT_GT(std::abs(want.loss - swapped.loss), 1e-4) << "the two members are too alike for the weights to show";

  // A member whose classes are listed in another order (state.class_names reversed: its output j means what
  // the others' L-1-j does) has its columns put back in order before the mix.
  auto reversed = train::load_checkpoint(b);
  auto state = nlohmann::json::parse(reversed.state_json);
  auto names = state.at("class_names").get<std::vector<std::string>>();
  std::reverse(names.begin(), names.end());
  state["class_names"] = names;
  reversed.state_json = state.dump();
  train::save_checkpoint(dir.file("reversed.pt"), reversed);
  e.members = {{a, 1.0}, {dir.file("reversed.pt"), 1.0}};
  res = train::evaluate_ensemble(e, 100, 32, nullptr, false);
  const auto in_order = train::score_probs(0.5 * member_probs(ta) + 0.5 * member_probs(tb).flip(1), ds.test.labels);
  EXPECT_NEAR(res.ensemble.loss, in_order.loss, 1e-6);
  names.back() = "Something else";
  state["class_names"] = names;
  reversed.state_json = state.dump();
  train::save_checkpoint(dir.file("other_classes.pt"), reversed);
  e.members = {{a, 1.0}, {dir.file("other_classes.pt"), 1.0}};
  test::expect_error([&] { train::evaluate_ensemble(e, 100, 32, nullptr, false); },
                     {"other_classes.pt has no class '", "expected members trained on the same classes"});

  // With tta and no tta_* keys each member sees the views it trained on, as in eval --tta: here 1-pixel
  // shifts and no flips (they were fixed: 2-pixel shifts and flips whatever it trained with); a key given
  // applies.
  auto plain = test::toy_resnest_run(dir.file("c"), 1, 3);
  plain.data.hflip = false;
  plain.data.crop_padding = 1;
  train::train_model(plain, {});
  const auto tc = train::load_trained(dir.file("c/checkpoint.pt"), c10::Device(c10::kCPU));
  train::EnsembleConfig views;
  views.members = {{dir.file("c/checkpoint.pt"), 1.0}};
  views.tta = true;
  const auto as_trained = train::tta_as_trained(tc.cfg.data, tc.cfg.model.family);
  ASSERT_EQ(as_trained.shift, 1);
  ASSERT_FALSE(as_trained.flip);
  auto tta_loss = [&](const train::TtaOptions& o) {
    return train::score_probs(
               train::predict_probs(*tc.model, ds.test.images, tc.cfg.data.mean, tc.cfg.data.std, o), ds.test.labels)
        .loss;
  };
  train::TtaOptions fixed;
  fixed.enabled = true;
  const double got = train::evaluate_ensemble(views, 100, 32, nullptr, false).ensemble.loss;
  EXPECT_NEAR(got, tta_loss(as_trained), 1e-6);
  EXPECT_GT(std::abs(got - tta_loss(fixed)), 1e-5);
  views.tta_flip = true;
  auto flipped = as_trained;
  flipped.flip = true;
  EXPECT_NEAR(train::evaluate_ensemble(views, 100, 32, nullptr, false).ensemble.loss, tta_loss(flipped), 1e-6);
  // Views past the image are refused, naming the key (a shift of 28 read as top-1 0.11 at exit 0; a scale
  // of 1000 asked for 627 GB).
  views.tta_shift = 8;
  test::expect_error([&] { train::evaluate_ensemble(views, 100, 32, nullptr, false); },
                     {"ensemble.tta_shift = 8", "a quarter of the 28-pixel image (7)"});
  views.tta_shift = 7;
  views.tta_scale = 1000.0;
  test::expect_error([&] { train::evaluate_ensemble(views, 100, 32, nullptr, false); },
                     {"ensemble.tta_scale = 1000", "0.5..2"});

  // A member from a run on other data: its labels would be scored against the first member's test set.
  auto ckpt = train::load_checkpoint(b);
  auto cfg = nlohmann::json::parse(ckpt.config_json);
  cfg["data"]["path"] = dir.file("other-fashion");
  ckpt.config_json = cfg.dump();
  const auto c = dir.file("c.pt");
  train::save_checkpoint(c, ckpt);
  e.members = {{a, 1.0}, {c, 1.0}};
  test::expect_error([&] { train::evaluate_ensemble(e, 100, 32, nullptr, false); },
                     {c, "another test set", "data.path", "other-fashion", "other_data = true"});
  e.other_data = true;
  res = train::evaluate_ensemble(e, 100, 32, nullptr, false);
  auto alone = [](const std::string& member) {
    train::EnsembleConfig one;
    one.members = {{member, 1.0}};
    return one;
  };
  EXPECT_EQ(res.members[1].top1, train::evaluate_ensemble(alone(b), 100, 32, nullptr, false).ensemble.top1);
  // Unset: the run's data.test_limit (200 in the toy run); 0: every test image.
  EXPECT_EQ(train::evaluate_ensemble(alone(a), std::nullopt, 32, nullptr, false).ensemble.images, 200);
  EXPECT_EQ(train::evaluate_ensemble(alone(a), 0, 500, nullptr, false).ensemble.images, 10000);

  using nlohmann::json;
  EXPECT_TRUE(train::parse_ensemble(json{{"members", {"x.pt"}}, {"other_data", true}}, "e.toml").other_data);
  // The views' keys without tta = true were passed over without a word.
  test::expect_error([] { train::parse_ensemble(json{{"members", {"x.pt"}}, {"tta_shift", 2}}, "e.toml"); },
                     {"e.toml", "ensemble.tta_shift without tta = true"});
  EXPECT_EQ(train::parse_ensemble(json{{"members", {"x.pt"}}, {"tta", true}, {"tta_shift", 2}}, "e.toml").tta_shift,
            2);
  test::expect_error([] { train::parse_ensemble(json{{"members", {"x.pt", "y.pt"}}, {"weights", {1}}}, "e.toml"); },
                     {"e.toml", "ensemble.weights has 1 numbers for 2 members"});
  test::expect_error([] { train::parse_ensemble(json{{"members", {"x.pt"}}, {"wieghts", {1}}}, "e.toml"); },
                     {"ensemble.wieghts is not a key"});
  // Weights become shares of the mix; [1e308, 1e308] summed to inf and weighed every member 0.
  for (const auto& [given, shares] : std::vector<std::pair<json, std::vector<double>>>{
           {json{3, 1}, {0.75, 0.25}}, {json{1e308, 1e308}, {0.5, 0.5}}, {json{0, 2e-300}, {0, 1}}}) {
    const auto e = train::parse_ensemble(json{{"members", {"x.pt", "y.pt"}}, {"weights", given}}, "e.toml");
    EXPECT_DOUBLE_EQ(e.members[0].weight, shares[0]) << given;
    EXPECT_DOUBLE_EQ(e.members[1].weight, shares[1]) << given;
  }
  test::expect_error([] { train::parse_ensemble(json{{"members", {"x.pt", "y.pt"}}, {"weights", {0, 0}}}, "e.toml"); },
                     {"e.toml", "all 0"});
  test::expect_error(
      [] {
        train::parse_ensemble(json{{"members", {"x.pt"}}, {"weights", {std::numeric_limits<double>::infinity()}}},
                              "e.toml");
      },
      {"e.toml", "expected finite numbers"});
}

// Which data settings make two runs' test sets differ, the rule ensembles check.
TEST(Ensemble, TestDataDifferenceComparesWhereTestImagesComeFrom) {
  train::DataConfig a;
  a.path = "/usr/share/datasets/fashion-mnist";
  auto b = a;
  b.path = "/usr/share/datasets/../datasets/fashion-mnist/";  // the same folder spelled another way
  b.per_class = 50;                                           // other training images, the same test set
  b.subset_seed = 3;
  EXPECT_EQ(train::test_data_difference(a, b), "");
  b.path = "/data/mnist";
  EXPECT_NE(train::test_data_difference(a, b).find("data.path"), std::string::npos);
  // Folder: the test root, which falls back to the training root.
  a.format = b.format = "folder";
  a.path = "/img/train";
  a.test_path = "/img/test";
  b.path = "/img/train";
  b.test_path = "";
  EXPECT_EQ(train::test_data_difference(a, b), "data.test_path \"/img/test\" vs data.path \"/img/train\"");
  b.path = "/other/train";
  b.test_path = "/img/test";
  EXPECT_EQ(train::test_data_difference(a, b), "");
  a.format = b.format = "manifest";
  b.tags = {"cat", "dog"};
  EXPECT_NE(train::test_data_difference(a, b).find("data.tags"), std::string::npos);
  b.format = "cifar10";
  EXPECT_NE(train::test_data_difference(a, b).find("data.format"), std::string::npos);
}
