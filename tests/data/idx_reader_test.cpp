// IDX reading: the real Fashion-MNIST files, and damaged copies of them that
// must fail with the file's name.
#include "moev/data/idx_reader.h"

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <zlib.h>

#include <fstream>

#include "support/expect_error.h"
#include "moev/core/error.h"
#include "support/temp_dir.h"

namespace moev::data {
namespace {

using moev::test::expect_error;
using moev::test::TempDir;
using moev::test::write_bytes;

std::string fashion_file(const std::string& name) {
  return std::string(kFashionMnistDir) + "/" + name;
}

std::vector<unsigned char> gunzip(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  EXPECT_NE(f, nullptr);
  std::vector<unsigned char> bytes, chunk(1 << 16);
  for (int got; (got = gzread(f, chunk.data(), static_cast<unsigned>(chunk.size()))) > 0;) {
    bytes.insert(bytes.end(), chunk.begin(), chunk.begin() + got);
  }
  gzclose(f);
  return bytes;
}

TEST(IdxReader, FashionMnistTrain) {
  const ImageSet set = load_fashion_mnist(kFashionMnistDir, /*train=*/true);
  EXPECT_EQ(set.size(), 60000);
  EXPECT_EQ(set.images.sizes(), torch::IntArrayRef({60000, 1, 28, 28}));
  EXPECT_EQ(set.images.scalar_type(), torch::kUInt8);
  EXPECT_EQ(set.labels.scalar_type(), torch::kInt64);
  ASSERT_EQ(set.num_classes(), 10);
  EXPECT_EQ(set.class_names[0], "T-shirt/top");
  EXPECT_EQ(set.class_names[9], "Ankle boot");
  const torch::Tensor counts = torch::bincount(set.labels, {}, 10);
  EXPECT_TRUE(torch::equal(counts, torch::full({10}, 6000, torch::kInt64)));
  // Not all black: the pixel data was really read.
  EXPECT_GT(set.images.to(torch::kFloat32).mean().item<float>(), 50.0f);
}

TEST(IdxReader, FashionMnistTest) {
  const ImageSet set = load_fashion_mnist(kFashionMnistDir, /*train=*/false);
  EXPECT_EQ(set.size(), 10000);
  EXPECT_EQ(set.images.sizes(), torch::IntArrayRef({10000, 1, 28, 28}));
  EXPECT_EQ(set.labels.min().item<int64_t>(), 0);
  EXPECT_EQ(set.labels.max().item<int64_t>(), 9);
  EXPECT_EQ(set.num_classes(), 10);
}

TEST(IdxReader, RawAndGzipGiveTheSameSet) {
  TempDir dir;
  write_bytes(dir.file("images"), gunzip(fashion_file("t10k-images-idx3-ubyte.gz")));
  write_bytes(dir.file("labels"), gunzip(fashion_file("t10k-labels-idx1-ubyte.gz")));
  const ImageSet raw = read_idx(dir.file("images"), dir.file("labels"));
  const ImageSet gz = read_idx(fashion_file("t10k-images-idx3-ubyte.gz"),
                               fashion_file("t10k-labels-idx1-ubyte.gz"));
  EXPECT_TRUE(torch::equal(raw.images, gz.images));
  EXPECT_TRUE(torch::equal(raw.labels, gz.labels));
}

TEST(IdxReader, TinyHandWrittenFileKnownAnswer) {
  TempDir dir;
  // 2 images of 2x3, labels 1 and 0 -> two classes named "0", "1".
  write_bytes(dir.file("img"), {0, 0, 8, 3, 0, 0, 0, 2, 0, 0,  0,  2,  0, 0, 0, 3,  //
                                1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 255});
  write_bytes(dir.file("lbl"), {0, 0, 8, 1, 0, 0, 0, 2, 1, 0});
  const ImageSet set = read_idx(dir.file("img"), dir.file("lbl"));
  EXPECT_TRUE(
      torch::equal(set.images.flatten(),
                   torch::tensor({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 255}).to(torch::kUInt8)));
  EXPECT_EQ(set.images.sizes(), torch::IntArrayRef({2, 1, 2, 3}));
  EXPECT_TRUE(torch::equal(set.labels, torch::tensor({1, 0}, torch::kInt64)));
  EXPECT_EQ(set.class_names, (std::vector<std::string>{"0", "1"}));
}

TEST(IdxReader, TruncatedRawFileNamesFileAndSizes) {
  TempDir dir;
  auto bytes = gunzip(fashion_file("t10k-images-idx3-ubyte.gz"));
  ASSERT_EQ(bytes.size(), 16u + 10000u * 784u);
  bytes.resize(bytes.size() - 100);
  write_bytes(dir.file("short-images"), bytes);
  expect_error(
      [&] { read_idx(dir.file("short-images"), fashion_file("t10k-labels-idx1-ubyte.gz")); },
      {dir.file("short-images"), "truncated", "7840016", "7839916"});
}

TEST(IdxReader, TruncatedGzipFileNamesFile) {
  TempDir dir;
  std::ifstream in(fashion_file("t10k-labels-idx1-ubyte.gz"), std::ios::binary);
  std::vector<unsigned char> gz((std::istreambuf_iterator<char>(in)), {});
  gz.resize(gz.size() / 2);
  write_bytes(dir.file("short-labels.gz"), gz);
  expect_error(
      [&] { read_idx(fashion_file("t10k-images-idx3-ubyte.gz"), dir.file("short-labels.gz")); },
      {dir.file("short-labels.gz"), "truncated", "10008"});
}

TEST(IdxReader, AbsurdHeaderInSmallGzipFailsBeforeAllocating) {
  TempDir dir;
  // Claims 4e9 images of 28x28 (3 TB) in a file of a few dozen bytes.
  const unsigned char header[] = {0, 0, 8, 3, 0xee, 0x6b, 0x28, 0, 0, 0, 0, 28, 0, 0, 0, 28};
  gzFile f = gzopen(dir.file("huge.gz").c_str(), "wb");
  ASSERT_NE(f, nullptr);
  gzwrite(f, header, sizeof header);
  gzclose(f);
  expect_error([&] { read_idx(dir.file("huge.gz"), fashion_file("t10k-labels-idx1-ubyte.gz")); },
               {dir.file("huge.gz"), "corrupt"});
}

// A file given as the directory was "not found", though it is there.
TEST(IdxReader, AFileGivenAsTheDirectoryIsNamedAsAFile) {
  TempDir dir;
  write_bytes(dir.file("a.png"), {1, 2, 3});
  expect_error([&] { load_fashion_mnist(dir.file("a.png"), false); },
               {dir.file("a.png"), "is a file", "--format folder"});
  expect_error([&] { load_fashion_mnist(dir.file("none"), false); }, {dir.file("none"), "not found", "--format"});
  // A folder tree read as Fashion-MNIST (a forgotten --format folder) was told to install the Debian package.
  std::filesystem::create_directories(dir.file("tree/shirt"));
  expect_error([&] { load_fashion_mnist(dir.file("tree"), true); },
               {dir.file("tree"), "holds folders", "--format folder"});
  try {
    load_fashion_mnist(dir.file("tree"), true);
  } catch (const moev::Error& e) {
    EXPECT_EQ(std::string(e.what()).find("Debian package"), std::string::npos) << e.what();
  }
  // torchvision's layout, FashionMNIST/raw/*.gz: pointed at the folder that holds them.
  std::filesystem::create_directories(dir.file("FashionMNIST/raw"));
  write_bytes(dir.file("FashionMNIST/raw/train-images-idx3-ubyte.gz"), {0});
  expect_error([&] { load_fashion_mnist(dir.file("FashionMNIST"), true); },
               {"they are in " + dir.file("FashionMNIST/raw"), "(--data)"});
}

TEST(IdxReader, TrailingBytesAreAnError) {
  TempDir dir;
  write_bytes(dir.file("img"), {0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 7, 99});
  write_bytes(dir.file("lbl"), {0, 0, 8, 1, 0, 0, 0, 1, 0});
  expect_error([&] { read_idx(dir.file("img"), dir.file("lbl")); },
               {dir.file("img"), "trailing", "17", "18"});
}

TEST(IdxReader, WrongMagicIsAnError) {
  // Arguments swapped: the labels file where images belong.
  expect_error(
      [&] {
        read_idx(fashion_file("t10k-labels-idx1-ubyte.gz"),
                 fashion_file("t10k-images-idx3-ubyte.gz"));
      },
      {"t10k-labels-idx1-ubyte.gz", "2049", "expected 2051"});
  TempDir dir;
  write_bytes(dir.file("junk"), {'h', 'e', 'l', 'l', 'o', ' ', 'w', 'o', 'r', 'l', 'd', '!'});
  expect_error([&] { read_idx(dir.file("junk"), fashion_file("t10k-labels-idx1-ubyte.gz")); },
               {dir.file("junk"), "magic"});
}

TEST(IdxReader, CountMismatchNamesBothFiles) {
  expect_error(
      [&] {
        read_idx(fashion_file("t10k-images-idx3-ubyte.gz"),
                 fashion_file("train-labels-idx1-ubyte.gz"));
      },
      {"t10k-images", "10000", "train-labels", "60000"});
}

TEST(IdxReader, MissingDirectoryOrFileSaysWhatToInstall) {
  expect_error([] { load_fashion_mnist("/nonexistent/fashion", /*train=*/true); },
               {"/nonexistent/fashion", "dataset-fashion-mnist"});
  TempDir dir;
  expect_error([&] { load_fashion_mnist(dir.path().string(), /*train=*/false); },
               {dir.file("t10k-images-idx3-ubyte.gz"), "dataset-fashion-mnist"});
  expect_error([&] { read_idx(dir.file("nope"), dir.file("nope2")); }, {dir.file("nope")});
}

}  // namespace
}  // namespace moev::data
