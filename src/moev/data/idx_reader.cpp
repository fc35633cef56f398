// IDX reading. gzopen/gzread read uncompressed files transparently, so one code
// path serves .gz and raw files; sizes are checked against the header so a
// truncated download fails here, by name, rather than as garbage images later.
#include "moev/data/idx_reader.h"

#include <torch/torch.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>

#include "moev/core/bytes.h"
#include "moev/core/error.h"

namespace moev::data {
namespace {

namespace fs = std::filesystem;

constexpr uint32_t kImagesMagic = 2051;  // 0x00000803: unsigned bytes, 3 dims
constexpr uint32_t kLabelsMagic = 2049;  // 0x00000801: unsigned bytes, 1 dim
constexpr uint32_t kMaxSide = 1 << 15;

// Why the IDX files are not in `dir`, for the message: a folder tree read with the wrong data.format (the
// package hint sent people to install what they had), the package missing, or another directory.
std::string missing_hint(const fs::path& dir) {
  std::error_code ec;
  std::string folders;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (!it->is_directory(ec) || it->path().filename().string().rfind('.', 0) == 0) continue;
    // torchvision's download keeps the files in FashionMNIST/raw.
    for (const char* name : {"train-images-idx3-ubyte.gz", "train-images-idx3-ubyte"})
      if (fs::exists(it->path() / name, ec)) return "; they are in " + it->path().string() + ": give that (--data)";
    folders = it->path().string();
  }
  if (!folders.empty())
    return "; " + dir.string() + " holds folders (one per class?), which data.format = fashion-mnist does not "
           "read: for a folder of images per class give --format folder (data.format = \"folder\")";
  std::string plain = dir.string();
  while (plain.size() > 1 && plain.back() == '/') plain.pop_back();
  if (fs::path(plain).lexically_normal() == fs::path("/usr/share/datasets/fashion-mnist"))
    return "; install the Debian package dataset-fashion-mnist";
  return "; Fashion-MNIST is read from its IDX files (train-images-idx3-ubyte.gz, ...) in the directory given, "
         "which the Debian package dataset-fashion-mnist puts in /usr/share/datasets/fashion-mnist (another kind "
         "of data set needs another data.format, --format)";
}

class IdxFile {
 public:
  explicit IdxFile(const std::string& path) : path_(path) {
    MOEV_CHECK(fs::is_regular_file(path), "IDX file ", path, " not found");
    file_ = gzopen(path.c_str(), "rb");
    MOEV_CHECK(file_ != nullptr, "cannot open IDX file ", path, ": ", std::strerror(errno));
    gzbuffer(file_, 1 << 18);
  }
  ~IdxFile() { gzclose(file_); }
  IdxFile(const IdxFile&) = delete;
  IdxFile& operator=(const IdxFile&) = delete;

  // Reads up to n bytes; fewer only when the data ends (a gzip stream cut short
  // counts as ending, since the size check that follows reports it better).
  int64_t read(void* dst, int64_t n) {
    auto* out = static_cast<unsigned char*>(dst);
    int64_t done = 0;
    while (done < n) {
      const auto chunk = static_cast<unsigned>(std::min<int64_t>(n - done, 1 << 30));
      const int got = gzread(file_, out + done, chunk);
      if (got < 0) {
        int code = Z_OK;
        const char* message = gzerror(file_, &code);
        if (code == Z_BUF_ERROR) break;
        fail("cannot read IDX file ", path_, ": ", message);
      }
      if (got == 0) break;
      done += got;
    }
    return done;
  }

  // Bytes left after the expected data; IDX files carry nothing after it.
  int64_t count_rest() {
    std::vector<unsigned char> sink(1 << 16);
    int64_t rest = 0;
    for (int64_t got; (got = read(sink.data(), static_cast<int64_t>(sink.size()))) > 0;) {
      rest += got;
    }
    return rest;
  }

  uint32_t read_u32(const char* what) {
    unsigned char b[4];
    MOEV_CHECK(read(b, 4) == 4, "IDX file ", path_, " ends inside its header (reading ", what, ")");
    return big_endian32(b);
  }

  // Checks, before anything is allocated, that the file can hold what its header
  // promises: exactly for a raw file, and for gzip by deflate's best ratio
  // (about 1032:1), so a corrupt header cannot ask for terabytes.
  void check_capacity(int64_t header_bytes, int64_t bytes) {
    const auto on_disk = static_cast<int64_t>(fs::file_size(path_));
    if (gzdirect(file_)) {
      MOEV_CHECK(on_disk == header_bytes + bytes, "IDX file ", path_,
                 on_disk < header_bytes + bytes ? " is truncated" : " has trailing data",
                 ": its header promises ", header_bytes + bytes, " bytes but it holds ", on_disk);
    } else {
      MOEV_CHECK(bytes <= 1100 * on_disk, "IDX file ", path_,
                 " is truncated or corrupt: its header promises ", header_bytes + bytes,
                 " bytes, more than its ", on_disk, " compressed bytes can hold");
    }
  }

  // Reads exactly `bytes` of payload and checks nothing follows.
  void read_payload(void* dst, int64_t header_bytes, int64_t bytes) {
    const int64_t got = read(dst, bytes);
    const int64_t rest = got == bytes ? count_rest() : 0;
    MOEV_CHECK(got == bytes && rest == 0, "IDX file ", path_,
               got < bytes ? " is truncated" : " has trailing data", ": its header promises ",
               header_bytes + bytes, " bytes (uncompressed) but it holds ",
               header_bytes + got + rest);
  }

  const std::string& path() const { return path_; }

 private:
  std::string path_;
  gzFile file_ = nullptr;
};

void check_magic(IdxFile& file, uint32_t expected, const char* kind) {
  const uint32_t magic = file.read_u32("magic number");
  if (magic == expected) return;
  const char* hint = magic == kImagesMagic   ? " (this is an image file)"
                     : magic == kLabelsMagic ? " (this is a label file)"
                                             : " (not an IDX ubyte file)";
  fail("IDX file ", file.path(), ": magic number ", magic, hint, ", expected ", expected, " for ",
       kind);
}

std::string find_split_file(const fs::path& dir, const std::string& stem) {
  for (const char* ext : {".gz", ""}) {
    const fs::path path = dir / (stem + ext);
    if (fs::is_regular_file(path)) return path.string();
  }
  fail("Fashion-MNIST file ", (dir / (stem + ".gz")).string(), " not found", missing_hint(dir));
}

}  // namespace

const std::vector<std::string>& fashion_mnist_class_names() {
  static const std::vector<std::string> names{"T-shirt/top", "Trouser",   "Pullover", "Dress",
                                              "Coat",        "Sandal",    "Shirt",    "Sneaker",
                                              "Bag",         "Ankle boot"};
  return names;
}

ImageSet read_idx(const std::string& images_gz_or_raw, const std::string& labels_gz_or_raw) {
  IdxFile images_file(images_gz_or_raw);
  check_magic(images_file, kImagesMagic, "IDX3 ubyte images");
  const uint32_t n = images_file.read_u32("image count");
  const uint32_t rows = images_file.read_u32("row count");
  const uint32_t cols = images_file.read_u32("column count");
  MOEV_CHECK(rows >= 1 && rows <= kMaxSide && cols >= 1 && cols <= kMaxSide, "IDX file ",
             images_gz_or_raw, ": image size ", rows, "x", cols, " outside 1..", kMaxSide);

  images_file.check_capacity(16, int64_t{n} * rows * cols);

  IdxFile labels_file(labels_gz_or_raw);
  check_magic(labels_file, kLabelsMagic, "IDX1 ubyte labels");
  const uint32_t n_labels = labels_file.read_u32("label count");
  MOEV_CHECK(n == n_labels, "IDX files disagree: ", images_gz_or_raw, " has ", n, " images but ",
             labels_gz_or_raw, " has ", n_labels, " labels");

  labels_file.check_capacity(8, n);

  ImageSet set;
  set.images = torch::empty({n, 1, rows, cols}, torch::kUInt8);
  images_file.read_payload(set.images.data_ptr<uint8_t>(), 16, set.images.numel());

  std::vector<uint8_t> raw_labels(n);
  labels_file.read_payload(raw_labels.data(), 8, n);
  set.labels = torch::empty({n}, torch::kInt64);
  auto* labels = set.labels.data_ptr<int64_t>();
  int64_t max_label = -1;
  for (uint32_t i = 0; i < n; ++i) {
    labels[i] = raw_labels[i];
    max_label = std::max<int64_t>(max_label, raw_labels[i]);
  }

  const int64_t num_classes = max_label + 1;
  if (num_classes == 10) {
    set.class_names = fashion_mnist_class_names();
  } else {
    for (int64_t c = 0; c < num_classes; ++c) set.class_names.push_back(std::to_string(c));
  }
  // Both files: a message about the set (a fingerprint that differs) named the images when the labels changed.
  set.source = images_gz_or_raw + " (labels " + labels_gz_or_raw + ")";
  return set;
}

ImageSet load_fashion_mnist(const std::string& dir, bool train) {
  MOEV_CHECK(!fs::exists(dir) || fs::is_directory(dir), "Fashion-MNIST directory ", dir,
             " is a file; expected the directory of the IDX files (or --format folder for one folder per class)");
  MOEV_CHECK(fs::is_directory(dir), "Fashion-MNIST directory ", dir, " not found", missing_hint(dir));
  const std::string prefix = train ? "train" : "t10k";
  const std::string images = find_split_file(dir, prefix + "-images-idx3-ubyte");
  const std::string labels = find_split_file(dir, prefix + "-labels-idx1-ubyte");
  ImageSet set = read_idx(images, labels);
  // A split may lack a class, but labels past 9 mean this is not Fashion-MNIST.
  MOEV_CHECK(set.num_classes() <= 10, "Fashion-MNIST labels in ", labels, " go up to ",
             set.num_classes() - 1, ", expected 0..9");
  set.class_names = fashion_mnist_class_names();
  return set;
}

}  // namespace moev::data
