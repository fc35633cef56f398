// UTF-8 checks on names bound for moev's JSON files: known well- and ill-formed
// byte sequences, and the refusals where names are read (a Latin-1 class folder
// crashed the run at its first checkpoint, losing every step before it).
#include "moev/core/utf8.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include "moev/data/image_folder.h"
#include "moev/io/run_config.h"
#include "support/expect_error.h"
#include "support/temp_dir.h"

namespace moev {
namespace {

TEST(Utf8, KnownWellAndIllFormedSequences) {
  for (const char* ok : {"", "plain", "caf\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80", "\xED\x9F\xBF",
                         "\xF4\x8F\xBF\xBF", "T-shirt/top"})
    EXPECT_TRUE(valid_utf8(ok)) << escaped_bytes(ok);
  for (const char* bad : {"caf\xE9", "\x80", "\xC3", "\xC0\xAF", "\xC1\xBF", "\xE0\x80\xAF", "\xED\xA0\x80",
                          "\xF4\x90\x80\x80", "\xF5\x80\x80\x80", "\xE2\x82", "\xF0\x9F\x98", "a\xFF"})
    EXPECT_FALSE(valid_utf8(bad)) << escaped_bytes(bad);
  EXPECT_EQ(escaped_bytes("caf\xE9/x"), "caf\\xE9/x");
}

TEST(Utf8, ALatin1ClassFolderOrConfigPathIsRefusedWhereItIsRead) {
  test::TempDir dir;
  const auto cls = std::filesystem::path(dir.file("train")) / "caf\xE9";
  std::filesystem::create_directories(cls);
  {
    std::ofstream f(cls / "0.pgm", std::ios::binary);
    f << "P5\n2 2\n255\n" << std::string(4, '\x10');
  }
  test::expect_error([&] { data::read_image_folder(dir.file("train"), 2, 2, 1); },
                     {"class folder name 'caf\\xE9'", "not valid UTF-8", "rename it"});
  io::RunConfig cfg;
  test::expect_error([&] { io::apply_override(cfg, "train.out_dir=runs/caf\xE9"); },
                     {"train.out_dir", "'runs/caf\\xE9' is not valid UTF-8"});
  io::apply_override(cfg, "train.out_dir=runs/caf\xC3\xA9");  // UTF-8 is a name like any other
  EXPECT_EQ(cfg.train.out_dir, "runs/caf\xC3\xA9");
}

}  // namespace
}  // namespace moev
