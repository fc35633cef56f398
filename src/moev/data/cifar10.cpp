// CIFAR-10 binary batches. Each record is already planar RGB, so it is copied
// straight into [3, 32, 32] without reordering.
#include "moev/data/cifar10.h"

#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "moev/core/error.h"

namespace moev::data {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kImageBytes = kCifar10RecordBytes - 1;

std::vector<std::string> read_meta(const fs::path& path) {
  std::ifstream in(path);
  MOEV_CHECK(in, "cannot open ", path.string());
  std::vector<std::string> names;
  for (std::string line; std::getline(in, line);) {
    const auto first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos) continue;  // the file ends with blank lines
    const auto last = line.find_last_not_of(" \t\r");
    names.push_back(line.substr(first, last - first + 1));
  }
  return names;
}

}  // namespace

const std::vector<std::string>& cifar10_class_names() {
  static const std::vector<std::string> names{"airplane", "automobile", "bird",  "cat",  "deer",
                                              "dog",      "frog",       "horse", "ship", "truck"};
  return names;
}

ImageSet read_cifar10(const std::string& dir, bool train) {
  fs::path root = dir;
  MOEV_CHECK(fs::is_directory(root), "CIFAR-10 directory ", dir,
             " not found; expected the binary version (cifar-10-batches-bin)");
  if (!fs::exists(root / "test_batch.bin") && fs::is_directory(root / "cifar-10-batches-bin")) {
    root /= "cifar-10-batches-bin";
  }

  std::vector<fs::path> files;
  if (train) {
    for (int i = 1; i <= 5; ++i)
      files.push_back(root / ("data_batch_" + std::to_string(i) + ".bin"));
  } else {
    files.push_back(root / "test_batch.bin");
  }
  std::vector<int64_t> counts;
  for (const auto& file : files) {
    MOEV_CHECK(fs::is_regular_file(file), "CIFAR-10 batch ", file.string(), " not found");
    const auto bytes = static_cast<int64_t>(fs::file_size(file));
    MOEV_CHECK(bytes > 0 && bytes % kCifar10RecordBytes == 0, "CIFAR-10 batch ", file.string(),
               " has ", bytes, " bytes, expected a positive multiple of ", kCifar10RecordBytes,
               " (1 label byte + 3072 pixel bytes per image)");
    counts.push_back(bytes / kCifar10RecordBytes);
  }

  const fs::path meta = root / "batches.meta.txt";
  ImageSet set;
  set.class_names = fs::exists(meta) ? read_meta(meta) : cifar10_class_names();
  MOEV_CHECK(!set.class_names.empty(), "CIFAR-10 class list ", meta.string(), " is empty");
  int64_t n = 0;
  for (int64_t count : counts) n += count;
  set.images = torch::empty({n, 3, 32, 32}, torch::kUInt8);
  set.labels = torch::empty({n}, torch::kInt64);
  set.source = root.string();

  uint8_t* images = set.images.data_ptr<uint8_t>();
  int64_t* labels = set.labels.data_ptr<int64_t>();
  std::vector<char> buffer;
  int64_t at = 0;
  for (size_t f = 0; f < files.size(); ++f) {
    buffer.resize(static_cast<size_t>(counts[f] * kCifar10RecordBytes));
    std::ifstream in(files[f], std::ios::binary);
    MOEV_CHECK(in.read(buffer.data(), static_cast<std::streamsize>(buffer.size())),
               "cannot read CIFAR-10 batch ", files[f].string());
    for (int64_t r = 0; r < counts[f]; ++r, ++at) {
      const char* record = buffer.data() + r * kCifar10RecordBytes;
      const auto label = static_cast<uint8_t>(record[0]);
      MOEV_CHECK(label < set.class_names.size(), "CIFAR-10 batch ", files[f].string(), ": record ",
                 r, " has label ", int{label}, ", expected 0..", set.class_names.size() - 1);
      labels[at] = label;
      std::copy(record + 1, record + kCifar10RecordBytes,
                reinterpret_cast<char*>(images + at * kImageBytes));
    }
  }
  return set;
}

}  // namespace moev::data
