// CIFAR-10 binary batches written here record by record, then read back.
#include "moev/data/cifar10.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>

#include "support/expect_error.h"
#include "support/temp_dir.h"

namespace moev::data {
namespace {

using moev::test::expect_error;
using moev::test::TempDir;
using moev::test::write_bytes;

// Writes `count` records whose label and pixels derive from `first + r`.
void write_batch(const std::string& path, int first, int count) {
  std::vector<unsigned char> bytes;
  for (int r = 0; r < count; ++r) {
    const int id = first + r;
    bytes.push_back(static_cast<unsigned char>(id % 10));
    for (int i = 0; i < 3072; ++i)
      bytes.push_back(static_cast<unsigned char>((i * 7 + id * 13) % 256));
  }
  write_bytes(path, bytes);
}

void expect_record(const ImageSet& set, int64_t at, int id) {
  EXPECT_EQ(set.labels[at].item<int64_t>(), id % 10);
  const torch::Tensor flat = set.images[at].flatten();
  for (int i : {0, 1, 1023, 1024, 2048, 3071}) {
    EXPECT_EQ(flat[i].item<uint8_t>(), (i * 7 + id * 13) % 256) << "record " << id << " byte " << i;
  }
}

TEST(Cifar10, TestBatchReadsBackExactly) {
  TempDir dir;
  write_batch(dir.file("test_batch.bin"), 0, 7);
  const ImageSet set = read_cifar10(dir.path().string(), /*train=*/false);
  ASSERT_EQ(set.size(), 7);
  EXPECT_EQ(set.images.sizes(), torch::IntArrayRef({7, 3, 32, 32}));
  EXPECT_EQ(set.class_names, cifar10_class_names());
  for (int r = 0; r < 7; ++r) expect_record(set, r, r);
  // Planes are R, G, B: byte 1024 of a record is the first green pixel.
  EXPECT_EQ(set.images[3][1][0][0].item<uint8_t>(), (1024 * 7 + 3 * 13) % 256);
}

TEST(Cifar10, TrainConcatenatesFiveBatchesInOrderAndReadsMeta) {
  TempDir dir;
  const auto sub = dir.path() / "cifar-10-batches-bin";
  std::filesystem::create_directories(sub);
  for (int b = 1; b <= 5; ++b) {
    write_batch((sub / ("data_batch_" + std::to_string(b) + ".bin")).string(), (b - 1) * 3, 3);
  }
  write_batch((sub / "test_batch.bin").string(), 0, 1);
  std::ofstream((sub / "batches.meta.txt").string()) << "a\nb\nc\nd\ne\nf\ng\nh\ni\nj\n\n\n";
  const ImageSet set = read_cifar10(dir.path().string(), /*train=*/true);
  ASSERT_EQ(set.size(), 15);
  for (int r = 0; r < 15; ++r) expect_record(set, r, r);
  EXPECT_EQ(set.class_names,
            (std::vector<std::string>{"a", "b", "c", "d", "e", "f", "g", "h", "i", "j"}));
}

TEST(Cifar10, BadSizeMissingBatchAndBadLabelAreErrors) {
  TempDir dir;
  write_bytes(dir.file("test_batch.bin"), std::vector<unsigned char>(3073 * 2 + 5, 1));
  expect_error([&] { read_cifar10(dir.path().string(), false); },
               {dir.file("test_batch.bin"), "6151", "3073"});
  expect_error([&] { read_cifar10(dir.path().string(), true); }, {dir.file("data_batch_1.bin")});
  std::vector<unsigned char> bad(3073, 0);
  bad[0] = 10;
  write_bytes(dir.file("test_batch.bin"), bad);
  expect_error([&] { read_cifar10(dir.path().string(), false); },
               {dir.file("test_batch.bin"), "label 10"});
  expect_error([&] { read_cifar10(dir.file("nowhere"), false); }, {dir.file("nowhere")});
}

}  // namespace
}  // namespace moev::data
