// `moev checkpoint info CKPT`: what a checkpoint holds and how it is laid out:
// the model, the training position, how many ranks wrote it, and its expert
// tensors. Checkpoints always hold full tensors (expert shards are gathered
// before saving), so any number of ranks can load one; this shows it.
#include <filesystem>
#include <fstream>
#include <iostream>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "moev/core/error.h"
#include "moev/hardmoe/hard_moe.h"
#include "moev/models/model_config.h"
#include "moev/models/placement.h"
#include "moev/train/checkpoint.h"
#include "moev/train/trained_model.h"

namespace moev::app {

namespace {

// A pre-training checkpoint keeps its place under "pretrain" (its epochs
// depend on the data set's size, so only the step is stored).
bool is_pretraining(const nlohmann::json& st) {
  return st.is_object() && st.contains("pretrain") && st.at("pretrain").is_object();
}
// "step 36 of 160 (40 epochs)": "step 36 of 40 epochs" mixed its units, and a paused run read as a finished one.
std::string pretrain_position(const nlohmann::json& st, const std::string& path) {
  const auto& p = st.at("pretrain");
  const int64_t step = p.value("step", int64_t{0}), total = p.value("total_steps", int64_t{0});
  std::string s = "pre-training (moev pretrain) step " + std::to_string(step);
  if (total > 0) s += " of " + std::to_string(total);
  if (p.contains("options") && p.at("options").is_object() && p.at("options").contains("epochs")) {
    const auto epochs = p.at("options").at("epochs");
    s += (total > 0 ? " (" : " of a run of ") + epochs.dump() + (epochs == 1 ? " epoch" : " epochs") +
         (total > 0 ? ")" : "");
  }
  if (total > 0 && step < total) s += ": unfinished (" + train::resume_command(path, st.dump()) + " finishes it)";
  return s + "; heads untrained (train.init_from starts a supervised run from it)";
}

// "step 21, after 1 of 2 epochs: unfinished (...)": "epoch 1" read as the epoch it was in or the epochs done.
std::string train_position(const io::RunConfig& cfg, const nlohmann::json& st, const std::string& state_json,
                           const std::string& path) {
  const int64_t all = cfg.train.epochs + cfg.train.cooldown_epochs;
  return "step " + std::to_string(st.value("step", int64_t{0})) + ", after " +
         std::to_string(st.value("epoch", int64_t{0})) + " of " + std::to_string(all) + (all == 1 ? " epoch" : " epochs") +
         (train::unfinished_training(cfg, state_json, path).empty()
              ? (st.value("epoch", int64_t{0}) < all ? " (its time budget's end)" : " (the run's end)")
              : ": unfinished (" + train::resume_command(path, state_json) + " finishes it)");
}

}  // namespace

Runner add_checkpoint(CLI::App& app) {
  auto* cmd = app.add_subcommand("checkpoint", "inspect checkpoints");
  cmd->require_subcommand(1);
  auto* info = cmd->add_subcommand("info", "print a checkpoint's model, position and tensor layout");
  auto path = std::make_shared<std::string>();
  info->add_option("checkpoint", *path, "checkpoint file")->required();
  return [info, path]() {
    if (!info->parsed()) return 1;
    if (hardmoe::is_hard_moe_file(*path)) {  // JSON text: a hardmoe.json, or a run's config.json or log
      MOEV_CHECK(!hardmoe::declares_hard_moe(*path), *path,
                 ": a hard MoE file, not a checkpoint; its trunk and each expert have one (moev checkpoint info ",
                 "<dir>/expert_0/checkpoint.pt)");
      fail(*path, ": JSON text, not a checkpoint (a checkpoint is the zip archive moev train writes, ",
           "<run>/checkpoint.pt)");
    }
    const auto ckpt = train::load_checkpoint(*path);
    const auto cfg = io::from_json_string(ckpt.config_json, *path);
    nlohmann::json st;
    try {
      st = nlohmann::json::parse(ckpt.state_json);
    } catch (const std::exception& e) {
      fail(*path, ": state is not JSON: ", e.what());
    }
    const auto& m = cfg.model;
    const auto moe_at = models::moe_blocks(m.moe, models::num_blocks(m));
    int64_t params = 0, expert_params = 0;
    // A multi-branch model's branches, and whether its fusion layer was trained (moev fuse): "resnest, 3 blocks,
    // dense" said neither.
    const auto fusion = ckpt.model.find("fusion_on");
    const bool fused = fusion != ckpt.model.end() && fusion->second.numel() == 1 && fusion->second.item<int64_t>() != 0;
    const std::string branches = m.branches > 1 ? ", " + std::to_string(m.branches) + " branches" +
                                                      (fused ? " joined by a trained fusion layer" : "")
                                                : std::string();
    for (const auto& [name, t] : ckpt.model) {
      params += t.numel();
      if (name.find(".experts.") != std::string::npos) expert_params += t.numel();
    }
    std::cout << "checkpoint   " << *path << " (" << train::kCheckpointFormat << ")\n"
              << "model        " << m.family << ", " << models::num_blocks(m) << " blocks, "
              << (moe_at.empty() ? std::string("dense") : std::to_string(moe_at.size()) + " MoE layers, E = " +
                                                              std::to_string(m.router.num_experts) + ", K = " +
                                                              std::to_string(m.router.k))
              << branches << ", precision " << m.precision << "\n"
              << "position     "
              << (is_pretraining(st) ? pretrain_position(st, *path)
                                     : train_position(cfg, st, ckpt.state_json, *path))
              << "\n"
              << "written by   " << st.value("world_size", 1) << " rank(s)"
              << (st.value("expert_parallel", false) ? ", experts split over them" : "") << "\n"
              << "layout       full tensors: loads on any number of ranks"
              << (moe_at.empty() ? "" : "; with train.expert_parallel each rank keeps E / ranks experts of every layer")
              << "\n"
              << "tensors      " << ckpt.model.size() << " model (" << params << " values, " << expert_params
              << " in experts), " << ckpt.optimizer.size() << " optimizer"
              << (ckpt.ema.empty() ? std::string()
                                   : ", " + std::to_string(ckpt.ema.size()) + " weight average (decay " +
                                         std::to_string(cfg.train.ema_decay) + ": what eval and predict use)")
              << "\n";
    for (const auto& [name, t] : ckpt.model)
      if (name.find(".experts.") != std::string::npos) std::cout << "  expert     " << name << " " << t.sizes() << "\n";
    return 0;
  };
}

}  // namespace moev::app
