// Distributed training on real c10d process groups over loopback: the
// collectives against their definitions, data-parallel training against one
// process with the same global batch, a checkpoint of 2 ranks resumed on 1 and
// on 4, and a killed rank making the other fail within the timeout.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <regex>
#include <thread>

#include "moev/dist/communicator.h"
#include "moev/train/checkpoint.h"
#include "moev/train/trained_model.h"
#include "support/free_port.h"
#include "support/resume_mark.h"
#include "support/run_cli.h"
#include "support/temp_dir.h"

namespace {


// Tiny V-MoE, big steps (no warmup, high lr) so that a wrong gradient moves the
// weights far more than float rounding does.
const std::string kRun =
    "train --model vmoe-tiny --set model.width=32 --set model.depth=2 --set model.heads=2 "
    "--set model.mlp_dim=64 --moe last-1 --experts 4 --set data.train_limit=512 --set data.test_limit=64 "
    "--batch-size 64 --lr 0.01 --set train.warmup_steps=0 --set train.progress=false "
    "--set train.eval_each_epoch=false --set train.checkpoint_every=0 --set train.dist_timeout=20 ";

std::map<std::string, at::Tensor> weights(const std::string& dir) {
  return moev::train::load_checkpoint(dir + "/checkpoint.pt").model;
}

// Largest absolute difference over all tensors of two checkpoints' models.
double max_diff(const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (const auto& [name, t] : a) {
    auto it = b.find(name);
    if (it == b.end()) {
      ADD_FAILURE() << "missing " << name;
      continue;
    }
    m = std::max(m, (t.to(torch::kDouble) - it->second.to(torch::kDouble)).abs().max().item<double>());
  }
  return m;
}

std::string launch(int nproc) { return "launch --nproc " + std::to_string(nproc) + " --master-port " +
                                       std::to_string(moev::test::free_port()) + " -- "; }

}  // namespace

TEST(Communicator, CollectivesOverLoopbackMatchTheirDefinitions) {
  const int port = moev::test::free_port();
  std::vector<at::Tensor> summed(2), bcast(2), a2a(2);
  auto rank_main = [&](int rank) {
    moev::dist::Communicator comm(moev::test::loopback_job(rank, 2, port));
    // Two dtypes and a bucket limit that forces several buckets.
    auto f = torch::full({3, 5}, float(rank + 1)), d = torch::arange(7, torch::kDouble) * (rank + 1);
    auto g = torch::full({1000}, float(10 * rank));
    comm.all_reduce_sum({f, d, g}, /*bucket_bytes=*/64);
    summed[rank] = torch::cat({f.flatten().to(torch::kDouble), d, g.to(torch::kDouble)});
    auto b = torch::full({4}, float(rank + 7));
    comm.broadcast({b}, /*root=*/1);
    bcast[rank] = b;
    // Rank 0 sends 1 row to itself and 2 to rank 1; rank 1 sends 3 to rank 0, 0 to itself.
    const std::vector<int64_t> send = rank == 0 ? std::vector<int64_t>{1, 2} : std::vector<int64_t>{3, 0};
    const std::vector<int64_t> recv = rank == 0 ? std::vector<int64_t>{1, 3} : std::vector<int64_t>{2, 0};
    auto rows = torch::arange(send[0] + send[1], torch::kFloat).unsqueeze(1).repeat({1, 2}) + 100 * rank;
    a2a[rank] = comm.all_to_all(rows, send, recv);
    comm.barrier();
  };
  std::thread t1(rank_main, 1);
  rank_main(0);
  t1.join();
  auto want = torch::cat({torch::full({15}, 3.0, torch::kDouble), torch::arange(7, torch::kDouble) * 3,
                          torch::full({1000}, 10.0, torch::kDouble)});
  EXPECT_TRUE(torch::equal(summed[0], want));
  EXPECT_TRUE(torch::equal(summed[1], want));
  EXPECT_TRUE(torch::equal(bcast[0], torch::full({4}, 8.0f)));
  EXPECT_TRUE(torch::equal(bcast[1], torch::full({4}, 8.0f)));
  // Rank 0 gets its own row 0, then rank 1's rows 0..2; rank 1 gets rank 0's rows 1..2.
  EXPECT_TRUE(torch::equal(a2a[0].select(1, 0), torch::tensor({0.f, 100.f, 101.f, 102.f})));
  EXPECT_TRUE(torch::equal(a2a[1].select(1, 0), torch::tensor({1.f, 2.f})));
}

TEST(DataParallel, TwoRanksTrainLikeOneProcessWithTheSameGlobalBatch) {
  moev::test::TempDir dir;
  // One process, the batch cut into 2 replicas; 2 ranks of 1 replica each.
  // Two steps: a step of lr 0.01 moves most weights by ~0.01 (Adam's first steps
  // are sign-like), so a gradient missing half the batch shows at once; more
  // steps would only let Adam blow last-bit differences up in parameters whose
  // true gradient is zero (the key bias of attention).
  auto one = moev::test::run_cli(kRun + "--threads 2 --set train.replicas=2 --max-steps 2 --out " + dir.file("one"));
  ASSERT_EQ(one.code, 0) << one.out;
  auto two = moev::test::run_cli(launch(2) + kRun + "--threads 1 --set train.replicas=1 --max-steps 2 --out " +
                                 dir.file("two"));
  ASSERT_EQ(two.code, 0) << two.out;
  EXPECT_NE(two.out.find("[rank 1] rank 1 of 2: paused after 2 steps"), std::string::npos) << two.out;
  // Same routing noise (per global replica), same slices, gradients summed a + b
  // either way: equal up to float rounding, which Adam's second step magnifies
  // where the true gradient is ~0 (measured: 3e-7 after one step, 6e-5 after two).
  const auto want = weights(dir.file("one"));
  const double d = max_diff(want, weights(dir.file("two")));
  EXPECT_LT(d, 5e-4) << "data-parallel weights differ from the single process by " << d;
  // What a rank that skipped the all-reduce would do: step on half the batch.
  auto half = moev::test::run_cli(kRun + "--threads 1 --set train.batch_size=32 --max-steps 2 --out " + dir.file("half"));
  ASSERT_EQ(half.code, 0) << half.out;
  EXPECT_GT(max_diff(want, weights(dir.file("half"))), 5e-3);
}

TEST(DataParallel, CheckpointOfTwoRanksResumesOnOneAndOnFour) {
  moev::test::TempDir dir;
  // Router noise off: with it, the noise streams follow the replica layout.
  const std::string run = kRun + "--set moe.noise_std=0 --threads 1 --set train.replicas=1 ";
  auto full = moev::test::run_cli(launch(2) + run + "--max-steps 3 --out " + dir.file("full"));
  ASSERT_EQ(full.code, 0) << full.out;
  auto half = moev::test::run_cli(launch(2) + run + "--max-steps 2 --out " + dir.file("half"));
  ASSERT_EQ(half.code, 0) << half.out;
  moev::test::mark_log(dir.file("half"));
  for (const char* to : {"on1", "on4"})
    std::filesystem::copy(dir.file("half"), dir.file(to), std::filesystem::copy_options::recursive);
  auto on1 = moev::test::run_cli("train --resume --max-steps 3 --threads 1 --out " + dir.file("on1"));
  ASSERT_EQ(on1.code, 0) << on1.out;
  auto on4 = moev::test::run_cli(launch(4) + "train --resume --max-steps 3 --threads 1 --out " + dir.file("on4"));
  ASSERT_EQ(on4.code, 0) << on4.out;
  const auto want = weights(dir.file("full"));
  // A step of lr 0.01 moves the weights far more than the tolerance below, so a
  // resume that lost the checkpoint, the optimizer state or the step cannot pass.
  EXPECT_GT(max_diff(want, weights(dir.file("half"))), 5e-3);
  EXPECT_LT(max_diff(want, weights(dir.file("on1"))), 5e-4);
  EXPECT_LT(max_diff(want, weights(dir.file("on4"))), 5e-4);
  // Three steps again from the start would match too: the resumed runs kept the cut run's log.
  EXPECT_TRUE(moev::test::log_has_mark(dir.file("on1")));
  EXPECT_TRUE(moev::test::log_has_mark(dir.file("on4")));
}

TEST(DataParallel, KilledRankMakesTheOtherFailWithinTheTimeout) {
  moev::test::TempDir dir;
  const int port = moev::test::free_port();
  const std::string env = "WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port);
  const std::string args =
      kRun + "--threads 1 --epochs 100000 --set train.dist_timeout=10 --out " + dir.file("r");
  const pid_t victim = ::fork();
  ASSERT_GE(victim, 0);
  if (victim == 0) {
    ::setenv("WORLD_SIZE", "2", 1);
    ::setenv("RANK", "1", 1);
    ::setenv("MASTER_ADDR", "127.0.0.1", 1);
    ::setenv("MASTER_PORT", std::to_string(port).c_str(), 1);
    std::freopen("/dev/null", "w", stdout);
    std::freopen("/dev/null", "w", stderr);
    const std::string cmd = std::string(MOEV_CLI_PATH) + " " + args;
    ::execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  moev::test::CliResult survivor{};
  std::thread rank0([&] { survivor = moev::test::run_cli(args, env + " RANK=0"); });
  // Kill rank 1 once training is under way (rank 0 has logged a step).
  const auto log = dir.file("r") + "/log.jsonl";
  for (int i = 0; i < 600 && !(std::filesystem::exists(log) && std::filesystem::file_size(log) > 0); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ::kill(victim, SIGKILL);
  const auto killed = std::chrono::steady_clock::now();
  int st = 0;
  ::waitpid(victim, &st, 0);
  rank0.join();
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - killed).count();
  EXPECT_EQ(survivor.code, 1) << survivor.out;
  EXPECT_NE(survivor.out.find("moev: error: rank 0 of 2"), std::string::npos) << survivor.out;
  EXPECT_EQ(survivor.out.find("terminate called"), std::string::npos) << survivor.out;
  EXPECT_LT(waited, 10 + 5) << "rank 0 took " << waited << " s to notice";
}

// Each rank reads its own config (a file per machine; a pipe only the first
// reader gets): a rank set up for another run trained it silently beside the
// others or hung in a collective. Both ranks fail at once, naming the keys.
TEST(DataParallel, RanksWithAnotherConfigFailNamingTheKeys) {
  moev::test::TempDir dir;
  const std::string env = "WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(moev::test::free_port());
  const std::string args = kRun + "--threads 1 --max-steps 2 --out " + dir.file("r");
  moev::test::CliResult r0{}, r1{};
  std::thread rank0([&] { r0 = moev::test::run_cli(args, env + " RANK=0"); });
  // Threads are each machine's own and may differ; the model may not.
  r1 = moev::test::run_cli(args + " --threads 2 --set model.width=48", env + " RANK=1");
  rank0.join();
  EXPECT_EQ(r0.code, 1) << r0.out;
  EXPECT_EQ(r1.code, 1) << r1.out;
  EXPECT_NE(r1.out.find("rank 1 of 2: its config differs from rank 0's"), std::string::npos) << r1.out;
  EXPECT_NE(r1.out.find("model.width = 48 (rank 0: 32)"), std::string::npos) << r1.out;
  EXPECT_EQ(r1.out.find("train.threads"), std::string::npos) << r1.out;
  EXPECT_NE(r0.out.find("rank 0 of 2: rank(s) 1 have another config"), std::string::npos) << r0.out;
  EXPECT_FALSE(std::filesystem::exists(dir.file("r") + "/checkpoint.pt"));
}

// A rank started with another WORLD_SIZE waited the whole timeout and blamed the network; a RANK given twice
// trained beside its twin until a collective timed out, past train.dist_timeout. Both are named at once now.
TEST(DataParallel, AnotherWorldSizeOrARankGivenTwiceIsNamedAtOnce) {
  moev::test::TempDir dir;
  const std::string env = "MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(moev::test::free_port());
  const std::string args = kRun + "--threads 1 --max-steps 2 --set train.dist_timeout=60 --out " + dir.file("w");
  moev::test::CliResult r0{}, r1{};
  const auto t0 = std::chrono::steady_clock::now();
  std::thread rank0([&] { r0 = moev::test::run_cli(args, env + " WORLD_SIZE=3 RANK=0"); });
  r1 = moev::test::run_cli(args, env + " WORLD_SIZE=2 RANK=1");
  rank0.join();
  EXPECT_LT(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 30);
  EXPECT_EQ(r0.code, 1) << r0.out;
  EXPECT_EQ(r1.code, 1) << r1.out;
  EXPECT_NE(r0.out.find("rank 0: WORLD_SIZE = 3 here, but rank 1 was started with WORLD_SIZE = 2"),
            std::string::npos) << r0.out;
  EXPECT_NE(r1.out.find("rank 1: WORLD_SIZE = 2 here, but rank 0 was started with WORLD_SIZE = 3"),
            std::string::npos) << r1.out;
  // Three processes for two ranks: one of the two rank 1s is refused, the job trains. Both rank 1s start first
  // and wait for rank 0's store, so both have joined before the job can end (a twin started after it found no
  // store and timed out: that is no test of the check).
  const std::string job = "MASTER_ADDR=127.0.0.1 WORLD_SIZE=2 MASTER_PORT=" + std::to_string(moev::test::free_port());
  const std::string run = kRun + "--threads 1 --max-steps 2 --set train.dist_timeout=60 --out ";
  moev::test::CliResult a{}, b{}, c{};
  std::thread tb([&] { b = moev::test::run_cli(run + dir.file("b"), job + " RANK=1"); });
  std::thread tc([&] { c = moev::test::run_cli(run + dir.file("c"), job + " RANK=1"); });
  std::this_thread::sleep_for(std::chrono::seconds(4));
  a = moev::test::run_cli(run + dir.file("a"), job + " RANK=0");
  tb.join();
  tc.join();
  EXPECT_EQ(a.code, 0) << a.out;
  EXPECT_EQ(b.code + c.code, 1) << b.out << c.out;
  const auto& twin = b.code == 1 ? b : c;
  EXPECT_NE(twin.out.find("another process has joined this job"), std::string::npos) << twin.out;
  EXPECT_NE(twin.out.find("as rank 1 already"), std::string::npos) << twin.out;
  EXPECT_TRUE(std::filesystem::exists(dir.file("a") + "/checkpoint.pt"));
}

// Each machine may mount the data under another path (the paths were compared as config keys, so such a job could
// not start); what must agree is the images, which a same-path copy of another version broke without a word.
TEST(DataParallel, RanksMayReadTheDataFromOtherPathsButNotOtherImages) {
  moev::test::TempDir dir;
  namespace fs = std::filesystem;
  const fs::path fmnist = "/usr/share/datasets/fashion-mnist";
  fs::create_directories(dir.file("same"));
  fs::create_directories(dir.file("other"));
  for (const char* f : {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                        "t10k-labels-idx1-ubyte.gz"}) {
    fs::create_symlink(fmnist / f, dir.path() / "same" / f);
    // "other" trains on the test images: the same shapes and header, other pictures.
    const std::string from = std::string(f).rfind("train", 0) == 0 ? "t10k" + std::string(f).substr(5) : f;
    fs::create_symlink(fmnist / from, dir.path() / "other" / f);
  }
  auto job = [&](const std::string& rank1_data, const std::string& out) {
    const std::string env = "WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(moev::test::free_port());
    const std::string args = kRun + "--threads 1 --max-steps 1 --out " + dir.file(out);
    std::pair<moev::test::CliResult, moev::test::CliResult> r;
    std::thread rank0([&] { r.first = moev::test::run_cli(args, env + " RANK=0"); });
    r.second = moev::test::run_cli(args + " --set data.path=" + rank1_data, env + " RANK=1");
    rank0.join();
    return r;
  };
  const auto [a0, a1] = job(dir.file("same"), "a");
  EXPECT_EQ(a0.code, 0) << a0.out;
  EXPECT_EQ(a1.code, 0) << a1.out;
  const auto [b0, b1] = job(dir.file("other"), "b");
  EXPECT_EQ(b0.code, 1) << b0.out;
  EXPECT_EQ(b1.code, 1) << b1.out;
  EXPECT_NE(b1.out.find("rank 1 of 2: its training set " + dir.file("other")), std::string::npos) << b1.out;
  EXPECT_NE(b1.out.find("differs from rank 0's"), std::string::npos) << b1.out;
  EXPECT_NE(b0.out.find("rank 0 of 2: rank(s) 1 read another training set"), std::string::npos) << b0.out;
  EXPECT_FALSE(fs::exists(dir.file("b") + "/checkpoint.pt"));
}

// Whether a process still runs (an orphan's zombie, left for whoever adopted it, does not).
bool running(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (!std::getline(stat, line)) return false;
  const auto close = line.rfind(')');
  return close != std::string::npos && close + 2 < line.size() && line[close + 2] != 'Z';
}

// A launcher killed outright (SIGKILL from a scheduler or the OOM killer) left
// both ranks training on as orphans, into the run directory and under its lock.
TEST(Launch, RanksStopWhenTheLauncherIsKilled) {
  moev::test::TempDir dir;
  const std::string cmd = std::string(MOEV_CLI_PATH) + " " + launch(2) + kRun +
                          "--threads 1 --set data.train_limit=0 --out " + dir.file("r");  // silent for minutes
  const pid_t launcher = ::fork();
  ASSERT_GE(launcher, 0);
  if (launcher == 0) {
    std::freopen("/dev/null", "w", stdout);
    std::freopen("/dev/null", "w", stderr);
    ::execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  const auto log = dir.file("r") + "/log.jsonl";  // the ranks are training once rank 0 has logged a step
  for (int i = 0; i < 600 && !(std::filesystem::exists(log) && std::filesystem::file_size(log) > 0); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::vector<pid_t> ranks;
  std::ifstream children("/proc/" + std::to_string(launcher) + "/task/" + std::to_string(launcher) + "/children");
  for (pid_t pid; children >> pid;) ranks.push_back(pid);
  if (ranks.size() != 2u) ::kill(-launcher, SIGKILL), ::kill(launcher, SIGKILL);
  ASSERT_EQ(ranks.size(), 2u);
  for (pid_t pid : ranks) EXPECT_TRUE(running(pid));
  ::kill(launcher, SIGKILL);
  int st = 0;
  ::waitpid(launcher, &st, 0);
  for (int i = 0; i < 100 && (running(ranks[0]) || running(ranks[1])); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  for (pid_t pid : ranks) {
    EXPECT_FALSE(running(pid)) << "rank " << pid << " outlived its launcher by 10 s";
    if (running(pid)) ::kill(pid, SIGKILL);
  }
}

// A 2-rank job of a thousand epochs, started in the background with its output in dir/out.txt, and whether it
// logged `lines` steps within 60 s (the launcher's pid is <= 0 if it did not start).
namespace {
std::pair<pid_t, bool> start_long_job(const moev::test::TempDir& dir, const std::string& out, int lines) {
  const pid_t launcher = moev::test::start_cli(
      launch(2) + kRun + "--threads 1 --epochs 1000 --set train.log_every=1 --out " + out, dir.file("out.txt"));
  if (launcher <= 0) return {launcher, false};
  return {launcher, moev::test::wait_for_lines(out + "/log.jsonl", lines, 60, launcher)};
}
}  // namespace

// A SIGTERM to one rank (a preempted node) stops the job: the request travels
// with the step's reduced figures, so rank 0, which got no signal, stops at the
// same step and saves it; the job exits 143 and resumes from there.
TEST(Launch, SigtermToOneRankStopsEveryRankAtOneStepAndTheJobResumes) {
  moev::test::TempDir dir;
  const std::string out = dir.file("r");
  const auto [launcher, training] = start_long_job(dir, out, 3);
  ASSERT_GT(launcher, 0);
  std::vector<pid_t> ranks;  // in rank order: the launcher starts rank 0 first
  std::ifstream children("/proc/" + std::to_string(launcher) + "/task/" + std::to_string(launcher) + "/children");
  for (pid_t pid; children >> pid;) ranks.push_back(pid);
  if (!training || ranks.size() != 2u) ::kill(launcher, SIGKILL);
  else ::kill(ranks[1], SIGTERM);
  const int code = moev::test::wait_cli(launcher);
  const auto text = moev::test::bytes_of(dir.file("out.txt"));
  ASSERT_TRUE(training) << text;
  ASSERT_EQ(ranks.size(), 2u) << text;
  EXPECT_EQ(code, 143) << text;  // rank 0's status: stopped as asked, though not signalled itself
  EXPECT_NE(text.find("[rank 1] moev: SIGTERM: stopping"), std::string::npos) << text;
  EXPECT_EQ(text.find("[rank 0] moev: SIGTERM"), std::string::npos) << text;
  EXPECT_NE(text.find("rank 0 stopped on request with status 143"), std::string::npos) << text;
  std::smatch m0, m1;
  ASSERT_TRUE(std::regex_search(text, m0, std::regex("\\[rank 0\\] stopped at step (\\d+) on request"))) << text;
  const std::regex rank1("\\[rank 1\\] rank 1 of 2: stopped after (\\d+) steps");
  ASSERT_TRUE(std::regex_search(text, m1, rank1)) << text;
  EXPECT_EQ(m0[1], m1[1]) << text;
  const int64_t step = std::stoll(m0[1]);
  EXPECT_GE(step, 3);
  EXPECT_EQ(moev::train::load_trained(out + "/checkpoint.pt", c10::Device(c10::kCPU)).step, step);
  const auto r = moev::test::run_cli(launch(2) + "train --out " + out + " --resume --max-steps " +
                                     std::to_string(step + 2));
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("paused at step " + std::to_string(step + 2) + " (train.max_steps"), std::string::npos) << r.out;
}

// Ctrl-C to the launcher: the ranks are asked with SIGTERM (a second SIGINT would stop them unsaved), and the
// launcher exits as Ctrl-C asks, 130, not with the ranks' 143.
TEST(Launch, SigintToTheLauncherStopsTheJobWithStatus130) {
  moev::test::TempDir dir;
  const std::string out = dir.file("r");
  const auto [launcher, training] = start_long_job(dir, out, 2);
  ASSERT_GT(launcher, 0);
  ::kill(launcher, training ? SIGINT : SIGKILL);
  const int code = moev::test::wait_cli(launcher);
  const auto text = moev::test::bytes_of(dir.file("out.txt"));
  ASSERT_TRUE(training) << text;
  EXPECT_EQ(code, 130) << text;
  EXPECT_NE(text.find("rank 0 stopped on request with status 143"), std::string::npos) << text;
  EXPECT_TRUE(std::filesystem::exists(out + "/checkpoint.pt")) << text;
}

// A SIGTERM while rank 0 evaluates ends the evaluation at its next batch, not
// after the whole test set: both ranks stop at the epoch's last step, the
// checkpoint before the epoch's end, and the resumed job makes that evaluation.
// Data parallel, rank 1 follows rank 0's batches and a signal to either counts;
// expert parallel, both run the evaluation. Half the test set (20 batches)
// makes an evaluation of seconds, long enough to be signalled inside.
TEST(Launch, SigtermDuringTheEvaluationStopsTheJobBeforeTheEpochsEnd) {
  struct Mode {
    const char* name;
    std::string flags;
    int signalled;  // the rank sent SIGTERM
  };
  for (const auto& [name, mode, signalled] : {Mode{"data parallel, rank 0", "", 0},
                                              Mode{"data parallel, rank 1", "", 1},
                                              Mode{"expert parallel, rank 0", "--set train.expert_parallel=true ", 0}}) {
    SCOPED_TRACE(name);
    moev::test::TempDir dir;
    const std::string out = dir.file("r");
    const std::string run = kRun + mode + "--threads 1 --epochs 1 --set model.width=192 --set model.mlp_dim=384 "
                                          "--set data.test_limit=5120 --set train.log_every=1 ";
    const pid_t launcher = moev::test::start_cli(launch(2) + run + "--out " + out, dir.file("out.txt"));
    ASSERT_GT(launcher, 0);
    // The line of step 8 (512 images in batches of 64): the epoch's steps are done and its evaluation begins.
    const bool evaluating = moev::test::wait_for_lines(out + "/log.jsonl", 8, 60, launcher);
    std::vector<pid_t> ranks;
    std::ifstream children("/proc/" + std::to_string(launcher) + "/task/" + std::to_string(launcher) + "/children");
    for (pid_t pid; children >> pid;) ranks.push_back(pid);
    if (!evaluating || ranks.size() != 2u) ::kill(launcher, SIGKILL);
    else ::kill(ranks[signalled], SIGTERM);
    const int code = moev::test::wait_cli(launcher);
    const auto text = moev::test::bytes_of(dir.file("out.txt"));
    ASSERT_TRUE(evaluating) << text;
    EXPECT_EQ(code, 143) << text;
    EXPECT_NE(text.find("[rank 0] stopped at step 8 on request"), std::string::npos) << text;
    EXPECT_NE(text.find("[rank 1] rank 1 of 2: stopped after 8 steps"), std::string::npos) << text;
    EXPECT_EQ(moev::test::bytes_of(out + "/log.jsonl").find("\"eval\""), std::string::npos) << "evaluated in full";
    const auto r = moev::test::run_cli(launch(2) + "train --out " + out + " --resume");
    EXPECT_EQ(r.code, 0) << r.out;
    EXPECT_NE(r.out.find("trained 8 steps (1 epoch)"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("test top-1"), std::string::npos) << r.out;
    EXPECT_NE(moev::test::bytes_of(out + "/log.jsonl").find("\"eval\""), std::string::npos);
  }
}

// Rank 0 cannot serve the store (its port is taken): it says so at once, and
// the launcher stops the other rank within seconds instead of letting it wait
// out its timeout; bad launcher flags and commands that are not distributed
// are refused before any rank starts.
// A rank killed from outside is the cause; rank 0's all-reduce error its effect. The launcher named rank 0 first
// and exited with its status 1: it reported by rank index, not in the order the ranks ended.
TEST(Launch, AKilledRankIsNamedFirstAndItsStatusIsTheLaunchers) {
  moev::test::TempDir dir;
  const auto [launcher, started] = start_long_job(dir, dir.file("r"), 2);
  ASSERT_GT(launcher, 0);
  if (!started) ::kill(launcher, SIGKILL);
  ASSERT_TRUE(started) << moev::test::bytes_of(dir.file("out.txt"));
  pid_t rank1 = -1;  // the child whose environment says RANK=1
  std::ifstream children("/proc/" + std::to_string(launcher) + "/task/" + std::to_string(launcher) + "/children");
  for (pid_t pid; children >> pid;) {
    std::ifstream env("/proc/" + std::to_string(pid) + "/environ", std::ios::binary);
    for (std::string var; std::getline(env, var, '\0');)
      if (var == "RANK=1") rank1 = pid;
  }
  if (rank1 <= 0) ::kill(launcher, SIGKILL);
  ASSERT_GT(rank1, 0);
  ::kill(rank1, SIGKILL);
  EXPECT_EQ(moev::test::wait_cli(launcher), 137);
  const std::string out = moev::test::bytes_of(dir.file("out.txt"));
  const auto killed = out.find("moev launch: rank 1 was ended by signal 9 (status 137)");
  ASSERT_NE(killed, std::string::npos) << out;
  const auto effect = out.find("moev launch: rank 0 exited with status 1");
  ASSERT_NE(effect, std::string::npos) << out;
  EXPECT_LT(killed, effect) << out;
}

TEST(Launch, AFailedRankStopsTheJobAndBadFlagsAreRefused) {
  moev::test::TempDir dir;
  const int held = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = 0;
  ASSERT_EQ(::bind(held, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  ASSERT_EQ(::listen(held, 8), 0);
  socklen_t len = sizeof a;
  ::getsockname(held, reinterpret_cast<sockaddr*>(&a), &len);
  const auto start = std::chrono::steady_clock::now();
  auto r = moev::test::run_cli("launch --nproc 2 --master-port " + std::to_string(ntohs(a.sin_port)) + " -- " + kRun +
                               "--threads 1 --max-steps 2 --set train.dist_timeout=60 --out " + dir.file("r"));
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  ::close(held);
  EXPECT_NE(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("is in use on this machine"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("rank 1 was ended by signal 15"), std::string::npos) << r.out;  // stopped, not timed out
  // Reported in the order they ended, the cause first, and its status is the launcher's.
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_LT(r.out.find("moev launch: rank 0 exited with status 1"), r.out.find("rank 1 was ended by signal 15"))
      << r.out;
  EXPECT_LT(took, 45) << r.out;
  for (const auto& [args, needle] : std::vector<std::pair<std::string, std::string>>{
           {"launch --nproc 0 -- train", "--nproc 0: expected 1..1024"},
           {"launch --nproc 2000000000 -- train", "--nproc 2000000000"},
           {"launch --master-port 70000 -- train", "--master-port 70000"},
           {"launch --nproc 2 -- sweep --config x.toml", "'sweep' does not run as ranks"},
           {"launch --nproc 2 -- train --config /dev/null", "--config /dev/null: not a regular file"},
           // Without the --, train's flags were read as launch's, with no word on where they go.
           {"launch --nproc 2 train --epochs 1", "--epochs; the command's own flags go after --"}}) {
    auto bad = moev::test::run_cli(args);
    EXPECT_EQ(bad.code, 1) << args << ": " << bad.out;
    EXPECT_NE(bad.out.find(needle), std::string::npos) << args << ": " << bad.out;
    EXPECT_EQ(bad.out.find("[rank"), std::string::npos) << args << ": started ranks: " << bad.out;
  }
  // Far more ranks than cores (1000 on 2 ran into the rendezvous timeout): refused before any starts.
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (16 * cores < 1024) {
    const std::string args = "launch --nproc " + std::to_string(16 * cores + 1) + " -- train";
    auto many = moev::test::run_cli(args);
    EXPECT_EQ(many.code, 1) << args << ": " << many.out;
    EXPECT_NE(many.out.find("expected at most " + std::to_string(16 * cores)), std::string::npos) << many.out;
    EXPECT_EQ(many.out.find("[rank"), std::string::npos) << args << ": started ranks: " << many.out;
  }
}

TEST(ExpertParallel, TrainingMatchesDataParallelAndItsCheckpointLoadsAnywhere) {
  moev::test::TempDir dir;
  // Router noise off: routing is then the same however the experts are placed.
  const std::string run = kRun + "--set moe.noise_std=0 --threads 1 --set train.replicas=1 ";
  auto dp = moev::test::run_cli(launch(2) + run + "--max-steps 2 --out " + dir.file("dp"));
  ASSERT_EQ(dp.code, 0) << dp.out;
  auto ep = moev::test::run_cli(launch(2) + run + "--set train.expert_parallel=true --max-steps 2 --out " +
                                dir.file("ep"));
  ASSERT_EQ(ep.code, 0) << ep.out;
  // The checkpoint holds all 4 experts, gathered from the 2 ranks.
  const auto ckpt = moev::train::load_checkpoint(dir.file("ep") + "/checkpoint.pt");
  EXPECT_EQ(ckpt.model.at("blocks.1.moe.experts.w1").size(0), 4);
  EXPECT_EQ(ckpt.optimizer.at("blocks.1.moe.experts.w1.exp_avg").size(0), 4);
  EXPECT_LT(max_diff(weights(dir.file("dp")), weights(dir.file("ep"))), 5e-4);
  auto info = moev::test::run_cli("checkpoint info " + dir.file("ep") + "/checkpoint.pt");
  EXPECT_EQ(info.code, 0) << info.out;
  EXPECT_NE(info.out.find("written by   2 rank(s), experts split over them"), std::string::npos) << info.out;
  EXPECT_NE(info.out.find("blocks.1.moe.experts.w1 [4, 32, 64]"), std::string::npos) << info.out;
  // Resumed by one process, and by 2 ranks again with the experts split.
  moev::test::mark_log(dir.file("ep"));
  std::filesystem::copy(dir.file("ep"), dir.file("on1"), std::filesystem::copy_options::recursive);
  auto on1 = moev::test::run_cli("train --resume --max-steps 3 --threads 1 --out " + dir.file("on1"));
  ASSERT_EQ(on1.code, 0) << on1.out;
  auto again = moev::test::run_cli(launch(2) + "train --resume --max-steps 3 --threads 1 --out " + dir.file("ep"));
  ASSERT_EQ(again.code, 0) << again.out;
  EXPECT_LT(max_diff(weights(dir.file("on1")), weights(dir.file("ep"))), 5e-4);
  EXPECT_TRUE(moev::test::log_has_mark(dir.file("on1")));
  EXPECT_TRUE(moev::test::log_has_mark(dir.file("ep")));
  // Experts that do not split over the ranks: a clear error on every rank.
  auto bad = moev::test::run_cli(launch(2) + kRun + "--set moe.num_experts=3 --set train.expert_parallel=true --max-steps 1 "
                                 "--threads 1 --out " + dir.file("bad"));
  EXPECT_NE(bad.code, 0);
  EXPECT_NE(bad.out.find("moe.num_experts = 3 does not split evenly over the 2 ranks"), std::string::npos)
      << bad.out;
}
