// The hard mixture of experts end to end on real mosaics of Fashion-MNIST
// images: every training image in exactly one partition, the gater's choice
// at inference equal to a brute-force nearest centroid, the assembled model's
// rows equal to its experts' own outputs, the decoder shared and frozen, and
// bad expert indices or an empty partition rejected before anything is written.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <filesystem>
#include <functional>
#include <fstream>
#include <sstream>

#include <torch/torch.h>

#include "moev/data/batch_loader.h"
#include "moev/data/idx_reader.h"
#include "moev/data/manifest.h"
#include "moev/hardmoe/expert_training.h"
#include "moev/hardmoe/hard_moe.h"
#include "moev/hardmoe/partition.h"
#include "moev/train/checkpoint.h"
#include "moev/train/datasets.h"
#include "moev/train/multilabel.h"
#include "moev/train/trained_model.h"
#include "moev/train/trainer.h"
#include "support/expect_error.h"
#include "support/temp_dir.h"

namespace moev {
namespace {

namespace fs = std::filesystem;
using test::bytes_of;

// A trunk of the smallest ConvNeXt on 120 training mosaics, clustered into 3
// experts; each test process builds it once (about two seconds on one thread).
struct Toy {
  test::TempDir dir;
  io::RunConfig run;
  hardmoe::HardMoEConfig hm;

  Toy() {
    auto fm_train = data::load_fashion_mnist("/usr/share/datasets/fashion-mnist", true);
    auto fm_test = data::load_fashion_mnist("/usr/share/datasets/fashion-mnist", false);
    run.model.family = "convnext";
    run.model.image_size = 56;
    run.model.channels = 1;
    run.model.num_classes = 10;
    run.model.patch = 4;
    run.model.dims = {8, 16, 16};
    run.model.depths = {1, 1, 1};
    run.data.format = "manifest";
    run.data.path = data::write_mosaics(fm_train, 120, 1, dir.file("mosaic"), "train");
    run.data.test_path = data::write_mosaics(fm_test, 40, 1, dir.file("mosaic"), "test");
    run.train.epochs = 2;
    run.train.batch_size = 20;
    run.train.warmup_steps = 2;
    run.train.threads = 1;
    run.train.replicas = 1;
    run.train.progress = false;
    run.train.eval_each_epoch = false;
    run.train.out_dir = dir.file("trunk");
    train::train_model(run, {});
    hm.trunk = train::checkpoint_path(run.train.out_dir);
    hm.dir = dir.file("hm3");
    hm.experts = 3;
    hm.expert_epochs = 1;
    hardmoe::cluster_trunk(hm, 32, nullptr, false);
  }
  // Expert runs: the file has no overrides beyond the trunk's own run.
  hardmoe::ExpertOutcome train(int64_t e, const std::string& dir = "") {
    auto c = hm;
    if (!dir.empty()) c.dir = dir;
    return hardmoe::train_expert(c, nlohmann::json::object(), e, "test", {});
  }
};

Toy& toy() {
  static Toy t;
  return t;
}

// The toy's clustering copied into `dir` but for partition.json, which a test writes edited.
void copy_clustering(const Toy& t, const std::string& dir) {
  fs::create_directories(dir);
  for (const char* f : {"centroids.pt", "partition.csv", "hardmoe.json"})
    fs::copy_file(fs::path(t.hm.dir) / f, fs::path(dir) / f);
}

// The toy clustering's partition.json, to write edited into a copy.
nlohmann::json summary_of(const Toy& t) {
  std::ifstream in(fs::path(t.hm.dir) / "partition.json");
  return nlohmann::json::parse(in);
}

// Writes `expert_of` as dir's partition.csv, and records it in dir's partition.json as cluster would (a
// partition.csv that partition.json does not record is refused as edited by hand).
void write_partition(const std::string& dir, const std::vector<int64_t>& expert_of, const std::string& eol = "\n") {
  std::ofstream csv(fs::path(dir) / "partition.csv", std::ios::binary);
  csv << "row,expert" << eol;
  for (size_t i = 0; i < expert_of.size(); ++i) csv << i << "," << expert_of[i] << eol;
  csv.close();
  std::ifstream in(fs::path(dir) / "partition.json");
  auto summary = nlohmann::json::parse(in);
  summary["assignment"] = train::index_fingerprint(expert_of);
  std::ofstream(fs::path(dir) / "partition.json") << summary.dump();
}

// Brute force: the index of the smallest squared distance, lower index on ties.
at::Tensor nearest_by_hand(const at::Tensor& x, const at::Tensor& c) {
  auto d = (x.unsqueeze(1) - c.unsqueeze(0)).pow(2).sum(2);
  return d.argmin(1);
}

TEST(HardMoE, EveryTrainingImageIsInExactlyOnePartitionItsNearestCentroids) {
  auto& t = toy();
  const auto p = hardmoe::read_partition(t.hm.dir);
  auto trunk = train::load_trained(t.hm.trunk, c10::Device(c10::kCPU));
  auto ds = train::open_datasets(trunk.cfg.data, trunk.cfg.model, true);
  ASSERT_EQ(static_cast<int64_t>(p.expert_of.size()), ds.train.size());
  int64_t sum = 0;
  for (auto c : p.counts) {
    EXPECT_GT(c, 0);
    sum += c;
  }
  EXPECT_EQ(sum, ds.train.size());
  // partition_rows over all experts: each row once.
  std::vector<int> seen(p.expert_of.size(), 0);
  for (int64_t e = 0; e < p.experts; ++e)
    for (auto r : hardmoe::partition_rows(p, e, t.hm.dir)) ++seen[static_cast<size_t>(r)];
  for (auto s : seen) EXPECT_EQ(s, 1);
  // The summary's tag shares: expert e's images with tag t over its image count.
  auto summary = summary_of(t);
  auto a = torch::tensor(p.expert_of, torch::kInt64);
  for (int64_t e = 0; e < p.experts; ++e) {
    auto mine = ds.train.targets.index_select(0, a.eq(e).nonzero().squeeze(1));
    for (int64_t tag = 0; tag < mine.size(1); ++tag)
      EXPECT_NEAR(summary["tag_share"][e][tag].get<double>(), mine.select(1, tag).mean().item<double>(), 1e-6);
  }
  EXPECT_TRUE(fs::exists(fs::path(t.hm.dir) / "partition.png"));
  auto f = hardmoe::extract_features(*trunk.model, ds.train, ds.mean, ds.std, 17, c10::Device(c10::kCPU));
  auto want = nearest_by_hand(f, p.centroids);
  EXPECT_TRUE(torch::equal(want, torch::tensor(p.expert_of, torch::kInt64)));
}

TEST(HardMoE, GaterPicksTheNearestCentroidAndOnlyThatExpertAnswers) {
  auto& t = toy();
  for (int64_t e = 0; e < 3; ++e) t.train(e);
  auto m = train::load_trained(hardmoe::model_file(t.hm.dir), c10::Device(c10::kCPU));
  EXPECT_FALSE(m.replicable);
  auto* moe = dynamic_cast<hardmoe::HardMoEImpl*>(m.model.get());
  ASSERT_NE(moe, nullptr);
  auto trunk = train::load_trained(t.hm.trunk, c10::Device(c10::kCPU));
  auto ds = train::open_datasets(trunk.cfg.data, trunk.cfg.model, false);
  auto x = data::normalize_images(ds.test.images, ds.mean, ds.std);
  torch::NoGradGuard ng;
  const auto p = hardmoe::read_partition(t.hm.dir);
  auto gate = moe->gate(x);
  EXPECT_TRUE(torch::equal(gate, nearest_by_hand(trunk.model->embed(x), p.centroids)));
  moe->reset_served();
  auto logits = moe->forward(x);
  int64_t served = 0;
  for (auto s : moe->served()) served += s;
  EXPECT_EQ(served, x.size(0));  // one expert per image, no more
  for (int64_t e = 0; e < 3; ++e) {
    auto expert = train::load_trained(train::checkpoint_path(hardmoe::expert_dir(t.hm.dir, e)), c10::Device(c10::kCPU));
    auto rows = gate.eq(e).nonzero().squeeze(1);
    if (rows.numel() == 0) continue;
    auto want = expert.model->forward(x.index_select(0, rows));
    EXPECT_TRUE(torch::allclose(logits.index_select(0, rows), want, 1e-5, 1e-5)) << "expert " << e;
  }
  // Multi-label evaluation of the assembled model: the metrics of its own scores.
  auto r = train::evaluate(*m.model, ds.test, ds.mean, ds.std, 16, c10::Device(c10::kCPU));
  ASSERT_TRUE(r.multilabel);
  // Ranked by probabilities: a softmax model's logits differ by a per-image offset.
  auto mm = train::multilabel_metrics(torch::softmax(logits, 1), ds.test.targets, r.k);
  EXPECT_NEAR(r.top1, mm.precision_at_1, 1e-9);
  EXPECT_NEAR(r.mean_ap, mm.mean_ap, 1e-9);
  EXPECT_NEAR(r.recall_at_k, mm.recall_at_k, 1e-9);
  EXPECT_EQ(r.k, 3);  // 2x2 mosaics of 10 classes carry 3.4 distinct tags on average
}

TEST(HardMoE, ExpertsShareTheTrunksFrozenDecoderAndTrainTheRest) {
  auto& t = toy();
  t.train(1);
  const auto trunk = train::load_checkpoint(t.hm.trunk).model;
  const auto expert = train::load_checkpoint(train::checkpoint_path(hardmoe::expert_dir(t.hm.dir, 1))).model;
  for (const char* name : {"head.weight", "head.bias"})
    EXPECT_TRUE(torch::equal(trunk.at(name), expert.at(name))) << name;
  EXPECT_FALSE(torch::equal(trunk.at("stem.weight"), expert.at("stem.weight")));
  // A second run of a finished expert does nothing.
  EXPECT_TRUE(t.train(1).already_done);
}

TEST(HardMoE, BadExpertIndexOrEmptyPartitionFailsAndLeavesOtherExpertsAlone) {
  auto& t = toy();
  t.train(0);
  const std::string ckpt0 = train::checkpoint_path(hardmoe::expert_dir(t.hm.dir, 0));
  const std::string before = bytes_of(ckpt0), result_before = bytes_of(hardmoe::expert_result_file(t.hm.dir, 0));
  test::expect_error([&] { t.train(3); }, {"--expert 3", "3 experts", "0..2"});
  test::expect_error([&] { t.train(-1); }, {"--expert -1"});
  EXPECT_FALSE(fs::exists(hardmoe::expert_dir(t.hm.dir, 3)));
  // A partition in which expert 2 got nothing.
  const std::string dir2 = t.dir.file("empty");
  fs::create_directories(dir2);
  for (const char* f : {"centroids.pt", "partition.json", "hardmoe.json"})
    fs::copy_file(fs::path(t.hm.dir) / f, fs::path(dir2) / f);
  const auto p = hardmoe::read_partition(t.hm.dir);
  std::vector<int64_t> halves;
  for (size_t i = 0; i < p.expert_of.size(); ++i) halves.push_back(static_cast<int64_t>(i % 2));
  write_partition(dir2, halves);
  test::expect_error([&] { t.train(2, dir2); }, {"expert 2", "is empty", dir2});
  EXPECT_FALSE(fs::exists(hardmoe::expert_dir(dir2, 2)));
  // One process per expert: while another holds its lock, a second one stops before writing.
  fs::create_directories(hardmoe::expert_dir(dir2, 0));
  const std::string lock = (fs::path(hardmoe::expert_dir(dir2, 0)) / ".lock").string();
  const int fd = ::open(lock.c_str(), O_RDWR | O_CREAT, 0644);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::flock(fd, LOCK_EX | LOCK_NB), 0);
  test::expect_error([&] { t.train(0, dir2); }, {"expert 0", "in use by another process", ".lock"});
  ::close(fd);
  EXPECT_FALSE(fs::exists(train::checkpoint_path(hardmoe::expert_dir(dir2, 0))));
  // The assembled model refuses to load while an expert is missing.
  test::expect_error([&] { hardmoe::load_hard_moe((fs::path(dir2) / "hardmoe.json").string(), c10::Device(c10::kCPU)); },
                     {"expert 0 has not finished", "train-expert --expert 0"});
  // Experts must come from the trunk the partition was made from.
  auto other = t.hm;
  other.dir = dir2;
  other.trunk = t.dir.file("other.pt");
  fs::copy_file(t.hm.trunk, other.trunk);
  test::expect_error([&] { hardmoe::train_expert(other, nlohmann::json::object(), 0, "test", {}); },
                     {"other.pt", "is not the one", "clustered from"});
  // A partition file that lost a row, or names an expert that does not exist.
  std::ofstream bad(fs::path(dir2) / "partition.csv");
  bad << "row,expert\n0,0\n1,5\n";
  bad.close();
  test::expect_error([&] { t.train(0, dir2); }, {"partition.csv:3", "expert 5 outside 0..2"});
  EXPECT_EQ(bytes_of(ckpt0), before);
  EXPECT_EQ(bytes_of(hardmoe::expert_result_file(t.hm.dir, 0)), result_before);
}

// A trunk retrained to the same step (another seed, other data) passed the
// step check, and its images went to clusters of the old feature space.
TEST(HardMoE, ATrunkWithOtherWeightsAtTheSameStepIsRefused) {
  auto& t = toy();
  const std::string dir3 = t.dir.file("retrained");
  copy_clustering(t, dir3);
  const std::string copy = t.dir.file("retrained_trunk.pt");
  auto ckpt = train::load_checkpoint(t.hm.trunk);
  train::save_checkpoint(copy, ckpt);
  auto summary = summary_of(t);
  ASSERT_EQ(summary.at("trunk_weights").get<std::string>().size(), 8u);
  summary["trunk"] = copy;
  std::ofstream(fs::path(dir3) / "partition.json") << summary.dump();
  std::ifstream model_in(fs::path(dir3) / "hardmoe.json");
  auto model = nlohmann::json::parse(model_in);
  model["trunk"] = copy;
  std::ofstream(fs::path(dir3) / "hardmoe.json") << model.dump();
  EXPECT_EQ(hardmoe::checked_trunk(hardmoe::read_partition(dir3), dir3), copy);  // the same weights
  ASSERT_TRUE(ckpt.ema.empty());  // inference_weights are ckpt.model
  for (auto& [name, w] : ckpt.model)
    if (w.is_floating_point()) {
      w.view(-1)[0] += 1e-3;
      break;
    }
  train::save_checkpoint(copy, ckpt);
  test::expect_error([&] { hardmoe::checked_trunk(hardmoe::read_partition(dir3), dir3); },
                     {copy, "holds other weights", "retrained since"});
  test::expect_error([&] { hardmoe::load_hard_moe((fs::path(dir3) / "hardmoe.json").string(), c10::Device(c10::kCPU)); },
                     {"holds other weights"});
  EXPECT_NE(train::weights_fingerprint(ckpt.model), summary.at("trunk_weights").get<std::string>());
}

// partition.csv's rows index the training set as it was clustered: a set that changed since, in its images or
// only in their order (a folder is read in a fixed mixed order since session 42), would train each expert on
// other images than the gater sends it, without a word.
TEST(HardMoE, AnExpertOnDataThatChangedSinceClusteringIsRefused) {
  auto& t = toy();
  const std::string dir = t.dir.file("changed");
  copy_clustering(t, dir);
  auto summary = summary_of(t);
  ASSERT_EQ(summary.at("training_data").get<std::string>().size(), 8u);
  summary["training_data"] = "00000000";  // what another image, or another order, gives
  std::ofstream(fs::path(dir) / "partition.json") << summary.dump();
  test::expect_error([&] { t.train(0, dir); }, {"differs from the one the rows to train on were chosen from",
                                                "cluster again"});
  EXPECT_FALSE(fs::exists(fs::path(dir) / "expert_0" / "checkpoint.pt"));
}

// hardmoe.json repeats partition.json's trunk and expert count; an edited copy
// used to be ignored, the model assembled from partition.json's instead.
TEST(HardMoE, AHardMoEFileDisagreeingWithItsPartitionIsRefused) {
  auto& t = toy();
  const std::string dir4 = t.dir.file("edited");
  fs::create_directories(dir4);
  for (const char* f : {"centroids.pt", "partition.csv", "partition.json", "hardmoe.json"})
    fs::copy_file(fs::path(t.hm.dir) / f, fs::path(dir4) / f);
  std::ifstream in(fs::path(dir4) / "hardmoe.json");
  const auto model = nlohmann::json::parse(in);
  const std::string file = (fs::path(dir4) / "hardmoe.json").string();
  auto write = [&](const char* key, const nlohmann::json& value) {
    auto m = model;
    m[key] = value;
    std::ofstream(file) << m.dump();
  };
  const std::string other = t.dir.file("another_trunk.pt");
  fs::copy_file(t.hm.trunk, other, fs::copy_options::overwrite_existing);
  write("trunk", other);
  test::expect_error([&] { hardmoe::load_hard_moe(file, c10::Device(c10::kCPU)); },
                     {file, "another_trunk.pt", "is not", "partition.json"});
  write("experts", 2);
  test::expect_error([&] { hardmoe::load_hard_moe(file, c10::Device(c10::kCPU)); },
                     {file, "experts = 2", "clustered into 3"});
  write("experts", "3");
  test::expect_error([&] { hardmoe::load_hard_moe(file, c10::Device(c10::kCPU)); }, {file, "experts as an integer"});
  // Damaged, it is named as a hard MoE file, not as an unreadable checkpoint.
  for (const auto& [text, needle] : std::vector<std::pair<std::string, std::string>>{
           {"", "an empty file"}, {model.dump().substr(0, 20), "not valid JSON"}, {"[]", "nor a hard MoE's hardmoe.json"},
           {R"({"format": "other"})", "JSON text, not a checkpoint"}}) {
    std::ofstream(file) << text;
    test::expect_error([&] { train::load_trained(file, c10::Device(c10::kCPU)); }, {file, needle});
  }
  // A checkpoint is told by its bytes, not its name (moev fuse --out fused.json writes a zip).
  const std::string named_json = t.dir.file("trunk_copy.json");
  fs::copy_file(t.hm.trunk, named_json, fs::copy_options::overwrite_existing);
  EXPECT_NO_THROW(train::load_trained(named_json, c10::Device(c10::kCPU)));
  // A trunk moved away since: named as missing, not as another trunk.
  std::ifstream pin(fs::path(dir4) / "partition.json");
  auto partition = nlohmann::json::parse(pin);
  const auto kept = partition;
  partition["trunk"] = t.dir.file("moved_away.pt");
  std::ofstream(fs::path(dir4) / "partition.json") << partition.dump();
  write("trunk", t.dir.file("moved_away.pt"));
  test::expect_error([&] { hardmoe::load_hard_moe(file, c10::Device(c10::kCPU)); }, {"moved_away.pt", "does not exist"});
  std::ofstream(fs::path(dir4) / "partition.json") << kept.dump();
  write("trunk", t.hm.trunk);  // the same trunk, named absolutely: accepted up to the missing experts
  test::expect_error([&] { hardmoe::load_hard_moe(file, c10::Device(c10::kCPU)); }, {"expert 0 has not finished"});
}

// A finished or half-trained expert kept the settings it was started with
// when run again with others (reported done, or resumed as it was); an expert
// checkpoint swapped with another's, or the trunk copied in, was scored as that
// expert; a link to hardmoe.json looked for its files beside the link.
TEST(HardMoE, ChangedSettingsSwappedExpertsAndLinksAreCaught) {
  auto& t = toy();
  for (int64_t e = 0; e < 3; ++e) t.train(e);
  const nlohmann::json other = {{"train", {{"batch_size", 10}}}};
  test::expect_error([&] { hardmoe::train_expert(t.hm, other, 0, "test", {}); },
                     {"expert 0", "was trained with other settings", "train.batch_size = 10 (was: 20)",
                      "delete"});
  // Half-way: a checkpoint and no result yet.
  const std::string half = t.dir.file("half");
  fs::create_directories(hardmoe::expert_dir(half, 0));
  for (const char* f : {"centroids.pt", "partition.csv", "partition.json", "hardmoe.json"})
    fs::copy_file(fs::path(t.hm.dir) / f, fs::path(half) / f);
  fs::copy_file(train::checkpoint_path(hardmoe::expert_dir(t.hm.dir, 0)),
                train::checkpoint_path(hardmoe::expert_dir(half, 0)));
  auto c = t.hm;
  c.dir = half;
  test::expect_error([&] { hardmoe::train_expert(c, other, 0, "test", {}); },
                     {"expert 0", "was started with other settings", "train.batch_size = 10", "to resume it"});
  // Swapped checkpoints, the trunk copied in, another expert's result.
  const std::string swapped = t.dir.file("swapped");
  fs::copy(t.hm.dir, swapped, fs::copy_options::recursive);
  const std::string model = (fs::path(swapped) / "hardmoe.json").string();
  auto ckpt = [&](int64_t e) { return train::checkpoint_path(hardmoe::expert_dir(swapped, e)); };
  EXPECT_NO_THROW(hardmoe::load_hard_moe(model, c10::Device(c10::kCPU)));
  fs::rename(ckpt(0), swapped + "/tmp.pt");
  fs::rename(ckpt(1), ckpt(0));
  fs::rename(swapped + "/tmp.pt", ckpt(1));
  test::expect_error([&] { hardmoe::load_hard_moe(model, c10::Device(c10::kCPU)); },
                     {ckpt(0), "not as expert 0", "expert_1"});
  fs::copy_file(t.hm.trunk, ckpt(0), fs::copy_options::overwrite_existing);
  test::expect_error([&] { hardmoe::load_hard_moe(model, c10::Device(c10::kCPU)); }, {ckpt(0), "not as expert 0"});
  fs::copy_file(train::checkpoint_path(hardmoe::expert_dir(t.hm.dir, 0)), ckpt(0),
                fs::copy_options::overwrite_existing);
  fs::copy_file(train::checkpoint_path(hardmoe::expert_dir(t.hm.dir, 1)), ckpt(1),
                fs::copy_options::overwrite_existing);
  const std::string result0 = hardmoe::expert_result_file(swapped, 0);
  fs::copy_file(hardmoe::expert_result_file(swapped, 1), result0, fs::copy_options::overwrite_existing);
  test::expect_error([&] { hardmoe::load_hard_moe(model, c10::Device(c10::kCPU)); }, {result0, "not expert 0's"});
  std::ofstream(result0) << "{}";
  test::expect_error([&] { hardmoe::load_hard_moe(model, c10::Device(c10::kCPU)); }, {result0, "not expert 0's"});
  fs::copy_file(hardmoe::expert_result_file(t.hm.dir, 0), result0, fs::copy_options::overwrite_existing);
  // Through a link in another directory, the files beside the link's target.
  const std::string link = t.dir.file("elsewhere/link.json");
  fs::create_directories(fs::path(link).parent_path());
  fs::create_symlink(model, link);
  EXPECT_NO_THROW(hardmoe::load_hard_moe(link, c10::Device(c10::kCPU)));
}

// An expert is a model of the images its partition gives it. A partition.csv edited by hand (even between a kill
// and the rerun), or experts copied in from another clustering, trained or reported done on other images than the
// centroids send them, at exit 0.
TEST(HardMoE, AnEditedPartitionOrExpertsOfAnotherClusteringAreRefused) {
  auto& t = toy();
  for (int64_t e = 0; e < 3; ++e) t.train(e);
  const auto p = hardmoe::read_partition(t.hm.dir);
  ASSERT_EQ(p.assignment, train::index_fingerprint(p.expert_of));
  // One row moved to another expert, partition.json left as cluster wrote it.
  const std::string edited = t.dir.file("hand_edited");
  fs::copy(t.hm.dir, edited, fs::copy_options::recursive);
  {
    std::ofstream csv(fs::path(edited) / "partition.csv");
    csv << "row,expert\n";
    for (size_t i = 0; i < p.expert_of.size(); ++i) csv << i << "," << (i == 0 ? (p.expert_of[0] + 1) % 3 : p.expert_of[i]) << "\n";
  }
  for (auto call : std::vector<std::function<void()>>{
           [&] { t.train(1, edited); },
           [&] { hardmoe::load_hard_moe((fs::path(edited) / "hardmoe.json").string(), c10::Device(c10::kCPU)); }})
    test::expect_error(call, {"partition.csv is not the partition", "partition.json records", "edited or replaced"});
  // Saved from a spreadsheet (CRLF lines), the same partition is read as it is.
  write_partition(edited, p.expert_of, "\r\n");
  EXPECT_EQ(hardmoe::read_partition(edited).expert_of, p.expert_of);
  // A consistent partition that is another one (experts renumbered), with the experts of the first copied in:
  // done, half-trained or loaded, each is refused.
  std::vector<int64_t> renumbered;
  for (auto e : p.expert_of) renumbered.push_back((e + 1) % 3);
  write_partition(edited, renumbered);
  const std::string model = (fs::path(edited) / "hardmoe.json").string();
  test::expect_error([&] { hardmoe::load_hard_moe(model, c10::Device(c10::kCPU)); },
                     {"expert_0", "trained on other images", "copied in from another clustering"});
  test::expect_error([&] { t.train(2, edited); }, {"expert 2 trained on other images"});
  fs::remove(hardmoe::expert_result_file(edited, 1));  // half-way: the resume is refused too
  const std::string ckpt1 = train::checkpoint_path(hardmoe::expert_dir(edited, 1));
  const std::string before = bytes_of(ckpt1);
  test::expect_error([&] { t.train(1, edited); }, {"expert 1 trained on other images"});
  EXPECT_EQ(bytes_of(ckpt1), before);
  // Below the hard MoE, the trainer refuses the resume on other rows as well.
  auto run = hardmoe::expert_run_config(t.hm, io::from_json_string(train::load_checkpoint(
                                                                      t.hm.trunk, train::CheckpointLoad::kConfig)
                                                                      .config_json,
                                                                  t.hm.trunk),
                                        nlohmann::json::object(), 1, "test");
  run.train.out_dir = hardmoe::expert_dir(edited, 1);
  train::TrainRunOptions opts;
  opts.resume = true;
  opts.train_rows = hardmoe::partition_rows(hardmoe::read_partition(edited), 1, edited);
  test::expect_error([&] { train::train_model(run, opts); }, {"--resume", "trained on other rows", "partition"});
  EXPECT_EQ(bytes_of(ckpt1), before);
  // Clustering again gives the experts' own partition back; into 2 clusters, it is refused over them.
  auto two = t.hm;
  two.dir = edited;
  two.experts = 2;
  test::expect_error([&] { hardmoe::cluster_trunk(two, 32, nullptr, false); },
                     {"holds expert 0", "another partition than this clustering gives"});
  two.experts = 3;
  EXPECT_NO_THROW(hardmoe::cluster_trunk(two, 32, nullptr, false));
  EXPECT_EQ(hardmoe::read_partition(edited).expert_of, p.expert_of);
  // A directory that lost its centroids and summary is mended by clustering again, its experts kept.
  const std::string lost = t.dir.file("lost_centroids");
  fs::copy(t.hm.dir, lost, fs::copy_options::recursive);
  fs::remove(fs::path(lost) / "centroids.pt");
  fs::remove(fs::path(lost) / "partition.json");
  auto c = t.hm;
  c.dir = lost;
  test::expect_error([&] { hardmoe::read_partition(lost); }, {"partition.json", "cannot open"});
  EXPECT_NO_THROW(hardmoe::cluster_trunk(c, 32, nullptr, false));
  EXPECT_TRUE(bytes_of((fs::path(lost) / "centroids.pt").string()) ==
              bytes_of((fs::path(t.hm.dir) / "centroids.pt").string()));
  EXPECT_NO_THROW(hardmoe::load_hard_moe((fs::path(lost) / "hardmoe.json").string(), c10::Device(c10::kCPU)));
}

// centroids.pt carries no checksum: centroids of another clustering copied in, or a damaged value, sent test
// images to experts that never trained on their kind, at exit 0. partition.json records their fingerprint.
TEST(HardMoE, CentroidsOfAnotherClusteringOrDamagedOnesAreRefused) {
  auto& t = toy();
  for (int64_t e = 0; e < 3; ++e) t.train(e);
  const auto p = hardmoe::read_partition(t.hm.dir);
  ASSERT_FALSE(p.centroids_weights.empty());
  const std::string copy = t.dir.file("other_centroids");
  fs::copy(t.hm.dir, copy, fs::copy_options::recursive);
  auto changed = p.centroids.clone();
  changed[1][0] += 1e-3;  // one value, as a flipped bit would
  {
    const std::vector<char> bytes = torch::pickle_save(c10::IValue(changed));
    std::ofstream out(fs::path(copy) / "centroids.pt", std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  }
  const std::string model = (fs::path(copy) / "hardmoe.json").string();
  for (auto call : std::vector<std::function<void()>>{
           [&] { hardmoe::read_partition(copy); },
           [&] { hardmoe::load_hard_moe(model, c10::Device(c10::kCPU)); }})
    test::expect_error(call, {"centroids.pt", "not the centroids partition.json records", "another clustering"});
  // Put back, the model loads again.
  fs::copy_file(fs::path(t.hm.dir) / "centroids.pt", fs::path(copy) / "centroids.pt",
                fs::copy_options::overwrite_existing);
  EXPECT_NO_THROW(hardmoe::load_hard_moe(model, c10::Device(c10::kCPU)));
}

// An expert's run resumed as a plain run (`moev train --out expert_1 --resume`, which its unfinished note told)
// had no rows to train on and failed as if its partition had changed: it names the command that resumes it.
TEST(HardMoE, AnExpertsRunNamesTheCommandThatResumesIt) {
  auto& t = toy();
  t.train(1);
  const std::string dir = hardmoe::expert_dir(t.hm.dir, 1);
  const auto ckpt = train::load_checkpoint(train::checkpoint_path(dir), train::CheckpointLoad::kConfig);
  const std::string want = "moev hardmoe train-expert --config <the hard MoE's config> --dir " + t.hm.dir +
                           " --expert 1 (or the moev hardmoe train-all that started it)";
  EXPECT_EQ(train::resume_command(train::checkpoint_path(dir), ckpt.state_json), want);
  // Named with a trailing slash, the directory's name is still expert_1 (it was "", and train --resume was named).
  EXPECT_EQ(train::resume_command(dir + "//checkpoint.pt", ckpt.state_json), want);
  EXPECT_EQ(train::resume_command("runs/a/checkpoint.pt", "{\"step\": 3}"), "moev train --out runs/a --resume");
  EXPECT_EQ(train::resume_command("runs/p/pretrain.pt", "{\"pretrain\": {\"step\": 3}}"),
            "moev pretrain --out runs/p --resume");
  // A fused model's run is its source's, wherever the fused file lies.
  EXPECT_EQ(train::resume_command("elsewhere/x.pt", "{\"fusion\": {\"from\": \"runs/b/checkpoint.pt\"}}"),
            "moev train --out runs/b --resume");
  auto run = io::from_json_string(ckpt.config_json, dir);
  train::TrainRunOptions opts;
  opts.resume = true;
  const std::string before = bytes_of(train::checkpoint_path(dir));
  test::expect_error([&] { train::train_model(run, opts); },
                     {"--resume", "is a hard MoE expert's run", "moev hardmoe train-expert", "--expert 1"});
  EXPECT_EQ(bytes_of(train::checkpoint_path(dir)), before);
}

// A hard MoE directory moved away from its trunk: the trunk named now (--trunk) is taken if its step and weights
// are the recorded ones; and an expert half-trained under one name of the trunk resumes under another.
TEST(HardMoE, AMovedDirectoryTakesTheSameTrunkByAnotherName) {
  auto& t = toy();
  const std::string moved = t.dir.file("moved");
  copy_clustering(t, moved);
  auto summary = summary_of(t);
  summary["trunk"] = "../gone/checkpoint.pt";
  std::ofstream(fs::path(moved) / "partition.json") << summary.dump();
  const auto p = hardmoe::read_partition(moved);
  test::expect_error([&] { hardmoe::checked_trunk(p, moved); }, {"gone/checkpoint.pt", "does not exist"});
  EXPECT_EQ(hardmoe::checked_trunk(p, moved, t.hm.trunk), t.hm.trunk);
  // A trunk of other weights under the given name is not taken for it.
  auto ckpt = train::load_checkpoint(t.hm.trunk);
  for (auto& [name, w] : ckpt.model)
    if (w.is_floating_point()) {
      w.view(-1)[0] += 1e-3;
      break;
    }
  const std::string other = t.dir.file("moved_other_trunk.pt");
  train::save_checkpoint(other, ckpt);
  test::expect_error([&] { hardmoe::checked_trunk(p, moved, other); }, {other, "holds other weights",
                                                                        "not the same trunk"});
  // The expert's saved train.init_from names the trunk as it was found then; another path to it is no change.
  const std::string half = t.dir.file("renamed_trunk");
  copy_clustering(t, half);
  fs::copy_file(fs::path(t.hm.dir) / "partition.json", fs::path(half) / "partition.json");
  fs::create_directories(hardmoe::expert_dir(half, 0));
  auto trunk_cfg = io::from_json_string(train::load_checkpoint(t.hm.trunk, train::CheckpointLoad::kConfig).config_json,
                                        t.hm.trunk);
  auto hc = t.hm;
  hc.dir = half;
  auto cfg = hardmoe::expert_run_config(hc, trunk_cfg, nlohmann::json::object(), 0, "test");
  cfg.train.max_steps = 1;
  train::TrainRunOptions opts;
  opts.train_rows = hardmoe::partition_rows(hardmoe::read_partition(half), 0, half);
  train::train_model(cfg, opts);
  hc.trunk = (fs::path(t.hm.trunk).parent_path() / "." / "checkpoint.pt").string();  // the same file
  auto now = hardmoe::expert_run_config(hc, trunk_cfg, nlohmann::json::object(), 0, "test");
  EXPECT_NE(now.train.init_from, cfg.train.init_from);
  EXPECT_NO_THROW(hardmoe::check_expert_settings(now, hc, 0));
  now.train.batch_size = 10;
  test::expect_error([&] { hardmoe::check_expert_settings(now, hc, 0); }, {"train.batch_size = 10"});
}

// centroids.pt is a plain tensor to Python's torch.load, equal to what moev reads.
TEST(HardMoE, CentroidsOpenInPython) {
  if (std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3-torch not installed";
  auto& t = toy();
  const auto c = hardmoe::read_partition(t.hm.dir).centroids;
  const std::string script = t.dir.file("check.py"), out = t.dir.file("py.txt");
  std::ofstream(script) << "import sys, torch\n"
                           "c = torch.load(sys.argv[1])\n"
                           "assert isinstance(c, torch.Tensor), type(c)\n"
                           "print(c.shape[0], c.shape[1], repr(c.double().sum().item()))\n";
  const std::string cmd = "/usr/bin/python3 " + script + " " + (fs::path(t.hm.dir) / "centroids.pt").string() +
                          " > " + out;
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  std::ifstream in(out);
  int64_t k = 0, f = 0;
  double sum = 0;
  in >> k >> f >> sum;
  EXPECT_EQ(k, 3);
  EXPECT_EQ(f, c.size(1));
  EXPECT_NEAR(sum, c.to(torch::kDouble).sum().item<double>(), 1e-9);
}

TEST(HardMoE, ConfigSectionIsCheckedKeyByKey) {
  io::RunConfig run;
  run.train.out_dir = "runs/x";
  auto c = hardmoe::parse_hardmoe_config(nlohmann::json::object(), run, "f.toml");
  EXPECT_EQ(c.trunk, "runs/x/checkpoint.pt");
  EXPECT_EQ(c.dir, "runs/x/hardmoe4");
  test::expect_error([&] { hardmoe::parse_hardmoe_config({{"hardmoe", {{"experts", 0}}}}, run, "f.toml"); },
                     {"f.toml: hardmoe.experts", ">= 1"});
  test::expect_error([&] { hardmoe::parse_hardmoe_config({{"hardmoe", {{"expertz", 2}}}}, run, "f.toml"); },
                     {"hardmoe.expertz", "unknown key"});
  test::expect_error([&] { hardmoe::parse_hardmoe_config({{"hardmoe", {{"init", "random"}}}}, run, "f.toml"); },
                     {"hardmoe.init", "trunk or scratch"});
  // A trunk not trained yet is named as the trunk ("checkpoint X: cannot open" before).
  c.trunk = "/nonexistent/runs/x/checkpoint.pt";
  test::expect_error([&] { hardmoe::cluster_trunk(c, 32, nullptr, false); },
                     {"hardmoe.trunk = /nonexistent/runs/x/checkpoint.pt", "train it first"});
}

}  // namespace
}  // namespace moev
