// `moev fuse`: trains the fusion layer of a multi-branch model with its branches
// frozen (Sun et al. section 2.3) and writes the fused model as a new checkpoint.
#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "moev/core/error.h"
#include "moev/io/table.h"
#include "moev/train/checkpoint.h"
#include "moev/train/fusion.h"
#include "moev/train/trainer.h"

namespace moev::app {

namespace {
struct FuseFlags {
  std::string checkpoint, out, result;
  train::FusionOptions o;
  int threads = 0;
};
}  // namespace

Runner add_fuse(CLI::App& app) {
  auto* cmd = app.add_subcommand("fuse", "train the fusion layer of a multi-branch model (branches frozen)");
  auto f = std::make_shared<FuseFlags>();
  cmd->add_option("checkpoint", f->checkpoint, "checkpoint of a model with model.branches >= 2")->required();
  cmd->add_option("--out", f->out, "fused checkpoint to write (default: <checkpoint dir>/fused.pt)");
  cmd->add_option("--epochs", f->o.epochs, "passes over the training set")->capture_default_str();
  cmd->add_option("--lr", f->o.lr, "peak learning rate")->capture_default_str();
  cmd->add_option("--batch-size", f->o.batch_size, "batch size")->capture_default_str();
  cmd->add_option("--threads", f->threads, "intra-op threads (0: all cores)");
  cmd->add_option("--result", f->result, "also write the test top-1 figures to this JSON file");
  cmd->footer("\nExample:\n  moev fuse runs/mb3/checkpoint.pt --epochs 30");
  return [f]() {
    train::set_threads(f->threads);
    const bool default_out = f->out.empty();
    if (default_out) {
      const auto slash = f->checkpoint.find_last_of('/');
      f->out = (slash == std::string::npos ? std::string(".") : f->checkpoint.substr(0, slash)) + "/fused.pt";
    }
    // Checked before training, which the paths would otherwise fail after.
    namespace fs = std::filesystem;
    MOEV_CHECK(fs::weakly_canonical(f->out) != fs::weakly_canonical(f->checkpoint),
               default_out ? "the output, by default fused.pt beside the input (" : "--out ", f->out,
               default_out ? "), is the input checkpoint itself; give --out another file: " : ": is the input checkpoint; ",
               "fusion writes a new file and leaves the trained run as it is");
    // A typo in --out replaced a training run's checkpoint (or any file) at exit 0; a new file, or an
    // earlier fusion's output, is what --out may name.
    if (fs::exists(f->out) && !fs::is_directory(f->out)) {
      bool fused = false;
      try {
        fused = nlohmann::json::parse(train::load_checkpoint(f->out, train::CheckpointLoad::kConfig).state_json)
                    .contains("fusion");
      } catch (const std::exception&) {  // not a checkpoint at all
      }
      MOEV_CHECK(fused, "--out ", f->out, ": exists and is not the output of an earlier fuse (a run's checkpoint, ",
                 "another file); fuse replaces only its own output: remove the file or name another --out");
    }
    MOEV_CHECK(!fs::is_directory(f->out), f->out, ": is a directory; expected a file to write (--out)");
    check_result_file(f->result);
    MOEV_CHECK(f->result.empty() || fs::weakly_canonical(f->result) != fs::weakly_canonical(f->out), "--result ",
               f->result, ": is --out, the fused checkpoint itself; name another file");
    check_parent_directory(f->out, "--out");  // now, not after the training (the error named the temporary file)
    f->o.progress = &std::cerr;
    f->o.interactive = stderr_is_terminal();
    auto r = train::train_fusion(f->checkpoint, f->out, f->o);
    std::printf("test top-1: mean of branch logits %.4f, fusion %.4f (fusion trained in %.1f s: %lld steps, %lld "
                "epoch%s of %lld images)\nwrote %s\n",
                r.mean_of_logits.top1, r.fused.top1, r.train_seconds, static_cast<long long>(r.steps),
                static_cast<long long>(f->o.epochs), f->o.epochs == 1 ? "" : "s",
                static_cast<long long>(r.train_images), f->out.c_str());
    if (!f->result.empty()) {
      nlohmann::json j{{"top1", r.fused.top1}, {"mean_of_logits_top1", r.mean_of_logits.top1},
                       {"seconds", r.train_seconds}, {"steps", r.steps},
                       {"train_images", r.train_images}, {"images_seen", r.images_seen},
                       {"test_images", r.fused.images}, {"checkpoint", f->out},
                       {"options", {{"epochs", f->o.epochs}, {"batch_size", f->o.batch_size}, {"lr", f->o.lr}}}};
      make_parent_directory(f->result, "--result");
      io::write_text_atomic(f->result, j.dump(2) + "\n");
    }
    return 0;
  };
}

}  // namespace moev::app
