// open_datasets' checks that a model and its data agree: as many outputs as
// the training set has classes, and a test set whose labels mean the same
// classes. Real PNG folders, written here with stb_image_write.
#include "moev/train/datasets.h"

#include <gtest/gtest.h>
#include <stb/stb_image_write.h>

#include <filesystem>
#include <vector>

#include "support/expect_error.h"
#include "support/temp_dir.h"

namespace moev {
namespace {

// Two 4x4 grey images in each of `classes`, under root/<class>/.
void write_classes(const std::string& root, const std::vector<std::string>& classes) {
  std::vector<unsigned char> px(16);
  for (const auto& c : classes) {
    std::filesystem::create_directories(root + "/" + c);
    for (int i = 0; i < 2; ++i) {
      for (size_t p = 0; p < px.size(); ++p) px[p] = static_cast<unsigned char>(p * 13 + i * 71 + c.size());
      ASSERT_EQ(stbi_write_png((root + "/" + c + "/" + std::to_string(i) + ".png").c_str(), 4, 4, 1, px.data(), 4), 1);
    }
  }
}

struct FolderRun {
  train::DataConfig data;
  models::ModelConfig model;
};

FolderRun folder_run(const test::TempDir& dir, int64_t num_classes) {
  FolderRun r;
  r.data.format = "folder";
  r.data.path = dir.file("train");
  r.data.test_path = dir.file("test");
  r.model.image_size = 4;
  r.model.channels = 1;
  r.model.num_classes = num_classes;
  return r;
}

}  // namespace

TEST(Datasets, ModelOutputsMustMatchTheTrainingClasses) {
  test::TempDir dir;
  write_classes(dir.file("train"), {"a", "b", "c"});
  write_classes(dir.file("test"), {"a", "b", "c"});
  auto r = folder_run(dir, 3);
  const auto ds = train::open_datasets(r.data, r.model, /*load_train=*/true);
  EXPECT_EQ(ds.train.num_classes(), 3);
  EXPECT_EQ(ds.test.size(), 6);
  // Ten outputs for three classes: seven made-up classes in predict and top-5.
  r = folder_run(dir, 10);
  test::expect_error([&] { train::open_datasets(r.data, r.model, true); },
                     {dir.file("train"), "has 3 classes", "model.num_classes = 10", "expected 3"});
  r = folder_run(dir, 2);
  test::expect_error([&] { train::open_datasets(r.data, r.model, true); }, {"model.num_classes = 2"});
}

TEST(Datasets, TestClassesMustBeTheTrainingClassesInOrder) {
  test::TempDir dir;
  write_classes(dir.file("train"), {"a", "b", "c"});
  // 'b' missing: the test's 'c' would be label 1, scored as 'b'.
  write_classes(dir.file("test"), {"a", "c"});
  auto r = folder_run(dir, 3);
  test::expect_error([&] { train::open_datasets(r.data, r.model, true); },
                     {dir.file("test"), "class 1 is 'c' but 'b'", dir.file("train")});
  write_classes(dir.file("test"), {"b"});  // now a, b, c: the same classes
  EXPECT_NO_THROW(train::open_datasets(r.data, r.model, true));
  write_classes(dir.file("test"), {"d"});  // a class the model has no output for
  test::expect_error([&] { train::open_datasets(r.data, r.model, true); }, {dir.file("test"), "has 4 classes"});
  // "café" composed on one machine and decomposed (as macOS stores names) on another print alike: the bytes differ.
  test::TempDir dir2;
  write_classes(dir2.file("train"), {"caf\xC3\xA9"});
  write_classes(dir2.file("test"), {"cafe\xCC\x81"});
  auto r2 = folder_run(dir2, 1);
  test::expect_error([&] { train::open_datasets(r2.data, r2.model, true); },
                     {"class 0 is", "(bytes 63 61 66 65 cc 81 against 63 61 66 c3 a9)"});
}

}  // namespace moev
