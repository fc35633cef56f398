// The multi-label manifest: quoted paths, header, tags; missing files and
// unknown tags named with their line; Fashion-MNIST mosaics written as real PNG
// files whose tags are the classes in them, the same for a seed.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>

#include "support/expect_error.h"
#include "support/temp_dir.h"
#include "moev/data/idx_reader.h"
#include "moev/data/manifest.h"

using namespace moev;

TEST(Manifest, ParsesQuotedPathsHeaderAndTags) {
  test::TempDir dir;
  std::ofstream(dir.file("m.csv")) << "path,tags\n"
                                      "a.png,cat dog\n"
                                      "\"b, \"\"odd\"\" name.png\",dog  dog bird\r\n"
                                      "\n"
                                      "/abs/c.jpg,fish\n";
  auto e = data::parse_manifest(dir.file("m.csv"));
  ASSERT_EQ(e.size(), 3u);
  EXPECT_EQ(e[0].path, "a.png");
  EXPECT_EQ(e[0].tags, (std::vector<std::string>{"cat", "dog"}));
  EXPECT_EQ(e[1].path, "b, \"odd\" name.png");
  EXPECT_EQ(e[1].tags, (std::vector<std::string>{"dog", "bird"}));
  EXPECT_EQ(e[1].line, 3);
  EXPECT_EQ(e[2].path, "/abs/c.jpg");
  std::ofstream(dir.file("bad.csv")) << "a.png,cat\n\"b.png,dog\n";
  test::expect_error([&] { data::parse_manifest(dir.file("bad.csv")); }, {"bad.csv:2", "unterminated"});
  std::ofstream(dir.file("notag.csv")) << "a.png,\n";
  test::expect_error([&] { data::parse_manifest(dir.file("notag.csv")); }, {"notag.csv:1", "no tags"});
  // As spreadsheets write it: a byte order mark, quoted fields. A third field
  // became part of a tag ("Coat,Dress"), a quoted one kept its quotes.
  std::ofstream(dir.file("sheet.csv")) << "\xEF\xBB\xBFpath,tags\n\"a.png\",\"cat dog\"  \nb.png,bird\n";
  e = data::parse_manifest(dir.file("sheet.csv"));
  ASSERT_EQ(e.size(), 2u);
  EXPECT_EQ(e[0].path, "a.png");
  EXPECT_EQ(e[0].tags, (std::vector<std::string>{"cat", "dog"}));
  std::ofstream(dir.file("three.csv")) << "a.png,cat\nb.png,Coat,Dress\n";
  test::expect_error([&] { data::parse_manifest(dir.file("three.csv")); },
                     {"three.csv:2", "'Coat,Dress' holds a comma", "two fields"});
  std::ofstream(dir.file("q.csv")) << "a.png,\"cat dog\nb.png,bird\n";
  test::expect_error([&] { data::parse_manifest(dir.file("q.csv")); }, {"q.csv:1", "quoted tags"});
  // Text that is not UTF-8 lines: named, not dumped into one line or cut at a NUL (which opened `a.png`).
  auto write = [&](const std::string& name, const std::string& bytes) {
    std::ofstream(dir.file(name), std::ios::binary) << bytes;
    return dir.file(name);
  };
  test::expect_error([&] { data::parse_manifest(write("utf16.csv", std::string("\xFF\xFEp\0a\0", 6))); },
                     {"utf16.csv", "UTF-16", "UTF-8"});
  test::expect_error([&] { data::parse_manifest(write("nul.csv", std::string("a.png\0junk,cat\n", 15))); },
                     {"nul.csv:1", "NUL byte at column 6"});
  test::expect_error([&] { data::parse_manifest(write("cr.csv", "a.png,cat\rb.png,dog\r")); },
                     {"cr.csv:1", "carriage return", "LF or CR LF"});
}

TEST(Manifest, MosaicsAreRealImagesTaggedWithTheirClassesAndDeterministic) {
  test::TempDir dir;
  auto test_set = data::load_fashion_mnist("/usr/share/datasets/fashion-mnist", false);
  const auto m1 = data::write_mosaics(test_set, 20, 5, dir.file("a"), "train");
  const auto m2 = data::write_mosaics(test_set, 20, 5, dir.file("b"), "train");
  auto s1 = data::read_manifest(m1, 56, 56, 1), s2 = data::read_manifest(m2, 56, 56, 1);
  ASSERT_EQ(s1.size(), 20);
  EXPECT_TRUE(torch::equal(s1.images, s2.images));
  EXPECT_TRUE(torch::equal(s1.targets, s2.targets));
  auto per = s1.targets.sum(1);
  EXPECT_GE(per.min().item<float>(), 1.0f);
  EXPECT_LE(per.max().item<float>(), 4.0f);
  // Each quadrant is a real test image, and its class is among the mosaic's tags.
  auto flat = test_set.images.view({test_set.size(), -1});
  for (int64_t i = 0; i < 5; ++i) {
    for (int q = 0; q < 4; ++q) {
      auto quad = s1.images[i][0].narrow(0, (q / 2) * 28, 28).narrow(1, (q % 2) * 28, 28).reshape({1, -1});
      auto hits = (flat == quad).all(1).nonzero().view({-1});
      ASSERT_GE(hits.numel(), 1) << "mosaic " << i << " quadrant " << q;
      std::string name = test_set.class_names[test_set.labels[hits[0]].item<int64_t>()];
      for (auto& ch : name)
        if (ch == ' ' || ch == '/') ch = '_';
      auto col = std::find(s1.tags.begin(), s1.tags.end(), name) - s1.tags.begin();
      ASSERT_LT(col, static_cast<long>(s1.tags.size())) << name;
      EXPECT_EQ(s1.targets[i][col].item<float>(), 1.0f);
    }
  }
  // A missing image and a tag outside the vocabulary are named with their line.
  std::filesystem::remove(dir.file("a") + "/train/3.png");
  test::expect_error([&] { data::read_manifest(m1, 56, 56, 1); }, {"train.csv:5", "3.png", "does not exist"});
  std::filesystem::create_directories(dir.file("a") + "/train/3.png");  // a directory where the image was
  test::expect_error([&] { data::read_manifest(m1, 56, 56, 1); }, {"train.csv:5", "3.png", "is not a file"});
  test::expect_error([&] { data::read_manifest(m2, 56, 56, 1, {"Trouser"}); }, {"train.csv:", "is not one of the model's 1 tags"});
  // A header other than moev's is read as an image; the message says what header it passes over.
  std::ofstream(dir.file("header.csv")) << "image,labels\n";
  test::expect_error([&] { data::read_manifest(dir.file("header.csv"), 56, 56, 1); },
                     {"header.csv:1", "image' does not exist", "(a header? the one moev passes over is `path,tags`)"});
  // The directory of a mosaic data set given for its manifest read as one without images.
  test::expect_error([&] { data::read_manifest(dir.file("a"), 56, 56, 1); },
                     {dir.file("a") + " is a directory", "the manifest CSV itself", "(it holds train.csv)"});
}
