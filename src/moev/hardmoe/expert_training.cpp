#include "moev/hardmoe/expert_training.h"

#include <filesystem>
#include <fstream>
#include <tuple>

#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/hardmoe/partition.h"
#include "moev/io/file_lock.h"
#include "moev/io/table.h"
#include "moev/models/model_config.h"
#include "moev/train/checkpoint.h"
#include "moev/train/teacher.h"

namespace moev::hardmoe {

namespace fs = std::filesystem;
using nlohmann::json;

std::string expert_result_file(const std::string& dir, int64_t expert) {
  return (fs::path(expert_dir(dir, expert)) / "result.json").string();
}

io::RunConfig expert_run_config(const HardMoEConfig& c, const io::RunConfig& trunk, const json& overrides,
                                int64_t expert, const std::string& source) {
  io::RunConfig cfg = trunk;
  cfg.train.max_steps = 0;  // a cap of the trunk's run is not the expert's
  if (overrides.is_object() && !overrides.empty()) io::apply_json(cfg, overrides, source);
  // The partition's rows index the trunk's training set, and the gater reads
  // the same normalised pixels as the expert: the data set stays the trunk's.
  // A config naming other data (a --trunk of another run) would be ignored, so
  // it is refused, as are images of another size than the trunk's.
  std::string differ = train::training_data_difference(cfg.data, trunk.data);
  auto test_data = cfg.data;
  test_data.format = trunk.data.format;  // named once, by the training data's difference
  test_data.path = trunk.data.path;      // likewise (an IDX directory's test files are read from data.path)
  const auto test_differ = train::test_data_difference(test_data, trunk.data);
  if (!test_differ.empty()) differ += (differ.empty() ? "" : ", ") + test_differ;
  MOEV_CHECK(differ.empty(), source, ": its [data] (config vs trunk: ", differ, ") is not the data the trunk ",
             c.trunk, " was trained on, which the partition and every expert use; give the trunk's run config, ",
             "or drop those keys");
  MOEV_CHECK(cfg.model.image_size == trunk.model.image_size && cfg.model.channels == trunk.model.channels, source,
             ": model.image_size = ", cfg.model.image_size, ", model.channels = ", cfg.model.channels,
             ", but the trunk ", c.trunk, " reads ", trunk.model.channels, "x", trunk.model.image_size,
             " images, which the experts train on too");
  const auto& d = trunk.data;
  cfg.data.format = d.format;
  cfg.data.path = d.path;
  cfg.data.test_path = d.test_path;
  cfg.data.train_limit = d.train_limit;
  cfg.data.test_limit = d.test_limit;
  cfg.data.per_class = d.per_class;
  cfg.data.subset_seed = d.subset_seed;
  cfg.data.mean = d.mean;
  cfg.data.std = d.std;
  cfg.data.tags = d.tags;
  if (c.expert_epochs > 0) cfg.train.epochs = c.expert_epochs;
  if (c.expert_lr > 0) cfg.train.lr = c.expert_lr;
  if (c.expert_warmup_steps >= 0) cfg.train.warmup_steps = c.expert_warmup_steps;
  cfg.train.seed += static_cast<uint64_t>(expert);
  // The thread count (with the replicas it implies) sets the reduction order,
  // so it is part of the config: the same bits however many experts run at once.
  if (c.expert_threads > 0) cfg.train.threads = c.expert_threads;
  cfg.train.out_dir = expert_dir(c.dir, expert);
  cfg.train.init_from = c.init == "trunk" ? c.trunk : "";
  cfg.train.teacher.clear();
  // One test evaluation at the end: an expert alone on every test image is a
  // diagnostic, not a figure of the model, and per epoch it would cost k times.
  cfg.train.eval_each_epoch = false;
  MOEV_CHECK(cfg.model.branches == 1, source, ": model.branches = ", cfg.model.branches,
             ": a hard MoE's experts are single-branch models");
  if (c.share_decoder) {
    auto m = models::build_model(cfg.model);
    const std::string dec = m->decoder();
    if (std::find(cfg.train.freeze.begin(), cfg.train.freeze.end(), dec) == cfg.train.freeze.end())
      cfg.train.freeze.push_back(dec);
  }
  return cfg;
}

void check_expert_settings(const io::RunConfig& cfg, const HardMoEConfig& hm, int64_t expert) {
  const std::string& dir = hm.dir;
  const std::string ckpt = train::checkpoint_path(cfg.train.out_dir);
  if (!fs::exists(ckpt)) return;
  auto saved = io::from_json_string(train::load_checkpoint(ckpt, train::CheckpointLoad::kConfig).config_json, ckpt);
  // The trunk is named as the command found it (relative to the cwd then, or a moved directory's --trunk);
  // checked_trunk has made sure it is the same training state, so another path to it is no other setting.
  if (!saved.train.init_from.empty() && !cfg.train.init_from.empty()) saved.train.init_from = cfg.train.init_from;
  std::string differ = train::resume_differences(saved, cfg, {});
  // An expert's run keys are set by [hardmoe] keys, which are what the user gave: a change of hardmoe.expert_lr
  // was reported as train.lr, a key --set may not change for experts.
  // Unset, they leave the trunk's train.X to the expert, and train.X is the key to name.
  for (const auto& [run_key, key, set] : {std::tuple{"train.epochs", "hardmoe.expert_epochs", hm.expert_epochs > 0},
                                          {"train.lr", "hardmoe.expert_lr", hm.expert_lr > 0},
                                          {"train.warmup_steps", "hardmoe.expert_warmup_steps",
                                           hm.expert_warmup_steps >= 0},
                                          {"train.threads", "hardmoe.expert_threads", hm.expert_threads > 0}}) {
    if (!set) continue;
    const std::string line = std::string("\n  ") + run_key + " = ";
    for (size_t at = differ.find(line); at != std::string::npos; at = differ.find(line, at + 1))
      differ.replace(at, line.size(), std::string("\n  ") + key + " (the expert's " + run_key + ") = ");
  }
  const bool done = fs::exists(expert_result_file(dir, expert));
  MOEV_CHECK(differ.empty(), "expert ", expert, " (", cfg.train.out_dir, ") was ", done ? "trained" : "started",
             " with other settings than these:", differ, "\n", done ? "drop them to keep it" : "drop them to resume it",
             ", or delete ", cfg.train.out_dir, " to train it again with them");
}

ExpertOutcome train_expert(const HardMoEConfig& c, const json& overrides, int64_t expert, const std::string& source,
                           train::TrainRunOptions opts) {
  // Everything that can be wrong is checked before this expert's directory is touched.
  const auto part = read_partition(c.dir);
  opts.train_rows = partition_rows(part, expert, c.dir);
  check_expert_rows(part, c.dir, expert);  // before "done earlier" could report another clustering's expert
  opts.expect_train_size = static_cast<int64_t>(part.expert_of.size());
  opts.expect_train_data = part.training_data;
  ExpertOutcome out;
  out.images = static_cast<int64_t>(opts.train_rows.size());
  const std::string result_file = expert_result_file(c.dir, expert);
  HardMoEConfig hc = c;
  hc.trunk = checked_trunk(part, c.dir, c.trunk);
  const auto trunk_cfg = io::from_json_string(
      train::load_checkpoint(hc.trunk, train::CheckpointLoad::kConfig).config_json, hc.trunk);
  // The overrides' keys and types, and the settings an earlier start saved, before "already trained" could hide them.
  auto cfg = expert_run_config(hc, trunk_cfg, overrides, expert, source);
  check_expert_settings(cfg, c, expert);
  // Rows index the training set in the order it was clustered in, and folder images have come in a fixed mixed
  // order since session 42: a partition from before then (no fingerprint) would give each expert other images.
  MOEV_CHECK(!part.training_data.empty() || trunk_cfg.data.format != "folder" || fs::exists(result_file), c.dir,
             ": its partition predates the fingerprint of the training set, and folder images are now read in ",
             "another order, so its rows would name other images: cluster again (moev hardmoe cluster)");
  if (fs::exists(result_file)) {
    std::ifstream in(result_file);
    out.result = json::parse(in, nullptr, false);
    MOEV_CHECK(out.result.is_object(), result_file, ": not a result file (delete it to train expert ", expert,
               " again)");
    out.already_done = true;
    return out;
  }
  // One process per expert: a second one (a rerun while the first still runs,
  // another machine on the same file system) would interleave its checkpoints.
  fs::create_directories(cfg.train.out_dir);
  const io::FileLock lock((fs::path(cfg.train.out_dir) / ".lock").string(),
                          "expert " + std::to_string(expert) + " (" + cfg.train.out_dir + ")");
  if (c.share_decoder) {
    const auto trunk_ckpt = train::load_checkpoint(hc.trunk, train::CheckpointLoad::kInference);
    // The decoder's tensors under the expert's own names (the same when the
    // architectures match; an expert of another family names it differently).
    auto trunk_model = models::build_model(trunk_cfg.model);
    const std::string from = trunk_model->decoder() + ".", to = models::build_model(cfg.model)->decoder() + ".";
    for (const auto& [name, t] : train::inference_weights(trunk_ckpt))
      if (name.rfind(from, 0) == 0) opts.init_tensors[to + name.substr(from.size())] = t;
    MOEV_CHECK(!opts.init_tensors.empty(), hc.trunk, ": no tensors of the decoding layer '", trunk_model->decoder(),
               "'");
  }
  opts.resume = fs::exists(train::checkpoint_path(cfg.train.out_dir));
  if (c.expert_warmup_steps >= 0) opts.warmup_key = "hardmoe.expert_warmup_steps";
  if (c.expert_lr > 0) opts.lr_key = "hardmoe.expert_lr";
  auto r = train::train_model(cfg, opts);
  if (r.stopped)
    throw Stopped("expert " + std::to_string(expert) + " stopped at step " + std::to_string(r.steps) +
                  "; its checkpoint is saved: the same command again continues it");
  MOEV_CHECK(r.finished, "expert ", expert, " stopped after ", r.steps, " steps before its last epoch (max_steps); ",
             "run it again to continue");
  out.result = {{"expert", expert},
                {"images", out.images},
                {"steps", r.steps},
                {"epochs", r.epochs_done},
                {"train_seconds", r.run_train_seconds},
                {"train_images_per_s", r.train_images_per_s},
                {"test_top1", r.eval.top1},
                {"test_mean_ap", r.eval.mean_ap},
                {"resumed", opts.resume}};
  io::write_text_atomic(result_file, out.result.dump(2) + "\n");
  return out;
}

}  // namespace moev::hardmoe
