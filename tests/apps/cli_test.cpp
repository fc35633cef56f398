// The `moev` binary on bad input: one clear line on stderr naming what is wrong,
// a non-zero exit, never an abort or a backtrace. And the happy path once:
// train a few steps, eval with overrides, predict a PNG.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>

#include <stb/stb_image_write.h>
#include <zlib.h>

#include <nlohmann/json.hpp>

#include "moev/io/table.h"
#include "moev/nn/linear.h"
#include "moev/train/checkpoint.h"
#include "moev/train/trained_model.h"
#include "support/run_cli.h"
#include "support/temp_dir.h"

namespace {

using Result = moev::test::CliResult;
using moev::test::bytes_of;

Result run(const std::string& args) { return moev::test::run_cli(args); }

// A clean failure: exit 1, the needles in the message, no crash traces.
Result expect_clean_failure(const std::string& args, const std::vector<std::string>& needles) {
  auto r = run(args);
  EXPECT_EQ(r.code, 1) << args << "\n" << r.out;
  EXPECT_NE(r.out.find("moev: error: "), std::string::npos) << r.out;
  for (const char* bad : {"terminate called", "frame #", "Aborted", "Exception raised from"})
    EXPECT_EQ(r.out.find(bad), std::string::npos) << r.out;
  for (const auto& n : needles) EXPECT_NE(r.out.find(n), std::string::npos) << "missing " << n << " in\n" << r.out;
  return r;
}

const std::string kTiny =
    "--model vmoe-tiny --set model.width=32 --set model.depth=2 --set model.heads=2 "
    "--set model.mlp_dim=64 --moe last-1 --experts 4 --set data.train_limit=256 "
    "--set data.test_limit=128 --batch-size 64 --threads 1 --set train.progress=false ";

}  // namespace

TEST(Cli, BadInputsFailCleanly) {
  moev::test::TempDir dir;
  expect_clean_failure("train " + kTiny + "--data " + dir.file("nope") + " --out " + dir.file("r"),
                       {dir.file("nope"), "dataset-fashion-mnist"});
  // Keys the model does not read were trained as if unset: a ConvNeXt's heads, a dense ViT's experts.
  expect_clean_failure("train --model convnext-tiny --set model.heads=3 --print-config",
                       {"model.heads is set, but a convnext model does not read it (vit models do)"});
  expect_clean_failure("train --model vit-tiny --experts 4 --print-config",
                       {"moe.num_experts is set, but model.moe = none"});
  expect_clean_failure("train --config \"\" --print-config", {"--config: an empty path"});
  // A value out of range names the file that set it (the message named the key alone).
  std::ofstream(dir.file("huge.toml")) << "[train]\nepochs = 2000000000\n";
  expect_clean_failure("train --config " + dir.file("huge.toml") + " --print-config",
                       {"train.epochs = 2000000000: expected 1..2^30 (set in " + dir.file("huge.toml") + ")"});
  expect_clean_failure("train --set train.multilabel_loss=foo --print-config", {"train.multilabel_loss = 'foo'"});
  // --print-config refuses what the run refuses (these printed at exit 0).
  expect_clean_failure("train --set data.test_limit=-5 --print-config", {"data.test_limit = -5: expected >= 0"});
  expect_clean_failure("train --device gpu --print-config", {"train.device (--device) = gpu"});
  // A folder's or a manifest's keys with IDX data were set and unread.
  expect_clean_failure("train --set data.test_path=/tmp --print-config",
                       {"data.test_path = /tmp: data.format = fashion-mnist reads its test set from data.path"});
  // A truncated IDX file: the first half of the real training images.
  std::filesystem::create_directories(dir.file("trunc"));
  for (const char* f : {"t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                        "train-labels-idx1-ubyte.gz"})
    std::filesystem::copy_file(std::string("/usr/share/datasets/fashion-mnist/") + f,
                               dir.file("trunc") + "/" + f);
  {
    gzFile in = gzopen("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz", "rb");
    gzFile out = gzopen((dir.file("trunc") + "/train-images-idx3-ubyte.gz").c_str(), "wb");
    std::vector<char> buf(1 << 20);
    for (int i = 0; i < 10; ++i) {
      const int n = gzread(in, buf.data(), static_cast<unsigned>(buf.size()));
      gzwrite(out, buf.data(), static_cast<unsigned>(n));
    }
    gzclose(in);
    gzclose(out);
  }
  expect_clean_failure("train " + kTiny + "--data " + dir.file("trunc") + " --out " + dir.file("r"),
                       {"train-images-idx3-ubyte.gz"});
  std::ofstream(dir.file("bad.toml")) << "[moe]\nexperts = 4\n";
  expect_clean_failure("train --config " + dir.file("bad.toml"), {"bad.toml", "moe.experts"});
  // --model names the preset in place of the file's (it lost to it without a word), the file's other model
  // keys still applying. Of a shorthand and --set for one key the later wins (--set won whatever the order).
  std::ofstream(dir.file("vmoe.toml")) << "[model]\npreset = \"vmoe-tiny\"\nstem_channels = 24\n"
                                       << "[train]\nepochs = 7\n";
  for (const auto& [flags, epochs] : std::vector<std::pair<std::string, int>>{
           {"--epochs 3", 3}, {"--set train.epochs=5 --epochs 3", 3}, {"--epochs 3 --set train.epochs=5", 5},
           {"--set train.epochs=4 --epochs 3 --set train.epochs=5 --epochs 2", 2}}) {
    auto printed = run("train --config " + dir.file("vmoe.toml") + " --set model.width=48 --model convnext-iso-tiny " +
                       flags + " --print-config");
    ASSERT_EQ(printed.code, 0) << printed.out;
    const auto resolved = nlohmann::json::parse(printed.out);
    EXPECT_EQ(resolved.at("model").at("family"), "convnext-iso") << flags << printed.out;
    EXPECT_EQ(resolved.at("model").at("width"), 48) << flags << printed.out;  // the preset goes first
    EXPECT_EQ(resolved.at("model").at("stem_channels"), 24) << flags << printed.out;
    EXPECT_EQ(resolved.at("train").at("epochs"), epochs) << flags;
  }
  expect_clean_failure("train " + kTiny + "--set moe.k=5", {"moe.k = 5", "moe.num_experts = 4"});
  expect_clean_failure("train " + kTiny + "--set moe.capacity=-1", {"moe.capacity"});
  // Top-K settings Expert-Choice would ignore (it trained without them at exit 0).
  expect_clean_failure("train " + kTiny + "--set moe.router=expert_choice --set moe.bpr=true --out " + dir.file("r"),
                       {"moe.bpr = true with moe.router = expert_choice"});
  expect_clean_failure("train " + kTiny + "--set data.crop_padding=-2 --out " + dir.file("r"), {"data.crop_padding = -2"});
  // A list with a stray comma became one path of that name, refused only when the teacher was read.
  expect_clean_failure("train " + kTiny + "--set 'train.teacher=[\"a.pt\",]' --out " + dir.file("r"),
                       {"train.teacher=[\"a.pt\",]", "does not parse", "expected JSON"});
  // A cool-down lengthens the run past train.epochs: said before training, not only in the summary.
  auto cd = run("train " + kTiny + "--epochs 1 --set train.cooldown_epochs=1 --max-steps 1 --set train.progress=true "
                "--out " + dir.file("cd"));
  EXPECT_EQ(cd.code, 0) << cd.out;
  EXPECT_NE(cd.out.find("note: train.epochs = 1 and then train.cooldown_epochs = 1 at train.cooldown_lr = "),
            std::string::npos) << cd.out;
  expect_clean_failure("train " + kTiny + "--set data.crop_padding=15 --out " + dir.file("r"),
                       {"data.crop_padding = 15", "at most half the 28-pixel image side (14)"});
  expect_clean_failure("train " + kTiny + "--set data.random_erase=2 --out " + dir.file("r"), {"data.random_erase = 2"});
  expect_clean_failure("train " + kTiny + "--device cuda", {"train.device (--device) = cuda"});
  expect_clean_failure("eval " + dir.file("missing.pt") + " --device gpu", {"--device gpu: unknown device"});
  expect_clean_failure("train " + kTiny + "--set data.resize=crop", {"data.resize = 'crop'", "center_crop"});
  expect_clean_failure("train " + kTiny + "--set data.resize=center_crop",
                       {"data.resize = center_crop", "folder or manifest", "fashion-mnist"});
  expect_clean_failure("train " + kTiny + "--device cpu:1",
                       {"train.device (--device) = cpu:1", "one CPU device", "--threads"});
  // Raw std::filesystem text before, naming neither the key nor the flag; an empty --moe made the model dense.
  std::ofstream(dir.file("afile")) << "x";
  expect_clean_failure("train " + kTiny + "--out " + dir.file("afile"), {"train.out_dir = ", "afile", "--out DIR"});
  expect_clean_failure("train " + kTiny + "--out " + dir.file("afile") + "/sub",
                       {"train.out_dir = ", "Not a directory", "--out DIR"});
  expect_clean_failure("train " + kTiny + "--set train.out_dir=", {"train.out_dir is empty"});
  expect_clean_failure("train " + kTiny + "--set model.moe=", {"model.moe is empty"});
  auto one_block = run("train " + kTiny + "--moe 1 --print-config");
  ASSERT_EQ(one_block.code, 0) << one_block.out;
  EXPECT_NE(one_block.out.find("\"moe\": \"1\""), std::string::npos) << one_block.out;
  expect_clean_failure("train --model vmoe-tiny --set train.threads=100000 --out " + dir.file("r"),
                       {"threads = 100000", "expected 0..1024"});
  expect_clean_failure("eval " + dir.file("missing.pt") + " --threads -2", {"threads = -2"});
  expect_clean_failure("eval " + dir.file("missing.pt"), {"missing.pt"});
  std::ofstream(dir.file("junk.pt")) << "not a checkpoint";
  expect_clean_failure("eval " + dir.file("junk.pt"), {"junk.pt", "not a moev checkpoint"});
  // A pipe with no writer used to block the open for ever.
  ASSERT_EQ(::mkfifo(dir.file("fifo.pt").c_str(), 0644), 0);
  expect_clean_failure("checkpoint info " + dir.file("fifo.pt"), {"fifo.pt", "not a regular file"});
  // A word that is not a subcommand is named, with the ones there are.
  expect_clean_failure("bogus", {"moev: error: 'bogus' is not a subcommand", "train, eval"});
  // With --help too: it printed hardmoe's help at status 0, as if `hardmoe eval` were a command.
  expect_clean_failure("hardmoe eval --help", {"moev hardmoe: 'eval' is not a subcommand", "cluster, train-expert"});
  // CLI11's usage errors read as moev's do (they exited 106-109, without the prefix), naming the command's help.
  expect_clean_failure("train --bogus-flag", {"--bogus-flag", "moev train --help"});
  expect_clean_failure("data mosaic --train", {"--train", "moev data mosaic --help"});
  expect_clean_failure("checkpoint bogus", {"moev checkpoint", "'bogus'", "info"});
  expect_clean_failure("data", {"moev data", "a subcommand is required", "mosaic"});
  // Named by the form people write (the error named --checkpoint alone, the help marked both forms REQUIRED).
  expect_clean_failure("eval", {"no checkpoint given", "moev eval CHECKPOINT"});
  expect_clean_failure("analyze", {"no checkpoint given", "moev analyze CHECKPOINT"});
  expect_clean_failure("train --set model.preset=vit-tiny --model vmoe-tiny --print-config",
                       {"--model vmoe-tiny and --set model.preset", "give one"});
  {  // A rank started by hand without MASTER_ADDR waited out the timeout without a word, then named no address.
    const std::string port = std::to_string(20000 + ::getpid() % 20000);
    const auto r = moev::test::run_cli("train --model vit-tiny --set train.dist_timeout=2 --out " + dir.file("dist"),
                                       "WORLD_SIZE=2 RANK=0 MASTER_PORT=" + port);
    EXPECT_EQ(r.code, 1) << r.out;
    for (const std::string& n : std::vector<std::string>{"MASTER_ADDR or MASTER_PORT is not set", "127.0.0.1:" + port,
                                                          "waiting up to 2 s", "are all 2 ranks started"})
      EXPECT_NE(r.out.find(n), std::string::npos) << n << " missing in " << r.out;
    // A rank whose rank 0 never comes: moev's one line, without LibTorch's glog lines before it.
    const auto alone = moev::test::run_cli("train --model vit-tiny --set train.dist_timeout=1 --out " + dir.file("d1"),
                                           "WORLD_SIZE=2 RANK=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + port);
    EXPECT_EQ(alone.code, 1) << alone.out;
    EXPECT_EQ(alone.out.rfind("moev: error: rank 1: rendezvous at MASTER_ADDR:MASTER_PORT = 127.0.0.1:" + port, 0), 0u)
        << alone.out;
    EXPECT_EQ(alone.out.find("InitGoogleLogging"), std::string::npos) << alone.out;
    EXPECT_EQ(alone.out.find("socket.cpp"), std::string::npos) << alone.out;
  }
  EXPECT_EQ(run("eval --help").out.find("REQUIRED"), std::string::npos);
}

// A scheduler's SIGTERM (or Ctrl-C) before its SIGKILL: the run saves the step
// in progress, says how to go on and exits 143; nothing since the last
// checkpoint is lost (here there is none before: checkpoint_every = 0).
namespace {
// A closed terminal's SIGHUP (a dropped ssh session) killed the run without saving: it stops as SIGTERM asks.
void expect_stop_saves_and_resumes(int sig, const std::string& said) {
  moev::test::TempDir dir;
  const std::string out = dir.file("run");
  const pid_t pid = moev::test::start_cli("train " + kTiny +
                                              "--epochs 500 --set train.checkpoint_every=0 --set train.log_every=1 "
                                              "--set train.eval_each_epoch=false --out " + out,
                                          dir.file("out.txt"));
  ASSERT_GT(pid, 0);
  const bool training = moev::test::wait_for_lines(out + "/log.jsonl", 3, 60, pid);
  ::kill(pid, training ? sig : SIGKILL);  // not training after a minute: no run of 2000 steps to wait for
  const int code = moev::test::wait_cli(pid);
  const auto text = bytes_of(dir.file("out.txt"));
  ASSERT_TRUE(training) << text;
  EXPECT_EQ(code, 128 + sig) << text;
  EXPECT_NE(text.find(said), std::string::npos) << text;
  EXPECT_NE(text.find("continue with: moev train --out " + out + " --resume"), std::string::npos) << text;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(text, m, std::regex("stopped at step (\\d+) on request"))) << text;
  const int64_t step = std::stoll(m[1]);
  EXPECT_GE(step, 3);
  EXPECT_EQ(moev::train::load_trained(out + "/checkpoint.pt", c10::Device(c10::kCPU)).step, step);
  const auto r = run("train --out " + out + " --resume --max-steps " + std::to_string(step + 2));
  EXPECT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("paused at step " + std::to_string(step + 2) + " (train.max_steps"), std::string::npos) << r.out;
}
}  // namespace

TEST(Cli, SigtermSavesTheStepInProgressAndTheRunResumes) {
  expect_stop_saves_and_resumes(SIGTERM, "moev: SIGTERM: stopping; a run in training saves a checkpoint");
  expect_stop_saves_and_resumes(SIGHUP, "moev: SIGHUP (its terminal closed): stopping; a run in training saves");
}

TEST(Cli, TrainEvalPredictAndBadPredictInput) {
  moev::test::TempDir dir;
  const std::string out = dir.file("run");
  auto t = run("train " + kTiny + "--epochs 1 --out " + out);
  ASSERT_EQ(t.code, 0) << t.out;
  EXPECT_NE(t.out.find("trained 4 steps"), std::string::npos) << t.out;
  const std::string ckpt = out + "/checkpoint.pt";

  auto e = run("eval " + ckpt + " --limit 128 --capacity 0.5 --bpr on --k 1 --json");
  ASSERT_EQ(e.code, 0) << e.out;
  EXPECT_NE(e.out.find("\"top1\""), std::string::npos) << e.out;
  EXPECT_NE(e.out.find("\"dropped\""), std::string::npos) << e.out;
  // The overrides are applied, not just accepted: capacity 0.5 of K = 1 leaves at least half the tokens
  // unplaced, capacity 4 = E none (stderr, the progress bar, kept out of the JSON).
  auto dropped = [&](const std::string& flags) {
    const auto r = run("eval " + ckpt + " --limit 128 --k 1 --json " + flags + " 2>/dev/null; true");
    const auto j = nlohmann::json::parse(r.out);
    return j.at("dropped").at(0).get<double>();
  };
  EXPECT_GE(dropped("--capacity 0.5"), 0.5);
  EXPECT_EQ(dropped("--capacity 4"), 0.0);
  const auto raw = run("eval " + ckpt + " --limit 128 --raw-weights");  // a run without an average: said
  EXPECT_EQ(raw.code, 0) << raw.out;
  EXPECT_NE(raw.out.find("trained without a weight average"), std::string::npos) << raw.out;
  {  // K = 1: a token whose one choice is dropped has no expert left
    const auto j = nlohmann::json::parse(run("eval " + ckpt + " --limit 128 --k 1 --json --capacity 0.5 2>/dev/null").out);
    EXPECT_GE(j.at("dropped").at(0).get<double>(), 0.5);
    EXPECT_EQ(j.at("unrouted").at(0).get<double>(), j.at("dropped").at(0).get<double>());
  }
  expect_clean_failure("eval " + ckpt + " --capacity 0", {"--capacity 0: expected a capacity ratio > 0"});
  expect_clean_failure("eval " + ckpt + " --k 7", {"--k 7: expected 1 to the model's moe.num_experts = 4"});
  expect_clean_failure("eval " + ckpt + " --bpr maybe", {"--bpr maybe"});
  // Routing settings that would not apply (dropped 0 at --capacity 0.125 on a dropless model) are refused.
  expect_clean_failure("eval " + ckpt + " --dropless on --capacity 0.5",
                       {"--capacity 0.5", "moe.dropless = true", "--dropless off"});
  expect_clean_failure("eval " + ckpt + " --dropless on --bpr on", {"--bpr on", "moe.dropless = true", "--dropless off"});
  expect_clean_failure("eval " + ckpt + " --tta --shift blur:1", {"--tta with --shift", "one view"});
  // The TTA line read the checkpoint afresh and kept its own routing and weights, whatever the flags said.
  for (const std::string flags : {"--capacity 0.5", "--k 1", "--dropless on", "--raw-weights", "--precision bf16"}) {
    const auto r = run("eval " + ckpt + " --tta " + flags);
    EXPECT_EQ(r.code, 1) << flags << ": " << r.out;
    EXPECT_NE(r.out.find("--tta scores each model as trained"), std::string::npos) << flags << ": " << r.out;
    EXPECT_EQ(r.out.find("top-1"), std::string::npos) << flags << ": refused after an evaluation: " << r.out;
  }
  {
    const auto r = run("eval " + ckpt + " --tta --data /usr/share/datasets/fashion-mnist");
    EXPECT_EQ(r.code, 1) << r.out;
    EXPECT_EQ(r.out.find("top-1"), std::string::npos) << "refused after an evaluation: " << r.out;
  }
  expect_clean_failure("eval " + ckpt + " --format manifest --data " + dir.file("test.csv"),
                       {"single-label data (data.format = 'fashion-mnist')", "multi-label test set"});
  expect_clean_failure("eval " + ckpt + " --router expert_choice --bpr on", {"--bpr on", "expert-choice"});
  {  // A model trained with BPR still switches to Expert-Choice at inference, which has no use for BPR.
    auto c = moev::train::load_checkpoint(ckpt);
    auto cfg = nlohmann::json::parse(c.config_json);
    cfg["moe"]["bpr"] = true;
    c.config_json = cfg.dump();
    moev::train::save_checkpoint(dir.file("bpr.pt"), c);
    const auto ec = run("eval " + dir.file("bpr.pt") + " --limit 64 --router expert_choice");
    EXPECT_EQ(ec.code, 0) << ec.out;
    // An Expert-Choice model saved with BPR set (refused for new runs since; it was ignored) still loads.
    cfg["moe"]["router"] = "expert_choice";
    c.config_json = cfg.dump();
    moev::train::save_checkpoint(dir.file("ec_bpr.pt"), c);
    const auto saved = run("eval " + dir.file("ec_bpr.pt") + " --limit 64");
    EXPECT_EQ(saved.code, 0) << saved.out;
  }
  // Results that cannot be written fail (they were lost at exit 0). A closed stdout is /dev/null, not a failed
  // write (or fd 1 handed to the next file opened).
  for (const std::string& cmd : {"eval " + ckpt + " --limit 64 --json", "checkpoint info " + ckpt}) {
    const auto full = run(cmd + " 2>&1 >/dev/full; echo status $?");  // stderr kept, stdout to the full device
    EXPECT_NE(full.out.find("status 1"), std::string::npos) << cmd << ": " << full.out;
    EXPECT_NE(full.out.find("writing to standard output failed"), std::string::npos) << cmd << ": " << full.out;
  }
  const auto closed = run("eval " + ckpt + " --limit 64 --json >&- 2>/dev/null; echo status $?");
  EXPECT_NE(closed.out.find("status 0"), std::string::npos) << closed.out;

  // Robustness table over two checkpoints (the same one twice: equal columns).
  auto s = run("eval " + ckpt + " " + ckpt + " --limit 64 --shift blur:2 --shift contrast:5 --table " +
               dir.file("shift"));
  ASSERT_EQ(s.code, 0) << s.out;
  {
    std::istringstream csv(bytes_of(dir.file("shift.csv")));
    std::string line;
    int rows = 0;
    for (std::getline(csv, line); std::getline(csv, line); ++rows) {  // shift,<ckpt>,<ckpt>
      const auto a = line.find(','), b = line.find(',', a + 1);
      ASSERT_NE(b, std::string::npos) << line;
      EXPECT_EQ(line.substr(a + 1, b - a - 1), line.substr(b + 1)) << line;
    }
    EXPECT_GE(rows, 3) << bytes_of(dir.file("shift.csv"));
  }
  EXPECT_NE(s.out.find("| blur:2 |"), std::string::npos) << s.out;
  EXPECT_NE(s.out.find("| mean over shifts |"), std::string::npos) << s.out;
  EXPECT_TRUE(std::filesystem::exists(dir.file("shift.csv")));
  expect_clean_failure("eval " + ckpt + " --shift fog:2", {"fog", "gaussian_noise"});
  expect_clean_failure("eval " + ckpt + " --shift blur:7", {"blur:7", "1..5"});
  expect_clean_failure("eval " + ckpt + " --table " + dir.file("t"), {"--table needs --shift"});
  expect_clean_failure("eval " + ckpt + " --shift blur:2 --shift all:2", {"blur:2", "twice"});
  expect_clean_failure("eval " + ckpt + " --shift blur:2 --table ''", {"--table is empty"});
  // --json writes the table too, and keeps stdout for the JSON.
  auto sj = run("eval " + ckpt + " --limit 64 --shift blur:2 --json --table " + dir.file("shift_json"));
  ASSERT_EQ(sj.code, 0) << sj.out;
  EXPECT_TRUE(std::filesystem::exists(dir.file("shift_json.csv")));
  EXPECT_NE(bytes_of(dir.file("shift_json.csv")).find("mean over shifts"), std::string::npos);
  EXPECT_NE(sj.out.find("\"shift\""), std::string::npos) << sj.out;
  // Two models scored on other images (another data.test_limit) are not set side by side.
  auto other = moev::train::load_checkpoint(ckpt);
  auto cfg = nlohmann::json::parse(other.config_json);
  cfg["data"]["test_limit"] = 32;
  other.config_json = cfg.dump();
  moev::train::save_checkpoint(dir.file("other.pt"), other);
  // Refused before the first checkpoint is scored (it came after a full evaluation of it).
  const auto shifted = expect_clean_failure("eval " + ckpt + " " + dir.file("other.pt") + " --shift blur:2",
                                            {"other.pt", "other test images", "data.test_limit"});
  EXPECT_EQ(shifted.out.find("top-1"), std::string::npos) << shifted.out;
  // Limits that both reach past the test set's end name the same images: not refused.
  cfg["data"]["test_limit"] = 20000;
  other.config_json = cfg.dump();
  moev::train::save_checkpoint(dir.file("past.pt"), other);
  cfg["data"]["test_limit"] = 0;
  other.config_json = cfg.dump();
  moev::train::save_checkpoint(dir.file("all.pt"), other);
  const auto past = run("eval " + dir.file("past.pt") + " " + dir.file("all.pt") + " --shift blur:2 --threads 1");
  EXPECT_EQ(past.code, 0) << past.out;
  EXPECT_EQ(run("eval " + ckpt + " " + dir.file("other.pt") + " --limit 64 --shift blur:2").code, 0);

  // Routing analysis: heatmap per MoE layer, report, capacity curve.
  auto a = run("analyze " + ckpt + " --limit 64 --capacity-curve --capacities 0.5 1 --out " +
               dir.file("an"));
  ASSERT_EQ(a.code, 0) << a.out;
  for (const char* f : {"routing_0.png", "routing_weight_0.png", "routing.md", "routing.json", "capacity_curve.png",
                        "capacity_curve.csv"})
    EXPECT_TRUE(std::filesystem::exists(dir.file("an") + "/" + f)) << f;
  EXPECT_NE(a.out.find("specialisation"), std::string::npos) << a.out;
  expect_clean_failure("analyze " + ckpt + " --capacities 0", {"--capacities", "> 0"});
  expect_clean_failure("analyze " + ckpt + " --capacities inf", {"--capacities", "inf"});
  expect_clean_failure("analyze " + ckpt + " --capacities 0.5 0.5", {"--capacities", "0.5 is given twice"});
  expect_clean_failure("analyze " + ckpt + " --capacities 0.5", {"--capacities", "needs --capacity-curve"});
  expect_clean_failure("analyze " + ckpt + " --out " + ckpt, {"--out " + ckpt, "cannot make a directory"});
  expect_clean_failure("analyze " + dir.file("none.pt"), {"none.pt"});

  // A real PNG of a Fashion-MNIST-sized image.
  std::vector<unsigned char> px(28 * 28);
  for (size_t i = 0; i < px.size(); ++i) px[i] = static_cast<unsigned char>(i % 251);
  ASSERT_TRUE(stbi_write_png(dir.file("img.png").c_str(), 28, 28, 1, px.data(), 28));
  auto p = run("predict --checkpoint " + ckpt + " --top 2 --json " + dir.file("img.png"));
  ASSERT_EQ(p.code, 0) << p.out;
  EXPECT_NE(p.out.find("\"probability\""), std::string::npos) << p.out;
  EXPECT_EQ(p.out.find("stretched"), std::string::npos) << p.out;
  // In bf16 the same answer within bf16's rounding; a precision it does not know is named.
  auto top_probability = [](const std::string& out) {
    return nlohmann::json::parse(out).at(0).at("top").at(0).at("probability").get<double>();
  };
  const double p32 = top_probability(p.out);
  // A file's answer is its own: given twice beside other images it gave three different probabilities, since
  // routing groups shared their experts' capacity (each image now routes without a capacity limit).
  std::vector<unsigned char> noise(28 * 28 * 3);
  for (size_t i = 0; i < noise.size(); ++i) noise[i] = static_cast<unsigned char>((i * 97) % 256);
  std::string others;
  for (int i = 0; i < 9; ++i) {
    const std::string f = dir.file("o" + std::to_string(i) + ".png");
    noise[0] = static_cast<unsigned char>(i);
    ASSERT_TRUE(stbi_write_png(f.c_str(), 28, 28, 3, noise.data(), 28 * 3));
    others += f + " ";
  }
  // (The colour files' notes go to stderr, left out here.)
  auto many = run("predict --checkpoint " + ckpt + " --top 2 --json " + others + dir.file("img.png") + " " +
                  dir.file("img.png") + " 2>/dev/null; true");
  ASSERT_EQ(many.code, 0) << many.out;
  const auto m = nlohmann::json::parse(many.out);
  ASSERT_EQ(m.size(), 11u);
  // Equal up to the GEMMs' blocking, which differs with the batch (grouped routing differed by 0.01-0.03).
  const auto alone = nlohmann::json::parse(p.out).at(0).at("top");
  for (size_t i : {9, 10})
    for (size_t j = 0; j < 2; ++j) {
      EXPECT_EQ(m.at(i).at("top").at(j).at("label"), alone.at(j).at("label")) << many.out;
      EXPECT_NEAR(m.at(i).at("top").at(j).at("probability").get<double>(), alone.at(j).at("probability").get<double>(),
                  1e-5) << many.out;
    }
  auto p16 = run("predict --checkpoint " + ckpt + " --top 2 --json --precision bf16 " + dir.file("img.png") +
                 " 2>/dev/null; true");
  EXPECT_NEAR(top_probability(p16.out), p32, 0.02) << p16.out;
  if (!moev::nn::native_bf16()) {  // the flag reached the model: it says it runs fp32 here
    p16 = run("predict --checkpoint " + ckpt + " --precision bf16 " + dir.file("img.png"));
    EXPECT_NE(p16.out.find("model.precision = bf16, but this CPU has no native bf16"), std::string::npos) << p16.out;
  }
  expect_clean_failure("predict --checkpoint " + ckpt + " --precision fp16 " + dir.file("img.png"),
                       {"--precision fp16", "expected fp32 or bf16"});
  // A 3x5 thumbnail is classified, with a note that it was blown up.
  ASSERT_TRUE(stbi_write_png(dir.file("tiny.png").c_str(), 3, 5, 1, px.data(), 3));
  p = run("predict --checkpoint " + ckpt + " " + dir.file("tiny.png"));
  ASSERT_EQ(p.code, 0) << p.out;
  EXPECT_NE(p.out.find("tiny.png is 3x5, stretched more than 2x to the model's 28x28"), std::string::npos) << p.out;
  // A wide photo with transparency: both said (the run stretches; the alpha is dropped).
  std::vector<unsigned char> rgba(40 * 28 * 4, 200);
  ASSERT_TRUE(stbi_write_png(dir.file("wide.png").c_str(), 40, 28, 4, rgba.data(), 40 * 4));
  p = run("predict --checkpoint " + ckpt + " " + dir.file("wide.png") + " " + dir.file("img.png"));
  ASSERT_EQ(p.code, 0) << p.out;
  EXPECT_NE(p.out.find("wide.png has an alpha channel, which is dropped"), std::string::npos) << p.out;
  EXPECT_NE(p.out.find("wide.png is 40x28, squashed to the model's square"), std::string::npos) << p.out;
  EXPECT_NE(p.out.find("wide.png is stored in colour; the model reads it as grey"), std::string::npos) << p.out;
  EXPECT_EQ(p.out.find("img.png has"), std::string::npos) << p.out;
  EXPECT_EQ(p.out.find("img.png is"), std::string::npos) << p.out;
  std::ofstream(dir.file("notes.png")) << "this is text, not an image";
  expect_clean_failure("predict --checkpoint " + ckpt + " " + dir.file("notes.png"), {"notes.png"});
  // Beside readable files, one that is not is said and passed over: the others are classified, the exit is 1.
  p = run("predict --checkpoint " + ckpt + " --top 1 --json " + dir.file("img.png") + " " + dir.file("notes.png") +
          " 2>" + dir.file("err.txt") + "; exit $?");
  EXPECT_EQ(p.code, 1) << p.out;
  const auto partial = nlohmann::json::parse(p.out);
  ASSERT_EQ(partial.size(), 2u) << p.out;
  EXPECT_EQ(partial.at(0).at("top").at(0).at("label"), alone.at(0).at("label")) << p.out;
  EXPECT_NE(partial.at(1).at("error").get<std::string>().find("notes.png"), std::string::npos) << p.out;
  EXPECT_NE(bytes_of(dir.file("err.txt")).find("1 of the 2 files could not be read"), std::string::npos);
  // With --json, one file alone still gets its entry: a script reading the JSON got nothing to parse.
  p = run("predict --checkpoint " + ckpt + " --json " + dir.file("notes.png") + " 2>" + dir.file("err.txt") +
          "; exit $?");
  EXPECT_EQ(p.code, 1) << p.out;
  const auto alone_bad = nlohmann::json::parse(p.out);
  ASSERT_EQ(alone_bad.size(), 1u) << p.out;
  EXPECT_NE(alone_bad.at(0).at("error").get<std::string>().find("notes.png"), std::string::npos) << p.out;
  std::ofstream(dir.file("empty.png")).flush();  // a copy cut off before its first byte
  expect_clean_failure("predict --checkpoint " + ckpt + " " + dir.file("empty.png"), {"empty.png is empty (0 bytes)"});
  // Another architecture's weights as the starting point of a run.
  expect_clean_failure("train " + kTiny + "--set moe.num_experts=8 --out " + dir.file("r2") +
                           " --set train.init_from=" + ckpt,
                       {"blocks.1.moe.experts", "[4, 64]"});
}

// A two-run sweep trains, tabulates, plots, and on a second call reads its runs
// back instead of training again; bad grids fail before any training.
TEST(Cli, SweepRunsResumesAndRejectsBadGrids) {
  moev::test::TempDir dir;
  const std::string common =
      "[model]\nwidth = 32\ndepth = 2\nheads = 2\nmlp_dim = 64\n"
      "[data]\ntrain_limit = 256\ntest_limit = 128\naugment = false\n"
      "[train]\nepochs = 1\nbatch_size = 64\nthreads = 1\nprogress = false\n";
  std::ofstream(dir.file("s.toml")) << "[sweep]\nmodels = [\"vit-tiny\"]\nexperts = [1, 2]\n"
                                       "placements = [\"last-1\"]\nk = [1]\n" << common;
  const std::string out = dir.file("sweep");
  auto r = run("sweep --config " + dir.file("s.toml") + " --out " + out);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("vit-tiny_dense"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("vit-tiny_e2_last-1_k1"), std::string::npos) << r.out;
  std::ifstream csv(out + "/results.csv");
  std::string line;
  int lines = 0;
  while (std::getline(csv, line)) ++lines;
  EXPECT_EQ(lines, 3);
  EXPECT_TRUE(std::filesystem::exists(out + "/results.png"));
  EXPECT_TRUE(std::filesystem::exists(out + "/results.md"));
  // The sweep's file given to train trained its common config, a dense ViT, without a word.
  r = run("train --config " + dir.file("s.toml") + " --max-steps 1 --out " + dir.file("as_train"));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("s.toml has a [sweep] section, which moev sweep reads; moev train trains the file's common "
                       "config alone (model.family = vit, model.moe = none): moev sweep --config "),
            std::string::npos) << r.out;
  auto again = run("sweep --config " + dir.file("s.toml") + " --out " + out);
  ASSERT_EQ(again.code, 0) << again.out;
  EXPECT_NE(again.out.find("done before"), std::string::npos) << again.out;
  EXPECT_EQ(again.out.find("trained"), std::string::npos) << again.out;
  // The same data spelled another way is the same run.
  auto spelled = run("sweep --config " + dir.file("s.toml") + " --out " + out +
                     " --set data.path=/usr/share/datasets/fashion-mnist/");
  ASSERT_EQ(spelled.code, 0) << spelled.out;
  EXPECT_NE(spelled.out.find("done before"), std::string::npos) << spelled.out;
  // Other settings into the same --out: the old results must not stand for them.
  const std::string results = bytes_of(out + "/results.csv");
  expect_clean_failure("sweep --config " + dir.file("s.toml") + " --out " + out + " --set train.lr=0.01",
                       {"sweep run", "vit-tiny_dense", "train.lr", "another --out"});
  EXPECT_EQ(bytes_of(out + "/results.csv"), results);
  // A sweep's directory and a run's are not written into each other (the run's files landed beside the results,
  // the grid's runs beside a checkpoint).
  EXPECT_TRUE(std::filesystem::exists(out + "/.sweep.lock"));
  expect_clean_failure("train --model vit-tiny --max-steps 1 --threads 1 --out " + out,
                       {"train.out_dir: " + out + " is a sweep's directory (.sweep.lock)", "another directory"});
  EXPECT_FALSE(std::filesystem::exists(out + "/checkpoint.pt"));
  expect_clean_failure("sweep --config " + dir.file("s.toml") + " --out " + out + "/vit-tiny_dense",
                       {"vit-tiny_dense is a training run's directory", "another directory"});
  EXPECT_FALSE(std::filesystem::exists(out + "/vit-tiny_dense/.sweep.lock"));
  // --dry-run listed the grid for that directory at exit 0, and the sweep then refused it.
  expect_clean_failure("sweep --config " + dir.file("s.toml") + " --dry-run --out " + out + "/vit-tiny_dense",
                       {"vit-tiny_dense is a training run's directory"});
  // An ablation's directory is its own kind too: not swept into, nor a sweep's ablated into.
  std::filesystem::create_directories(dir.file("abl"));
  std::ofstream(dir.file("abl/.ablation.lock"));
  expect_clean_failure("sweep --config " + dir.file("s.toml") + " --out " + dir.file("abl"),
                       {"is an ablation's directory"});
  std::ofstream(dir.file("abl.toml")) << "[model]\npreset = \"resnest-tiny\"\n";
  expect_clean_failure("ablation --config " + dir.file("abl.toml") + " --out " + out,
                       {out + " is a sweep's directory"});
  // The grid takes --set as the run does; a misspelt [sweep] section is named.
  auto set_grid = run("sweep --config " + dir.file("s.toml") + " --set sweep.experts=[2] --dry-run --out " + out);
  ASSERT_EQ(set_grid.code, 0) << set_grid.out;
  EXPECT_NE(set_grid.out.find("1 run in"), std::string::npos) << set_grid.out;
  expect_clean_failure("sweep --config " + dir.file("s.toml") + " --set sweep.experts=2 --dry-run --out " + out,
                       {"s.toml with --set sweep.experts=2: sweep.experts"});
  // Each run's directory is the sweep's to name: a train.out_dir was dropped without a word.
  expect_clean_failure("sweep --config " + dir.file("s.toml") + " --set train.out_dir=x --dry-run --out " + out,
                       {"train.out_dir: a sweep sets it for each run"});
  std::ofstream(dir.file("typo.toml")) << "[swep]\nmodels = [\"vit-tiny\"]\n" << common;
  expect_clean_failure("sweep --config " + dir.file("typo.toml") + " --dry-run --out " + out,
                       {"no [sweep] section", "the file has [data], [model], [swep], [train]"});
  // A grid point skipped for K > E is named.
  std::ofstream(dir.file("k.toml")) << "[sweep]\nmodels = [\"vit-tiny\"]\nexperts = [1, 2]\n"
                                       "placements = [\"last-1\"]\nk = [1, 4]\n" << common;
  auto dry = run("sweep --config " + dir.file("k.toml") + " --dry-run --out " + dir.file("b"));
  ASSERT_EQ(dry.code, 0) << dry.out;
  EXPECT_NE(dry.out.find("skipped vit-tiny_e2_last-1_k4: K > E"), std::string::npos) << dry.out;
  // Two placements that pick the same blocks of this 2-block model: trained once.
  std::ofstream(dir.file("p.toml")) << "[sweep]\nmodels = [\"vit-tiny\"]\nexperts = [2]\n"
                                       "placements = [\"last-1\", \"every-2\"]\nk = [1]\n" << common;
  auto same = run("sweep --config " + dir.file("p.toml") + " --dry-run --out " + dir.file("b"));
  ASSERT_EQ(same.code, 0) << same.out;
  EXPECT_NE(same.out.find("skipped vit-tiny_e2_every-2_k1: the same MoE blocks as vit-tiny_e2_last-1_k1"),
            std::string::npos) << same.out;
  // Block lists as model.moe takes them: a string, one block, or a TOML array of blocks.
  std::ofstream(dir.file("a.toml")) << "[sweep]\nmodels = [\"vit-tiny\"]\nexperts = [2]\n"
                                       "placements = [\"last-1\", [0, 1], 0]\nk = [1]\n" << common;
  auto arrays = run("sweep --config " + dir.file("a.toml") + " --dry-run --out " + dir.file("b"));
  ASSERT_EQ(arrays.code, 0) << arrays.out;
  for (const char* name : {"vit-tiny_e2_last-1_k1", "vit-tiny_e2_0,1_k1", "vit-tiny_e2_0_k1"})
    EXPECT_NE(arrays.out.find(name), std::string::npos) << name << " in\n" << arrays.out;
  r = run("train --model vit-tiny --set model.moe=[1,3] --print-config");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(nlohmann::json::parse(r.out.substr(r.out.find('{'))).at("model").at("moe"), "1,3") << r.out;
  // --print-config checks what the run checks: it printed model.moe = "3,3", which training then refused.
  expect_clean_failure("train --model vit-tiny --set model.moe=3,3 --print-config", {"block 3 is listed twice"});
  expect_clean_failure("train --model vit-tiny --set train.lr=-1 --print-config", {"train.lr"});
  expect_clean_failure("train --model vit-tiny --set data.format=foldr --print-config", {"data.format = 'foldr'"});
  // A ViT has no stochastic depth: the key was trained as if unset.
  expect_clean_failure("train --model vit-tiny --set model.drop_path=0.2 --print-config",
                       {"model.drop_path = 0.2", "a ViT", "has none"});
  // Augmentations that data.augment = false turns off were trained without, and without a word.
  expect_clean_failure("train --model vit-tiny --set data.augment=false --set data.random_erase=0.5 --out " +
                           dir.file("noaug"),
                       {"data.random_erase = 0.5", "data.augment = false", "set data.augment = true"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("noaug")));
  expect_clean_failure("sweep --config " + dir.file("s.toml") + " --out " + dir.file("s.toml"), {"is a file"});
  for (const char* flags : {"--epochs -3", "--epochs 0", "--minutes -1 --dry-run", "--minutes nan"})
    expect_clean_failure("sweep --config " + dir.file("s.toml") + " " + flags + " --out " + dir.file("b"),
                         {std::string(flags).substr(0, std::string(flags).find(' ', 3)), "expected"});

  auto bad = [&](const std::string& sweep, const std::vector<std::string>& needles) {
    std::ofstream(dir.file("b.toml")) << "[sweep]\n" << sweep << common;
    expect_clean_failure("sweep --config " + dir.file("b.toml") + " --out " + dir.file("b"), needles);
    EXPECT_FALSE(std::filesystem::exists(dir.file("b"))) << "trained before failing";
  };
  bad("models = [\"vit-huge\"]\n", {"b.toml", "vit-huge"});
  bad("models = [\"vit-tiny\"]\nexperts = [4]\nplacements = [\"last-3\"]\n",
      {"b.toml", "vit-tiny_e4_last-3_k2"});
  bad("models = [\"vit-tiny\"]\nexperts = [2]\nk = [3]\n", {"b.toml", "grid is empty"});
  bad("models = []\n", {"sweep.models", "non-empty"});
  bad("models = [\"vit-tiny\"]\nplacement = [\"last-2\"]\n", {"sweep.placement", "unknown key"});
  bad("models = [\"vit-tiny\"]\nexperts = [4.5]\n", {"sweep.experts", "4.5", "integer"});
  bad("models = [\"vit-tiny\"]\nexperts = [2]\nplacements = [\"none\"]\n", {"'none'", "no MoE layer"});
  bad("models = [\"vit-tiny\", \"vit-tiny\"]\nexperts = [1]\n", {"sweep.models", "repeats"});
  bad("models = [\"vit-tiny\"]\nexperts = [1, 2, 1]\n", {"sweep.experts", "1 repeats 1"});
  bad("models = [\"vit-tiny\"]\nexperts = [2]\nplacements = [\"all\", \"every-1\"]\n",
      {"sweep.placements", "\"every-1\" repeats \"all\""});
  bad("models = [\"vit-tiny\"]\nexperts = [2]\nplacements = [[0, \"x\"]]\n",
      {"sweep.placements", "[0,\"x\"]", "block indices"});
  bad("models = [\"vit-tiny\"]\nexperts = [2]\nplacements = [[]]\n", {"sweep.placements", "empty"});
  // A block listed twice was accepted by the plan and refused by its run, after the runs before it had trained.
  bad("models = [\"vit-tiny\"]\nexperts = [1, 2]\nplacements = [\"last-1\", \"1,1\"]\n",
      {"sweep.placements", "'1,1'", "block 1 is listed twice"});
  expect_clean_failure("sweep --config " + dir.file("s.toml") + " --set train.lrr=1 --out " +
                           dir.file("b"), {"train.lrr"});
  // Keys the grid sets for each run replaced the common config's without a word.
  expect_clean_failure("sweep --config " + dir.file("s.toml") + " --set moe.num_experts=16 --out " + dir.file("b"),
                       {"moe.num_experts", "sweep.experts", "drop it"});
  expect_clean_failure("sweep --config " + dir.file("s.toml") + " --set model.moe=all --out " + dir.file("b"),
                       {"model.moe", "sweep.placements"});

  // A time budget instead of epochs: each run stops at its 1.2 s of training,
  // far before its 1000-epoch cap, and says so in its checkpoint.
  const std::string timed = dir.file("timed");
  auto t = run("sweep --config " + dir.file("s.toml") + " --minutes 0.02 --epochs 1000 --out " + timed);
  ASSERT_EQ(t.code, 0) << t.out;
  for (const char* name : {"vit-tiny_dense", "vit-tiny_e2_last-1_k1"}) {
    const auto c = moev::train::load_checkpoint(timed + "/" + name + "/checkpoint.pt");
    const auto state = nlohmann::json::parse(c.state_json);
    EXPECT_LT(state.at("step").get<int64_t>(), 4000) << name;
    EXPECT_EQ(state.at("planned_steps").get<int64_t>(), state.at("step").get<int64_t>()) << name;
    EXPECT_GE(state.at("train_elapsed_s").get<double>(), 1.0) << name;
    EXPECT_LE(state.at("train_elapsed_s").get<double>(), 3.2) << name;
  }
}

TEST(Cli, MultiBranchRecipeAndItsBadInputs) {
  moev::test::TempDir dir;
  const std::string toy =
      "--model resnest-tiny --set model.dims=[16,32,64] --set model.stem_channels=16 --set data.per_class=5 "
      "--set data.test_limit=100 --batch-size 10 --epochs 1 --threads 1 --set train.replicas=1 "
      "--set train.progress=false ";
  expect_clean_failure("train " + toy + "--set data.per_class=7000 --out " + dir.file("a"),
                       {"data.per_class = 7000", "'T-shirt/top'", "only 6000 images"});
  expect_clean_failure("train " + toy + "--set model.branches=0 --out " + dir.file("a"),
                       {"model.branches = 0", "expected >= 1"});
  expect_clean_failure("train " + toy + "--set model.precision=bf16 --out " + dir.file("a"),
                       {"model.precision = 'bf16'", "fp32 only"});
  // On a CPU without native bf16 the "running the GEMMs in fp32" note would
  // contradict the refusal that follows it.
  EXPECT_EQ(run("train " + toy + "--set model.precision=bf16 --out " + dir.file("a")).out.find("note:"),
            std::string::npos);
  const auto help = run("train --help");
  EXPECT_EQ(help.code, 0);
  for (const char* preset : {"resnest-mb-tiny", "resnest-mb-cifar", "resnest-mb-50", "convnext-moe-tiny"})
    EXPECT_NE(help.out.find(preset), std::string::npos) << preset << " missing from:\n" << help.out;
  auto r = run("train " + toy + "--out " + dir.file("n1"));
  ASSERT_EQ(r.code, 0) << r.out;
  // Started from a model trained on more labels than its own subset: said (it reached 0.87 where its data gave 0.54).
  r = run("train " + toy + "--set data.per_class=6 --set train.progress=true --set train.init_from=" +
          dir.file("n1") + "/checkpoint.pt --out " + dir.file("init6"));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("note: starting from the weights of " + dir.file("n1") + "/checkpoint.pt, a supervised run "
                       "on other data than this one's (data.per_class 5 vs 6)"),
            std::string::npos)
      << r.out;
  // --resume with a setting the run does not have: refused, naming it (it was dropped silently).
  expect_clean_failure("train " + toy + "--set model.branches=5 --set train.epochs=2 --out " + dir.file("n1") + " --resume",
                       {"model.branches = 5 (was: 1)", "train.epochs = 2 (was: 1)", "another --out"});
  r = run("train " + toy + "--out " + dir.file("n1") + " --resume");  // the same settings
  EXPECT_EQ(r.code, 0) << r.out;
  // A run's own key repeated on resume, with no --model: judged against the saved ResNeSt, not the default ViT.
  r = run("train --set model.dims=[16,32,64] --out " + dir.file("n1") + " --resume");
  EXPECT_EQ(r.code, 0) << r.out;
  // --model alone compares the model's keys: the other keys' defaults were listed as differences too.
  r = run("train --model resnest-tiny --out " + dir.file("n1") + " --resume");
  EXPECT_EQ(r.code, 1) << r.out;
  EXPECT_NE(r.out.find("model.dims = [32,64,128] (was: [16,32,64])"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("data.per_class"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("train.batch_size"), std::string::npos) << r.out;
  r = run("train --out " + dir.file("n1") + " --resume --threads 1 --set train.progress=false");  // none given
  EXPECT_EQ(r.code, 0) << r.out;
  // --resume --print-config prints what the resumed run goes on with: the saved config (it printed the defaults),
  // with what may change now; a differing key is refused as the run refuses it.
  r = run("train --out " + dir.file("n1") + " --resume --threads 2 --print-config");
  ASSERT_EQ(r.code, 0) << r.out;
  const auto resumed_cfg = nlohmann::json::parse(r.out.substr(r.out.find('{')));
  EXPECT_EQ(resumed_cfg.at("model").at("family"), "resnest") << r.out;
  EXPECT_EQ(resumed_cfg.at("train").at("epochs"), 1) << r.out;
  EXPECT_EQ(resumed_cfg.at("train").at("threads"), 2) << r.out;
  // How often it saves may change on resume (it was refused), and is kept when not named (not the default's).
  r = run("train --out " + dir.file("n1") + " --resume --set train.checkpoint_every=7 --print-config");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_EQ(nlohmann::json::parse(r.out.substr(r.out.find('{'))).at("train").at("checkpoint_every"), 7) << r.out;
  EXPECT_EQ(resumed_cfg.at("train").at("checkpoint_every"),
            nlohmann::json::parse(std::ifstream(dir.file("n1") + "/config.json")).at("train").at("checkpoint_every"));
  expect_clean_failure("train --out " + dir.file("n1") + " --resume --epochs 3 --print-config",
                       {"train.epochs = 3 (was: 1)"});
  expect_clean_failure("train --out " + dir.file("none") + " --resume --print-config", {"holds no run to resume"});
  // Resumed with no thread count named, a run keeps the one it was saved with: it took all cores, and the
  // other order of float sums gave other weights than the uninterrupted run.
  r = run("train " + toy + "--max-steps 2 --out " + dir.file("cut"));
  ASSERT_EQ(r.code, 0) << r.out;
  // A paused run's weights are said to be one's where they are used, and by checkpoint info.
  const std::string cut_ckpt = dir.file("cut") + "/checkpoint.pt";
  r = run("eval " + cut_ckpt + " --limit 16 --json");
  EXPECT_NE(r.out.find("note: " + cut_ckpt + " is an unfinished run's: it stopped at step 2, after 0 of"),
            std::string::npos) << r.out;
  const auto paused_json = nlohmann::json::parse(r.out.substr(r.out.find('{')));
  EXPECT_EQ(paused_json.at("finished"), false) << r.out;
  EXPECT_EQ(paused_json.at("step"), 2) << r.out;
  r = run("checkpoint info " + cut_ckpt);
  EXPECT_NE(r.out.find("step 2, after 0 of 1 epoch: unfinished (moev train --out " + dir.file("cut") +
                       " --resume finishes it)"),
            std::string::npos)
      << r.out;
  r = run("train --out " + dir.file("cut") + " --resume --set train.progress=false");
  ASSERT_EQ(r.code, 0) << r.out;
  r = run("checkpoint info " + cut_ckpt);
  EXPECT_NE(r.out.find(", after 1 of 1 epoch (the run's end)"), std::string::npos) << r.out;
  r = run("eval " + cut_ckpt + " --limit 16 --json");
  EXPECT_EQ(r.out.find("unfinished"), std::string::npos) << r.out;
  EXPECT_EQ(nlohmann::json::parse(r.out).at("finished"), true) << r.out;
  EXPECT_EQ(nlohmann::json::parse(std::ifstream(dir.file("cut") + "/config.json")).at("train").at("threads"), 1);
  {
    const auto whole = moev::train::load_checkpoint(dir.file("n1") + "/checkpoint.pt");
    const auto resumed = moev::train::load_checkpoint(dir.file("cut") + "/checkpoint.pt");
    ASSERT_EQ(whole.model.size(), resumed.model.size());
    for (const auto& [name, t] : whole.model) EXPECT_TRUE(torch::equal(t, resumed.model.at(name))) << name;
  }
  expect_clean_failure("train " + toy + "--set model.branches=3 --set train.teacher=" + dir.file("n1") +
                           "/checkpoint.pt --out " + dir.file("a"),
                       {"train.teacher", "model.branches 1 vs 3", "same architecture"});
  // Refused over its input, it leaves no directory of --out or --result behind (they were made first).
  expect_clean_failure("fuse " + dir.file("n1") + "/checkpoint.pt --out " + dir.file("new_out") + "/f.pt --result " +
                           dir.file("new_res") + "/r.json",
                       {"multi-branch model", "1 branch"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("new_out")));
  EXPECT_FALSE(std::filesystem::exists(dir.file("new_res")));
  std::ofstream(dir.file("plain")) << "x";
  expect_clean_failure("fuse " + dir.file("n1") + "/checkpoint.pt --out " + dir.file("plain") + "/sub/f.pt",
                       {"--out " + dir.file("plain") + "/sub/f.pt", "cannot make its directory", "not a directory"});
  expect_clean_failure("fuse " + dir.file("n1") + "/checkpoint.pt --lr 0", {"lr = 0", "--lr"});
  expect_clean_failure("train " + toy + "--set train.label_smoothing=-0.1 --out " + dir.file("a"),
                       {"train.label_smoothing = -0.1", "[0, 1)"});
  // Ablation flags out of range are errors naming the flag, before any run;
  // they once fell back to the config's values without a word.
  std::ofstream(dir.file("abl.toml")) << "[model]\npreset = \"resnest-tiny\"\n";
  for (const std::string bad : {"--seeds 0", "--teachers -2", "--first-seed -1", "--fusion-epochs 0"})
    expect_clean_failure("ablation --config " + dir.file("abl.toml") + " --dry-run " + bad,
                         {bad, "expected"});
  expect_clean_failure("ablation --config " + dir.file("abl.toml") + " --dry-run --branches 3,3",
                       {"N = 3 twice"});
  expect_clean_failure("ablation --config " + dir.file("abl.toml") + " --dry-run --branches 1,3 --no-diversity 5",
                       {"--no-diversity", "N = 5"});
  // A rerun into the same directory under other settings: refused, not read as the old results.
  std::ofstream(dir.file("abl1.toml"))
      << "[ablation]\nbranches = [1]\nno_diversity = []\nseeds = 1\ndistill = false\nfusion = false\n"
         "no_stochastic_depth = false\n[model]\npreset = \"resnest-tiny\"\ndims = [16, 32, 64]\n"
         "stem_channels = 16\n[data]\nper_class = 5\ntest_limit = 100\n[train]\nbatch_size = 10\nepochs = 1\n"
         "threads = 1\n";
  // The [ablation] keys take --set as the runs' keys do (it was "unknown config key").
  auto a = run("ablation --config " + dir.file("abl1.toml") + " --dry-run --set ablation.seeds=2 --out " +
               dir.file("abl1"));
  ASSERT_EQ(a.code, 0) << a.out;
  EXPECT_NE(a.out.find("n1_s1"), std::string::npos) << a.out;
  expect_clean_failure("ablation --config " + dir.file("abl1.toml") + " --dry-run --set ablation.seedz=2",
                       {"abl1.toml with --set ablation.seedz=2", "seedz"});
  a = run("ablation --config " + dir.file("abl1.toml") + " --jobs 1 --out " + dir.file("abl1"));
  ASSERT_EQ(a.code, 0) << a.out;
  a = run("ablation --config " + dir.file("abl1.toml") + " --jobs 1 --out " + dir.file("abl1"));
  EXPECT_EQ(a.code, 0) << a.out;
  EXPECT_NE(a.out.find("1 runs already done"), std::string::npos) << a.out;
  // The same directory named another way: its runs were refused as started with another train.out_dir.
  a = run("ablation --config " + dir.file("abl1.toml") + " --jobs 1 --out " + dir.file("abl1") + "/../abl1");
  EXPECT_EQ(a.code, 0) << a.out;
  EXPECT_NE(a.out.find("1 runs already done"), std::string::npos) << a.out;
  // A table grown by a seed: its CSV names seed 1 (it said 0), and the run of seed 0 beside it is pointed at.
  a = run("ablation --config " + dir.file("abl1.toml") + " --jobs 1 --first-seed 1 --out " + dir.file("abl1"));
  ASSERT_EQ(a.code, 0) << a.out;
  EXPECT_NE(bytes_of(dir.file("abl1") + "/ablation.csv").find("\nN=1,1,0,0,0,1,"), std::string::npos)
      << bytes_of(dir.file("abl1") + "/ablation.csv");
  EXPECT_NE(a.out.find("also holds finished runs of seed 0, outside this table (seeds 1..1); --first-seed 0 "
                       "--seeds 2 tabulates them all"),
            std::string::npos)
      << a.out;
  expect_clean_failure("ablation --config " + dir.file("abl1.toml") + " --jobs 1 --set train.epochs=2 --out " +
                           dir.file("abl1"),
                       {"n1_s0", "train.epochs = 2 (was: 1)", "another --out"});
  // A fusion row fused for other epochs (the result file fuse --result writes) is refused too, before any run.
  std::filesystem::create_directories(dir.file("abl2") + "/n2_distill_fusion_s0");
  std::ofstream(dir.file("abl2") + "/n2_distill_fusion_s0/result.json")
      << R"({"top1": 0.5, "seconds": 1, "options": {"epochs": 5, "batch_size": 128, "lr": 0.001}})";
  std::ofstream(dir.file("abl2.toml"))
      << "[ablation]\nbranches = [2]\nno_diversity = []\nseeds = 1\nno_stochastic_depth = false\n"
         "[model]\npreset = \"resnest-tiny\"\n";
  expect_clean_failure("ablation --config " + dir.file("abl2.toml") + " --jobs 1 --fusion-epochs 7 --out " +
                           dir.file("abl2"),
                       {"n2_distill_fusion_s0", "fused for 5 epochs", "--fusion-epochs 7"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("abl2") + "/n2_s0"));
  // Self-supervised initialisation: a queue longer than the images allow, then a
  // short pre-training whose checkpoint starts a supervised run.
  expect_clean_failure("pretrain " + toy + "--out " + dir.file("a"), {"train.epochs=1", "--pretrain-epochs"});
  std::string toy_ssl = toy;
  toy_ssl.erase(toy_ssl.find("--epochs 1 "), std::string("--epochs 1 ").size());
  // A time budget is the supervised run's: --minutes was in pretrain's --help, and then ignored.
  expect_clean_failure("pretrain " + toy_ssl + "--minutes 0.05 --out " + dir.file("a"),
                       {"train.minutes", "--pretrain-epochs"});
  // --set train.epochs and train.lr were taken and read by nothing, where --epochs and --lr are refused.
  expect_clean_failure("pretrain " + toy_ssl + "--set train.epochs=3 --out " + dir.file("a"),
                       {"--set train.epochs=3", "pre-training does not read", "pretrain.epochs=", "--pretrain-epochs"});
  expect_clean_failure("pretrain " + toy_ssl + "--set train.lr=0.1 --out " + dir.file("a"),
                       {"--set train.lr=0.1", "pretrain.lr=", "--pretrain-lr"});
  expect_clean_failure("pretrain " + toy_ssl + "--queue 5000 --out " + dir.file("a"), {"queue = 5000", "at most 40"});
  // Supervised-run settings pre-training would not read: refused rather than ignored.
  expect_clean_failure("pretrain " + toy_ssl + "--pretrain-weight-decay -1 --out " + dir.file("a"),
                       {"weight_decay = -1", ">= 0"});
  expect_clean_failure("pretrain " + toy_ssl + "--set train.init_from=" + dir.file("n1") + "/checkpoint.pt --out " +
                           dir.file("a"),
                       {"train.init_from", "random weights"});
  expect_clean_failure("pretrain " + toy_ssl + "--set train.teacher=" + dir.file("n1") + "/checkpoint.pt --out " +
                           dir.file("a"),
                       {"train.teacher", "no teacher"});
  expect_clean_failure("pretrain " + toy_ssl + "--set train.branch_views=true --out " + dir.file("a"),
                       {"train.branch_views"});
  // A temperature that overflows InfoNCE: stopped at the first step, no NaN pretrain.pt left to start from.
  expect_clean_failure("pretrain " + toy_ssl + "--queue 20 --temperature 1e-40 --out " + dir.file("pnan"),
                       {"pretraining diverged at step 0", "pretrain.temperature"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("pnan") + "/pretrain.pt"));
  const auto ranked = moev::test::run_cli("pretrain " + toy_ssl + "--out " + dir.file("a"), "WORLD_SIZE=2 RANK=0");
  EXPECT_EQ(ranked.code, 1) << ranked.out;
  EXPECT_NE(ranked.out.find("one process"), std::string::npos) << ranked.out;
  // Options from the config's [pretrain] section, a flag over it, --set over the flag.
  std::ofstream(dir.file("ssl.toml")) << "[pretrain]\nepochs = 1\nqueue = 30\nknn = 5\n";
  std::ofstream(dir.file("ssl_bad.toml")) << "[pretrain]\nqueu = 30\n";
  expect_clean_failure("pretrain --config " + dir.file("ssl_bad.toml") + " " + toy_ssl + "--out " + dir.file("a"),
                       {"ssl_bad.toml", "pretrain.queu is not a key", "queue"});
  expect_clean_failure("pretrain " + toy_ssl + "--set pretrain.queue=many --out " + dir.file("a"),
                       {"pretrain.queue=many", "expected an integer"});
  r = run("pretrain --config " + dir.file("ssl.toml") + " " + toy_ssl + "--queue 25 --print-config");
  ASSERT_EQ(r.code, 0) << r.out;
  const auto printed = nlohmann::json::parse(r.out.substr(r.out.find('{')));
  EXPECT_EQ(printed.at("pretrain").at("queue"), 25) << r.out;
  EXPECT_EQ(printed.at("pretrain").at("knn"), 5) << r.out;
  // Options the run refuses are refused when printed too (they printed at exit 0).
  expect_clean_failure("pretrain " + toy_ssl + "--momentum 1.5 --print-config", {"pretrain: momentum = 1.5"});
  r = run("pretrain --help-config");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("pretrain.queue"), std::string::npos) << r.out;
  r = run("pretrain --config " + dir.file("ssl.toml") + " " + toy_ssl +
          "--set model.branches=2 --queue 25 --set pretrain.queue=20 --out " + dir.file("ssl"));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("test kNN top-1"), std::string::npos) << r.out;
  const auto ssl = nlohmann::json::parse(std::ifstream(dir.file("ssl") + "/pretrain.json"));
  EXPECT_EQ(ssl.at("options").at("epochs"), 1) << ssl.dump();
  EXPECT_EQ(ssl.at("options").at("queue"), 20) << ssl.dump();
  // Pre-training beside a supervised run: its files would pass for that run's.
  expect_clean_failure("pretrain " + toy_ssl + "--queue 25 --out " + dir.file("n1"),
                       {"holds a supervised run", "another --out"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("n1") + "/pretrain_log.jsonl"));
  // train --resume in a pretraining run's directory names the commands that continue or use it.
  expect_clean_failure("train --out " + dir.file("ssl") + " --resume",
                       {"holds a pretraining run", "moev pretrain --out", "train.init_from=" + dir.file("ssl")});
  // A new supervised run there was accepted: its checkpoint.pt and config.json among pretrain's files.
  expect_clean_failure("train " + toy + "--out " + dir.file("ssl"),
                       {"holds a pretraining run", "moev pretrain --out", "train.init_from=" + dir.file("ssl")});
  EXPECT_FALSE(std::filesystem::exists(dir.file("ssl") + "/checkpoint.pt"));
  EXPECT_FALSE(std::filesystem::exists(dir.file("ssl") + "/.train.lock"));
  // Its position is under "pretrain": it read as step 0 of a supervised run.
  r = run("checkpoint info " + dir.file("ssl") + "/pretrain.pt");
  ASSERT_EQ(r.code, 0) << r.out;
  ASSERT_GT(ssl.at("steps").get<int>(), 0) << ssl.dump();
  EXPECT_NE(r.out.find("pre-training (moev pretrain) step " + ssl.at("steps").dump() + " of " + ssl.at("steps").dump() +
                       " (1 epoch); heads untrained"),
            std::string::npos)
      << r.out;
  // A ResNeSt has no experts to split over ranks: its layout line said how experts were kept.
  EXPECT_EQ(r.out.find("train.expert_parallel"), std::string::npos) << r.out;
  {  // Resumed with no thread count named, pre-training keeps the one it was saved with, as train does.
    const std::string cut = "pretrain --config " + dir.file("ssl.toml") + " " + toy_ssl +
                            "--set model.branches=2 --queue 25 --set pretrain.queue=20 --out " + dir.file("sslcut");
    r = run(cut + " --max-steps 2 --set train.checkpoint_every=1");
    ASSERT_EQ(r.code, 0) << r.out;
    // A pause says so and how to go on (it read as a finished run, and wrote pretrain.json and the probe).
    EXPECT_NE(r.out.find("paused at step 2 (train.max_steps = 2)"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("continue with: moev pretrain --out " + dir.file("sslcut") + " --resume"), std::string::npos);
    EXPECT_FALSE(std::filesystem::exists(dir.file("sslcut") + "/pretrain.json"));
    expect_clean_failure("pretrain --out " + dir.file("sslcut") + " --resume --max-steps 1",
                         {"train.max_steps = 1", "at step 2"});
    // A paused pre-training reads as one (it read as finished: "step 2 of 1 epoch").
    r = run("checkpoint info " + dir.file("sslcut") + "/pretrain.pt");
    ASSERT_EQ(r.code, 0) << r.out;
    EXPECT_NE(r.out.find("step 2 of " + ssl.at("steps").dump() + " (1 epoch): unfinished (moev pretrain --out " +
                         dir.file("sslcut") + " --resume finishes it)"),
              std::string::npos)
        << r.out;
    // How often it saves is the run's own (a bare --resume saved every 200 steps, not every step).
    r = run("pretrain --out " + dir.file("sslcut") + " --resume --print-config");
    ASSERT_EQ(r.code, 0) << r.out;
    EXPECT_EQ(nlohmann::json::parse(r.out.substr(r.out.find('{'))).at("train").at("checkpoint_every"), 1) << r.out;
    // The command a stop or pause prints, with no config: the run as saved, its [pretrain] options too (it was
    // refused as "written with another config").
    r = run("pretrain --out " + dir.file("sslcut") + " --resume");
    ASSERT_EQ(r.code, 0) << r.out;
    expect_clean_failure("pretrain --out " + dir.file("sslcut") + " --resume --set model.branches=3",
                         {"model.branches = 3 (was: 2)"});
    const auto resumed = moev::train::load_checkpoint(dir.file("sslcut") + "/pretrain.pt");
    EXPECT_EQ(nlohmann::json::parse(resumed.config_json).at("train").at("threads"), 1);
    const auto whole = moev::train::load_checkpoint(dir.file("ssl") + "/pretrain.pt");
    ASSERT_EQ(whole.model.size(), resumed.model.size());
    for (const auto& [name, t] : whole.model) EXPECT_TRUE(torch::equal(t, resumed.model.at(name))) << name;
  }
  r = run("train " + toy + "--set model.branches=2 --set train.init_from=" + dir.file("ssl") + "/pretrain.pt --out " +
          dir.file("ssl_sup"));
  ASSERT_EQ(r.code, 0) << r.out;
  // The happy path: N = 2 with distillation from an N = 2 teacher, fused, ensembled with TTA.
  r = run("train " + toy + "--set model.branches=2 --out " + dir.file("t2"));
  ASSERT_EQ(r.code, 0) << r.out;
  r = run("train " + toy + "--set model.branches=2 --set train.teacher=" + dir.file("t2") +
          "/checkpoint.pt --set train.mixup_alpha=0.8 --set train.cutmix_alpha=1 --out " + dir.file("s2"));
  ASSERT_EQ(r.code, 0) << r.out;
  // Writing over the trained run, or into a directory, is refused before training.
  expect_clean_failure("fuse " + dir.file("s2") + "/checkpoint.pt --epochs 1 --out " + dir.file("s2") +
                           "/../s2/checkpoint.pt",
                       {"is the input checkpoint"});
  expect_clean_failure("fuse " + dir.file("s2") + "/checkpoint.pt --epochs 1 --out " + dir.file("s2"),
                       {dir.file("s2") + ": is a directory", "--out"});
  r = run("fuse " + dir.file("s2") + "/checkpoint.pt --epochs 1 --threads 1");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("fusion"), std::string::npos) << r.out;
  // Its own output it replaces; another run's checkpoint or any other file it refused to (it replaced them).
  r = run("fuse " + dir.file("s2") + "/checkpoint.pt --epochs 2 --threads 1 --out " + dir.file("s2") +
          "/fused.pt --result " + dir.file("res/fuse.json"));
  ASSERT_EQ(r.code, 0) << r.out;
  // The result's counts: "images" was the training set times the epochs, read as a set's size.
  const auto fr = nlohmann::json::parse(std::ifstream(dir.file("res/fuse.json")));
  EXPECT_FALSE(fr.contains("images")) << fr;
  EXPECT_EQ(fr.at("images_seen").get<int64_t>(), 2 * fr.at("train_images").get<int64_t>()) << fr;
  EXPECT_EQ(fr.at("test_images").get<int64_t>(), 100) << fr;
  EXPECT_NE(r.out.find(" epochs of " + fr.at("train_images").dump() + " images"), std::string::npos) << r.out;
  // checkpoint info says what a multi-branch model is, and whether it was fused.
  r = run("checkpoint info " + dir.file("s2") + "/fused.pt");
  EXPECT_NE(r.out.find(", 2 branches joined by a trained fusion layer,"), std::string::npos) << r.out;
  r = run("checkpoint info " + dir.file("s2") + "/checkpoint.pt");
  EXPECT_NE(r.out.find(", 2 branches, precision"), std::string::npos) << r.out;
  // A fused model fused again with no --out: the default output is the input (named as --out, never given).
  expect_clean_failure("fuse " + dir.file("s2") + "/fused.pt --epochs 1",
                       {"by default fused.pt beside the input", "is the input checkpoint itself", "give --out"});
  const auto teacher_bytes = bytes_of(dir.file("t2") + "/checkpoint.pt");
  expect_clean_failure("fuse " + dir.file("s2") + "/checkpoint.pt --epochs 1 --out " + dir.file("t2") +
                           "/checkpoint.pt",
                       {dir.file("t2") + "/checkpoint.pt", "not the output of an earlier fuse", "--out"});
  EXPECT_EQ(bytes_of(dir.file("t2") + "/checkpoint.pt"), teacher_bytes);
  // --result over a checkpoint replaced it with a few hundred bytes of JSON at exit 0.
  expect_clean_failure("fuse " + dir.file("s2") + "/checkpoint.pt --epochs 1 --out " + dir.file("s2") +
                           "/fused.pt --result " + dir.file("t2") + "/checkpoint.pt",
                       {"--result " + dir.file("t2") + "/checkpoint.pt", "not an earlier result"});
  EXPECT_EQ(bytes_of(dir.file("t2") + "/checkpoint.pt"), teacher_bytes);
  expect_clean_failure("fuse " + dir.file("s2") + "/checkpoint.pt --epochs 1 --out " + dir.file("f.pt") +
                           " --result " + dir.file("f.pt"),
                       {"--result " + dir.file("f.pt"), "is --out"});
  std::ofstream(dir.file("notes.txt")) << "mine";
  expect_clean_failure("fuse " + dir.file("s2") + "/checkpoint.pt --epochs 1 --out " + dir.file("notes.txt"),
                       {dir.file("notes.txt"), "not the output of an earlier fuse"});
  // Branch agreement: the model's top-1 in branches.json is eval's, on the same images.
  r = run("analyze " + dir.file("s2") + "/checkpoint.pt --limit 64 --threads 1 --out " + dir.file("an2"));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("some branch right"), std::string::npos) << r.out;
  const auto agree = nlohmann::json::parse(std::ifstream(dir.file("an2") + "/branches.json"));
  EXPECT_EQ(agree.at("images"), 64);
  EXPECT_EQ(agree.at("top1").size(), 2u);
  EXPECT_TRUE(std::filesystem::exists(dir.file("an2") + "/branches.png"));
  const auto e2 = run("eval " + dir.file("s2") + "/checkpoint.pt --limit 64 --threads 1 --json");
  ASSERT_EQ(e2.code, 0) << e2.out;
  const auto top1_at = e2.out.find("\"top1\"");
  ASSERT_NE(top1_at, std::string::npos) << e2.out;
  EXPECT_NEAR(agree.at("model_top1").get<double>(), std::stod(e2.out.substr(e2.out.find(':', top1_at) + 1)), 1e-12);
  // A fused model: its output is the fusion layer's, its branches the frozen ones.
  // By default into analysis-fused/: analysis/ is the unfused checkpoint's, which it replaced.
  r = run("analyze " + dir.file("s2") + "/fused.pt --limit 64 --threads 1");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_FALSE(std::filesystem::exists(dir.file("s2") + "/analysis")) << r.out;
  const auto agree_f = nlohmann::json::parse(std::ifstream(dir.file("s2") + "/analysis-fused/branches.json"));
  EXPECT_EQ(agree_f.at("top1"), agree.at("top1"));  // fusion leaves the branches as they were
  const auto e2f = run("eval " + dir.file("s2") + "/fused.pt --limit 64 --threads 1 --json");
  ASSERT_EQ(e2f.code, 0) << e2f.out;
  const auto top1_f = e2f.out.find("\"top1\"");
  ASSERT_NE(top1_f, std::string::npos) << e2f.out;
  EXPECT_NEAR(agree_f.at("model_top1").get<double>(), std::stod(e2f.out.substr(e2f.out.find(':', top1_f) + 1)),
              1e-12);
  expect_clean_failure("analyze " + dir.file("n1") + "/checkpoint.pt", {"one branch", "nothing to analyse", "model.branches >= 2"});
  // Router flags on a model without MoE layers were ignored; --limit 0 meant the run's 100 images, -3 as well.
  expect_clean_failure("eval " + dir.file("n1") + "/checkpoint.pt --capacity 0.5",
                       {"n1/checkpoint.pt", "--capacity", "has none (model.moe = none)"});
  expect_clean_failure("eval " + dir.file("n1") + "/checkpoint.pt --limit -3", {"--limit -3", ">= 0"});
  expect_clean_failure("analyze " + dir.file("s2") + "/checkpoint.pt --limit -1", {"--limit -1", ">= 0"});
  r = run("eval " + dir.file("n1") + "/checkpoint.pt --limit 0 --threads 1 --json");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("\"images\": 10000"), std::string::npos) << r.out;
  // Another test set through --data: its classes are matched to the run's by name ('T-shirt_top' for
  // 'T-shirt/top'), and one the run does not have is named.
  std::vector<unsigned char> grey(28 * 28, 90);
  for (const char* c : {"Trouser", "T-shirt_top"}) {
    const std::string folder = dir.file("fold") + "/" + c;
    std::filesystem::create_directories(folder);
    ASSERT_TRUE(stbi_write_png((folder + "/0.png").c_str(), 28, 28, 1, grey.data(), 28));
  }
  r = run("eval " + dir.file("n1") + "/checkpoint.pt --format folder --data " + dir.file("fold") + " --json");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("\"images\": 2"), std::string::npos) << r.out;
  std::filesystem::rename(dir.file("fold/T-shirt_top"), dir.file("fold/T-shirt"));
  expect_clean_failure("eval " + dir.file("n1") + "/checkpoint.pt --format folder --data " + dir.file("fold"),
                       {"class 'T-shirt' is not one of the 10 classes of the training set of", "n1/checkpoint.pt",
                        "'T-shirt/top'"});
  // A config edited inside a checkpoint: the error names the file.
  auto edited = moev::train::load_checkpoint(dir.file("n1") + "/checkpoint.pt");
  auto edited_cfg = nlohmann::json::parse(edited.config_json);
  edited_cfg["model"]["branches"] = 0;
  edited.config_json = edited_cfg.dump();
  moev::train::save_checkpoint(dir.file("edited.pt"), edited);
  expect_clean_failure("eval " + dir.file("edited.pt"), {"edited.pt", "model.branches = 0"});
  std::ofstream(dir.file("ens.toml")) << "[ensemble]\nmembers = [\"" << dir.file("s2") << "/fused.pt\", \""
                                      << dir.file("n1") << "/checkpoint.pt\"]\nweights = [3, 1]\ntta = true\n";
  for (const std::string& target : {dir.file("ens.toml"), dir.file("t2") + "/checkpoint.pt"})
    expect_clean_failure("ensemble --config " + dir.file("ens.toml") + " --limit 50 --result " + target,
                         {"--result " + target, "not an earlier result"});
  EXPECT_EQ(bytes_of(dir.file("t2") + "/checkpoint.pt"), teacher_bytes);
  std::ofstream(dir.file("ens.json")).flush();  // an empty file (mktemp's) is there to be written
  r = run("ensemble --config " + dir.file("ens.toml") + " --limit 50 --threads 1 --result " + dir.file("ens.json"));
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("weighted ensemble"), std::string::npos) << r.out;
  // --result: the figures the ablation reads its teacher rows from.
  const auto res = nlohmann::json::parse(std::ifstream(dir.file("ens.json")));
  EXPECT_EQ(res.at("images").get<int64_t>(), 50);
  EXPECT_EQ(res.at("members").size(), 2u);
  EXPECT_EQ(res.at("members")[0].at("finished"), true) << res;  // --json has no stderr note to read
  // As the table: TTA said, each member's top-5 and NLL beside its top-1.
  EXPECT_EQ(res.at("tta"), true);
  for (const auto& m : res.at("members")) {
    EXPECT_GE(m.at("top5").get<double>(), m.at("top1").get<double>()) << m;
    EXPECT_GT(m.at("loss").get<double>(), 0) << m;
    EXPECT_NE(r.out.find(moev::io::fmt(m.at("loss").get<double>())), std::string::npos) << r.out;
  }
  const double top1 = res.at("top1").get<double>();
  EXPECT_TRUE(top1 >= 0 && top1 <= 1) << top1;
  EXPECT_NE(r.out.find(moev::io::fmt(top1)), std::string::npos) << r.out;
  std::ofstream(dir.file("ens_bad.toml")) << "[ensemble]\nmembers = [\"" << dir.file("nope.pt") << "\"]\n";
  expect_clean_failure("ensemble --config " + dir.file("ens_bad.toml"), {"nope.pt"});
  expect_clean_failure("ensemble --config " + dir.file("ens.toml") + " --limit -5", {"--limit -5", ">= 0"});
  // Sections beside [ensemble] were passed over without a word.
  std::ofstream(dir.file("ens_model.toml")) << "[ensemble]\nmembers = [\"" << dir.file("nope.pt")
                                            << "\"]\n[model]\npreset = \"vit-tiny\"\n";
  expect_clean_failure("ensemble --config " + dir.file("ens_model.toml"), {"ens_model.toml", "[model]", "[ensemble] only"});
}

// The hard MoE as users run it: mosaics, a trunk, clustering, experts trained
// as two processes at once (train-all --jobs 2) and, in another directory,
// one after the other (train-expert), each with default threads: the same
// weights to the bit. Then eval
// and predict on the assembled model, and the bad inputs.
TEST(Cli, HardMoEExpertsAsIndependentProcesses) {
  moev::test::TempDir dir;
  expect_clean_failure("data mosaic --out " + dir.file("m0") + " --train 0", {"--train 0", "expected 1.."});
  expect_clean_failure("data mosaic --out " + dir.file("m0") + " --test 99999999999", {"--test 99999999999"});
  expect_clean_failure("data mosaic --out ''", {"--out is empty"});
  // A wrong source is refused before anything is written (it left an empty staging directory behind).
  expect_clean_failure("data mosaic --out " + dir.file("m9") + " --fashion-mnist " + dir.file("nope"),
                       {dir.file("nope"), "not found", "dataset-fashion-mnist"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("m9") + ".moev-partial"));
  EXPECT_FALSE(std::filesystem::exists(dir.file("m0")));
  expect_clean_failure("data mosaic --out " + dir.file("m0") + " --seed -1", {"--seed -1", ">= 0"});
  // An interrupted run's staging directory is cleared; one moev did not make is left alone.
  std::filesystem::create_directories(dir.file("mosaic.moev-partial"));
  expect_clean_failure("data mosaic --out " + dir.file("mosaic"), {"mosaic.moev-partial", "not made by moev"});
  std::ofstream(dir.file("mosaic.moev-partial/.moev-partial")) << "x";
  std::ofstream(dir.file("mosaic.moev-partial/train.csv")) << "path,tags\n";
  expect_clean_failure("data mosaic --out .", {"--out .", "expected a directory name"});
  auto r = run("data mosaic --out " + dir.file("mosaic") + "/ --train 100 --test 30 --seed 3");  // "dir/" is dir
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_FALSE(std::filesystem::exists(dir.file("mosaic.moev-partial")));
  EXPECT_FALSE(std::filesystem::exists(dir.file("mosaic/.moev-partial")));
  // A data set is never rewritten in place (an interrupted rewrite left old tags on new images).
  const std::string manifest = bytes_of(dir.file("mosaic/train.csv"));
  expect_clean_failure("data mosaic --out " + dir.file("mosaic") + " --train 100 --test 30 --seed 4",
                       {"--out", "not empty", "new directory"});
  EXPECT_EQ(bytes_of(dir.file("mosaic/train.csv")), manifest);
  expect_clean_failure("data mosaic --out " + dir.file("mosaic/train.csv"), {"is a file"});
  // A link to an empty directory: the mosaics go into the directory it names (the rename onto the link failed).
  std::filesystem::create_directories(dir.file("real"));
  std::filesystem::create_directory_symlink(dir.file("real"), dir.file("link"));
  r = run("data mosaic --out " + dir.file("link") + " --train 4 --test 4");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_TRUE(std::filesystem::exists(dir.file("real/train.csv")));
  EXPECT_FALSE(std::filesystem::exists(dir.file("real/.moev-partial")));
  EXPECT_TRUE(std::filesystem::is_symlink(dir.file("link")));
  const std::string cfg = dir.file("hm.toml");
  std::ofstream(cfg) << "[model]\nfamily = \"convnext\"\nimage_size = 56\nchannels = 1\nnum_classes = 10\n"
                        "patch = 4\ndims = [8, 16, 16]\ndepths = [1, 1, 1]\n"
                        "[data]\nformat = \"manifest\"\npath = \"" << dir.file("mosaic/train.csv")
                     << "\"\ntest_path = \"" << dir.file("mosaic/test.csv") << "\"\n"
                        "[train]\nepochs = 2\nbatch_size = 20\nwarmup_steps = 2\nthreads = 2\n"
                        "progress = false\neval_each_epoch = false\nout_dir = \"" << dir.file("run") << "\"\n"
                        "[hardmoe]\nexperts = 2\nexpert_epochs = 1\n";
  r = run("train --config " + cfg);
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("precision@1"), std::string::npos) << r.out;
  const std::string a = dir.file("run/hardmoe2"), b = dir.file("seq");
  r = run("hardmoe cluster --config " + cfg);
  ASSERT_EQ(r.code, 0) << r.out;
  r = run("hardmoe cluster --config " + cfg + " --dir " + b);
  ASSERT_EQ(r.code, 0) << r.out;
  // Default threads everywhere: hardmoe.expert_threads fixes them, whoever starts the expert.
  r = run("hardmoe train-all --config " + cfg + " --jobs 2");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("expert 1"), std::string::npos) << r.out;
  for (const char* e : {"0", "1"}) {
    r = run("hardmoe train-expert --config " + cfg + " --dir " + b + " --expert " + e);
    ASSERT_EQ(r.code, 0) << r.out;
  }
  for (const char* e : {"/expert_0/checkpoint.pt", "/expert_1/checkpoint.pt"}) {
    auto x = moev::train::load_checkpoint(a + e).model, y = moev::train::load_checkpoint(b + e).model;
    ASSERT_EQ(x.size(), y.size());
    for (const auto& [name, t] : x) EXPECT_TRUE(torch::equal(t, y.at(name))) << e << " " << name;
  }
  expect_clean_failure("eval " + a + "/hardmoe.json --tta", {"hardmoe.json is a hard MoE", "without --tta"});
  r = run("eval " + a + "/hardmoe.json --threads 1");
  ASSERT_EQ(r.code, 0) << r.out;
  for (const char* s : {"precision@1", "mAP", "hard MoE: images per expert"})
    EXPECT_NE(r.out.find(s), std::string::npos) << r.out;
  // checkpoint info tells a hard MoE file from other JSON (a run's config.json was called a hard MoE file).
  expect_clean_failure("checkpoint info " + a + "/hardmoe.json", {"a hard MoE file, not a checkpoint"});
  expect_clean_failure("checkpoint info " + dir.file("run/config.json"), {"config.json", "JSON text, not a checkpoint"});
  // eval and predict called it "not a hard MoE file", analyze "a hard MoE".
  for (const std::string cmd : {"eval ", "analyze ", "predict --checkpoint "})
    expect_clean_failure(cmd + dir.file("run/config.json") + (cmd[0] == 'p' ? " " + a + "/hardmoe.json" : ""),
                         {"config.json: JSON text, not a checkpoint", "nor a hard MoE's hardmoe.json"});
  r = run("predict --checkpoint " + a + "/hardmoe.json --top 2 " + dir.file("mosaic/test/0.png"));
  ASSERT_EQ(r.code, 0) << r.out;
  // A hard MoE's directory in place of its file names that file (it suggested a checkpoint.pt there is none of).
  expect_clean_failure("predict --checkpoint " + a + " " + dir.file("mosaic/test/0.png"), {a + "/hardmoe.json?"});
  // An ensemble scored tagged images as top-1 against each image's first tag (0.16 where eval said 0.56).
  std::ofstream(dir.file("tagged.toml")) << "[ensemble]\nmembers = [\"" << dir.file("run/checkpoint.pt") << "\"]\n";
  expect_clean_failure("ensemble --config " + dir.file("tagged.toml") + " --threads 1",
                       {"run/checkpoint.pt", "tagged images", "single-label test sets only"});
  {  // A SIGTERM to an expert's training (a scheduler's job) saves it, writes no result and says how to go on.
    const std::string c = dir.file("stopped"), long_cfg = dir.file("hm_long.toml");
    std::string text = bytes_of(cfg);
    text.replace(text.find("expert_epochs = 1\n"), 18, "expert_epochs = 1000\n");
    std::ofstream(long_cfg) << text;
    r = run("hardmoe cluster --config " + long_cfg + " --dir " + c);
    ASSERT_EQ(r.code, 0) << r.out;
    const pid_t pid = moev::test::start_cli("hardmoe train-expert --config " + long_cfg + " --dir " + c +
                                                " --expert 0 --set train.log_every=1",
                                            dir.file("stop.txt"));
    ASSERT_GT(pid, 0);
    const bool training = moev::test::wait_for_lines(c + "/expert_0/log.jsonl", 2, 60, pid);
    ::kill(pid, training ? SIGTERM : SIGKILL);
    const int code = moev::test::wait_cli(pid);
    text = bytes_of(dir.file("stop.txt"));
    ASSERT_TRUE(training) << text;
    EXPECT_EQ(code, 143) << text;
    EXPECT_NE(text.find("moev: expert 0 stopped at step"), std::string::npos) << text;
    EXPECT_NE(text.find("the same command again continues it"), std::string::npos) << text;
    EXPECT_TRUE(std::filesystem::exists(c + "/expert_0/checkpoint.pt"));
    EXPECT_FALSE(std::filesystem::exists(c + "/expert_0/result.json"));
    // A SIGTERM to train-all (it died at once, without a word, the expert running left unasked) is passed to the
    // experts running: they save, none other starts, and it says what stopped.
    const size_t lines_before = [&] {
      const auto log = bytes_of(c + "/expert_0/log.jsonl");
      return static_cast<size_t>(std::count(log.begin(), log.end(), '\n'));
    }();
    const pid_t all = moev::test::start_cli("hardmoe train-all --config " + long_cfg + " --dir " + c +
                                                " --jobs 1 --set train.log_every=1",
                                            dir.file("stop_all.txt"));
    ASSERT_GT(all, 0);
    const bool resumed = moev::test::wait_for_lines(c + "/expert_0/log.jsonl", lines_before + 2, 60, all);
    ::kill(all, resumed ? SIGTERM : SIGKILL);
    const int all_code = moev::test::wait_cli(all);
    text = bytes_of(dir.file("stop_all.txt"));
    ASSERT_TRUE(resumed) << text;
    EXPECT_EQ(all_code, 143) << text;
    EXPECT_NE(text.find("hardmoe train-all: stopped: expert 0 (stopped on request); not started: expert 1"),
              std::string::npos)
        << text;
    EXPECT_NE(bytes_of(c + "/expert_0/output.log").find("moev: expert 0 stopped at step"), std::string::npos);
    EXPECT_FALSE(std::filesystem::exists(c + "/expert_1"));
    // Its unfinished checkpoint names the command that resumes it (it named train --resume, which then failed
    // as if the partition had changed).
    r = run("checkpoint info " + c + "/expert_0/checkpoint.pt");
    ASSERT_EQ(r.code, 0) << r.out;
    EXPECT_NE(r.out.find("unfinished (moev hardmoe train-expert --config <the hard MoE's config> --dir " + c +
                         " --expert 0"),
              std::string::npos)
        << r.out;
    expect_clean_failure("train --out " + c + "/expert_0 --resume",
                         {"is a hard MoE expert's run", "moev hardmoe train-expert", "--expert 0"});
  }
  {  // Experts with fewer images than a batch cannot train: said by cluster, refused by train-all before any starts
     // (13 of 20 failed one by one, the cause only in each output.log).
    const std::string small = dir.file("small");
    r = run("hardmoe cluster --config " + cfg + " --experts 8 --dir " + small);
    ASSERT_EQ(r.code, 0) << r.out;
    EXPECT_NE(r.out.find("fewer training images than train.batch_size = 20 and cannot train"), std::string::npos)
        << r.out;
    expect_clean_failure("hardmoe train-all --config " + cfg + " --experts 8 --dir " + small,
                         {"hardmoe train-all: expert", "fewer training images than train.batch_size = 20",
                          "--set train.batch_size=N"});
    EXPECT_FALSE(std::filesystem::exists(small + "/expert_0"));
  }
  // An expert's notes name the [hardmoe] keys that set its warmup and rate (they said train.warmup_steps).
  r = run("hardmoe cluster --config " + cfg + " --dir " + dir.file("warm"));
  ASSERT_EQ(r.code, 0) << r.out;
  r = run("hardmoe train-expert --config " + cfg + " --dir " + dir.file("warm") +
          " --expert 0 --set hardmoe.expert_warmup_steps=500 --set hardmoe.expert_lr=0.002");
  ASSERT_EQ(r.code, 0) << r.out;
  EXPECT_NE(r.out.find("note: hardmoe.expert_warmup_steps = 500 is at least"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("(hardmoe.expert_lr = 0.002)"), std::string::npos) << r.out;
  // Bad input: an expert the partition does not have, a manifest line whose image is missing.
  expect_clean_failure("hardmoe train-expert --config " + cfg + " --expert 2", {"--expert 2", "2 experts", "0..1"});
  // Checked though the expert is done (it said "already trained" at exit 0), and 0 experts is not "unset".
  expect_clean_failure("hardmoe train-expert --config " + cfg + " --expert 0 --set train.lr=abc",
                       {"train.lr", "expected a number"});
  // A run key that hardmoe.expert_* decides for the experts was dropped without a word; it is refused, and the
  // [hardmoe] keys take --set.
  expect_clean_failure("hardmoe train-expert --config " + cfg + " --expert 0 --set train.epochs=7",
                       {"--set train.epochs=7", "hardmoe.expert_epochs = 1", "--set hardmoe.expert_epochs="});
  expect_clean_failure("hardmoe train-all --config " + cfg + " --set train.threads=2",
                       {"--set train.threads=2", "hardmoe.expert_threads = 1 (its default)", "--threads N",
                        "hardmoe.expert_threads = 0"});
  // The hard MoE's directory is no run directory (a run trained into it beside partition.json and hardmoe.json).
  expect_clean_failure("train --config " + cfg + " --out " + b, {b, "a hard MoE's directory", "partition.json"});
  expect_clean_failure("hardmoe train-expert --config " + cfg + " --expert 0 --set hardmoe.expert_epochs=2",
                       {"expert_0", "hardmoe.expert_epochs (the expert's train.epochs) = 2 (was: 1)"});  // named as set
  expect_clean_failure("hardmoe train-expert --config " + cfg + " --expert 0 --set hardmoe.expert_epoch=2",
                       {"--set hardmoe.expert_epoch=2", "unknown key"});
  expect_clean_failure("hardmoe cluster --config " + cfg + " --experts 0 --dir " + dir.file("zero"), {"--experts 0"});
  expect_clean_failure("hardmoe train-all --config " + cfg + " --dir " + dir.file("none"),
                       {dir.file("none"), "hardmoe cluster"});
  // A trunk of other data than the config's: the config's [data] would be ignored, and the experts fail late.
  auto other = moev::train::load_checkpoint(dir.file("run") + "/checkpoint.pt");
  auto other_cfg = nlohmann::json::parse(other.config_json);
  other_cfg["data"]["path"] = dir.file("mosaic/test.csv");
  other.config_json = other_cfg.dump();
  moev::train::save_checkpoint(dir.file("other_trunk.pt"), other);
  expect_clean_failure("hardmoe cluster --config " + cfg + " --trunk " + dir.file("other_trunk.pt") + " --dir " +
                           dir.file("other"),
                       {"hm.toml", "data.path", "mosaic/train.csv", "mosaic/test.csv", "the trunk"});
  EXPECT_FALSE(std::filesystem::exists(dir.file("other")));
  // The same difference from a --set is named as the flag: the config file holds the trunk's own data.
  expect_clean_failure("hardmoe train-expert --config " + cfg + " --expert 0 --set data.path=" +
                           dir.file("mosaic/test.csv"),
                       {"hm.toml with --set data.path=", "mosaic/test.csv", "the trunk"});
  expect_clean_failure("train --config " + cfg + " --set train.multilabel_loss=bce --out " + dir.file("bad"),
                       {"train.multilabel_loss = 'bce'", "softmax or sigmoid"});
  std::ofstream(dir.file("mosaic/bad.csv")) << "path,tags\ntrain/0.png,Trouser\ntrain/missing.png,Bag\n";
  expect_clean_failure("train --config " + cfg + " --set data.path=" + dir.file("mosaic/bad.csv") + " --out " +
                           dir.file("bad"),
                       {"bad.csv:3", "missing.png"});
}
