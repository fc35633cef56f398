// `moev data mosaic`: the multi-label task of DESIGN.md, 2x2 mosaics of
// Fashion-MNIST images tagged with the set of their classes, written as PNG
// files and train.csv / test.csv manifests (deterministic per seed).
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <system_error>

#include "commands.h"
#include "moev/data/idx_reader.h"
#include "moev/data/manifest.h"

namespace moev::app {

namespace {
struct MosaicFlags {
  std::string out = "data/mosaic", source = "/usr/share/datasets/fashion-mnist";
  int64_t train = 20000, test = 4000;
  int64_t seed = 0;
};
}  // namespace

Runner add_data(CLI::App& app) {
  auto* cmd = app.add_subcommand("data", "make data sets");
  cmd->require_subcommand(1);
  auto* mosaic = cmd->add_subcommand("mosaic", "2x2 Fashion-MNIST mosaics tagged with their classes (multi-label)");
  auto f = std::make_shared<MosaicFlags>();
  mosaic->add_option("--out", f->out, "directory for the PNG files and manifests")->capture_default_str();
  mosaic->add_option("--fashion-mnist", f->source, "Fashion-MNIST IDX directory")->capture_default_str();
  mosaic->add_option("--train", f->train, "training mosaics (from the training images)")->capture_default_str();
  mosaic->add_option("--test", f->test, "test mosaics (from the test images)")->capture_default_str();
  mosaic->add_option("--seed", f->seed, "seed of the image draws")->capture_default_str();
  return [f, mosaic]() {
    if (!mosaic->parsed()) return 1;
    // Checked before any file is written; 10^7 mosaics is ~20 GB of PNGs, past any use of this task.
    constexpr int64_t kMaxMosaics = 10000000;
    MOEV_CHECK(f->train >= 1 && f->train <= kMaxMosaics, "--train ", f->train, ": expected 1..", kMaxMosaics, " mosaics");
    MOEV_CHECK(f->test >= 1 && f->test <= kMaxMosaics, "--test ", f->test, ": expected 1..", kMaxMosaics, " mosaics");
    MOEV_CHECK(!f->out.empty(), "--out is empty: expected a directory for the mosaics");
    MOEV_CHECK(f->seed >= 0, "--seed ", f->seed, ": expected >= 0");
    namespace fs = std::filesystem;
    // A data set is never rewritten in place: an interrupted run would leave a
    // manifest whose tags describe the images of another seed. The mosaics go
    // to a staging directory that is renamed into place once both manifests exist.
    fs::path out = fs::path(f->out).lexically_normal();
    if (!out.has_filename()) out = out.parent_path();  // "dir/" names dir
    // A link is followed: the staging directory is renamed onto what it names
    // (a directory cannot replace the link itself).
    std::error_code link_ec;
    if (fs::is_symlink(out, link_ec)) out = fs::weakly_canonical(out, link_ec);
    std::error_code ec;
    MOEV_CHECK(out.has_filename() && out.filename() != "." && out.filename() != "..", "--out ", f->out,
               ": expected a directory name (the mosaics are staged beside it)");
    MOEV_CHECK(!fs::exists(out) || fs::is_directory(out), "--out ", f->out, " is a file; expected a directory");
    const bool empty = !fs::exists(out) || fs::is_empty(out, ec);
    MOEV_CHECK(!ec, "--out ", f->out, ": cannot read it (", ec.message(), ")");
    MOEV_CHECK(empty, "--out ", f->out, " is not empty (a data set made before?); choose a new directory or delete it first");
    // Read first: a wrong --fashion-mnist left an empty staging directory behind.
    data::ImageSet train_set, test_set;
    try {
      train_set = data::load_fashion_mnist(f->source, true);
      test_set = data::load_fashion_mnist(f->source, false);
    } catch (const Error& e) {
      // The reader's hint for a folder tree names train's --format, which this command does not have.
      std::string why = e.what();
      const auto hint = why.find(": for a folder of images per class give --format folder");
      if (hint != std::string::npos)
        why = why.substr(0, hint) + ": moev data mosaic reads Fashion-MNIST's IDX files only (--fashion-mnist DIR)";
      fail("--fashion-mnist ", f->source, ": ", why);
    }
    const fs::path stage = out.string() + ".moev-partial";
    const fs::path marker = stage / ".moev-partial";
    MOEV_CHECK(!fs::exists(stage) || fs::exists(marker), stage.string(),
               " exists but was not made by moev data mosaic; move it away");
    fs::remove_all(stage);  // an interrupted run's, by the marker
    fs::create_directories(stage, ec);
    MOEV_CHECK(!ec, "--out ", f->out, ": cannot create ", stage.string(), " (", ec.message(), ")");
    std::ofstream(marker) << "moev data mosaic staging directory; renamed to " << out.string() << " when complete\n";
    data::write_mosaics(train_set, f->train, static_cast<uint64_t>(f->seed), stage.string(), "train");
    data::write_mosaics(test_set, f->test, static_cast<uint64_t>(f->seed), stage.string(), "test");
    fs::rename(stage, out, ec);  // the marker goes after: a failed rename leaves a staging directory moev can clear
    MOEV_CHECK(!ec, "cannot rename ", stage.string(), " to ", out.string(), " (", ec.message(), ")");
    fs::remove(out / marker.filename(), ec);
    std::printf("wrote %lld + %lld mosaics (56x56 PNG): %s, %s\n", (long long)f->train, (long long)f->test,
                (out / "train.csv").string().c_str(), (out / "test.csv").string().c_str());
    return 0;
  };
}

}  // namespace moev::app
