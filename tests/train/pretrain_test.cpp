// Self-supervised pre-training (MoCo v2): the random views stay inside the image
// and flip as asked, InfoNCE and the kNN probe give known answers, and a toy
// run on real Fashion-MNIST images resumes bit for bit, never touches the
// heads (no label reaches the model) and starts a supervised run.
#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "support/expect_error.h"
#include "support/temp_dir.h"
#include "support/toy_resnest.h"
#include "moev/io/file_lock.h"
#include "moev/train/checkpoint.h"
#include "moev/train/fusion.h"
#include "moev/train/pretrain.h"
#include "moev/train/trained_model.h"
#include "moev/train/trainer.h"

using namespace moev;

TEST(Pretrain, RandomViewJitterShiftsAConstantImageWithinBounds) {
  // A constant image stays constant under any crop and flip; with jitter it
  // only shifts, by at most the jitter (contrast acts about its own mean).
  const auto x = torch::full({32, 1, 28, 28}, 3.0f);
  EXPECT_TRUE(torch::allclose(train::random_view(x, 7, 0.2, true, 0.0), x, 0, 1e-5));
  const auto v = train::random_view(x, 7, 0.2, true, 0.4);
  const auto per_image = v.flatten(1);
  EXPECT_LT((per_image - per_image.mean(1, true)).abs().max().item<double>(), 1e-5);
  EXPECT_LE((per_image.mean(1) - 3.0).abs().max().item<double>(), 0.4 + 1e-5);
  EXPECT_GT((per_image.mean(1) - 3.0).abs().max().item<double>(), 0.05);
}

TEST(Pretrain, RandomViewCropsScalesAndFlipsAsAsked) {
  // Left-to-right ramps: a view keeps the ramp rising unless it is mirrored, and
  // its span is the crop's width, between sqrt(min_scale * 3/4) and 1 of the image.
  const int64_t B = 64, W = 28;
  const auto ramp = torch::arange(W, torch::kFloat).view({1, 1, 1, W}).expand({B, 1, W, W}).contiguous();
  auto rising = [&](const at::Tensor& v) {
    const auto d = v.select(1, 0).select(1, W / 2).diff(1, 1);  // [B, W - 1]
    return d.ge(-1e-4).all(1);
  };
  const double min_scale = 0.25;
  const auto plain = train::random_view(ramp, 1, min_scale, /*flip=*/false, 0.0);
  EXPECT_TRUE(rising(plain).all().item<bool>());
  // Inside the image: every sample lies within [0, W - 1], and the border is
  // repeated for at most the half pixel beyond the outermost pixel centres.
  EXPECT_GE(plain.min().item<double>(), 0.0);
  EXPECT_LE(plain.max().item<double>(), W - 1.0);
  const auto steps = plain.select(1, 0).select(1, W / 2).diff(1, 1);
  EXPECT_LE(steps.le(1e-4).sum(1).max().item<int64_t>(), 2);
  const auto row = plain.select(1, 0).select(1, W / 2);
  const auto span = (row.amax(1) - row.amin(1)) / static_cast<double>(W);
  EXPECT_GE(span.min().item<double>(), std::sqrt(min_scale * 0.75) - 0.08);
  EXPECT_LE(span.max().item<double>(), 1.0);
  EXPECT_GT(span.max().item<double>() - span.min().item<double>(), 0.2);  // the scale varies
  const auto flipped = train::random_view(ramp, 1, min_scale, /*flip=*/true, 0.0);
  const int64_t mirrored = B - rising(flipped).sum().item<int64_t>();
  EXPECT_GT(mirrored, B / 4);
  EXPECT_LT(mirrored, 3 * B / 4);
  // The same seed draws the same views; another seed others.
  EXPECT_TRUE(torch::equal(flipped, train::random_view(ramp, 1, min_scale, true, 0.0)));
  EXPECT_FALSE(torch::equal(flipped, train::random_view(ramp, 2, min_scale, true, 0.0)));
}

TEST(Pretrain, InfoNceKnownAnswerAndGradient) {
  auto q = torch::tensor({{1.0f, 0.0f}}).requires_grad_(true);
  const auto k = torch::tensor({{1.0f, 0.0f}});
  const auto queue = torch::tensor({{0.0f, 1.0f}, {-1.0f, 0.0f}});
  // logits [1, 0, -1] / 0.5 = [2, 0, -2]
  const auto loss = train::info_nce(q, k, queue, 0.5);
  EXPECT_NEAR(loss.item<double>(), -std::log(std::exp(2.0) / (std::exp(2.0) + 1 + std::exp(-2.0))), 1e-6);
  loss.backward();
  // Descending the gradient moves q towards its key and away from the negatives.
  const auto g = q.grad();
  EXPECT_LT((g * k).sum().item<double>(), 0);
  EXPECT_GT((g * queue.select(0, 0)).sum().item<double>(), 0);
}

TEST(Pretrain, KnnProbeKnownAnswer) {
  const auto train = torch::tensor({{1.0f, 0.0f}, {0.9f, 0.1f}, {0.0f, 1.0f}, {0.1f, 0.9f}});
  const auto train_labels = torch::tensor({0, 0, 1, 1}, torch::kInt64);
  const auto test = torch::tensor({{2.0f, 0.1f}, {0.1f, 3.0f}, {0.8f, 0.3f}});
  // The third is nearest to class 0, labelled 1: two of three right.
  EXPECT_NEAR(train::knn_top1(train, train_labels, test, torch::tensor({0, 1, 1}, torch::kInt64), 2, 2), 2.0 / 3.0,
              1e-9);
  // k = 4 lets all four vote, the nearer ones weighing more.
  EXPECT_NEAR(train::knn_top1(train, train_labels, test, torch::tensor({0, 1, 0}, torch::kInt64), 4, 2), 1.0, 1e-9);
}

// Blocks of test rows (here of 7, 128 floats over 17 training rows) give the
// answer the whole set in one block gives.
TEST(Pretrain, KnnProbeInBlocksEqualsOneBlock) {
  torch::manual_seed(5);
  const auto train = torch::randn({17, 4});
  const auto train_labels = torch::randint(0, 3, {17}, torch::kInt64);
  const auto test = torch::randn({50, 4});
  const auto test_labels = torch::randint(0, 3, {50}, torch::kInt64);
  const double whole = train::knn_top1(train, train_labels, test, test_labels, 5, 3);
  EXPECT_GT(whole, 0);
  EXPECT_LT(whole, 1);
  EXPECT_EQ(train::knn_top1(train, train_labels, test, test_labels, 5, 3, 128), whole);
  EXPECT_EQ(train::knn_top1(train, train_labels, test, test_labels, 5, 3, 1), whole);  // a row at a time
}

TEST(Pretrain, ToyRunResumesExactlyLeavesHeadsAndStartsTraining) {
  test::TempDir dir;
  auto cfg = test::toy_resnest_run(dir.file("ssl"), 2);
  cfg.train.checkpoint_every = 4;
  cfg.train.log_every = 4;  // lines at 4, 8, 12 and the end: the cut at 7 falls inside a window
  train::PretrainOptions o;
  o.epochs = 3;  // 15 steps of 10 images
  o.queue = 20;
  o.proj_dim = 16;
  o.knn_k = 5;
  const auto full = train::pretrain(cfg, dir.file("full"), o);
  EXPECT_EQ(full.steps, 15);
  EXPECT_TRUE(std::isfinite(full.final_loss));
  EXPECT_GT(full.final_loss, 0);
  EXPECT_GE(full.knn_top1_init, 0);
  EXPECT_GE(full.knn_top1, 0);
  EXPECT_LE(full.knn_top1, 1);
  for (const char* f : {"pretrain.pt", "pretrain_log.jsonl", "pretrain.json", "pretrain.png"})
    EXPECT_TRUE(std::filesystem::exists(dir.file("full") + "/" + f)) << f;

  // Stopped after 7 steps (mid-epoch, between checkpoints) and resumed.
  auto cut = cfg;
  cut.train.max_steps = 7;
  EXPECT_EQ(train::pretrain(cut, dir.file("cut"), o).steps, 7);
  auto again = o;
  again.resume = true;
  const auto resumed = train::pretrain(cfg, dir.file("cut"), again);
  EXPECT_EQ(resumed.steps, 15);
  // The figures a resumed run reports are the uninterrupted run's.
  EXPECT_EQ(resumed.knn_top1_init, full.knn_top1_init);
  EXPECT_EQ(resumed.final_loss, full.final_loss);
  // Its log too: the pause wrote no line of its own, and the next averages the steps the uninterrupted run's does.
  EXPECT_EQ(test::bytes_of(dir.file("cut") + "/pretrain_log.jsonl"),
            test::bytes_of(dir.file("full") + "/pretrain_log.jsonl"));
  const auto a = train::load_checkpoint(dir.file("full") + "/pretrain.pt");
  const auto b = train::load_checkpoint(dir.file("cut") + "/pretrain.pt");
  for (const auto& [name, t] : a.model) EXPECT_TRUE(torch::equal(t, b.model.at(name))) << name;
  for (const auto& [name, t] : a.optimizer) EXPECT_TRUE(torch::equal(t, b.optimizer.at(name))) << name;

  // A stop request (SIGTERM) saves after the step in progress; the probe and pretrain.json wait for the end.
  const std::atomic<bool> stop{true};
  auto asked = o;
  asked.stop = &stop;
  const auto stopped = train::pretrain(cfg, dir.file("stop"), asked);
  EXPECT_TRUE(stopped.stopped);
  EXPECT_EQ(stopped.steps, 1);
  EXPECT_FALSE(std::filesystem::exists(dir.file("stop") + "/pretrain.json"));
  const auto saved = train::load_checkpoint(dir.file("stop") + "/pretrain.pt", train::CheckpointLoad::kConfig);
  EXPECT_EQ(nlohmann::json::parse(saved.state_json).at("pretrain").at("step"), 1);
  const auto finished = train::pretrain(cfg, dir.file("stop"), again);
  EXPECT_FALSE(finished.stopped);
  EXPECT_EQ(finished.final_loss, full.final_loss);
  const auto c = train::load_checkpoint(dir.file("stop") + "/pretrain.pt");
  for (const auto& [name, t] : a.model) EXPECT_TRUE(torch::equal(t, c.model.at(name))) << name;

  // No label reaches the model: the heads are as initialised, the trunk is not.
  torch::manual_seed(cfg.train.seed);
  const auto init = train::module_tensors(*models::build_model(cfg.model));
  int64_t heads = 0, moved = 0;
  for (const auto& [name, t] : a.model) {
    if (name.rfind("heads.", 0) == 0) {
      ++heads;
      EXPECT_TRUE(torch::equal(t, init.at(name))) << name;
    } else if (name.find("weight") != std::string::npos && !torch::equal(t, init.at(name))) {
      ++moved;
    }
  }
  EXPECT_EQ(heads, 4);  // two branches' weight and bias
  EXPECT_GT(moved, 10);

  // Where a trained model is expected it is refused, pointing to train.init_from.
  test::expect_error([&] { train::load_trained(dir.file("full") + "/pretrain.pt", c10::Device(c10::kCPU)); },
                     {"pretrain.pt", "pre-training checkpoint", "train.init_from"});
  train::FusionOptions fo;
  fo.evaluate = false;
  test::expect_error([&] { train::train_fusion(dir.file("full") + "/pretrain.pt", dir.file("fused.pt"), fo); },
                     {"pre-training checkpoint"});

  // The checkpoint starts a supervised run.
  auto sup = cfg;
  sup.train.out_dir = dir.file("sup");
  sup.train.epochs = 1;
  sup.train.init_from = dir.file("full") + "/pretrain.pt";
  EXPECT_EQ(train::train_model(sup, {}).steps, 5);
}

// train.log_every = 0 (no step lines in train) logged every step here; it logs
// each epoch's end, which the loss curve needs. A line that cannot be written is
// said once and the run goes on, as in train.
TEST(Pretrain, LogEveryZeroLogsEpochEndsAndAFullDiskIsSaidOnce) {
  test::TempDir dir;
  auto cfg = test::toy_resnest_run(dir.file("ssl"), 2);
  cfg.train.log_every = 0;
  cfg.train.progress = true;
  train::PretrainOptions o;
  o.epochs = 2;  // 10 steps of 10 images
  o.queue = 20;
  o.proj_dim = 16;
  o.knn_k = 0;
  train::pretrain(cfg, dir.file("quiet"), o);
  std::vector<int64_t> steps;
  std::ifstream log(dir.file("quiet/pretrain_log.jsonl"));
  for (std::string line; std::getline(log, line);) steps.push_back(nlohmann::json::parse(line).at("step"));
  EXPECT_EQ(steps, (std::vector<int64_t>{5, 10}));

  std::filesystem::create_directories(dir.file("full_disk"));
  std::filesystem::create_symlink("/dev/full", dir.file("full_disk/pretrain_log.jsonl"));
  cfg.train.log_every = 2;
  std::ostringstream progress;
  o.progress = &progress;
  EXPECT_EQ(train::pretrain(cfg, dir.file("full_disk"), o).steps, 10);
  EXPECT_TRUE(std::filesystem::exists(dir.file("full_disk/pretrain.pt")));
  const std::string said = progress.str();
  const std::string warning = "warning: cannot write " + dir.file("full_disk/pretrain_log.jsonl") + " at step 2";
  EXPECT_NE(said.find(warning), std::string::npos) << said;
  EXPECT_EQ(said.find("warning: cannot write", said.find(warning) + 1), std::string::npos) << said;

  // A forgotten --resume started again from step 0: the log emptied at once, pretrain.pt replaced at the
  // first checkpoint. And the train keys it reads are checked as train checks them (-1 ran at exit 0).
  const std::string before = test::bytes_of(dir.file("quiet/pretrain.pt"));
  test::expect_error([&] { train::pretrain(cfg, dir.file("quiet"), o); },
                     {"quiet/pretrain.pt", "already holds a pre-training run", "--resume"});
  EXPECT_EQ(test::bytes_of(dir.file("quiet/pretrain.pt")), before);
  cfg.train.log_every = -1;
  test::expect_error([&] { train::pretrain(cfg, dir.file("negative"), o); }, {"train.log_every = -1", ">= 0"});
}

TEST(Pretrain, BadOptionsAndResumesAreErrors) {
  test::TempDir dir;
  auto cfg = test::toy_resnest_run(dir.file("ssl"), 1);
  train::PretrainOptions o;
  o.epochs = 1;
  o.queue = 45;  // 50 images minus a batch of 10 leaves 40
  test::expect_error([&] { train::pretrain(cfg, dir.file("a"), o); }, {"queue = 45", "at most 40"});
  o.queue = 5;  // shorter than a batch
  test::expect_error([&] { train::pretrain(cfg, dir.file("a"), o); }, {"queue = 5", "at least 10"});
  o.queue = 20;
  o.temperature = 0;
  test::expect_error([&] { train::pretrain(cfg, dir.file("a"), o); }, {"temperature = 0"});
  o.temperature = 0.2;
  o.resume = true;
  test::expect_error([&] { train::pretrain(cfg, dir.file("a"), o); }, {"no checkpoint", "pretrain.pt"});
  o.resume = false;
  o.knn_k = 0;
  cfg.train.max_steps = 2;
  train::pretrain(cfg, dir.file("a"), o);
  o.resume = true;
  o.temperature = 0.1;
  test::expect_error([&] { train::pretrain(cfg, dir.file("a"), o); }, {"temperature = 0.2", "not 0.1"});
  o.temperature = 0.2;
  const double saved_lr = cfg.train.lr;
  cfg.train.lr = 0.5;
  test::expect_error([&] { train::pretrain(cfg, dir.file("a"), o); }, {"another config", "train.lr = 0.5 (was: "});
  cfg.train.lr = saved_lr;
  // A second process in the directory (a run started twice) truncated the other's pretrain.pt.tmp.
  {
    io::FileLock held(dir.file("a") + "/.pretrain.lock", "the test");
    test::expect_error([&] { train::pretrain(cfg, dir.file("a"), o); },
                       {"pretrain --out " + dir.file("a"), "in use by another process", ".pretrain.lock"});
  }
  // A run refused before it wrote anything leaves no directory behind.
  o.resume = false;
  o.temperature = 0;
  test::expect_error([&] { train::pretrain(cfg, dir.file("b"), o); }, {"temperature = 0"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("b")));
}

// A pre-training resumed on a folder that changed since went on over other images without a word.
TEST(Pretrain, ResumeOnChangedDataIsRefused) {
  test::TempDir dir;
  for (int i = 0; i < 4; ++i) {
    test::write_pattern_pgm(dir.file("data/a/" + std::to_string(i) + ".pgm"), i);
    test::write_pattern_pgm(dir.file("data/b/" + std::to_string(i) + ".pgm"), i + 5);
  }
  auto cfg = test::toy_resnest_run(dir.file("ssl"), 1);
  cfg.data = {};
  cfg.data.format = "folder";
  cfg.data.path = dir.file("data");
  cfg.model.num_classes = 2;
  cfg.train.batch_size = 4;
  cfg.train.max_steps = 1;
  train::PretrainOptions o;
  o.epochs = 2;
  o.queue = 4;
  o.knn_k = 0;
  train::pretrain(cfg, cfg.train.out_dir, o);
  o.resume = true;
  cfg.train.max_steps = 2;
  train::pretrain(cfg, cfg.train.out_dir, o);  // the same images: resumed
  test::write_pattern_pgm(dir.file("data/b/9.pgm"), 99);
  cfg.train.max_steps = 3;
  test::expect_error([&] { train::pretrain(cfg, cfg.train.out_dir, o); },
                     {"pretrain --resume: the training set", dir.file("data"), "differs from the one", "pretrain.pt"});
  // A folder pre-training from before the fingerprint stands in the old order of the images: refused too.
  std::filesystem::remove(dir.file("data/b/9.pgm"));
  const std::string path = cfg.train.out_dir + "/pretrain.pt";
  auto old = train::load_checkpoint(path);
  auto state = nlohmann::json::parse(old.state_json);
  state["pretrain"].erase("train_data");
  old.state_json = state.dump();
  train::save_checkpoint(path, old);
  test::expect_error([&] { train::pretrain(cfg, cfg.train.out_dir, o); },
                     {"pretrain --resume", "predates the fingerprint"});
}
