// Training end to end on real Fashion-MNIST images with a tiny V-MoE: the loss
// falls, checkpoints round-trip, a resumed run equals an uninterrupted one, and a
// checkpoint of another architecture is refused naming the tensor.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <atomic>
#include <csignal>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <sys/resource.h>

#include <nlohmann/json.hpp>

#include "support/expect_error.h"
#include "support/stop_when_seen.h"
#include "support/temp_dir.h"
#include "support/tiny_vmoe.h"
#include "moev/io/file_lock.h"
#include "moev/train/checkpoint.h"
#include "moev/train/trained_model.h"
#include "moev/train/trainer.h"

using namespace moev;

namespace {

io::RunConfig tiny_run(const std::string& out) {
  io::RunConfig c;
  c.model = test::tiny_vmoe();
  c.data.train_limit = 640;
  c.data.test_limit = 256;
  c.train.batch_size = 64;
  c.train.epochs = 2;
  c.train.warmup_steps = 4;
  c.train.lr = 3e-3;
  c.train.threads = 1;  // bit-exact comparisons need a fixed reduction order
  c.train.checkpoint_every = 3;
  c.train.log_every = 1;
  c.train.progress = false;
  c.train.out_dir = out;
  return c;
}

std::string read_bytes(const std::string& file) {
  std::ifstream in(file, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// A checkpoint's bytes with one bit flipped at `offset` into the data of its
// tensor record "<archive>/data/<key>": after the local header's fixed 30
// bytes, name and extra field, of the header whose name ends there ("/data/5",
// not "/data/50"). Empty when there is no such record.
std::string with_flipped_bit(const std::string& file, int64_t key, size_t offset) {
  std::string bytes = read_bytes(file);
  const std::string record = "/data/" + std::to_string(key);
  auto le16 = [&](size_t at) {
    return static_cast<size_t>(static_cast<unsigned char>(bytes[at]) | static_cast<unsigned char>(bytes[at + 1]) << 8);
  };
  for (size_t at = bytes.find(record); at != std::string::npos; at = bytes.find(record, at + 1)) {
    const auto h = bytes.rfind(std::string("PK\x03\x04", 4), at);
    if (h == std::string::npos || h + 30 + le16(h + 26) != at + record.size()) continue;
    const size_t data = h + 30 + le16(h + 26) + le16(h + 28);
    bytes[data + offset] = static_cast<char>(bytes[data + offset] ^ 0x40);
    return bytes;
  }
  return {};
}

// A run of one step into dir/a: a small real checkpoint to load, damage or start from.
io::RunConfig one_step_run(const test::TempDir& dir) {
  auto a = tiny_run(dir.file("a"));
  a.train.max_steps = 1;
  train::train_model(a, {});
  return a;
}

// The step lines' values of `key` (the loss by default), in order.
std::vector<double> logged_losses(const std::string& out, const char* key = "loss") {
  std::ifstream in(std::filesystem::path(out) / "log.jsonl");
  std::vector<double> v;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains(key)) v.push_back(j[key].get<double>());
  }
  return v;
}

// The epochs of the evaluation lines, in order.
std::vector<int64_t> evaluated_epochs(const std::string& out) {
  std::ifstream in(std::filesystem::path(out) / "log.jsonl");
  std::vector<int64_t> epochs;
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("eval")) epochs.push_back(j.at("epoch").get<int64_t>());
  }
  return epochs;
}

// Trains `cfg` with its progress written to a stream that raises a stop request
// at the first line matching `trigger` (a regex; "": from the start), which it must see.
train::TrainOutcome train_stopped_on(io::RunConfig cfg, const std::string& trigger) {
  cfg.train.progress = true;
  test::StopWhenSeen progress(trigger);
  train::TrainRunOptions o;
  o.stop = progress.flag();
  o.progress = &progress;
  auto r = train::train_model(cfg, o);
  EXPECT_TRUE(progress.raised()) << "no progress line matched " << trigger;
  return r;
}

}  // namespace

TEST(Trainer, LossFallsAndCheckpointRoundTrips) {
  test::TempDir dir;
  auto cfg = tiny_run(dir.file("run"));
  cfg.train.epochs = 3;
  auto r = train::train_model(cfg, {});
  EXPECT_TRUE(r.finished);
  EXPECT_EQ(r.steps, 30);
  auto losses = logged_losses(cfg.train.out_dir);
  ASSERT_EQ(losses.size(), 30u);
  const double first = (losses[0] + losses[1] + losses[2]) / 3;
  const double last = (losses[27] + losses[28] + losses[29]) / 3;
  EXPECT_LT(last, first - 0.3) << "first " << first << " last " << last;
  EXPECT_GT(r.eval.top1, 0.3);  // chance is 0.1
  EXPECT_FALSE(std::filesystem::exists(train::checkpoint_path(cfg.train.out_dir) + ".tmp"));

  // The checkpoint rebuilds the same model: same weights, same test accuracy.
  auto t = train::load_trained(train::checkpoint_path(cfg.train.out_dir), torch::kCPU);
  EXPECT_EQ(t.step, 30);
  EXPECT_EQ(t.class_names.at(9), "Ankle boot");
  auto ckpt = train::load_checkpoint(train::checkpoint_path(cfg.train.out_dir));
  for (auto& [name, v] : train::module_tensors(*t.model))
    EXPECT_TRUE(torch::equal(v, ckpt.model.at(name))) << name;
  EXPECT_EQ(ckpt.optimizer.count("step"), 1u);
  EXPECT_EQ(ckpt.optimizer.at("step").item<int64_t>(), 30);
}

// Replicas > 1: each step splits the batch over model replicas on their own
// threads; the run must stay bit-reproducible across the kill and resume.
// With a weight average (ema_decay > 0) the average must resume exactly too.
// by_stop_request: the first part ends by a stop request (a signal) set before
// its first step, not by max_steps: it saves after step 1, off the checkpoint
// interval.
void expect_resume_equals_uninterrupted(int replicas, double ema_decay = 0, bool by_stop_request = false) {
  test::TempDir dir;
  auto full = tiny_run(dir.file("full"));
  full.train.replicas = replicas;
  full.train.ema_decay = ema_decay;
  // Step lines every 4 steps: the line at step 8 averages steps 5-8 in both runs (the resumed one ran only 6-8).
  full.train.log_every = 4;
  train::train_model(full, {});

  auto part = tiny_run(dir.file("part"));
  part.train.replicas = replicas;
  part.train.ema_decay = ema_decay;
  part.train.max_steps = by_stop_request ? 0 : 5;  // stops mid-epoch 0 (10 steps per epoch), as a kill would
  part.train.log_every = 4;
  const std::atomic<bool> stop{true};
  train::TrainRunOptions first;
  if (by_stop_request) first.stop = &stop;
  auto r1 = train::train_model(part, first);
  EXPECT_EQ(r1.steps, by_stop_request ? 1 : 5);
  EXPECT_FALSE(r1.finished);
  EXPECT_EQ(r1.stopped, by_stop_request);
  EXPECT_EQ(train::load_trained(train::checkpoint_path(part.train.out_dir), torch::kCPU).step, r1.steps);
  // A kill after the checkpoint at step 5 leaves lines of steps the resumed run
  // takes again, the last one cut short: they go, so each step is logged once.
  std::ofstream(std::filesystem::path(part.train.out_dir) / "log.jsonl", std::ios::app)
      << R"({"step": 6, "epoch": 0, "loss": 9.5})" << "\n" << R"({"step": 5, "epoch": 1, "eval": {"top1": 0.5}})"
      << "\n" << R"({"step": 7, "epoch": 0, "lo)";
  const double first_s = nlohmann::json::parse(train::load_checkpoint(train::checkpoint_path(part.train.out_dir),
                                                                      train::CheckpointLoad::kConfig)
                                                   .state_json)
                            .at("train_elapsed_s")
                            .get<double>();
  ASSERT_GT(first_s, 0);
  part.train.max_steps = 0;
  part.train.lr = 1.0;  // ignored: a resumed run keeps its checkpoint's config
  train::TrainRunOptions o;
  o.resume = true;
  auto r2 = train::train_model(part, o);
  EXPECT_EQ(r2.steps, 20);
  EXPECT_TRUE(r2.finished);
  // The run's training seconds count the first process's too (the ablation's table took the last process's).
  EXPECT_GT(r2.train_seconds, 0);
  EXPECT_NEAR(r2.run_train_seconds, first_s + r2.train_seconds, 1e-6);
  {
    std::ifstream in(std::filesystem::path(part.train.out_dir) / "log.jsonl");
    double last_train_s = 0;
    for (std::string line; std::getline(in, line);) {
      const auto j = nlohmann::json::parse(line);
      if (j.contains("eval")) last_train_s = j.at("train_s").get<double>();
    }
    EXPECT_GT(last_train_s, first_s);
  }

  // Run again once done: nothing to train; the checkpoint stays as it was (rewritten, it gained this process's
  // seconds each time) and the figures are the run's.
  const auto done = read_bytes(train::checkpoint_path(part.train.out_dir));
  const auto r3 = train::train_model(part, o);
  EXPECT_EQ(r3.steps, 20);
  EXPECT_TRUE(r3.finished);
  EXPECT_TRUE(read_bytes(train::checkpoint_path(part.train.out_dir)) == done) << "the checkpoint was rewritten";
  EXPECT_EQ(r3.run_train_seconds, r2.run_train_seconds);
  EXPECT_EQ(r3.eval.top1, r2.eval.top1);

  auto a = train::load_checkpoint(train::checkpoint_path(full.train.out_dir));
  auto b = train::load_checkpoint(train::checkpoint_path(part.train.out_dir));
  ASSERT_EQ(a.model.size(), b.model.size());
  for (auto& [name, v] : a.model) EXPECT_TRUE(torch::equal(v, b.model.at(name))) << name;
  for (auto& [name, v] : a.optimizer) EXPECT_TRUE(torch::equal(v, b.optimizer.at(name))) << name;
  ASSERT_EQ(a.ema.size(), ema_decay > 0 ? a.model.size() : 0u);
  ASSERT_EQ(b.ema.size(), a.ema.size());
  for (auto& [name, v] : a.ema) EXPECT_TRUE(torch::equal(v, b.ema.at(name))) << name;
  EXPECT_EQ(logged_losses(part.train.out_dir), logged_losses(full.train.out_dir));
  for (const char* key : {"grad_norm", "aux_loss", "train_acc"})
    EXPECT_EQ(logged_losses(part.train.out_dir, key), logged_losses(full.train.out_dir, key)) << key;
  // An epoch's evaluation line is the resumed run's to write, once.
  EXPECT_EQ(evaluated_epochs(part.train.out_dir), evaluated_epochs(full.train.out_dir));
}

TEST(Trainer, ResumeEqualsUninterruptedRun) { expect_resume_equals_uninterrupted(1); }

TEST(Trainer, ResumeEqualsUninterruptedRunWithWeightAverage) { expect_resume_equals_uninterrupted(2, 0.9); }

// A stop request (SIGTERM, Ctrl-C) saves after the step in progress: nothing since the last checkpoint is lost.
TEST(Trainer, StopRequestSavesAndResumesExactly) { expect_resume_equals_uninterrupted(1, 0, true); }

// A stop at an epoch's end, or during its evaluation, saves without another
// step; an evaluation cut short is the resumed run's to make. Each case ends as
// the uninterrupted run, evaluation lines included. One step per epoch.
TEST(Trainer, StopAtAnEpochsEndOrDuringItsEvaluationSavesAndTheResumedRunEvaluates) {
  test::TempDir dir;
  auto full = tiny_run(dir.file("full"));
  full.data.train_limit = 64;
  full.train.epochs = 3;
  full.train.warmup_steps = 1;
  full.train.checkpoint_every = 0;
  const auto whole = train::train_model(full, {});
  ASSERT_EQ(whole.steps, 3);
  struct Case {
    std::string trigger;           // the progress line that raises the stop (a regex; "": from the start)
    int64_t steps, epoch, batch;   // where the first process stops, as its checkpoint says
    std::vector<int64_t> evaluated;  // the epochs it evaluated
  };
  const Case cases[] = {
      {"", 1, 0, 1, {}},                          // before step 1's check: saved before the evaluation
      {"\\] 1/3 ", 1, 0, 1, {}},                  // after it: the evaluation of epoch 1 cut short
      {"epoch 1: test top-1", 1, 1, 0, {1}},      // after that evaluation: no step 2
      {"\\] 3/3 ", 3, 2, 1, {1, 2}},              // the last evaluation cut short: not finished
  };
  for (const auto& c : cases) {
    SCOPED_TRACE("stop on '" + c.trigger + "'");
    auto part = full;
    part.train.out_dir = dir.file("part" + std::to_string(&c - cases));
    const auto r1 = train_stopped_on(part, c.trigger);
    EXPECT_TRUE(r1.stopped);
    EXPECT_FALSE(r1.finished);
    EXPECT_EQ(r1.steps, c.steps);
    const auto st = nlohmann::json::parse(
        train::load_checkpoint(train::checkpoint_path(part.train.out_dir), train::CheckpointLoad::kConfig).state_json);
    EXPECT_EQ(st.at("step"), c.steps);
    EXPECT_EQ(st.at("epoch"), c.epoch);
    EXPECT_EQ(st.at("batch"), c.batch);
    EXPECT_EQ(evaluated_epochs(part.train.out_dir), c.evaluated);
    train::TrainRunOptions o;
    o.resume = true;
    const auto r2 = train::train_model(part, o);
    EXPECT_TRUE(r2.finished);
    EXPECT_FALSE(r2.stopped);
    EXPECT_EQ(r2.eval.images, whole.eval.images);
    EXPECT_EQ(r2.eval.top1, whole.eval.top1);
    EXPECT_EQ(logged_losses(part.train.out_dir), logged_losses(full.train.out_dir));
    EXPECT_EQ(evaluated_epochs(part.train.out_dir), (std::vector<int64_t>{1, 2, 3}));
  }
  // A stop after the evaluation at a max_steps pause: the run was ending there anyway, but the signal is
  // answered as a stop (143), as at any other step; it exited 0, and a scheduler took a preemption for a pause.
  auto paused = full;
  paused.train.out_dir = dir.file("paused");
  paused.train.max_steps = 1;
  const auto r = train_stopped_on(paused, "epoch 1: test top-1");
  EXPECT_EQ(r.steps, 1);
  EXPECT_TRUE(r.stopped);
  EXPECT_FALSE(r.finished);
}

// train.replicas = 0 means one per thread: a run resumed with other threads (a
// machine with other cores) cut its batches into other replicas and went on as
// another run. It keeps the replicas it was saved with.
TEST(Trainer, ResumeWithOtherThreadsKeepsTheRunsReplicas) {
  test::TempDir dir;
  auto full = tiny_run(dir.file("full"));
  full.train.replicas = 0;
  full.train.max_steps = 8;
  train::train_model(full, {});
  auto part = full;
  part.train.out_dir = dir.file("part");
  part.train.max_steps = 4;
  train::train_model(part, {});
  part.train.max_steps = 8;
  part.train.threads = 2;
  train::TrainRunOptions o;
  o.resume = true;
  train::train_model(part, o);
  const auto a = train::load_checkpoint(train::checkpoint_path(full.train.out_dir), train::CheckpointLoad::kWeights);
  const auto b = train::load_checkpoint(train::checkpoint_path(part.train.out_dir), train::CheckpointLoad::kWeights);
  EXPECT_EQ(nlohmann::json::parse(b.state_json).at("replicas"), 1);
  double worst = 0;
  for (const auto& [name, v] : a.model) worst = std::max(worst, (v - b.model.at(name)).abs().max().item<double>());
  EXPECT_LT(worst, 1e-3);  // two threads sum in another order (4e-5 here); two replicas moved them 7e-3
}

// config.json edited to change the run (the learning rate) was overwritten on resume without a word: it is noted,
// naming the key. Another thread count, which a resume may set, is no edit.
TEST(Trainer, AnEditedConfigJsonIsNotedOnResume) {
  test::TempDir dir;
  auto part = tiny_run(dir.file("part"));
  part.train.max_steps = 2;
  train::train_model(part, {});
  const auto file = dir.file("part") + "/config.json";
  auto resume_noting = [&](int threads) {
    ++part.train.max_steps;
    part.train.threads = threads;
    std::ostringstream said;
    train::TrainRunOptions o;
    o.resume = true;
    o.progress = &said;
    train::train_model(part, o);
    return said.str();
  };
  EXPECT_EQ(resume_noting(2).find("was changed since the run wrote it"), std::string::npos);
  auto text = test::bytes_of(file);
  const auto at = text.find("\"lr\": ");
  ASSERT_NE(at, std::string::npos) << text;
  text.insert(at + 6, "9");  // 0.001 -> 90.001
  std::ofstream(file) << text;
  const auto said = resume_noting(1);
  EXPECT_NE(said.find(file + " was changed since the run wrote it: train.lr = 9"), std::string::npos) << said;
  EXPECT_EQ(test::bytes_of(file).find("\"lr\": 9"), std::string::npos);  // written from the checkpoint again
  std::ofstream(file) << "{ not json";
  EXPECT_NE(resume_noting(1).find("it no longer reads as a config"), std::string::npos);
}

// train.ema_decay: the checkpoint keeps the training weights (to resume) and the
// average; eval and the run's own figures use the average, --raw-weights the other.
TEST(Trainer, WeightAverageIsWhatTheRunAndItsUsersEvaluate) {
  test::TempDir dir;
  auto cfg = tiny_run(dir.file("run"));
  cfg.train.ema_decay = 0.8;
  auto r = train::train_model(cfg, {});
  const auto path = train::checkpoint_path(cfg.train.out_dir);
  auto ckpt = train::load_checkpoint(path);
  ASSERT_EQ(ckpt.ema.size(), ckpt.model.size());
  double moved = 0;
  for (auto& [name, v] : ckpt.ema) moved += (v - ckpt.model.at(name)).abs().sum().item<double>();
  EXPECT_GT(moved, 0) << "the average equals the last weights";

  auto avg = train::load_trained(path, torch::kCPU);
  auto raw = train::load_trained(path, torch::kCPU, "", /*raw_weights=*/true);
  EXPECT_TRUE(avg.averaged);
  EXPECT_FALSE(raw.averaged);
  for (auto& [name, v] : train::module_tensors(*avg.model)) EXPECT_TRUE(torch::equal(v, ckpt.ema.at(name))) << name;
  for (auto& [name, v] : train::module_tensors(*raw.model)) EXPECT_TRUE(torch::equal(v, ckpt.model.at(name))) << name;

  // The last log line holds both figures; the run reports the average's.
  std::ifstream in(std::filesystem::path(cfg.train.out_dir) / "log.jsonl");
  std::string line, last;
  while (std::getline(in, line)) last = line;
  auto j = nlohmann::json::parse(last);
  ASSERT_TRUE(j.contains("eval") && j.contains("eval_raw")) << last;
  EXPECT_DOUBLE_EQ(j["eval"]["top1"].get<double>(), r.eval.top1);
  EXPECT_NE(j["eval"]["loss"].get<double>(), j["eval_raw"]["loss"].get<double>());
}

TEST(Trainer, WeightAverageDecayOutsideZeroToOneIsRefused) {
  test::TempDir dir;
  for (double d : {-0.5, 1.0, 1.5}) {
    auto cfg = tiny_run(dir.file("bad"));
    cfg.train.ema_decay = d;
    test::expect_error([&] { train::train_model(cfg, {}); }, {"train.ema_decay", "expected in (0, 1)"});
  }
}

TEST(Trainer, ResumeEqualsUninterruptedRunWithTwoReplicas) { expect_resume_equals_uninterrupted(2); }

TEST(Trainer, CheckpointOfAnotherArchitectureIsRefusedNamingTheTensor) {
  test::TempDir dir;
  const auto a = one_step_run(dir);
  auto b = tiny_run(dir.file("b"));
  b.model.router.num_experts = 8;
  b.train.init_from = train::checkpoint_path(a.train.out_dir);
  test::expect_error([&] { train::train_model(b, {}); },
                     {"train.init_from = " + b.train.init_from, "blocks.1.moe.experts.b1", "[4, 64]", "[8, 64]",
                      "its model differs from this run's: model.moe ", "(E 4) vs ", "(E 8)"});
  auto c = tiny_run(dir.file("c"));
  c.model.moe = models::parse_placement("none");
  c.train.init_from = b.train.init_from;
  test::expect_error([&] { train::train_model(c, {}); }, {"blocks.1.fc1.bias", "missing", "vs none (E"});
}

// A NaN weight (a run saved after diverging, a damaged file) would otherwise
// evaluate, fuse and teach at chance level with exit 0.
TEST(Trainer, CheckpointWithNonFiniteWeightsOrADirectoryIsRefused) {
  test::TempDir dir;
  const auto a = one_step_run(dir);
  const auto path = train::checkpoint_path(a.train.out_dir);
  auto ckpt = train::load_checkpoint(path);
  const std::string name = "blocks.1.moe.experts.b1";
  ASSERT_TRUE(ckpt.model.count(name));
  ckpt.model.at(name).view(-1)[3] = std::numeric_limits<float>::quiet_NaN();
  train::save_checkpoint(dir.file("nan.pt"), ckpt);
  test::expect_error([&] { train::load_checkpoint(dir.file("nan.pt")); },
                     {dir.file("nan.pt"), name, "NaN or infinite"});
  ckpt.model.at(name).view(-1)[3] = 0.0f;
  train::save_checkpoint(dir.file("ok.pt"), ckpt);
  EXPECT_NO_THROW(train::load_checkpoint(dir.file("ok.pt")));
  test::expect_error([&] { train::load_checkpoint(a.train.out_dir); },
                     {a.train.out_dir, "is a directory", train::checkpoint_path(a.train.out_dir) + "?"});
  // The directory of a sweep or an ablation: its runs' checkpoints are named, not "<dir>/checkpoint.pt?".
  const auto parent = std::filesystem::path(a.train.out_dir).parent_path().string();
  test::expect_error([&] { train::load_checkpoint(parent); },
                     {parent + ": is a directory of ", "(a sweep's or an ablation's?)", "checkpoint.pt"});
  std::filesystem::create_directories(dir.file("empty_dir"));
  test::expect_error([&] { train::load_checkpoint(dir.file("empty_dir")); }, {"with no checkpoint.pt in it"});
  test::expect_error([&] { train::load_checkpoint(""); }, {"checkpoint path is empty"});
}

// The finiteness check reads exponent bits as the bytes stream in: every
// floating type, a value in a later 4 MB block, in the average as in the
// model; the largest, smallest and subnormal finite values still load, and a
// NaN in the optimizer's moments is not a weight's.
// A state or config of the wrong kind (hand-edited, or from another tool) is
// refused when the checkpoint is read, naming the file and the key: it failed
// later with the JSON library's or LibTorch's words ("isString() INTERNAL
// ASSERT FAILED ... please report a bug to PyTorch").
TEST(Trainer, CheckpointMetadataOfTheWrongKindIsRefusedNamingTheKey) {
  test::TempDir dir;
  const auto a = one_step_run(dir);
  const auto good = train::load_checkpoint(train::checkpoint_path(a.train.out_dir));
  struct Bad {
    std::string config, state;
    std::vector<std::string> needles;
  };
  const std::vector<Bad> bad = {
      {good.config_json, R"({"step": "x", "epoch": 0, "batch": 1})", {"state.step = \"x\"", "an integer >= 0"}},
      {good.config_json, R"({"step": 1, "epoch": -1, "batch": 1})", {"state.epoch = -1", "an integer >= 0"}},
      {good.config_json, "not json", {"'state' entry is not a JSON object"}},
      {"[1]", good.state_json, {"'config' entry is not a JSON object"}},
      {good.config_json, R"({"step": 1, "log_window": {"loss": "a"}})", {"state.log_window.loss = \"a\"", "a number"}},
      {good.config_json, R"({"class_names": ["a", 2]})", {"state.class_names", "a list of strings"}},
  };
  for (size_t i = 0; i < bad.size(); ++i) {
    auto c = good;
    c.config_json = bad[i].config;
    c.state_json = bad[i].state;
    const auto path = dir.file("bad" + std::to_string(i) + ".pt");
    train::save_checkpoint(path, c);
    auto needles = bad[i].needles;
    needles.push_back(path);
    test::expect_error([&] { train::load_checkpoint(path, train::CheckpointLoad::kConfig); }, needles);
  }
  // An entry that is no text at all, as a Python script can write one.
  if (std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3-torch not installed";
  const auto py = dir.file("int_config.pt");
  const std::string cmd = "/usr/bin/python3 -c \"import torch,sys; d=dict(torch.load(sys.argv[1])); d['config']=5; "
                          "torch.save(d, sys.argv[2])\" " + train::checkpoint_path(a.train.out_dir) + " " + py;
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  test::expect_error([&] { train::load_checkpoint(py); }, {py, "'config' entry is not JSON text but a value of type Int"});
}

TEST(Trainer, CheckpointFinitenessCheckCoversEveryFloatTypeAndBlock) {
  test::TempDir dir;
  for (auto type : {torch::kFloat, torch::kDouble, torch::kHalf, torch::kBFloat16}) {
    SCOPED_TRACE(c10::toString(type));
    const int64_t n = (int64_t{9} << 20) / c10::elementSize(type);  // three blocks
    train::Checkpoint ckpt;
    ckpt.config_json = ckpt.state_json = "{}";
    auto finite = torch::randn({n}).to(type);
    const auto info = [&](auto tag) {
      using T = decltype(tag);
      return std::vector<double>{double(std::numeric_limits<T>::max()), double(std::numeric_limits<T>::lowest()),
                                 double(std::numeric_limits<T>::min()), double(std::numeric_limits<T>::denorm_min())};
    };
    const auto extremes = type == torch::kFloat    ? info(float{})
                          : type == torch::kDouble ? info(double{})
                          : type == torch::kHalf   ? info(c10::Half{})
                                                   : info(c10::BFloat16{});
    for (size_t i = 0; i < extremes.size(); ++i) finite[n - 1 - static_cast<int64_t>(i)] = extremes[i];
    ASSERT_TRUE(torch::isfinite(finite).all().item<bool>());
    ckpt.model["w"] = finite;
    ckpt.ema["w"] = finite.clone();
    ckpt.optimizer["m"] = torch::full({5}, std::numeric_limits<double>::quiet_NaN()).to(type);
    const auto path = dir.file("finite.pt");
    train::save_checkpoint(path, ckpt);
    const auto loaded = train::load_checkpoint(path);
    EXPECT_TRUE(torch::equal(loaded.model.at("w"), finite));
    for (const char* part : {"model", "ema"})
      for (double bad : {std::numeric_limits<double>::infinity(), -std::numeric_limits<double>::infinity(),
                         std::numeric_limits<double>::quiet_NaN()}) {
        auto damaged = ckpt;
        auto& w = (std::string(part) == "model" ? damaged.model : damaged.ema)["w"];
        w = finite.clone();
        w[n - 10] = bad;
        train::save_checkpoint(path, damaged);
        test::expect_error([&] { train::load_checkpoint(path); }, {path, "'w'", "NaN or infinite"});
      }
  }
}

// torch's reader does not check the zip's CRC-32s: a flipped byte in a tensor
// loaded as a wrong weight at exit 0 (eval reported a loss of 2.4e9).
TEST(Trainer, ADamagedCheckpointFailsItsCrcCheck) {
  test::TempDir dir;
  const auto a = one_step_run(dir);
  const auto path = train::checkpoint_path(a.train.out_dir);
  const auto bytes = with_flipped_bit(path, 0, 5);  // the first tensor's
  ASSERT_FALSE(bytes.empty());
  std::ofstream(dir.file("damaged.pt"), std::ios::binary) << bytes;
  test::expect_error([&] { train::load_checkpoint(dir.file("damaged.pt")); },
                     {dir.file("damaged.pt"), "/data/0", "fails its CRC-32 check"});
  // Cut short: the directory at the end is gone, and the file is refused as cut short (it read as "not a
  // moev checkpoint").
  // A flipped bit that makes a weight infinite (1.0f = 0x3F800000 -> 0x7F800000) is damage, not a diverged run.
  train::Checkpoint ones;
  ones.config_json = ones.state_json = "{}";
  ones.model["w"] = torch::ones({4});
  train::save_checkpoint(dir.file("ones.pt"), ones);
  std::ofstream(dir.file("inf.pt"), std::ios::binary) << with_flipped_bit(dir.file("ones.pt"), 0, 3);
  test::expect_error([&] { train::load_checkpoint(dir.file("inf.pt")); }, {"inf.pt", "fails its CRC-32 check"});
  for (size_t keep : {size_t{100}, bytes.size() / 2, bytes.size() - 10}) {
    std::ofstream(dir.file("short.pt"), std::ios::binary) << bytes.substr(0, keep);
    test::expect_error([&] { train::load_checkpoint(dir.file("short.pt")); }, {dir.file("short.pt"), "cut short"});
  }
  // A directory that is there but lists nothing is damage, not a cut (it read as "cut short").
  auto listless = bytes;
  const auto end_record = listless.rfind(std::string("PK\x05\x06", 4));
  ASSERT_NE(end_record, std::string::npos);
  std::fill_n(listless.begin() + static_cast<std::ptrdiff_t>(end_record) + 8, 4, '\0');
  std::ofstream(dir.file("listless.pt"), std::ios::binary) << listless;
  test::expect_error([&] { train::load_checkpoint(dir.file("listless.pt")); },
                     {dir.file("listless.pt"), "lists no members", "corrupt"});
  EXPECT_NO_THROW(train::load_checkpoint(path));
}

// Inference reads one copy of the weights: the average when kept, else the
// model. A part left out is not read at all: a damaged byte in the optimizer's
// first record fails only the load that wants the optimizer.
TEST(Trainer, CheckpointLoadsReadOnlyThePartsAsked) {
  test::TempDir dir;
  auto cfg = tiny_run(dir.file("run"));
  cfg.train.ema_decay = 0.8;
  train::train_model(cfg, {});
  const auto path = train::checkpoint_path(cfg.train.out_dir);
  const auto all = train::load_checkpoint(path);
  ASSERT_FALSE(all.optimizer.empty());
  ASSERT_FALSE(all.ema.empty());
  auto same = [](const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b) {
    if (a.size() != b.size()) return false;
    for (const auto& [name, t] : a)
      if (!b.count(name) || !torch::equal(t, b.at(name))) return false;
    return true;
  };
  using L = train::CheckpointLoad;
  const auto weights = train::load_checkpoint(path, L::kWeights);
  EXPECT_TRUE(same(weights.model, all.model));
  EXPECT_TRUE(same(weights.ema, all.ema));
  EXPECT_TRUE(weights.optimizer.empty());
  const auto inference = train::load_checkpoint(path, L::kInference);
  EXPECT_TRUE(same(train::inference_weights(inference), all.ema));
  EXPECT_TRUE(inference.model.empty());
  EXPECT_TRUE(inference.optimizer.empty());
  EXPECT_TRUE(torch::equal(inference.rng, all.rng));
  const auto config = train::load_checkpoint(path, L::kConfig);
  EXPECT_EQ(config.config_json, all.config_json);
  EXPECT_EQ(config.state_json, all.state_json);
  EXPECT_TRUE(config.model.empty() && config.optimizer.empty() && config.ema.empty() && !config.rng.defined());

  // Without an average, inference reads the model.
  auto plain = all;
  plain.ema.clear();
  train::save_checkpoint(dir.file("plain.pt"), plain);
  EXPECT_TRUE(same(train::load_checkpoint(dir.file("plain.pt"), L::kInference).model, all.model));

  // The records are numbered in the order saved: the model's first, then the optimizer's.
  const auto first_moment = static_cast<int64_t>(all.model.size());
  const auto bytes = with_flipped_bit(path, first_moment, 2);
  ASSERT_FALSE(bytes.empty());
  std::ofstream(dir.file("damaged.pt"), std::ios::binary) << bytes;
  test::expect_error([&] { train::load_checkpoint(dir.file("damaged.pt")); },
                     {dir.file("damaged.pt"), "/data/" + std::to_string(first_moment), "fails its CRC-32 check"});
  EXPECT_TRUE(same(train::load_checkpoint(dir.file("damaged.pt"), L::kWeights).ema, all.ema));
}

// A write that fails (here past the file-size limit, as on a full disk) is an
// error naming the file, and the last checkpoint is left as it was, with no
// temporary file beside it.
TEST(Trainer, ACheckpointWriteThatFailsLeavesTheLastOneAsItWas) {
  test::TempDir dir;
  const auto a = one_step_run(dir);
  auto ckpt = train::load_checkpoint(train::checkpoint_path(a.train.out_dir));
  const auto path = dir.file("last.pt");
  train::save_checkpoint(path, ckpt);
  const auto before = read_bytes(path);
  ckpt.model["blocks.0.grown"] = torch::ones({1 << 20});  // 4 MB more than the limit below allows
  struct Limit {  // RLIMIT_FSIZE at `size` bytes, SIGXFSZ ignored (write then fails with EFBIG), both undone after
    rlimit old{};
    void (*handler)(int) = SIG_DFL;
    explicit Limit(rlim_t size) {
      getrlimit(RLIMIT_FSIZE, &old);
      handler = std::signal(SIGXFSZ, SIG_IGN);
      rlimit lim = old;
      lim.rlim_cur = std::min(size, old.rlim_max);
      setrlimit(RLIMIT_FSIZE, &lim);
    }
    ~Limit() {
      setrlimit(RLIMIT_FSIZE, &old);
      std::signal(SIGXFSZ, handler);
    }
  };
  {
    Limit limit(before.size() + (1 << 20));
    test::expect_error([&] { train::save_checkpoint(path, ckpt); },
                       {path + ".tmp", "write failed", "File too large", "the last checkpoint is left as it was"});
  }
  EXPECT_TRUE(read_bytes(path) == before);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  train::save_checkpoint(path, ckpt);  // without the limit it writes
  EXPECT_TRUE(torch::equal(train::load_checkpoint(path).model.at("blocks.0.grown"), torch::ones({1 << 20})));
}

TEST(Trainer, ResumeWithoutCheckpointIsAClearError) {
  test::TempDir dir;
  auto cfg = tiny_run(dir.file("none"));
  train::TrainRunOptions o;
  o.resume = true;
  test::expect_error([&] { train::train_model(cfg, o); },
                     {"checkpoint.pt does not exist", "no checkpoint yet", "without --resume"});
}

// A model whose weights, gradients and AdamW moments alone outgrow the machine (16384 experts of width 4096:
// about 35 TB) is refused naming its size, before anything is allocated; the kernel's OOM killer took other
// processes with it. A tiny one passes.
TEST(Trainer, AModelLargerThanTheMachinesMemoryIsRefused) {
  test::TempDir dir;
  auto cfg = tiny_run(dir.file("huge"));
  EXPECT_NO_THROW(train::check_new_run_config(cfg));
  cfg.model.width = 4096;
  cfg.model.mlp_dim = 16384;
  cfg.model.heads = 64;
  cfg.model.router.num_experts = 16384;
  test::expect_error([&] { train::check_new_run_config(cfg); },
                     {"parameters need about", "GB of memory", "moe.num_experts = 16384", "make the model smaller"});
  test::expect_error([&] { train::train_model(cfg, {}); }, {"make the model smaller"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("huge")));
}

// A folder that gained an image between a kill and --resume was trained on without a word: the checkpoint keeps
// the training set's fingerprint, and the resumed run compares it.
TEST(Trainer, ResumeOnChangedDataIsRefused) {
  test::TempDir dir;
  auto write_pgm = [&](const std::string& cls, int i) {
    test::write_pattern_pgm(dir.file("data/" + cls + "/" + std::to_string(i) + ".pgm"), i + 10 * int(cls.size()));
  };
  for (int i = 0; i < 4; ++i) write_pgm("a", i), write_pgm("bb", i);
  std::filesystem::create_directories(dir.file("test"));
  std::filesystem::copy(dir.file("data"), dir.file("test"), std::filesystem::copy_options::recursive);
  auto cfg = tiny_run(dir.file("run"));
  cfg.data = {};
  cfg.data.format = "folder";
  cfg.data.path = dir.file("data");
  cfg.data.test_path = dir.file("test");
  cfg.model.num_classes = 2;
  cfg.train.batch_size = 4;
  cfg.train.max_steps = 1;
  train::train_model(cfg, {});
  train::TrainRunOptions o;
  o.resume = true;
  cfg.train.max_steps = 2;
  EXPECT_EQ(train::train_model(cfg, o).steps, 2);  // the same data: resumed
  write_pgm("bb", 4);
  cfg.train.max_steps = 3;
  test::expect_error([&] { train::train_model(cfg, o); },
                     {"--resume: the training set", dir.file("data"), "differs from the one", "checkpoint.pt"});
  // A folder run's checkpoint from before the fingerprint (and the mixed order) is refused too.
  const auto path = train::checkpoint_path(cfg.train.out_dir);
  auto old = train::load_checkpoint(path);
  auto state = nlohmann::json::parse(old.state_json);
  state.erase("train_data");
  old.state_json = state.dump();
  train::save_checkpoint(path, old);
  test::expect_error([&] { train::train_model(cfg, o); }, {"predates the fingerprint", "start a new run"});
  // A stop while the folder decodes ends the run before its first step, the checkpoint as it was.
  const std::string before = test::bytes_of(path);
  std::atomic<bool> stop{true};
  o.stop = &stop;
  try {
    train::train_model(cfg, o);
    ADD_FAILURE() << "no moev::Stopped";
  } catch (const moev::Stopped& e) {
    const std::vector<std::string> parts = {"stopped while reading image folder " + dir.file("data"),
                                            "before the first step", path + " is as it was"};
    for (const auto& part : parts)
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
  }
  EXPECT_EQ(test::bytes_of(path), before);
}

// Resumed with a train.max_steps it had reached, a run trained nothing and said "paused" at exit 0; a stop that
// came with the max_steps pause was taken for the pause alone (exit 0 where a scheduler needs 143).
TEST(Trainer, MaxStepsAlreadyReachedIsRefusedAndAStopAtThePauseIsAStop) {
  test::TempDir dir;
  auto cfg = tiny_run(dir.file("run"));
  cfg.train.max_steps = 2;
  std::atomic<bool> stop{true};
  train::TrainRunOptions o;
  o.stop = &stop;
  cfg.train.max_steps = 1;
  const auto first = train::train_model(cfg, o);
  EXPECT_EQ(first.steps, 1);
  EXPECT_TRUE(first.stopped);
  o.stop = nullptr;
  o.resume = true;
  cfg.train.max_steps = 2;
  const auto second = train::train_model(cfg, o);
  EXPECT_EQ(second.steps, 2);
  EXPECT_FALSE(second.stopped);
  // Reached exactly, a pause may owe its epoch's end: it goes on. Passed, it is refused.
  EXPECT_EQ(train::train_model(cfg, o).steps, 2);
  cfg.train.max_steps = 1;
  const std::string log_before = test::bytes_of(cfg.train.out_dir + "/log.jsonl");
  test::expect_error([&] { train::train_model(cfg, o); },
                     {"train.max_steps = 1 (--max-steps)", "is at step 2 already", "give a larger --max-steps"});
  EXPECT_EQ(test::bytes_of(cfg.train.out_dir + "/log.jsonl"), log_before);  // refused before the run wrote
}

// A second run into a directory without resume replaced the first's log at
// once and its checkpoint soon after; optimiser settings outside their range
// diverged later with a message blaming train.lr.
TEST(Trainer, ASecondRunIntoARunsDirectoryAndBadOptimiserSettingsAreRefused) {
  test::TempDir dir;
  const auto a = one_step_run(dir);
  const auto log_before = logged_losses(a.train.out_dir);
  ASSERT_FALSE(log_before.empty());
  test::expect_error([&] { train::train_model(a, {}); },
                     {train::checkpoint_path(a.train.out_dir), "already holds a run", "--resume"});
  EXPECT_EQ(logged_losses(a.train.out_dir), log_before);
  // A directory no run started in, holding the user's own config.json: kept.
  {
    auto mine = tiny_run(dir.file("mine"));
    std::filesystem::create_directories(mine.train.out_dir);
    std::ofstream(dir.file("mine/config.json")) << R"({"model": {"preset": "vmoe-tiny"}})";
    test::expect_error([&] { train::train_model(mine, {}); },
                       {"train.out_dir = " + mine.train.out_dir, "holds a config.json that no moev run wrote"});
    EXPECT_EQ(read_bytes(dir.file("mine/config.json")), R"({"model": {"preset": "vmoe-tiny"}})");
  }
  // Another process in the directory (here: its lock held), resuming or not:
  // refused before the directory's checkpoint is even looked at.
  {
    const io::FileLock other((std::filesystem::path(a.train.out_dir) / ".train.lock").string(), "test");
    test::expect_error([&] { train::train_model(a, {}); }, {"in use by another process"});
  }
  {
    const io::FileLock other((std::filesystem::path(a.train.out_dir) / ".train.lock").string(), "test");
    train::TrainRunOptions resume;
    resume.resume = true;
    test::expect_error([&] { train::train_model(a, resume); },
                       {a.train.out_dir, "in use by another process", ".train.lock"});
    auto fresh = tiny_run(dir.file("fresh"));
    std::filesystem::create_directories(fresh.train.out_dir);
    const io::FileLock held((std::filesystem::path(fresh.train.out_dir) / ".train.lock").string(), "test");
    test::expect_error([&] { train::train_model(fresh, {}); }, {"in use by another process"});
  }
  EXPECT_EQ(logged_losses(a.train.out_dir), log_before);
  struct Bad {
    void (*set)(io::RunConfig&);
    const char* needle;
  };
  const Bad bad[] = {
      {[](io::RunConfig& c) { c.train.beta2 = 1.0; }, "train.beta2 = 1"},
      // Overflowed the step count: 0 steps at exit 0.
      {[](io::RunConfig& c) { c.train.epochs = int64_t(1) << 62; }, "train.epochs = 4611686018427387904"},
      {[](io::RunConfig& c) { c.train.cooldown_epochs = int64_t(1) << 40; }, "train.cooldown_epochs = 1099511627776"},
      {[](io::RunConfig& c) { c.train.beta1 = -1; }, "train.beta1 = -1"},
      {[](io::RunConfig& c) { c.train.min_lr = 1.0; }, "train.min_lr = 1"},
      {[](io::RunConfig& c) { c.train.warmup_steps = -1; }, "train.warmup_steps = -1"},
      {[](io::RunConfig& c) { c.train.max_steps = -3; }, "train.max_steps = -3"},
      {[](io::RunConfig& c) { c.train.threads = -1; }, "threads = -1"},
      {[](io::RunConfig& c) { c.data.train_limit = -1; }, "data.train_limit = -1"},
      {[](io::RunConfig& c) { c.data.test_limit = -2; }, "data.test_limit = -2"},
      // These trained at exit 0: a negative cool-down rate climbed the loss to chance, and so on.
      {[](io::RunConfig& c) { c.train.cooldown_lr = -1; }, "train.cooldown_lr = -1"},
      {[](io::RunConfig& c) { c.train.weight_decay = -1; }, "train.weight_decay = -1"},
      {[](io::RunConfig& c) { c.train.clip_grad_norm = -1; }, "train.clip_grad_norm = -1"},
      {[](io::RunConfig& c) { c.train.mix_prob = 5; }, "train.mix_prob = 5"},
      {[](io::RunConfig& c) { c.train.mix_switch_prob = -1; }, "train.mix_switch_prob = -1"},
      {[](io::RunConfig& c) { c.train.checkpoint_every = -5; }, "train.checkpoint_every = -5"},
      {[](io::RunConfig& c) { c.train.log_every = -1; }, "train.log_every = -1"},
      {[](io::RunConfig& c) { c.train.dist_timeout = 0; }, "train.dist_timeout = 0"},
      {[](io::RunConfig& c) { c.model.aux.load = -1; }, "moe.load_weight = -1"},
      {[](io::RunConfig& c) { c.model.aux.z = -0.5; }, "moe.z_weight = -0.5"},
      {[](io::RunConfig& c) { c.model.router.num_experts = 100000; }, "moe.num_experts = 100000"},
      {[](io::RunConfig& c) { c.model.depth = 0; }, "model.depth = 0"},
      {[](io::RunConfig& c) { c.model.num_classes = 1; }, "model.num_classes = 1"},
  };
  for (const auto& b : bad) {
    auto cfg = tiny_run(dir.file("bad"));
    b.set(cfg);
    test::expect_error([&] { train::train_model(cfg, {}); }, {b.needle, "expected"});
    EXPECT_FALSE(std::filesystem::exists(dir.file("bad"))) << "a refused run left its directory";
  }
  // A directory where the run's files cannot be written (here a directory in
  // the way of config.json, which fails for root too) fails before training,
  // not at the first checkpoint, and leaves no temporary file behind.
  std::filesystem::create_directories(dir.file("blocked") + "/config.json/x");
  std::ofstream(dir.file("blocked/.train.lock"));  // a run's directory (else the foreign config.json is refused)
  auto blocked = tiny_run(dir.file("blocked"));
  test::expect_error([&] { train::train_model(blocked, {}); }, {"cannot write", "config.json"});
  for (const auto& entry : std::filesystem::directory_iterator(dir.file("blocked")))
    EXPECT_EQ(entry.path().filename().string().find(".tmp"), std::string::npos) << entry.path();
  EXPECT_FALSE(std::filesystem::exists(train::checkpoint_path(blocked.train.out_dir)));
}

// A log line that cannot be written (a full disk: here log.jsonl is /dev/full)
// was lost without a word until the next checkpoint failed; it is said once,
// and the run goes on to its checkpoint.
TEST(Trainer, ALogThatCannotBeWrittenIsReportedOnceAndTrainingGoesOn) {
  test::TempDir dir;
  auto run = tiny_run(dir.file("full_disk"));
  run.train.max_steps = 4;
  std::filesystem::create_directories(run.train.out_dir);
  std::ofstream(dir.file("full_disk/.train.lock"));
  std::filesystem::create_symlink("/dev/full", dir.file("full_disk/log.jsonl"));
  std::ostringstream progress;
  train::TrainRunOptions o;
  o.progress = &progress;
  const auto r = train::train_model(run, o);
  EXPECT_EQ(r.steps, 4);
  EXPECT_TRUE(std::filesystem::exists(train::checkpoint_path(run.train.out_dir)));
  const std::string said = progress.str();
  EXPECT_NE(said.find("warning: cannot write " + dir.file("full_disk/log.jsonl") + " at step 1"), std::string::npos)
      << said;
  EXPECT_EQ(said.find("warning: cannot write", said.find("warning: cannot write") + 1), std::string::npos) << said;
}

TEST(Trainer, CheckpointOpensInPython) {
  if (std::system("/usr/bin/python3 -c 'import torch' >/dev/null 2>&1") != 0)
    GTEST_SKIP() << "python3-torch not installed";
  test::TempDir dir;
  auto cfg = tiny_run(dir.file("py"));
  cfg.train.max_steps = 2;
  train::train_model(cfg, {});
  const std::string script = dir.file("check.py");
  std::ofstream(script) << "import json, sys, torch\n"
                           "d = torch.load(sys.argv[1])\n"
                           "assert d['format'] == 'moev-checkpoint-v1'\n"
                           "m = d['model']\n"
                           "assert tuple(m['blocks.1.moe.experts.w1'].shape) == (4, 32, 64)\n"
                           "assert json.loads(d['config'])['moe']['num_experts'] == 4\n"
                           "assert json.loads(d['state'])['step'] == 2\n"
                           "print('ok', len(m))\n";
  const std::string cmd = "/usr/bin/python3 " + script + " " +
                          train::checkpoint_path(cfg.train.out_dir) + " > " + dir.file("out.txt");
  EXPECT_EQ(std::system(cmd.c_str()), 0);
  std::ifstream in(dir.file("out.txt"));
  std::string ok;
  in >> ok;
  EXPECT_EQ(ok, "ok");
}

// train.freeze: the named module's parameters come out bit-identical (with two
// replicas, which hold their own parameter handles), the rest trains; a name
// that matches nothing is an error, not a silently trained model.
TEST(Trainer, FrozenParametersStayExactlyAsLoaded) {
  test::TempDir dir;
  auto c = tiny_run(dir.file("a"));
  c.train.epochs = 1;
  c.train.threads = 2;
  c.train.replicas = 2;
  c.train.freeze = {"head", "blocks.0.ln1.weight"};
  train::train_model(c, {});
  torch::manual_seed(c.train.seed);
  auto fresh = models::build_model(c.model);  // the initial weights, drawn from the same seed
  auto init = train::module_tensors(*fresh);
  auto trained = train::load_checkpoint(train::checkpoint_path(c.train.out_dir)).model;
  for (const char* name : {"head.weight", "head.bias", "blocks.0.ln1.weight"})
    EXPECT_TRUE(torch::equal(init.at(name), trained.at(name))) << name;
  EXPECT_FALSE(torch::equal(init.at("blocks.0.ln1.bias"), trained.at("blocks.0.ln1.bias")));
  c.train.freeze = {"haed"};
  c.train.out_dir = dir.file("b");
  test::expect_error([&] { train::train_model(c, {}); }, {"train.freeze", "'haed'", "names no parameter"});
}

namespace {
nlohmann::json checkpoint_state(const std::string& out) {
  return nlohmann::json::parse(train::load_checkpoint(train::checkpoint_path(out)).state_json);
}
double last_logged_lr(const std::string& out) {
  std::ifstream in(std::filesystem::path(out) / "log.jsonl");
  double lr = -1;
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    if (j.contains("lr")) lr = j["lr"].get<double>();
  }
  return lr;
}
}  // namespace

// train.minutes: the run stops when its training time reaches the budget (not at
// train.epochs, here far away), its cosine schedule has reached the floor by
// then, it evaluates, and a run paused and resumed spends the same budget in all.
TEST(Trainer, TimeBudgetEndsTheScheduleOnTime) {
  test::TempDir dir;
  const double budget_s = 3.0;
  auto cfg = tiny_run(dir.file("budget"));
  cfg.train.epochs = 1000;  // 10,000 steps: far more than 3 s hold
  cfg.train.minutes = budget_s / 60;
  cfg.train.eval_each_epoch = false;
  cfg.train.checkpoint_every = 0;
  auto r = train::train_model(cfg, {});
  EXPECT_TRUE(r.finished);
  EXPECT_LT(r.steps, 10000);
  EXPECT_GT(r.steps, 5);
  EXPECT_GE(r.train_seconds, budget_s * 0.9);
  EXPECT_LE(r.train_seconds, budget_s + 2.0);
  EXPECT_GT(r.eval.images, 0);
  EXPECT_LT(last_logged_lr(cfg.train.out_dir), 0.1 * cfg.train.lr);
  auto st = checkpoint_state(cfg.train.out_dir);
  EXPECT_EQ(st.at("planned_steps").get<int64_t>(), r.steps);

  // Paused a third of the way in, then resumed: the second process gets what is left. The pause is counted from
  // the first run's steps, not fixed: under a sanitizer 20 steps did not fit in the budget.
  auto part = tiny_run(dir.file("part"));
  part.train.epochs = 1000;
  part.train.minutes = budget_s / 60;
  part.train.eval_each_epoch = false;
  part.train.max_steps = std::max<int64_t>(2, r.steps / 3);
  auto r1 = train::train_model(part, {});
  EXPECT_FALSE(r1.finished);
  const double first_s = checkpoint_state(part.train.out_dir).at("train_elapsed_s").get<double>();
  EXPECT_GT(first_s, 0);
  part.train.max_steps = 0;
  train::TrainRunOptions o;
  o.resume = true;
  auto r2 = train::train_model(part, o);
  EXPECT_TRUE(r2.finished);
  EXPECT_GT(r2.steps, part.train.max_steps);
  const double total_s = checkpoint_state(part.train.out_dir).at("train_elapsed_s").get<double>();
  EXPECT_GE(total_s, budget_s * 0.9);
  EXPECT_LE(total_s, budget_s + 2.0);
  EXPECT_NEAR(r2.train_seconds, total_s - first_s, 0.5);

  // A stop during the evaluation after the budget's last step (the bar's last line): the resumed run makes it,
  // logged as the uninterrupted run logs it.
  auto cut = tiny_run(dir.file("cut"));
  cut.train.epochs = 1000;
  cut.train.minutes = budget_s / 60;
  cut.train.eval_each_epoch = false;
  cut.train.checkpoint_every = 0;
  const auto c1 = train_stopped_on(cut, "\\] (\\d+)/\\1 ");
  EXPECT_TRUE(c1.stopped);
  EXPECT_FALSE(c1.finished);
  EXPECT_TRUE(evaluated_epochs(cut.train.out_dir).empty());
  const auto c2 = train::train_model(cut, o);
  EXPECT_TRUE(c2.finished);
  EXPECT_EQ(c2.steps, c1.steps);
  EXPECT_GT(c2.eval.images, 0);
  EXPECT_EQ(evaluated_epochs(cut.train.out_dir).size(), 1u);
}

// A budget of about eight steps ends near its time: sampled every tenth step from the fifth, the first plan came at
// the fifteenth, and a budget of eight steps ran nearly twice as long.
TEST(Trainer, AShortTimeBudgetEndsNearItsTime) {
  test::TempDir dir;
  auto probe = tiny_run(dir.file("probe"));
  probe.train.max_steps = 20;
  probe.train.eval_each_epoch = false;
  probe.train.checkpoint_every = 0;  // as the timed run: saves would lengthen the steps measured
  probe.train.epochs = 1000;
  const auto p = train::train_model(probe, {});
  const double step_s = p.train_seconds / double(p.steps), budget_s = 8 * step_s;
  auto cfg = tiny_run(dir.file("short"));
  cfg.train.epochs = 1000;
  cfg.train.minutes = budget_s / 60;
  cfg.train.eval_each_epoch = false;
  cfg.train.checkpoint_every = 0;
  const auto r = train::train_model(cfg, {});
  EXPECT_TRUE(r.finished);
  EXPECT_LE(r.train_seconds, 1.3 * budget_s) << r.steps << " steps of about " << step_s << " s";
}

// A warmup at least as long as the schedule (a preset's 300 steps in a short
// run) never reaches train.lr nor decays: the run says so once, at its start.
TEST(Trainer, AWarmupAsLongAsTheScheduleIsNoted) {
  test::TempDir dir;
  for (const int64_t warmup : {20, 19}) {  // the schedule: 2 epochs of 10 steps
    auto cfg = tiny_run(dir.file("w" + std::to_string(warmup)));
    cfg.train.warmup_steps = warmup;
    cfg.train.max_steps = 1;
    cfg.train.progress = false;  // the bar off: notes still print (train.progress = false hid them)
    std::ostringstream progress;
    train::TrainRunOptions o;
    o.progress = &progress;
    train::train_model(cfg, o);
    const bool noted = progress.str().find("note: train.warmup_steps = 20 is at least the schedule's 20 steps: "
                                           "the learning rate rises to 0.003 (train.lr = 0.003) and never decays") !=
                       std::string::npos;
    EXPECT_EQ(noted, warmup == 20) << progress.str();
  }
}

TEST(Trainer, TimeBudgetWithEpochCountedPhasesIsRefused) {
  test::TempDir dir;
  auto cfg = tiny_run(dir.file("bad"));
  cfg.train.minutes = 1;
  cfg.train.cooldown_epochs = 2;
  test::expect_error([&] { train::train_model(cfg, {}); }, {"train.minutes = 1 with train.cooldown_epochs = 2"});
  cfg.train.cooldown_epochs = 0;
  cfg.train.minutes = -1;
  test::expect_error([&] { train::train_model(cfg, {}); }, {"train.minutes = -1: expected >= 0"});
}
