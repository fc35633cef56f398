// The multi-branch training recipe end to end on real Fashion-MNIST images, at
// toy size: distillation runs the teacher once per image and augmentation,
// refuses a teacher of another architecture or trained on other images, and
// fusion training leaves every branch weight as it was; with branch views each
// branch trains on its own batch.
#include <filesystem>
#include <fstream>
#include <sstream>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "support/expect_error.h"
#include "support/temp_dir.h"
#include "support/resume_mark.h"
#include "support/toy_resnest.h"
#include "moev/data/batch_loader.h"
#include "moev/train/checkpoint.h"
#include "moev/train/datasets.h"
#include "moev/train/fusion.h"
#include "moev/train/losses.h"
#include "moev/train/teacher.h"
#include "moev/train/trained_model.h"
#include "moev/train/trainer.h"

using namespace moev;

namespace {
io::RunConfig toy(const std::string& out, int64_t branches) { return test::toy_resnest_run(out, branches); }

// Runs `s` whole, and again killed after `cut_at` steps and resumed in dir/cut:
// the two end with the same weights, bit for bit; the cut stopped where asked,
// short of the end, and the resumed run went on from it (not from step 0).
// The uninterrupted run's, the cut one's and the resumed one's results.
struct CutRuns {
  train::TrainOutcome whole, part, rest;
};

CutRuns expect_killed_run_resumes_exactly(io::RunConfig s, int64_t cut_at, test::TempDir& dir) {
  s.train.out_dir = dir.file("full");
  const auto whole = train::train_model(s, {});
  auto cut = s;
  cut.train.out_dir = dir.file("cut");
  cut.train.max_steps = cut_at;
  const auto part = train::train_model(cut, {});
  EXPECT_EQ(part.steps, cut_at);
  EXPECT_FALSE(part.finished);
  EXPECT_LT(cut_at, whole.steps);
  const auto halfway = train::load_checkpoint(dir.file("cut") + "/checkpoint.pt").model;
  test::mark_log(cut.train.out_dir);
  cut.train.max_steps = 0;
  train::TrainRunOptions resume;
  resume.resume = true;
  const auto rest = train::train_model(cut, resume);
  EXPECT_EQ(rest.steps, whole.steps);
  EXPECT_TRUE(rest.finished);
  EXPECT_TRUE(test::log_has_mark(cut.train.out_dir)) << "the resumed run started again";
  const auto a = train::load_checkpoint(dir.file("full") + "/checkpoint.pt").model;
  const auto b = train::load_checkpoint(dir.file("cut") + "/checkpoint.pt").model;
  int64_t moved = 0;
  for (const auto& [name, t] : a) {
    EXPECT_TRUE(torch::equal(t, b.at(name))) << name;
    moved += !torch::equal(t, halfway.at(name));
  }
  EXPECT_GT(moved, 0) << "the steps after the cut changed nothing";
  return {whole, part, rest};
}

// Trains c for one step (logged alone) and returns that log line's `field`,
// with the model as it stood before the step: built again from the run's seed.
// Needs a config without random draws between init and the first forward.
std::pair<double, models::ClassifierPtr> first_step(io::RunConfig c, const std::string& field) {
  c.train.max_steps = 1;
  c.train.log_every = 1;
  train::train_model(c, {});
  std::ifstream in(std::filesystem::path(c.train.out_dir) / "log.jsonl");
  std::string line;
  std::getline(in, line);
  const double logged = nlohmann::json::parse(line).at(field).get<double>();
  torch::manual_seed(c.train.seed);
  auto m = models::build_model(c.model);
  m->train();
  return {logged, m};
}
// The batch the run's first step trains on (branch 0's, with views).
data::Batch first_batch(const io::RunConfig& c) {
  auto ds = train::open_datasets(c.data, c.model, /*load_train=*/true);
  data::Batch b;
  data::BatchLoader loader(
      ds.train, train::training_loader_options(c.data, ds, c.train.batch_size, train::branch_view_seed(c.train.seed, 0)),
      0);
  EXPECT_TRUE(loader.next(b));
  return b;
}
}  // namespace

TEST(MultiBranch, TeacherRunsOncePerImageAndAugmentation) {
  test::TempDir dir;
  train::train_model(toy(dir.file("teacher"), 2), {});
  auto s = toy(dir.file("student"), 2);
  s.train.teacher = {dir.file("teacher") + "/checkpoint.pt"};
  s.data.augment = false;  // one augmentation per image: epoch 2 is all cache hits
  s.train.epochs = 3;
  auto r = train::train_model(s, {});
  EXPECT_EQ(r.steps, 15);
  EXPECT_EQ(r.teacher_images, 50);
  // A cache of 20 keys (10 classes: 40 bytes of probabilities plus 64 per
  // key): the other 30 images run the teacher every epoch, and the student
  // learns exactly the same weights.
  s.train.teacher_cache_mb = 20.5 * 104 / (1024.0 * 1024.0);
  s.train.out_dir = dir.file("student_small_cache");
  s.train.log_every = 5;  // the note comes with a log line
  s.train.progress = true;
  std::ostringstream progress;
  train::TrainRunOptions with_progress;
  with_progress.progress = &progress;
  const auto capped = train::train_model(s, with_progress);
  const std::string said = progress.str();
  EXPECT_EQ(capped.teacher_images, 50 + 30 + 30);
  EXPECT_NE(said.find("teacher's cache is full (20 images"), std::string::npos) << said;
  const auto full = train::load_checkpoint(dir.file("student") + "/checkpoint.pt").model;
  const auto small = train::load_checkpoint(dir.file("student_small_cache") + "/checkpoint.pt").model;
  for (const auto& [name, t] : full) EXPECT_TRUE(torch::equal(t, small.at(name))) << name;
  s.train.teacher_cache_mb = 2048;
  // With crops and flips there are 50 variants per image; 3 epochs see at most 150 of 2500.
  s.data.augment = true;
  s.train.out_dir = dir.file("student_aug");
  r = train::train_model(s, {});
  EXPECT_GT(r.teacher_images, 100);
  EXPECT_LE(r.teacher_images, 150);
}

TEST(MultiBranch, TeacherOnMixRunsOnEveryBlendAndCachesTheRest) {
  test::TempDir dir;
  train::train_model(toy(dir.file("teacher"), 2), {});
  const auto ckpt = dir.file("teacher") + "/checkpoint.pt";
  auto s = toy(dir.file("student"), 2);
  s.train.teacher = {ckpt};
  s.data.augment = false;
  s.train.epochs = 3;
  s.train.mix_off_epochs = 1;  // epochs 0-1 blend every batch, epoch 2 none
  s.train.mixup_alpha = 0.8;
  s.train.cutmix_alpha = 1.0;
  s.train.mix_prob = 1.0;
  auto cached = train::train_model(s, {});
  EXPECT_EQ(cached.teacher_images, 50);  // the parts' probabilities, one forward per image
  s.train.teacher_on_mix = true;
  s.train.out_dir = dir.file("on_mix");
  auto on_mix = train::train_model(s, {});
  EXPECT_EQ(on_mix.teacher_images, 100 + 50);  // 10 blended batches of 10, then the plain epoch's 50
  // Other targets, other weights.
  const auto a = train::load_checkpoint(dir.file("student") + "/checkpoint.pt").model;
  const auto b = train::load_checkpoint(dir.file("on_mix") + "/checkpoint.pt").model;
  EXPECT_FALSE(torch::equal(a.at("heads.0.weight"), b.at("heads.0.weight")));

  // The uncached probabilities are the teacher's softmax on the image given,
  // and the cached ones agree with them.
  auto loaded = train::load_trained(ckpt, c10::Device(c10::kCPU));
  loaded.model->eval();
  train::Teacher t({ckpt}, s.model, loaded.cfg.data.mean, loaded.cfg.data.std);
  torch::manual_seed(3);
  const auto x = torch::randn({40, 1, 28, 28});
  torch::NoGradGuard ng;
  const auto expected = torch::softmax(loaded.model->forward(x), 1);
  const auto p = t.probs_uncached(x);
  EXPECT_TRUE(torch::allclose(p, expected, 1e-5, 1e-6)) << (p - expected).abs().max();
  const auto index = torch::arange(40, torch::kInt64), aug = torch::zeros({40}, torch::kInt64);
  EXPECT_TRUE(torch::allclose(t.probs(x, index, aug, 1), p, 1e-5, 1e-6));
  EXPECT_EQ(t.images_run(), 80);
}

// Images AutoAugment or erasing changed come with aug = -1: the teacher runs
// on each of them every time (their probabilities are of the image given) and
// caches only the keyed rows. A student with AutoAugment and erasing trains
// against a teacher (erasing was refused while every image had a key).
TEST(MultiBranch, TeacherRunsOnEveryImageWithoutAKey) {
  test::TempDir dir;
  train::train_model(toy(dir.file("teacher"), 2), {});
  const auto ckpt = dir.file("teacher") + "/checkpoint.pt";
  auto loaded = train::load_trained(ckpt, c10::Device(c10::kCPU));
  train::Teacher t({ckpt}, loaded.cfg.model, loaded.cfg.data.mean, loaded.cfg.data.std);
  torch::manual_seed(4);
  const auto x = torch::randn({20, 1, 28, 28});
  const auto index = torch::arange(20, torch::kInt64);
  auto aug = torch::zeros({20}, torch::kInt64);
  aug.slice(0, 0, 8).fill_(-1);
  const auto first = t.probs(x, index, aug, 1);
  EXPECT_EQ(t.images_run(), 20);
  const auto x2 = torch::randn({20, 1, 28, 28});  // other pixels under the same keys
  const auto second = t.probs(x2, index, aug, 1);
  EXPECT_EQ(t.images_run(), 28);  // only the 8 keyless rows ran again
  const auto fresh = t.probs_uncached(x2);
  EXPECT_TRUE(torch::allclose(second.slice(0, 0, 8), fresh.slice(0, 0, 8), 1e-5, 1e-6));
  EXPECT_TRUE(torch::equal(second.slice(0, 8), first.slice(0, 8)));  // cached
  EXPECT_FALSE(torch::allclose(second.slice(0, 0, 8), first.slice(0, 0, 8), 1e-3, 1e-3));

  auto s = toy(dir.file("student"), 2);
  s.train.teacher = {ckpt};
  s.train.epochs = 2;
  s.data.auto_augment = "imagenet";
  s.data.random_erase = 0.25;
  const auto r = train::train_model(s, {});
  EXPECT_TRUE(r.finished);
  EXPECT_GT(r.teacher_images, 0);
  s.data.auto_augment = "randaugment";
  s.train.out_dir = dir.file("bad");
  test::expect_error([&] { train::train_model(s, {}); }, {"data.auto_augment", "randaugment"});
}

TEST(MultiBranch, TeacherEnsembleAveragesItsMembersProbabilities) {
  test::TempDir dir;
  train::train_model(toy(dir.file("a"), 2), {});
  train::train_model(test::toy_resnest_run(dir.file("b"), 2, /*seed=*/7), {});
  train::train_model(toy(dir.file("n1"), 1), {});
  const auto a = dir.file("a") + "/checkpoint.pt", b = dir.file("b") + "/checkpoint.pt";
  const auto n1 = dir.file("n1") + "/checkpoint.pt";
  auto la = train::load_trained(a, c10::Device(c10::kCPU));
  auto lb = train::load_trained(b, c10::Device(c10::kCPU));
  la.model->eval();
  lb.model->eval();
  const auto& mean = la.cfg.data.mean;
  const auto& sd = la.cfg.data.std;
  train::Teacher t({a, b}, la.cfg.model, mean, sd);
  torch::manual_seed(5);
  const auto x = torch::randn({40, 1, 28, 28});
  torch::NoGradGuard ng;
  const auto pa = torch::softmax(la.model->forward(x), 1), pb = torch::softmax(lb.model->forward(x), 1);
  ASSERT_FALSE(torch::allclose(pa, pb, 1e-3, 1e-3));  // two different members
  const auto expected = (pa + pb) / 2;
  const auto p = t.probs_uncached(x);
  EXPECT_TRUE(torch::allclose(p, expected, 1e-5, 1e-6)) << (p - expected).abs().max();
  EXPECT_TRUE(torch::allclose(p.sum(1), torch::ones({40}), 1e-5, 1e-6));
  const auto index = torch::arange(40, torch::kInt64), aug = torch::zeros({40}, torch::kInt64);
  EXPECT_TRUE(torch::allclose(t.probs(x, index, aug, 1), expected, 1e-5, 1e-6));
  EXPECT_EQ(t.images_run(), 80);  // images, whatever the number of members

  // A member named twice (here by another spelling) counted double in the average.
  test::expect_error([&] { train::Teacher({a, b, dir.file("a") + "/../a/checkpoint.pt"}, la.cfg.model, mean, sd); },
                     {"train.teacher lists " + dir.file("a") + "/../a/checkpoint.pt twice", "each member once"});
  // One member of another architecture spoils the ensemble, and is named.
  test::expect_error([&] { train::Teacher({a, n1}, la.cfg.model, mean, sd); },
                     {"train.teacher = " + n1, "model.branches 1 vs 2"});

  // Classes are matched by name: a teacher listing them in another order (a folder's) taught permuted targets.
  auto relabelled = [&](const std::string& name, std::vector<std::string> classes) {
    auto ckpt = train::load_checkpoint(a);
    auto st = nlohmann::json::parse(ckpt.state_json);
    st["class_names"] = classes;
    ckpt.state_json = st.dump();
    train::save_checkpoint(dir.file(name), ckpt);
    return dir.file(name);
  };
  ASSERT_EQ(la.class_names.size(), 10u);
  auto reversed = la.class_names;
  std::reverse(reversed.begin(), reversed.end());
  const auto flipped = relabelled("reversed.pt", reversed);
  train::Teacher r({flipped}, la.cfg.model, mean, sd, nullptr, la.class_names);
  EXPECT_TRUE(torch::allclose(r.probs_uncached(x), pa.flip(1), 1e-5, 1e-6));
  std::vector<std::string> other;
  for (int c = 0; c < 10; ++c) other.push_back("c" + std::to_string(c));
  const auto foreign = relabelled("other_classes.pt", other);
  test::expect_error([&] { train::Teacher({foreign}, la.cfg.model, mean, sd, nullptr, la.class_names); },
                     {"train.teacher = " + foreign, "no class '" + la.class_names[0] + "'", "not other classes"});
}

// A paused run's weights (--max-steps, a stop) were taught from and fused as a trained model's without a word:
// each use notes them, with where the run stopped and how to finish it, until the run has ended.
TEST(MultiBranch, AnUnfinishedRunIsNotedWhereItIsUsed) {
  test::TempDir dir;
  auto c = toy(dir.file("paused"), 2);
  c.train.max_steps = 3;
  train::train_model(c, {});
  const auto paused = dir.file("paused") + "/checkpoint.pt";
  const auto t = train::load_trained(paused, c10::Device(c10::kCPU));
  for (const std::string& needle : std::vector<std::string>{paused + " is an unfinished run's",
                                                             "step 3, after 0 of 2 epochs",
                                                             "moev train --out " + dir.file("paused") + " --resume"})
    EXPECT_NE(t.unfinished.find(needle), std::string::npos) << t.unfinished << "\nmissing: " << needle;
  const auto& mean = t.cfg.data.mean;
  const auto& sd = t.cfg.data.std;
  EXPECT_EQ(train::Teacher({paused}, t.cfg.model, mean, sd).notes(), std::vector<std::string>{"train.teacher: " +
                                                                                               t.unfinished});
  auto s = toy(dir.file("student"), 2);
  s.train.teacher = {paused};
  s.train.max_steps = 1;
  std::ostringstream said;
  train::TrainRunOptions o;
  o.progress = &said;
  train::train_model(s, o);
  EXPECT_NE(said.str().find("note: train.teacher: " + t.unfinished + "\n"), std::string::npos) << said.str();
  train::FusionOptions fo;
  fo.epochs = 1;
  fo.evaluate = false;
  std::ostringstream fused_said;
  fo.progress = &fused_said;
  train::train_fusion(paused, dir.file("fused.pt"), fo);
  EXPECT_NE(fused_said.str().find("note: " + t.unfinished), std::string::npos) << fused_said.str();
  // The fusion of a paused run is the paused run's too: that run is to be finished, and fused again.
  const auto fused_note = train::load_trained(dir.file("fused.pt"), c10::Device(c10::kCPU)).unfinished;
  for (const std::string& needle : std::vector<std::string>{dir.file("fused.pt") + " fused the branches of an "
                                                            "unfinished run (" + paused + ")",
                                                            "moev train --out " + dir.file("paused") + " --resume",
                                                            "moev fuse " + paused + " fuses it again"})
    EXPECT_NE(fused_note.find(needle), std::string::npos) << fused_note << "\nmissing: " << needle;

  // Finished: nothing to say.
  c.train.max_steps = 0;
  train::TrainRunOptions resume;
  resume.resume = true;
  ASSERT_TRUE(train::train_model(c, resume).finished);
  EXPECT_EQ(train::load_trained(paused, c10::Device(c10::kCPU)).unfinished, "");
  EXPECT_TRUE(train::Teacher({paused}, t.cfg.model, mean, sd).notes().empty());

  // Known answers: the cool-down is part of the schedule; a time budget ends at its planned step.
  auto cfg = c;
  cfg.train.epochs = 2;
  cfg.train.cooldown_epochs = 1;
  EXPECT_NE(train::unfinished_training(cfg, R"({"step": 20, "epoch": 2})", "x.pt").find("after 2 of 3 epochs (cool-"),
            std::string::npos);
  EXPECT_EQ(train::unfinished_training(cfg, R"({"step": 30, "epoch": 3})", "x.pt"), "");
  EXPECT_EQ(train::unfinished_training(cfg, R"({"step": 7, "epoch": 0, "planned_steps": 7})", "x.pt"), "");
  EXPECT_NE(train::unfinished_training(cfg, R"({"step": 6, "epoch": 0, "planned_steps": 7})", "x.pt"), "");
  EXPECT_EQ(train::unfinished_training(cfg, R"({"pretrain": {"step": 6}})", "x.pt"), "");  // not a train run's
}

// Sun et al.'s objective on the first step, whose model is the same in every
// run: soft cross-entropy is linear in the target, so with target = lambda *
// smoothed + (1 - lambda) * teacher the loss is linear in lambda, and at
// lambda = 1 it is the run without a teacher; the cosine term adds w times the
// same 1 - cos. Swapped lambdas or a dropped cosine term fail here.
TEST(MultiBranch, DistillTargetAndCosineTermMakeTheFirstStepsLoss) {
  test::TempDir dir;
  train::train_model(toy(dir.file("teacher"), 1), {});
  int runs = 0;
  auto loss = [&](double lambda, double cosine, bool teacher = true) {
    auto c = toy(dir.file("s" + std::to_string(runs++)), 1);
    if (teacher) c.train.teacher = {dir.file("teacher") + "/checkpoint.pt"};
    c.train.distill_lambda = lambda;
    c.train.cosine_loss = cosine;
    return first_step(c, "loss").first;
  };
  const double plain = loss(1, 0, /*teacher=*/false), labels = loss(1, 0), teacher = loss(0, 0);
  EXPECT_NEAR(labels, plain, 1e-5);
  ASSERT_GT(std::abs(teacher - labels), 1e-3) << "the teacher's targets are the labels'";
  EXPECT_NEAR(loss(0.25, 0), 0.25 * labels + 0.75 * teacher, 1e-5);
  const double mixed = loss(0.5, 0), cos1 = loss(0.5, 1) - mixed, cos2 = loss(0.5, 2) - mixed;
  EXPECT_GT(cos1, 1e-4);
  EXPECT_LT(cos1, 1.0);  // a mean of 1 - cos over probability vectors
  EXPECT_NEAR(cos2, 2 * cos1, 1e-5);
}

TEST(MultiBranch, TeacherOfAnotherArchitectureIsRefused) {
  test::TempDir dir;
  train::train_model(toy(dir.file("teacher"), 1), {});
  auto s = toy(dir.file("student"), 3);
  s.train.teacher = {dir.file("teacher") + "/checkpoint.pt"};
  test::expect_error([&] { train::train_model(s, {}); },
                     {"train.teacher = ", "not a model of the student's architecture", "model.branches 1 vs 3"});
}

// A teacher that saw more labelled images (or other ones) would carry their
// labels into a data-efficient student: refused, before the student's run
// directory is written, unless train.teacher_other_data says it is meant.
TEST(MultiBranch, TeacherTrainedOnOtherImagesIsRefused) {
  test::TempDir dir;
  auto t = toy(dir.file("teacher"), 2);
  t.data.per_class = 8;
  t.data.subset_seed = 1;
  train::train_model(t, {});
  auto s = toy(dir.file("student"), 2);
  s.train.teacher = {dir.file("teacher") + "/checkpoint.pt"};
  test::expect_error([&] { train::train_model(s, {}); },
                     {"train.teacher = " + s.train.teacher[0], "other images", "data.per_class 8 vs 5",
                      "data.subset_seed 1 vs 0", "train.teacher_other_data = true"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("student")));
  s.train.teacher_other_data = true;
  EXPECT_EQ(train::train_model(s, {}).steps, 10);

  train::DataConfig a, b;
  a.path = "/usr/share/datasets/fashion-mnist/";
  b.path = "/usr/share/datasets/../datasets/fashion-mnist";
  EXPECT_EQ(train::training_data_difference(a, b), "");  // one directory, two spellings
  b.augment = false;  // augmentation is not the data
  b.mean = {0.5f};
  EXPECT_EQ(train::training_data_difference(a, b), "");
  b.per_class = 50;  // all images vs a subset: the subset's seed does not matter
  b.subset_seed = 7;
  EXPECT_EQ(train::training_data_difference(a, b), "data.per_class 0 vs 50");
  a.format = "cifar10";
  EXPECT_EQ(train::training_data_difference(a, b), "data.format \"cifar10\" vs \"fashion-mnist\", data.per_class 0 vs 50");
}

// What the refusal names: every field that shapes the network, in one list;
// drop rates and routing noise are training choices, not architecture.
TEST(MultiBranch, ArchitectureDifferenceNamesEveryShapingField) {
  models::ModelConfig a, b;
  EXPECT_EQ(train::architecture_difference(a, b), "");
  b.drop_path = 0.3;
  b.router.noise_std = 0.5;
  EXPECT_EQ(train::architecture_difference(a, b), "");
  b.branches = 3;
  b.moe = models::parse_placement("every-2");
  b.router.num_experts = 4;
  EXPECT_EQ(train::architecture_difference(a, b), "model.branches 1 vs 3, model.moe none (E " +
                                                      std::to_string(a.router.num_experts) + ") vs every-2 (E 4)");
  a.moe = b.moe;  // same placement, other expert count
  EXPECT_EQ(train::architecture_difference(a, b),
            "model.branches 1 vs 3, model.moe every-2 (E " + std::to_string(a.router.num_experts) + ") vs every-2 (E 4)");
  // Another family is named alone, not with every field the two presets set apart.
  EXPECT_EQ(train::architecture_difference(models::preset("vit-tiny"), models::preset("resnest-tiny")),
            "model.family \"vit\" vs \"resnest\"");
}

TEST(MultiBranch, FusionTrainsOnlyTheFusionLayer) {
  test::TempDir dir;
  auto c = toy(dir.file("mb"), 3);
  c.train.mixup_alpha = 0.8;
  c.train.cutmix_alpha = 1.0;
  c.train.cosine_loss = 1.0;
  train::train_model(c, {});
  train::FusionOptions o;
  o.epochs = 3;
  o.batch_size = 12;  // 50 images: four batches of 12 and one of 2
  o.lr = 1e-2;
  auto res = train::train_fusion(dir.file("mb") + "/checkpoint.pt", dir.file("fused.pt"), o);
  EXPECT_GT(res.fused.images, 0);
  EXPECT_EQ(res.steps, 15);
  EXPECT_EQ(res.images_seen, 150);  // no image left out of an epoch
  EXPECT_EQ(res.train_images, 50);
  const auto before = train::load_checkpoint(dir.file("mb") + "/checkpoint.pt").model;
  const auto after = train::load_checkpoint(dir.file("fused.pt")).model;
  ASSERT_EQ(before.size(), after.size());
  int changed = 0;
  for (const auto& [name, t] : before) {
    if (name.rfind("fusion", 0) == 0) {
      changed += !torch::equal(t, after.at(name));
      continue;
    }
    EXPECT_TRUE(torch::equal(t, after.at(name))) << name << " changed";
  }
  EXPECT_EQ(changed, 3);  // fusion.weight, fusion.bias, fusion_on
  EXPECT_EQ(after.at("fusion_on").item<int64_t>(), 1);
  const auto fused_state = nlohmann::json::parse(train::load_checkpoint(dir.file("fused.pt")).state_json);
  EXPECT_EQ(fused_state.at("fusion").at("images_seen"), 150);
  EXPECT_EQ(fused_state.at("fusion").at("train_images"), 150 / o.epochs);
  // A single-branch model has nothing to fuse.
  train::train_model(toy(dir.file("one"), 1), {});
  test::expect_error([&] { train::train_fusion(dir.file("one") + "/checkpoint.pt", dir.file("f1.pt"), o); },
                     {"multi-branch model", "1 branch"});
}

TEST(MultiBranch, KilledRunWithTeacherMixingAndDropPathResumesExactly) {
  test::TempDir dir;
  train::train_model(toy(dir.file("teacher"), 2), {});
  auto s = toy(dir.file("full"), 2);
  s.model.drop_path = 0.3;  // stochastic depth draws from the global generator every step
  s.train.teacher = {dir.file("teacher") + "/checkpoint.pt"};
  s.train.mixup_alpha = 0.8;
  s.train.cutmix_alpha = 1.0;
  s.train.epochs = 3;
  s.train.cooldown_epochs = 1;
  const auto runs = expect_killed_run_resumes_exactly(s, 13, dir);  // inside epoch 2
  // The resumed run is taught from the cache the checkpoint holds: it runs the teacher on no key cached before
  // the cut. Refilled, the cache's probabilities came from other batches, and the kernels' blocking by a row's
  // position in a batch moved them by ~1e-7: a resumed 300-step run then ended with other weights.
  EXPECT_GT(runs.part.teacher_images, 0);
  EXPECT_EQ(runs.part.teacher_images + runs.rest.teacher_images, runs.whole.teacher_images);
  const auto ckpt = train::load_checkpoint(dir.file("cut") + "/checkpoint.pt");
  ASSERT_EQ(ckpt.optimizer.count("teacher_cache.keys"), 1u);
  EXPECT_EQ(ckpt.optimizer.at("teacher_cache.probs").size(1), 10);
  // A teacher file replaced between the stop and the resume is refused: the rest of the run would learn other
  // targets.
  auto cut = s;
  cut.train.out_dir = dir.file("cut2");
  cut.train.max_steps = 5;
  train::train_model(cut, {});
  train::train_model(test::toy_resnest_run(dir.file("other_teacher"), 2, /*seed=*/1), {});
  std::filesystem::copy_file(dir.file("other_teacher") + "/checkpoint.pt", dir.file("teacher") + "/checkpoint.pt",
                             std::filesystem::copy_options::overwrite_existing);
  cut.train.max_steps = 0;
  train::TrainRunOptions resume;
  resume.resume = true;
  test::expect_error([&] { train::train_model(cut, resume); }, {"was taught by other teacher weights"});
}

// train.branch_views: branch b trains on the batch of its own loader (seed
// branch_view_seed(seed, b)), the trunk on all of them at once. The first
// step's logged loss is recomputed here from those batches: the sum over the
// branches of each one's cross-entropy on its own images.
TEST(MultiBranch, BranchViewsTrainEachBranchOnItsOwnBatch) {
  test::TempDir dir;
  auto c = toy(dir.file("views"), 2);
  c.model.drop_path = 0;  // no draws from the generator between init and the first step
  c.model.dropout = 0;
  c.train.branch_views = true;
  c.train.diversity_weight = 0;
  const auto [logged, m] = first_step(c, "loss");
  auto ds = train::open_datasets(c.data, c.model, /*load_train=*/true);
  std::vector<at::Tensor> x, y;
  for (int64_t v = 0; v < 2; ++v) {
    data::Batch b;
    data::BatchLoader loader(
        ds.train, train::training_loader_options(c.data, ds, c.train.batch_size, train::branch_view_seed(0, v)), 0);
    ASSERT_TRUE(loader.next(b));
    x.push_back(b.x);
    y.push_back(b.y);
  }
  EXPECT_FALSE(torch::equal(y[0], y[1]) && torch::equal(x[0], x[1]));  // other images
  torch::NoGradGuard ng;
  const auto outs = m->forward_views(x);
  auto ce = torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(c.train.label_smoothing);
  const double expected = (torch::nn::functional::cross_entropy(outs.logits[0], y[0], ce) +
                           torch::nn::functional::cross_entropy(outs.logits[1], y[1], ce))
                              .item<double>();
  EXPECT_NEAR(logged, expected, 1e-5);
  // Both branches on view 0 (what the run without views trains on) is another loss.
  const auto same = m->forward_branches(x[0]);
  const double plain = (torch::nn::functional::cross_entropy(same.logits[0], y[0], ce) +
                        torch::nn::functional::cross_entropy(same.logits[1], y[0], ce))
                           .item<double>();
  EXPECT_GT(std::abs(plain - expected), 1e-3);

  // The diversity loss compares branches on one image: refused with views,
  // before a run directory is made.
  c.train.out_dir = dir.file("views_diversity");
  c.train.diversity_weight = 0.2;
  test::expect_error([&] { train::train_model(c, {}); }, {"train.branch_views", "train.diversity_weight = 0"});
  EXPECT_FALSE(std::filesystem::exists(c.train.out_dir));
}

TEST(MultiBranch, OffTargetDiversityLeavesTheLabelOut) {
  test::TempDir dir;
  auto c = toy(dir.file("offt"), 2);
  c.model.drop_path = 0;  // the first step's forward is then a fixed function of the init
  c.model.dropout = 0;
  c.train.diversity_weight = 0.5;
  c.train.diversity_off_target = true;
  const auto [logged, m] = first_step(c, "aux_loss");
  const data::Batch b = first_batch(c);
  torch::NoGradGuard ng;
  const auto outs = m->forward_branches(b.x);
  const auto label = torch::one_hot(b.y, c.model.num_classes).to(torch::kBool);
  // At initialisation the branches nearly agree, and least on the label: the
  // two losses differ by ~1e-5, so the logged one must match to far better.
  const double off = 0.5 * train::diversity_loss(outs.logits, label).item<double>();
  const double all = 0.5 * train::diversity_loss(outs.logits).item<double>();
  ASSERT_LT(off, 0.0);
  ASSERT_GT(std::abs(all - off), 5e-6) << "all " << all << ", off target " << off;
  EXPECT_NEAR(logged, off, 5e-7) << "all classes: " << all;
}

// Online distillation is the first step's whole auxiliary loss with the
// diversity loss off; with views it is refused like the diversity loss.
TEST(MultiBranch, OnlineDistillationIsTheLoggedAuxLoss) {
  test::TempDir dir;
  auto c = toy(dir.file("od"), 3);
  c.model.drop_path = 0;
  c.model.dropout = 0;
  c.train.diversity_weight = 0;
  c.train.online_distill = 2.0;
  c.train.online_distill_temperature = 4.0;
  const auto [logged, m] = first_step(c, "aux_loss");
  const data::Batch b = first_batch(c);
  torch::NoGradGuard ng;
  const double expected = 2.0 * train::online_distill_loss(m->forward_branches(b.x).logits, 4.0).item<double>();
  ASSERT_GT(expected, 1e-2);  // three freshly initialised branches are far from agreeing
  EXPECT_NEAR(logged, expected, 1e-5);

  c.train.out_dir = dir.file("od_views");
  c.train.branch_views = true;
  test::expect_error([&] { train::train_model(c, {}); }, {"train.branch_views", "train.online_distill = 0"});
  c.train.branch_views = false;
  c.train.online_distill_temperature = 0;
  test::expect_error([&] { train::train_model(c, {}); }, {"train.online_distill_temperature = 0", "expected > 0"});
  EXPECT_FALSE(std::filesystem::exists(c.train.out_dir));
}

// A killed run with branch views resumes exactly: every view's loader picks up
// at the batch it stopped at, and so do the views' mix draws.
TEST(MultiBranch, KilledRunWithBranchViewsResumesExactly) {
  test::TempDir dir;
  auto s = toy(dir.file("full"), 3);
  s.train.branch_views = true;
  s.train.diversity_weight = 0;
  s.train.mixup_alpha = 0.8;
  s.train.cutmix_alpha = 1.0;
  // Two replicas, each slice holding its rows' three views, each drawing its
  // stochastic depth and dropout from its own generator (nn/random.h): from
  // the shared one, the threads would take the numbers in a racing order.
  s.model.drop_path = 0.3;
  s.model.dropout = 0.2;
  s.train.replicas = 2;
  s.train.threads = 2;
  expect_killed_run_resumes_exactly(s, 7, dir);  // inside epoch 1
}
