// open_datasets' checks that a model and its data agree: as many outputs as
// the training set has classes, and a test set whose labels mean the same
// classes. Real PNG folders, written here with stb_image_write.
#include "moev/train/datasets.h"

#include <gtest/gtest.h>
#include <stb/stb_image_write.h>

#include <filesystem>
#include <vector>

#include <torch/torch.h>

#include "moev/train/trained_model.h"
#include "support/expect_error.h"
#include "support/temp_dir.h"

namespace moev {
namespace {

// Two 4x4 grey images in each of `classes`, under root/<class>/.
// channels = 3: stored as RGB.
void write_classes(const std::string& root, const std::vector<std::string>& classes, int channels = 1) {
  std::vector<unsigned char> px(16 * channels);
  for (const auto& c : classes) {
    std::filesystem::create_directories(root + "/" + c);
    for (int i = 0; i < 2; ++i) {
      for (size_t p = 0; p < px.size(); ++p) px[p] = static_cast<unsigned char>(p * 13 + i * 71 + c.size());
      ASSERT_EQ(stbi_write_png((root + "/" + c + "/" + std::to_string(i) + ".png").c_str(), 4, 4, channels,
                               px.data(), 4 * channels),
                1);
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

// A folder run without a test root is refused: its training images scored as
// "test" would report training accuracy under the test set's name.
TEST(Datasets, AFolderRunNeedsATestRoot) {
  test::TempDir dir;
  write_classes(dir.file("train"), {"a", "b"});
  auto r = folder_run(dir, 2);
  r.data.test_path.clear();
  test::expect_error([&] { train::open_datasets(r.data, r.model, true); },
                     {"data.test_path", dir.file("train"), "not a test set"});
}

// A folder is read class by class; its images come mixed, in an order fixed on every machine. Limits took the
// first class alone (a run scored 100 % after two steps), and an evaluation's MoE routing groups held one class.
// A run keeps its paths as given; evaluated from another directory, its relative test folder was "not found".
TEST(Datasets, ARunsRelativeTestPathReadFromElsewhereSaysSo) {
  train::TrainedModel t;
  t.cfg.data.format = "folder";
  t.cfg.data.path = "no/such/train";
  t.cfg.data.test_path = "no/such/test";
  test::expect_error([&] { train::open_test_set(t, t.cfg.data, "run/checkpoint.pt"); },
                     {"run/checkpoint.pt", "no/such/test (data.test_path)", "relative to the directory the run was "
                      "started in", "--data"});
  auto other = t.cfg.data;  // a path of the user's own (--data) is theirs to get right: the plain message
  other.test_path = "elsewhere/test";
  test::expect_error([&] { train::open_test_set(t, other, "run/checkpoint.pt"); }, {"elsewhere/test", "not found"});
}

TEST(Datasets, AFoldersImagesComeMixedInAFixedOrder) {
  test::TempDir dir;
  const std::vector<std::string> classes = {"a", "b", "c", "d", "e", "f", "g", "h"};
  write_classes(dir.file("train"), classes);
  write_classes(dir.file("test"), classes);
  auto r = folder_run(dir, 8);
  r.data.train_limit = 8;
  const auto limited = train::open_datasets(r.data, r.model, true, false);
  ASSERT_EQ(limited.train.size(), 8);
  // The first 8 of 16 images, 2 per class: sorted by class they were a, a, b, b, c, c, d, d.
  EXPECT_GE(std::get<0>(at::_unique(limited.train.labels)).numel(), 5) << limited.train.labels;
  r.data.train_limit = 0;
  const auto all = train::open_datasets(r.data, r.model, true);
  EXPECT_TRUE(torch::equal(std::get<0>(all.train.labels.sort()), torch::arange(16, torch::kLong).div(2, "floor")));
  EXPECT_TRUE(torch::equal(all.train.images.narrow(0, 0, 8), limited.train.images));  // one order, every time
  EXPECT_EQ(all.train.source, dir.file("train"));
  EXPECT_TRUE(torch::equal(all.test.labels, all.train.labels));  // the same layout, mixed the same way
}

// A test folder with some of the classes (listed alphabetically as always) is
// scored in the model's class indices, matched by name: its 'c' is label 2,
// not 1 (it was scored as 'b' before the order was checked, then refused).
TEST(Datasets, TestClassesAreMatchedToTheTrainingClassesByName) {
  test::TempDir dir;
  write_classes(dir.file("train"), {"a", "b", "c"});
  write_classes(dir.file("test"), {"a", "c"});
  auto r = folder_run(dir, 3);
  auto ds = train::open_datasets(r.data, r.model, true);
  EXPECT_EQ(ds.test.class_names, (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_TRUE(torch::equal(std::get<0>(ds.test.labels.sort()), torch::tensor({0, 0, 2, 2}, torch::kLong)))
      << ds.test.labels;
  // Said: a test folder short of a class by mistake trained without a word.
  std::string notes;
  for (const auto& n : ds.notes) notes += n + "\n";
  EXPECT_NE(notes.find("has no folder for 1 of the 3 training classes ('b'): its figures leave them out"),
            std::string::npos) << notes;
  // Fashion-MNIST's classes in label order against a folder (alphabetical, '_' for '/' and ' '): each image
  // keeps its class.
  const std::vector<std::string> fmnist = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"};
  data::ImageSet folder;
  folder.class_names = {"Ankle_boot", "Bag", "Coat", "Dress", "Pullover", "Sandal", "Shirt", "Sneaker", "T-shirt_top",
                        "Trouser"};
  folder.labels = torch::arange(10, torch::kLong);
  folder.source = "photos/test";
  EXPECT_TRUE(train::align_classes(folder, fmnist, "the run").empty());
  EXPECT_TRUE(torch::equal(folder.labels, torch::tensor({9, 8, 4, 3, 2, 5, 6, 7, 0, 1}, torch::kLong)))
      << folder.labels;
  EXPECT_EQ(folder.class_names, fmnist);
  // A class the model does not have, and two folders standing for one class: named.
  write_classes(dir.file("test"), {"d"});
  test::expect_error([&] { train::open_datasets(r.data, r.model, true); },
                     {dir.file("test"), "class 'd' is not one of the 3 classes", dir.file("train")});
  data::ImageSet other;
  other.class_names = {"a", "z"};
  other.labels = torch::tensor({0, 1}, torch::kLong);
  other.source = "t";
  test::expect_error([&] { train::align_classes(other, {"a", "b"}, "the run"); },
                     {"test set t", "class 'z' is not one of the 2 classes of the run ('a', 'b')"});
  // The other way round: a folder-trained run (T-shirt_top) scored on the IDX files (T-shirt/top).
  other.class_names = {"Trouser", "T-shirt/top"};
  other.labels = torch::tensor({0, 1}, torch::kLong);
  train::align_classes(other, {"T-shirt_top", "Trouser"}, "the run");
  EXPECT_TRUE(torch::equal(other.labels, torch::tensor({1, 0}, torch::kLong))) << other.labels;
  other.class_names = {"a_b"};  // could be either of two classes
  test::expect_error([&] { train::align_classes(other, {"a b", "a/b"}, "the run"); },
                     {"'a_b' could stand for 'a b' or 'a/b'"});
  other.class_names = {"T-shirt/top", "T-shirt_top"};
  test::expect_error([&] { train::align_classes(other, {"T-shirt/top"}, "the run"); },
                     {"'T-shirt/top' and 'T-shirt_top' both stand for 'T-shirt/top'"});
  // "café" composed on one machine and decomposed (as macOS stores names) on another print alike: the bytes differ.
  test::TempDir dir2;
  write_classes(dir2.file("train"), {"caf\xC3\xA9"});
  write_classes(dir2.file("test"), {"cafe\xCC\x81"});
  auto r2 = folder_run(dir2, 1);
  test::expect_error([&] { train::open_datasets(r2.data, r2.model, true); },
                     {"is not one of", "its bytes 63 61 66 65 cc 81 against 'caf\xC3\xA9': 63 61 66 c3 a9"});
}

}  // namespace moev

namespace moev {

// A grey model's note on colour images counts what the source holds: it counted the images read, then
// data.train_limit kept fewer, under a count that read as the run's; a colour test set beside a grey training
// set went unsaid.
TEST(Datasets, ColourReadAsGreyIsNotedPerSource) {
  test::TempDir dir;
  write_classes(dir.file("train"), {"a", "b", "c"}, 3);
  write_classes(dir.file("test"), {"a", "b", "c"}, 3);
  auto r = folder_run(dir, 3);
  r.data.train_limit = 4;
  auto ds = train::open_datasets(r.data, r.model, /*load_train=*/true);
  EXPECT_EQ(ds.train.size(), 4);
  ASSERT_EQ(ds.notes.size(), 1u);  // said once for both sets
  EXPECT_NE(ds.notes[0].find(dir.file("train")), std::string::npos) << ds.notes[0];
  EXPECT_NE(ds.notes[0].find("6 of its 6 images are stored in colour"), std::string::npos) << ds.notes[0];
  std::filesystem::remove_all(dir.file("train"));
  write_classes(dir.file("train"), {"a", "b", "c"}, 1);
  ds = train::open_datasets(r.data, r.model, /*load_train=*/true);
  ASSERT_EQ(ds.notes.size(), 1u);
  EXPECT_NE(ds.notes[0].find(dir.file("test")), std::string::npos) << ds.notes[0];
  r.model.channels = 3;
  EXPECT_TRUE(train::open_datasets(r.data, r.model, /*load_train=*/true).notes.empty());
}

}  // namespace moev
