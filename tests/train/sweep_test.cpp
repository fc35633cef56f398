// The sweep's own pieces, below the CLI: a stop request after a run's last step
// stops the sweep there, and the same sweep again scores the run without
// training it further.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "moev/core/error.h"
#include "moev/train/checkpoint.h"
#include "moev/train/sweep.h"
#include "support/expect_error.h"
#include "support/stop_when_seen.h"
#include "support/temp_dir.h"
#include "support/tiny_vmoe.h"

using namespace moev;

namespace {
// One grid point: a tiny V-MoE, 2 steps of 64 images, scored on 256 test images.
train::SweepRun tiny_run(const std::string& name) {
  train::SweepRun run;
  run.name = name;
  run.model = "vmoe-tiny";
  run.placement = "last-1";
  run.experts = 4;
  run.k = 1;
  run.cfg.model = test::tiny_vmoe();
  run.cfg.data.train_limit = 128;
  run.cfg.data.test_limit = 256;
  run.cfg.train.batch_size = 64;
  run.cfg.train.epochs = 1;
  run.cfg.train.threads = 1;
  return run;
}
}  // namespace

// A run's score is its own last evaluation (the sweep scored each run a second
// time from its checkpoint): stopped before that evaluation, the resumed run
// makes it, and the sweep takes its figures.
TEST(Sweep, AStopAfterARunsLastStepStopsTheSweepAndTheSweepAgainScoresIt) {
  test::TempDir dir;
  const auto run = tiny_run("tiny_e4_last-1_k1");
  const std::string out = dir.file("sweep");
  test::StopWhenSeen progress(" 2/2 ");  // the bar at the last of 2 steps
  try {
    train::run_sweep({run}, out, &progress, false, progress.flag());
    ADD_FAILURE() << "the sweep did not stop";
  } catch (const Stopped& e) {
    EXPECT_NE(std::string(e.what()).find("stopped in run tiny_e4_last-1_k1 at step 2"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(progress.raised());
  const auto run_dir = std::filesystem::path(out) / run.name;
  EXPECT_TRUE(std::filesystem::exists(run_dir / "checkpoint.pt"));
  EXPECT_FALSE(std::filesystem::exists(run_dir / "result.json"));
  const auto rows = train::run_sweep({run}, out, nullptr, false);
  ASSERT_EQ(rows.size(), 1u);
  EXPECT_GT(rows[0].top1, 0);  // scored: not a blank row
  EXPECT_GT(rows[0].eval_images_per_s, 0);
  EXPECT_TRUE(std::filesystem::exists(run_dir / "result.json"));
  const auto state = train::load_checkpoint((run_dir / "checkpoint.pt").string(), train::CheckpointLoad::kConfig);
  EXPECT_EQ(nlohmann::json::parse(state.state_json).at("step"), 2);  // not trained further
  // The row is the run's logged evaluation, its measured rate too: not a second one.
  std::ifstream log(run_dir / "log.jsonl");
  nlohmann::json logged;
  for (std::string line; std::getline(log, line);)
    if (line.find("\"eval\"") != std::string::npos) logged = nlohmann::json::parse(line).at("eval");
  ASSERT_TRUE(logged.is_object());
  EXPECT_EQ(rows[0].top1, logged.at("top1").get<double>());
  EXPECT_EQ(rows[0].eval_images_per_s, logged.at("images_per_s").get<double>());
}

// A run paused at train.max_steps has no score: the sweep says so (it scored the half-trained run as done).
TEST(Sweep, ARunPausedAtMaxStepsIsNotScored) {
  test::TempDir dir;
  auto run = tiny_run("tiny");
  run.cfg.train.max_steps = 1;
  test::expect_error([&] { train::run_sweep({run}, dir.file("sweep"), nullptr, false); },
                     {"sweep run tiny paused at train.max_steps = 1", "drop max_steps"});
  EXPECT_FALSE(std::filesystem::exists(std::filesystem::path(dir.file("sweep")) / "tiny" / "result.json"));
}
