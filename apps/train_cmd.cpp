// `moev train`: train a model from a config, with a progress bar, checkpoints and
// --resume.
#include <cmath>
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "stop_signal.h"
#include "moev/core/error.h"
#include "moev/io/table.h"
#include "moev/train/checkpoint.h"
#include "moev/train/trainer.h"

namespace moev::app {

namespace {

// The command, its config resolved from `flags`.
int run_train(ConfigFlags& flags, bool resume) {
  flags.resuming = resume;
  // --resume --print-config prints the config the resumed run goes on with (the saved one), below.
  const bool print_resumed = resume && flags.print_config && !flags.help_config;
  if (flags.print_config && !resume && !flags.help_config) {  // never a config the run would refuse
    const auto cfg = flags.resolve();
    train::check_new_run_config(cfg);
    std::cout << io::to_json_string(cfg) << "\n";
    return 0;
  }
  const auto resolved = print_resumed ? std::optional<io::RunConfig>(flags.resolve()) : flags.resolve_or_print();
  if (!resolved) return 0;
  io::RunConfig cfg = *resolved;
  const auto dc = dist_from_environment(cfg);
  // The run being resumed, read once here (train_model says what is missing).
  const auto path = train::checkpoint_path(cfg.train.out_dir);
  std::optional<io::RunConfig> saved;
  if (resume && std::filesystem::exists(path)) {
    const auto ckpt = train::load_checkpoint(path, train::CheckpointLoad::kConfig);
    saved = io::from_json_string(ckpt.config_json, path);
    // A job's saved count is rank 0's share of its machine's cores; another job splits them its own way.
    const auto state = nlohmann::json::parse(ckpt.state_json, nullptr, /*allow_exceptions=*/false);
    const bool one_process = state.is_object() && state.value("world_size", 1) == 1;
    keep_saved_run_settings(flags, *saved, cfg, one_process && dc.world_size == 1);
  }
  if (print_resumed) {
    MOEV_CHECK(saved || !std::filesystem::exists(std::filesystem::path(cfg.train.out_dir) / "pretrain.pt"),
               "--resume --print-config: train.out_dir = ", cfg.train.out_dir, " holds a pretraining run ",
               "(pretrain.pt), not a supervised one; moev pretrain --out ", cfg.train.out_dir,
               " --resume continues it");
    MOEV_CHECK(saved, "--resume --print-config: ", path, " does not exist: train.out_dir = ", cfg.train.out_dir,
               " holds no run to resume");
    check_resume_overrides(flags, *saved, cfg, path);
    std::cout << io::to_json_string(train::resumed_config(*saved, cfg)) << "\n";
    return 0;
  }
  // A rank of a distributed job: local ranks share the cores, so "all cores"
  // means this rank's part of them.
  if (cfg.train.threads == 0 && local_world_size() > 1)
    cfg.train.threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / local_world_size());
  std::unique_ptr<dist::Communicator> comm;
  if (dc.world_size > 1) comm = std::make_unique<dist::Communicator>(dc);
  if (saved) check_resume_overrides(flags, *saved, cfg, path);
  // A sweep's or an ablation's file trains here as its common config alone (a dense ViT for the sweep's):
  // said, as that is seldom what was meant.
  if (!resume && dc.rank == 0 && !flags.config_file.empty())
    for (const char* grid : {"sweep", "ablation"})
      if (flags.file().is_object() && flags.file().contains(grid))
        std::cerr << "note: " << flags.config_file << " has a [" << grid << "] section, which moev " << grid
                  << " reads; moev train trains the file's common config alone (model.family = " << cfg.model.family
                  << ", model.moe = " << models::to_string(cfg.model.moe) << "): moev " << grid << " --config "
                  << flags.config_file << " runs its " << (grid[0] == 's' ? "grid" : "rows") << "\n";
  train::TrainRunOptions o;
  o.resume = resume;
  o.progress = &std::cerr;
  o.interactive = stderr_is_terminal();
  o.comm = comm.get();
  o.stop = stop_on_signals();
  auto r = train::train_model(cfg, o);
  const int code = r.stopped ? stop_exit_code() : 0;
  if (dc.rank != 0) {
    std::cout << "rank " << dc.rank << " of " << dc.world_size << ": "
              << (r.stopped ? "stopped after " : r.finished ? "trained " : "paused after ") << r.steps
              << (r.steps == 1 ? " step\n" : " steps\n");
    return code;
  }
  // A job's ranks continue as ranks again (the hint alone moved the run to one process).
  const std::string as_ranks = dc.world_size > 1 ? " (as ranks: the same launch command with --resume)" : "";
  if (r.stopped) {
    std::cout << "stopped at step " << r.steps << " on request; checkpoint: "
              << train::checkpoint_path(cfg.train.out_dir) << "\ncontinue with: moev train --out " << cfg.train.out_dir
              << " --resume"
              // The pause it was heading for: without it, the resumed run went on to the end.
              << (cfg.train.max_steps >= r.steps ? " --max-steps " + std::to_string(cfg.train.max_steps) : "")
              << as_ranks << "\n";
    return code;
  }
  if (!r.finished) {  // paused at train.max_steps: it read like a finished run, without a test figure
    std::cout << "paused at step " << r.steps << " (train.max_steps = " << cfg.train.max_steps
              << "); checkpoint: " << train::checkpoint_path(cfg.train.out_dir)
              << "\ncontinue with: moev train --out " << cfg.train.out_dir
              << " --resume --max-steps N (N > " << r.steps << ", or 0 for the whole run)" << as_ranks << "\n";
    return 0;
  }
  std::cout << "trained " << r.steps << (r.steps == 1 ? " step (" : " steps (");
  // A time budget ends the run inside an epoch, which counts as its last: the steps say how far it got.
  if (r.budgeted && r.steps_per_epoch > 0 && r.steps % r.steps_per_epoch != 0)
    std::cout << io::fmt(static_cast<double>(r.steps) / r.steps_per_epoch, 1) << " epochs";
  else
    std::cout << r.epochs_done << (r.epochs_done == 1 ? " epoch" : " epochs");
  std::cout << ") in " << std::llround(r.run_train_seconds) << " s";
  // A resumed run's rate is this process's: its steps and seconds only.
  if (resume) std::cout << " (this process: " << std::llround(r.train_seconds) << " s";
  std::cout << " at " << static_cast<int64_t>(r.train_images_per_s) << " img/s" << (resume ? ")" : "");
  if (r.eval.images > 0 && r.eval.multilabel)
    std::cout << "; test precision@1 " << io::fmt(r.eval.top1) << ", mAP " << io::fmt(r.eval.mean_ap);
  else if (r.eval.images > 0)
    std::cout << "; test top-1 " << io::fmt(r.eval.top1) << train::top5_text(r.eval.top5, ", ");
  std::cout << "\ncheckpoint: " << train::checkpoint_path(cfg.train.out_dir) << "\n";
  return 0;
}

}  // namespace

Runner add_train(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "train a model (V-MoE, ViT, ConvNeXt, multi-branch ResNeSt) on an image dataset");
  auto flags = std::make_shared<ConfigFlags>();
  auto resume = std::make_shared<bool>(false);
  flags->add_to(cmd);
  cmd->add_flag("--resume", *resume, "continue the run in --out from its last checkpoint");
  cmd->footer(
      "Examples:\n"
      "  moev train --config configs/vmoe_tiny_fmnist.toml\n"
      "  moev train --model vmoe-tiny --epochs 3 --out runs/quick\n"
      "  moev train --out runs/quick --resume");
  return [flags, resume]() { return flags->naming_the_file([&] { return run_train(*flags, *resume); }); };
}

}  // namespace moev::app
