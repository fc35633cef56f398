// Text-file helpers of moev::io: the last line of a file that a predicate
// keeps, read backwards in blocks, against a forward scan of the same file.
#include <gtest/gtest.h>
#include <stb/stb_image.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "moev/io/table.h"
#include "support/expect_error.h"
#include "support/temp_dir.h"

using namespace moev;

namespace {
// What a forward scan finds: the last line (split at '\n') that `keep` holds.
std::string forward_scan(const std::string& text, const std::function<bool(const std::string&)>& keep) {
  std::string found, line;
  for (size_t at = 0; at <= text.size(); ++at) {
    if (at == text.size() || text[at] == '\n') {
      if (!line.empty() && keep(line)) found = line;
      line.clear();
    } else {
      line += text[at];
    }
  }
  return found;
}
}  // namespace

TEST(LastLineWhere, AgreesWithAForwardScanAcrossBlockBoundaries) {
  test::TempDir dir;
  const std::string path = dir.file("log.jsonl");
  // Lines of every length around the 64 KiB block, a line longer than two
  // blocks, and a last line cut short without its newline (a log being written).
  std::string text;
  for (int i = 0; i < 3000; ++i) text += "{\"step\":" + std::to_string(i) + std::string(i % 97, ' ') + "}\n";
  text += "{\"eval\":1," + std::string(150000, 'x') + "}\n";
  for (int i = 0; i < 500; ++i) text += (i % 7 ? "{\"loss\":" : "{\"eval\":") + std::to_string(i) + "}\n";
  text += "{\"loss\":9";
  std::ofstream(path, std::ios::binary) << text;
  const std::vector<std::string> keys = {"\"step\"", "\"eval\"", "\"loss\"", "\"none\"", "x}", "\"step\":0 "};
  for (const auto& key : keys) {
    auto has = [&](const std::string& l) { return l.find(key) != std::string::npos; };
    EXPECT_EQ(io::last_line_where(path, has), forward_scan(text, has)) << key;
  }
  // The first line of the file, with the blocks' starts falling anywhere in it.
  auto first = [](const std::string& l) { return l == "{\"step\":0}"; };
  EXPECT_EQ(io::last_line_where(path, first), "{\"step\":0}");
  EXPECT_EQ(io::last_line_where(dir.file("missing.jsonl"), first), "");
  // A predicate that keeps everything is asked about the file's last line only.
  int asked = 0;
  EXPECT_EQ(io::last_line_where(path, [&](const std::string&) { return ++asked > 0; }), "{\"loss\":9");
  EXPECT_EQ(asked, 1);
}

// A device is written into, not renamed over: `ensemble --result /dev/full`, run
// as root, replaced /dev/full with a file (and said nothing). A link is followed.
TEST(WriteTextAtomic, WritesIntoDevicesAndThroughLinks) {
  moev::test::TempDir dir;
  bool failed = false;
  try {
    moev::io::write_text_atomic("/dev/full", "{}\n");
  } catch (const std::exception& e) {
    failed = std::string(e.what()).find("cannot write /dev/full") != std::string::npos;
  }
  EXPECT_TRUE(failed) << "a full device took the text";
  EXPECT_TRUE(std::filesystem::is_character_file("/dev/full"));
  EXPECT_NO_THROW(moev::io::write_text_atomic("/dev/null", "x"));
  EXPECT_TRUE(std::filesystem::is_character_file("/dev/null"));
  std::ofstream(dir.file("target.json")) << "old";
  std::filesystem::create_symlink(dir.file("target.json"), dir.file("link.json"));
  moev::io::write_text_atomic(dir.file("link.json"), "new");
  EXPECT_TRUE(std::filesystem::is_symlink(dir.file("link.json")));
  std::ifstream in(dir.file("target.json"));
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(text, "new");
}

// stb's own PNG file writer left a short write unchecked: on a full disk `analyze` and `sweep` put cut PNGs in
// place at exit 0. A PNG is now encoded in memory and written as any output is.
TEST(WritePngAtomic, RoundTripsAndAFullDiskIsAnErrorNamingTheFile) {
  moev::test::TempDir dir;
  std::vector<unsigned char> px(5 * 3 * 3);
  for (size_t i = 0; i < px.size(); ++i) px[i] = static_cast<unsigned char>(i * 37);
  moev::io::write_png_atomic(dir.file("a.png"), px.data(), 5, 3, 3);
  int w = 0, h = 0, c = 0;
  unsigned char* back = stbi_load(dir.file("a.png").c_str(), &w, &h, &c, 3);
  ASSERT_NE(back, nullptr);
  EXPECT_EQ(w, 5);
  EXPECT_EQ(h, 3);
  EXPECT_TRUE(std::equal(px.begin(), px.end(), back));
  stbi_image_free(back);
  std::filesystem::create_symlink("/dev/full", dir.file("full.png"));
  moev::test::expect_error([&] { moev::io::write_png_atomic(dir.file("full.png"), px.data(), 5, 3, 3); },
                           {"cannot write " + dir.file("full.png")});
  EXPECT_TRUE(std::filesystem::is_symlink(dir.file("full.png")));
}
