// The `moev` binary on bad input: one clear line on stderr naming what is wrong,
// a non-zero exit, never an abort or a backtrace. And the happy path once:
// train a few steps, eval with overrides, predict a PNG.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <stb/stb_image_write.h>
#include <zlib.h>

#include "support/temp_dir.h"

namespace {

struct Result {
  int code;
  std::string out;
};

Result run(const std::string& args) {
  const std::string cmd = std::string(MOEV_CLI_PATH) + " " + args + " 2>&1";
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  const int status = pclose(p);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status), out};
}

// A clean failure: exit 1, the needles in the message, no crash traces.
void expect_clean_failure(const std::string& args, const std::vector<std::string>& needles) {
  auto r = run(args);
  EXPECT_EQ(r.code, 1) << args << "\n" << r.out;
  EXPECT_NE(r.out.find("moev: error: "), std::string::npos) << r.out;
  for (const char* bad : {"terminate called", "frame #", "Aborted", "Exception raised from"})
    EXPECT_EQ(r.out.find(bad), std::string::npos) << r.out;
  for (const auto& n : needles) EXPECT_NE(r.out.find(n), std::string::npos) << "missing " << n << " in\n" << r.out;
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
  expect_clean_failure("train " + kTiny + "--set moe.k=5", {"moe.k = 5", "moe.num_experts = 4"});
  expect_clean_failure("train " + kTiny + "--set moe.capacity=-1", {"moe.capacity"});
  expect_clean_failure("train " + kTiny + "--device cuda", {"--device cuda"});
  expect_clean_failure("eval " + dir.file("missing.pt"), {"missing.pt"});
  std::ofstream(dir.file("junk.pt")) << "not a checkpoint";
  expect_clean_failure("eval " + dir.file("junk.pt"), {"junk.pt", "not a moev checkpoint"});
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
  expect_clean_failure("eval " + ckpt + " --capacity 0", {"moe.capacity = 0"});
  expect_clean_failure("eval " + ckpt + " --k 7", {"moe.k = 7"});
  expect_clean_failure("eval " + ckpt + " --bpr maybe", {"--bpr maybe"});

  // A real PNG of a Fashion-MNIST-sized image.
  std::vector<unsigned char> px(28 * 28);
  for (size_t i = 0; i < px.size(); ++i) px[i] = static_cast<unsigned char>(i % 251);
  ASSERT_TRUE(stbi_write_png(dir.file("img.png").c_str(), 28, 28, 1, px.data(), 28));
  auto p = run("predict --checkpoint " + ckpt + " --top 2 --json " + dir.file("img.png"));
  ASSERT_EQ(p.code, 0) << p.out;
  EXPECT_NE(p.out.find("\"probability\""), std::string::npos) << p.out;
  std::ofstream(dir.file("notes.png")) << "this is text, not an image";
  expect_clean_failure("predict --checkpoint " + ckpt + " " + dir.file("notes.png"), {"notes.png"});
  // Another architecture's weights as the starting point of a run.
  expect_clean_failure("train " + kTiny + "--set moe.num_experts=8 --out " + dir.file("r2") +
                           " --set train.init_from=" + ckpt,
                       {"blocks.1.moe.experts", "[4, 64]"});
}
