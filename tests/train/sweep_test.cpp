// The sweep's own pieces, below the CLI: a stop request while a finished run is
// scored stops the sweep there, and the same sweep again scores it.
#include <gtest/gtest.h>

#include <filesystem>

#include "moev/core/error.h"
#include "moev/train/sweep.h"
#include "support/stop_when_seen.h"
#include "support/temp_dir.h"
#include "support/tiny_vmoe.h"

using namespace moev;

// The trainer's last evaluation line comes after the run's own stop check: the
// stop lands in the sweep's evaluation of the run, which ends at its first
// batch rather than scoring the whole test set in a grace period.
TEST(Sweep, AStopDuringARunsScoringStopsTheSweepAndTheSweepAgainScoresIt) {
  test::TempDir dir;
  train::SweepRun run;
  run.name = "tiny_e4_last-1_k1";
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
  const std::string out = dir.file("sweep");
  test::StopWhenSeen progress("epoch 1: test top-1");
  try {
    train::run_sweep({run}, out, &progress, false, progress.flag());
    ADD_FAILURE() << "the sweep did not stop";
  } catch (const Stopped& e) {
    EXPECT_NE(std::string(e.what()).find("while evaluating run tiny_e4_last-1_k1"), std::string::npos) << e.what();
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
}
