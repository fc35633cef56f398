// `moev pretrain`: self-supervised pre-training (MoCo v2) of a config's model on
// its own training images, Sun et al.'s initialisation step; the checkpoint
// starts a supervised run through train.init_from.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <memory>
#include <optional>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "stop_signal.h"
#include "moev/core/error.h"
#include "moev/io/run_config.h"
#include "moev/io/table.h"
#include "moev/train/checkpoint.h"
#include "moev/train/pretrain.h"
#include "moev/train/trainer.h"

namespace moev::app {

Runner add_pretrain(CLI::App& app) {
  auto* cmd = app.add_subcommand("pretrain", "self-supervised pre-training (MoCo v2) on the training images");
  auto flags = std::make_shared<ConfigFlags>();
  auto o = std::make_shared<train::PretrainOptions>();
  flags->add_to(cmd);
  // Kept (to be refused with a pointer to --pretrain-epochs / --pretrain-lr below) but out of --help, which
  // listed them as if pre-training read them.
  for (const char* f : {"--epochs", "--lr", "--minutes"}) cmd->get_option(f)->group("");
  // Flags bind to `given`; the options are defaults <- the config's
  // [pretrain] section <- these flags <- --set pretrain.<key>=..., as the run
  // config's keys are.
  auto given = std::make_shared<train::PretrainOptions>();
  for (const auto& k : train::pretrain_keys()) {
    auto* opt = k.integer ? cmd->add_option(k.flag, given.get()->*k.integer, k.help)
                          : cmd->add_option(k.flag, given.get()->*k.real, k.help);
    opt->capture_default_str();
  }
  cmd->add_flag("--resume", o->resume, "continue from <out>/pretrain.pt");
  cmd->footer(
      "\nThe options also come from the config's [pretrain] section, under which the flags and\n"
      "then --set pretrain.<key>=value go (--help-config lists the keys, --print-config the values).\n"
      "Writes <train.out_dir>/pretrain.pt, pretrain_log.jsonl, pretrain.json, pretrain.png.\n"
      "Example:\n"
      "  moev pretrain --config configs/multibranch_fmnist.toml --set model.branches=3 --out runs/ssl3\n"
      "  moev train --config configs/multibranch_fmnist.toml --set model.branches=3 \\\n"
      "      --set train.init_from=runs/ssl3/pretrain.pt --out runs/mb3_ssl");
  return [cmd, flags, o, given]() {
    if (flags->help_config) {
      flags->resolve_or_print();
      for (const auto& k : train::pretrain_keys())
        std::cout << "  pretrain." << k.key << "  " << k.help << " (" << k.flag << ")\n";
      return 0;
    }
    // The shared shorthands that would set what pre-training does not read.
    for (const auto& a : flags->shorthand)
      for (const char* k : {"train.epochs=", "train.lr=", "train.minutes="})
        MOEV_CHECK(a.rfind(k, 0) != 0, "moev pretrain: ", a, " sets the supervised run's ", std::string(k, strlen(k) - 1),
                   ", which pre-training does not read; use --pretrain-epochs / --pretrain-lr (pre-training runs ",
                   "for its epochs: a time budget is the supervised run's)");
    for (const auto& a : flags->sets) {  // --minutes listed in --help and then ignored; so was this
      MOEV_CHECK(a.rfind("train.minutes=", 0) != 0, "moev pretrain: --set ", a, ": a time budget is the supervised ",
                 "run's; pre-training runs for --pretrain-epochs");
      // Refused as --epochs and --lr are; given with --set, they were taken and changed nothing.
      for (const char* k : {"train.epochs=", "train.lr="})
        MOEV_CHECK(a.rfind(k, 0) != 0, "moev pretrain: --set ", a, " sets the supervised run's ",
                   std::string(k, strlen(k) - 1), ", which pre-training does not read; use --set pretrain.",
                   std::string(k + 6, strlen(k) - 7), "=... (or --pretrain-", std::string(k + 6, strlen(k) - 7), ")");
    }
    // --set pretrain.<key>=... is this command's (applied below); the rest go to the run config.
    auto& run_sets = flags->in_order;
    run_sets.erase(std::remove_if(run_sets.begin(), run_sets.end(),
                                  [](const std::string& s) { return s.rfind("pretrain.", 0) == 0; }),
                   run_sets.end());
    // The run being resumed, read once: `moev pretrain --out DIR --resume` (the command a stop prints) continues
    // it as it was saved, its options too, as `train --resume` does; it was refused as "another config".
    flags->resuming = o->resume;
    io::RunConfig cfg = flags->resolve();
    const auto saved_path = (std::filesystem::path(cfg.train.out_dir) / "pretrain.pt").string();
    std::optional<io::RunConfig> saved;
    if (o->resume && std::filesystem::exists(saved_path)) {  // pretrain says what is missing
      const auto c = train::load_checkpoint(saved_path, train::CheckpointLoad::kConfig);
      saved = io::from_json_string(c.config_json, saved_path);
      const auto state = nlohmann::json::parse(c.state_json, nullptr, /*allow_exceptions=*/false);
      if (state.is_object() && state.contains("pretrain") && state["pretrain"].contains("options"))
        train::apply_pretrain_section(*o, state["pretrain"]["options"], saved_path);
    }
    nlohmann::json section = nlohmann::json::object();
    if (!flags->config_file.empty()) {
      const auto& file = flags->file();
      if (file.is_object() && file.contains("pretrain")) section = file["pretrain"];
      train::apply_pretrain_section(*o, section, flags->config_file);
    }
    for (const auto& k : train::pretrain_keys())
      if (cmd->get_option(k.flag)->count() > 0) {
        if (k.integer) o.get()->*k.integer = given.get()->*k.integer;
        else o.get()->*k.real = given.get()->*k.real;
      }
    for (const auto& s : flags->sets)
      if (s.rfind("pretrain.", 0) == 0)
        train::apply_pretrain_section(*o, io::assignment_json(s).at("pretrain"), "--set " + s);
    if (saved) {
      keep_saved_run_settings(*flags, *saved, cfg, /*keep_threads=*/true);
      check_resume_overrides(*flags, *saved, cfg, saved_path);
      cfg = train::resumed_config(*saved, cfg);
    }
    if (flags->print_config) {  // never options the run would refuse (--queue -1 printed at exit 0)
      train::validate_pretrain_options(*o);
      auto j = io::to_json(cfg);
      j["pretrain"] = train::pretrain_section(*o);
      std::cout << io::output_json(j) << "\n";
      return 0;
    }
    // One process: ranks of a job would each write the same files.
    const int world = dist_from_environment(cfg).world_size;
    MOEV_CHECK(world == 1, "moev pretrain runs as one process, not as a rank of a distributed job (WORLD_SIZE = ",
               world, "); run it without moev launch");
    o->progress = &std::cerr;
    o->interactive = stderr_is_terminal();
    o->stop = stop_on_signals();
    const auto r = train::pretrain(cfg, cfg.train.out_dir, *o);
    if (r.stopped) {
      std::printf("stopped at step %lld on request; checkpoint: %s\ncontinue with: moev pretrain --out %s --resume\n",
                  static_cast<long long>(r.steps), r.checkpoint.c_str(), cfg.train.out_dir.c_str());
      return stop_exit_code();
    }
    if (!r.finished) {  // paused at train.max_steps: it read as a finished run, and wrote the finished run's files
      std::printf("paused at step %lld (train.max_steps = %lld); checkpoint: %s\ncontinue with: moev pretrain --out %s "
                  "--resume --max-steps N (N > %lld, or 0 for the whole run)\n",
                  static_cast<long long>(r.steps), static_cast<long long>(cfg.train.max_steps), r.checkpoint.c_str(),
                  cfg.train.out_dir.c_str(), static_cast<long long>(r.steps));
      return 0;
    }
    std::printf("pre-trained %lld steps in %.0f s; InfoNCE %.4f", static_cast<long long>(r.steps), r.seconds,
                r.final_loss);
    if (r.knn_top1 >= 0) {
      std::printf("; test kNN top-1 %.4f", r.knn_top1);
      if (r.knn_top1_init >= 0) std::printf(" (at initialisation %.4f)", r.knn_top1_init);
    }
    std::printf("\ncheckpoint: %s (start a run from it with --set train.init_from=%s)\n", r.checkpoint.c_str(),
                r.checkpoint.c_str());
    return 0;
  };
}

}  // namespace moev::app
