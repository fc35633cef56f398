#include "moev/train/datasets.h"

#include <algorithm>
#include <cstdio>
#include <map>

#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/data/batch_loader.h"
#include "moev/data/cifar10.h"
#include "moev/data/idx_reader.h"
#include "moev/data/image_folder.h"
#include "moev/train/checkpoint.h"
#include "moev/data/manifest.h"
#include "moev/data/subset.h"

namespace moev::train {

namespace {

// A multi-label manifest as an ImageSet: labels = each image's first tag column.
data::ImageSet open_manifest(const std::string& path, const models::ModelConfig& m,
                             const std::vector<std::string>& vocabulary, const data::ReadOptions& ro) {
  auto ml = data::read_manifest(path, m.image_size, m.image_size, m.channels, vocabulary, ro);
  data::ImageSet s;
  s.images = ml.images;
  s.targets = ml.targets;
  s.labels = ml.targets.argmax(1).contiguous();  // first maximum: the lowest tag column
  s.class_names = ml.tags;
  s.source = ml.source;
  s.colour_as_grey = ml.colour_as_grey;
  return s;
}

// The seed of a folder tree's image order: fixed, so every run, evaluation and clustering of a folder reads it
// in the same order.
constexpr uint64_t kFolderOrderSeed = 0x6d6f6576;  // "moev"

[[noreturn]] void unknown_format(const std::string& format) {
  fail("data.format = '", format, "': expected fashion-mnist, folder, cifar10 or manifest");
}

data::ImageSet open_one(const DataConfig& d, const models::ModelConfig& m, bool train,
                        const std::vector<std::string>& vocabulary, const data::ReadOptions& ro) {
  if (d.format == "manifest") {
    const std::string& file = train ? d.path : d.test_path;
    MOEV_CHECK(!file.empty(), "data.format = 'manifest' needs data.test_path: the test manifest CSV");
    return open_manifest(file, m, vocabulary, ro);
  }
  if (d.format == "fashion-mnist") return data::load_fashion_mnist(d.path, train);
  if (d.format == "cifar10") return data::read_cifar10(d.path, train);
  if (d.format == "folder") {
    // Never the training root in its place: the test figures would be training accuracy under another name.
    MOEV_CHECK(train || !d.test_path.empty(),
               "data.format = 'folder' needs data.test_path: the root of the test images, one folder per class "
               "(eval and analyze: --data DIR); the training images (data.path = '", d.path,
               "') are not a test set");
    // Read class by class, the first N images (data.train_limit, test_limit, eval --limit) were all one class,
    // scored 100 % after two steps, and each MoE routing group of an evaluation held a single class, dropping
    // twice the tokens mixed groups drop: the images come in a fixed mixed order, as IDX files do.
    return data::mixed_order(
        data::read_image_folder(train ? d.path : d.test_path, m.image_size, m.image_size, m.channels, ro),
        kFolderOrderSeed);
  }
  unknown_format(d.format);
}

data::ImageSet limit(data::ImageSet s, int64_t n, const char* key) {
  MOEV_CHECK(n >= 0, key, " = ", n, ": expected >= 0 (0: every image)");
  if (n > 0 && n < s.size()) {
    s.images = s.images.narrow(0, 0, n).contiguous();
    s.labels = s.labels.narrow(0, 0, n).contiguous();
    if (s.multilabel()) s.targets = s.targets.narrow(0, 0, n).contiguous();
  }
  return s;
}

void check_fits(const data::ImageSet& s, const models::ModelConfig& m) {
  MOEV_CHECK(s.images.size(1) == m.channels && s.images.size(2) == m.image_size &&
                 s.images.size(3) == m.image_size,
             "dataset ", s.source, " has images of ", s.images.size(1), "x", s.images.size(2), "x",
             s.images.size(3), " but the model expects ", m.channels, "x", m.image_size, "x",
             m.image_size, " (set model.channels / model.image_size)");
  MOEV_CHECK(s.num_classes() <= m.num_classes, "dataset ", s.source, " has ", s.num_classes(),
             " classes but model.num_classes = ", m.num_classes);
  // A tag column without an output (or an output without a tag) has no meaning.
  MOEV_CHECK(!s.multilabel() || s.num_classes() == m.num_classes, "dataset ", s.source, " has ",
             s.num_classes(), " tags but model.num_classes = ", m.num_classes, ": expected one output per tag");
}

}  // namespace

namespace {

// Names that print alike (a folder's é composed on one machine, e and a
// combining accent on another) are told apart by their bytes.
std::string hex_bytes(const std::string& s) {
  std::string out;
  char hex[4];
  for (unsigned char ch : s) {
    std::snprintf(hex, sizeof hex, " %02x", ch);
    out += hex;
  }
  return out;
}

bool non_ascii(const std::string& x) {
  return std::any_of(x.begin(), x.end(), [](char ch) { return static_cast<unsigned char>(ch) >= 0x80; });
}

}  // namespace

namespace {

// Equal, or equal with '_' for each '/', ' ' and ','.
bool same_class_name(const std::string& a, const std::string& b) {
  // A folder name cannot hold '/' (Fashion-MNIST's "T-shirt/top"); data mosaic writes '_' for it, and for
  // the spaces and commas a tag cannot hold.
  auto folder_safe = [](std::string n) {
    for (char& ch : n)
      if (ch == '/' || ch == ' ' || ch == ',') ch = '_';
    return n;
  };
  return a == b || folder_safe(a) == folder_safe(b);
}

}  // namespace

std::vector<std::string>::const_iterator find_class(const std::vector<std::string>& classes, const std::string& name,
                                                    const std::string& source, const std::string& learnt_from) {
  auto at = std::find(classes.begin(), classes.end(), name);
  if (at != classes.end()) return at;
  auto alike = [&](const std::string& n) { return same_class_name(n, name); };
  at = std::find_if(classes.begin(), classes.end(), alike);
  const auto again = at == classes.end() ? at : std::find_if(at + 1, classes.end(), alike);
  MOEV_CHECK(again == classes.end(), source, ": class '", name, "' could stand for '", *at, "' or '", *again, "' of ",
             learnt_from, "; expected a folder named as one of them exactly");
  return at;
}

std::vector<std::string> align_classes(data::ImageSet& test, const std::vector<std::string>& classes,
                                       const std::string& learnt_from) {
  if (test.multilabel() || test.class_names == classes) return {};
  std::vector<int64_t> to(test.class_names.size());
  std::vector<std::string> taken(classes.size());
  for (size_t c = 0; c < test.class_names.size(); ++c) {
    const std::string& got = test.class_names[c];
    const auto at = find_class(classes, got, "test set " + test.source, learnt_from);
    if (at == classes.end()) {
      std::string known, alike;
      for (const auto& n : classes) {
        known += (known.empty() ? "'" : ", '") + n + "'";
        if (non_ascii(got) && non_ascii(n)) alike += " '" + n + "':" + hex_bytes(n);  // composed otherwise?
      }
      fail("test set ", test.source, ": class '", got, "' is not one of the ", classes.size(), " classes of ",
           learnt_from, " (", known, ")",
           alike.empty() ? "" : "; its bytes" + hex_bytes(got) + " against" + alike,
           ": expected test classes named as the model's ('_' may stand for '/', ' ' or ',')");
    }
    const size_t j = static_cast<size_t>(at - classes.begin());
    MOEV_CHECK(taken[j].empty(), "test set ", test.source, ": classes '", taken[j], "' and '", got,
               "' both stand for '", classes[j], "' of ", learnt_from, "; expected one each");
    taken[j] = got;
    to[c] = static_cast<int64_t>(j);
  }
  test.labels = torch::tensor(to, torch::kLong).index_select(0, test.labels);
  test.class_names = classes;
  std::vector<std::string> missing;
  for (size_t j = 0; j < classes.size(); ++j)
    if (taken[j].empty()) missing.push_back(classes[j]);
  return missing;
}

std::string data_fingerprint(const data::ImageSet& set) {
  std::map<std::string, at::Tensor> parts{{"images", set.images}, {"labels", set.labels}};
  if (set.targets.defined()) parts.emplace("targets", set.targets);
  std::string names;
  for (const auto& n : set.class_names) names += n + '\n';
  parts.emplace("class_names", torch::from_blob(names.data(), {static_cast<int64_t>(names.size())}, torch::kUInt8));
  return weights_fingerprint(parts);
}

std::string index_fingerprint(const std::vector<int64_t>& values) {
  auto t = torch::from_blob(const_cast<int64_t*>(values.data()), {static_cast<int64_t>(values.size())}, torch::kInt64);
  return weights_fingerprint({{"values", t}});
}

void check_resume_data(const std::string& command, const std::string& checkpoint, const std::string& saved,
                       const std::string& now, const std::string& source, const std::string& format) {
  // Folder images have come in a fixed mixed order since session 42; a checkpoint without a fingerprint may stand
  // at a position in the old order (its limits then took another sample), and which it was cannot be told.
  MOEV_CHECK(!saved.empty() || format != "folder", command, ": ", checkpoint, " predates the fingerprint of its ",
             "training set, so moev cannot tell whether it read the folder in today's order (older versions read it ",
             "class by class): the run could go on over other batches (and limits over other images); start a new ",
             "run");
  MOEV_CHECK(saved.empty() || now == saved, command, ": the training set ", source, " differs from the one ",
             checkpoint, " was trained on (fingerprint ", now, ", then ", saved, "): images added, removed, changed or ",
             "subset otherwise (or decoded otherwise, by another moev version: the fingerprint is of the pixels read); ",
             "resume on that data, or start a new run with another --out");
}

Datasets open_datasets(const DataConfig& d, const models::ModelConfig& m, bool load_train, bool load_test,
                       const std::atomic<bool>* stop) {
  Datasets out;
  // A multi-label test set takes its tag columns from the training set (or
  // data.tags, which a trained run stores), so a column means one tag in both.
  std::vector<std::string> vocabulary = d.tags;
  data::ReadOptions ro;
  ro.fit = data::parse_fit(d.resize, "data.resize");
  ro.stop = stop;
  // A folder of colour photos trained a grey model without a word (the presets have one channel). Counted
  // over the images read, before data.train_limit or data.per_class keeps some: the count is of the source.
  auto note_colour = [&](const data::ImageSet& s) {
    if (s.colour_as_grey > 0)
      out.notes.push_back(s.source + ": " + std::to_string(s.colour_as_grey) + " of its " +
                          std::to_string(s.size()) + " images are stored in colour (RGB, or a colour palette), " +
                          "and model.channels = 1 reads them as grey (luminance); model.channels = 3 keeps the " +
                          "colours");
  };
  int64_t train_colour = 0;
  if (load_train) {
    validate_training_data(d, m);
    out.train = open_one(d, m, /*train=*/true, vocabulary, ro);
    note_colour(out.train);
    train_colour = out.train.colour_as_grey;
    out.train = limit(std::move(out.train), d.train_limit, "data.train_limit");
    if (out.train.multilabel()) vocabulary = out.train.class_names;
    MOEV_CHECK(d.per_class == 0 || !out.train.multilabel(), "data.per_class = ", d.per_class,
               ": a per-class subset needs single-label data, not data.format = 'manifest'");
    if (d.per_class > 0) out.train = data::class_subset(out.train, d.per_class, d.subset_seed);
    check_fits(out.train, m);
    // Outputs no training image can have would be made-up classes in predict
    // and free guesses in top-5.
    MOEV_CHECK(out.train.num_classes() == m.num_classes, "dataset ", out.train.source, " has ",
               out.train.num_classes(), " classes but model.num_classes = ", m.num_classes, ": expected ",
               out.train.num_classes(), " (set model.num_classes)");
  }
  if (load_test) {
    MOEV_CHECK(d.format != "manifest" || !vocabulary.empty(),
               "data.tags is empty and there is no training manifest to take the tags from");
    // Held beside the training set: the two together must fit.
    if (out.train.images.defined()) ro.held_bytes = static_cast<double>(out.train.images.nbytes());
    out.test = open_one(d, m, /*train=*/false, vocabulary, ro);
    // Beside a training set in colour, said once for both; a colour test set beside a grey one is said.
    if (train_colour == 0) note_colour(out.test);
    out.test = limit(std::move(out.test), d.test_limit, "data.test_limit");
    check_fits(out.test, m);
    if (load_train) {
      // Allowed (a test set of some classes), but the figures then leave those out: said, as a folder short of
      // a class by mistake trained without a word.
      const auto missing = align_classes(out.test, out.train.class_names, "the training set " + out.train.source);
      std::string names;
      for (size_t j = 0; j < missing.size() && j < 5; ++j) names += (j ? ", '" : "'") + missing[j] + "'";
      if (missing.size() > 5) names += ", ...";
      if (!missing.empty())
        out.notes.push_back("test set " + out.test.source + " has no folder for " + std::to_string(missing.size()) +
                            " of the " + std::to_string(out.train.num_classes()) + " training classes (" + names +
                            "): its figures leave them out");
    }
  }
  out.mean = d.mean;
  out.std = d.std;
  if (out.mean.empty() || out.std.empty()) {
    MOEV_CHECK(load_train, "data.mean / data.std are not set and there is no training set to ",
               "compute them from");
    auto [mean, std] = data::channel_stats(out.train);
    if (out.mean.empty()) out.mean = mean;
    if (out.std.empty()) out.std = std;
  }
  MOEV_CHECK(static_cast<int64_t>(out.mean.size()) == m.channels &&
                 static_cast<int64_t>(out.std.size()) == m.channels,
             "data.mean / data.std: expected ", m.channels, " value(s), one per channel");
  return out;
}

void validate_training_data(const DataConfig& d, const models::ModelConfig& m) {
  static const char* kFormats[] = {"fashion-mnist", "folder", "cifar10", "manifest"};  // as open_one reads them
  if (std::find(std::begin(kFormats), std::end(kFormats), d.format) == std::end(kFormats)) unknown_format(d.format);
  MOEV_CHECK(d.per_class >= 0, "data.per_class = ", d.per_class, ": expected >= 0 (0: every image)");
  // Also checked where the sets are cut; here too, so --print-config refuses what the run would.
  MOEV_CHECK(d.train_limit >= 0, "data.train_limit = ", d.train_limit, ": expected >= 0 (0: every image)");
  MOEV_CHECK(d.test_limit >= 0, "data.test_limit = ", d.test_limit, ": expected >= 0 (0: every image)");
  // Checked here, so the message names the config keys (the loader's own check cannot).
  MOEV_CHECK(d.crop_padding >= 0, "data.crop_padding = ", d.crop_padding, ": expected >= 0 pixels");
  // Past half the side a crop can be all padding: an image of nothing, trained on without a word.
  MOEV_CHECK(2 * d.crop_padding <= m.image_size, "data.crop_padding = ", d.crop_padding, ": expected at most half ",
             "the ", m.image_size, "-pixel image side (", m.image_size / 2, "); a larger shift can crop padding alone");
  MOEV_CHECK(d.random_erase >= 0 && d.random_erase <= 1, "data.random_erase = ", d.random_erase,
             ": expected a probability in [0, 1]");
  data::parse_auto_augment(d.auto_augment, "data.auto_augment");
  // data.augment = false turns off the whole training augmentation: these ran as if never set.
  MOEV_CHECK(d.augment || (d.random_erase == 0 && d.auto_augment == "none"), "data.random_erase = ", d.random_erase,
             " and data.auto_augment = '", d.auto_augment, "' with data.augment = false, which turns off every ",
             "training augmentation (crop, flip, AutoAugment, random erasing): set data.augment = true, or drop them");
  data::parse_fit(d.resize, "data.resize");
  // IDX and CIFAR images have the model's size already: there is nothing to crop.
  MOEV_CHECK(d.resize == "stretch" || d.format == "folder" || d.format == "manifest", "data.resize = ", d.resize,
             ": applies to the images of data.format = folder or manifest, not to ", d.format,
             "'s, which are read at their own size");
}

data::LoaderOptions training_loader_options(const DataConfig& data, const Datasets& ds, int64_t batch_size,
                                            uint64_t seed) {
  data::LoaderOptions lo;
  lo.batch_size = batch_size;
  lo.seed = seed;
  lo.augment = data.augment;
  lo.crop_padding = data.crop_padding;
  lo.hflip = data.hflip;
  lo.random_erase = data.random_erase;
  lo.auto_augment = data::parse_auto_augment(data.auto_augment, "data.auto_augment");
  lo.mean = ds.mean;
  lo.std = ds.std;
  return lo;
}

}  // namespace moev::train
