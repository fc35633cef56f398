// `moev sweep`: a grid of dense and MoE models trained with one budget, resumable,
// summarised as results.csv / results.md / results.png. The grid is the [sweep]
// section of a config file; its other sections are the runs' common config.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "stop_signal.h"
#include "moev/core/error.h"
#include "moev/io/file_lock.h"
#include "moev/io/table.h"
#include "moev/train/sweep.h"
#include "moev/train/trainer.h"

namespace moev::app {

namespace {
struct SweepFlags {
  std::string config, out = "runs/sweep";
  std::vector<std::string> sets;
  int64_t epochs = 0;
  double minutes = 0;
  bool dry_run = false;
};
}  // namespace

Runner add_sweep(CLI::App& app) {
  auto* cmd = app.add_subcommand("sweep", "train a grid of dense and MoE models with one budget "
                                          "and tabulate accuracy against cost");
  auto f = std::make_shared<SweepFlags>();
  cmd->add_option("-c,--config", f->config, "config file with a [sweep] section")->required();
  cmd->add_option("--out", f->out, "sweep directory (one run directory per grid point)")
      ->capture_default_str();
  cmd->add_option("--set", f->sets, "override a common config key: section.key=value");
  auto* epochs = cmd->add_option("--epochs", f->epochs, "epochs of every run (= --set train.epochs=...)");
  auto* minutes = cmd->add_option("--minutes", f->minutes,
                  "training minutes of every run, evaluations excluded; train.epochs caps it "
                  "(= --set train.minutes=...)");
  cmd->add_flag("--dry-run", f->dry_run, "list the runs and exit");
  cmd->footer("\nRun it again with the same --out to resume an interrupted sweep.\n"
              "Example:\n  moev sweep --config configs/sweep_fmnist.toml --out runs/sweep");
  return [f, epochs, minutes]() {
    // Checked before the grid is listed (--dry-run too); 0 used to mean "not given".
    MOEV_CHECK(epochs->count() == 0 || f->epochs >= 1, "--epochs ", f->epochs, ": expected >= 1");
    MOEV_CHECK(minutes->count() == 0 || (std::isfinite(f->minutes) && f->minutes > 0), "--minutes ", f->minutes,
               ": expected a number of minutes > 0");
    MOEV_CHECK(!std::filesystem::exists(f->out) || std::filesystem::is_directory(f->out), "--out ", f->out,
               " is a file; expected the sweep's directory");
    auto j = io::read_config_file(f->config);
    // The grid's keys take --set as the run's do ("sweep.k" was an unknown key, read after [sweep] was taken out).
    auto sets = f->sets;
    const std::string grid_source = merge_section_sets(j, sets, "sweep", f->config);
    MOEV_CHECK(j.is_object() && j.contains("sweep"), f->config,
               ": no [sweep] section (models, experts, placements, k)", [&] {
                 std::string found;  // a misspelt [swep] is the likely cause: say what is there
                 if (j.is_object())
                   for (const auto& [key, value] : j.items())
                     if (value.is_object()) found += (found.empty() ? "" : ", ") + ("[" + key + "]");
                 return found.empty() ? std::string() : "; the file has " + found;
               }());
    const auto grid = train::parse_sweep_grid(j["sweep"], grid_source);
    j.erase("sweep");
    if (epochs->count()) sets.push_back("train.epochs=" + std::to_string(f->epochs));
    // As JSON, which keeps every digit (std::to_string turned 1e-7 into 0, no budget).
    if (minutes->count()) sets.push_back("train.minutes=" + nlohmann::json(f->minutes).dump());
    for (const auto& s : sets) j.merge_patch(io::override_json(s));
    std::vector<std::string> skipped;
    const auto runs = train::expand_grid(grid, j, f->config, &skipped);
    // Before the listing (run_sweep checks again, for its library callers): --dry-run listed runs it would refuse.
    io::refuse_other_kinds(f->out, {".sweep.lock"}, "sweep --out");
    std::printf("%zu run%s in %s\n", runs.size(), runs.size() == 1 ? "" : "s", f->out.c_str());
    for (const auto& r : runs) std::printf("  %s\n", r.name.c_str());
    for (const auto& why : skipped) std::printf("  (skipped %s)\n", why.c_str());
    if (f->dry_run) return 0;
    train::set_threads(runs.front().cfg.train.threads);
    auto rows = train::run_sweep(runs, f->out, &std::cerr, stderr_is_terminal(), stop_on_signals());
    io::Table t;
    t.header = {"run", "top1", "active MFLOPs", "train img/s"};
    for (const auto& r : rows)
      t.add({r.name, io::fmt(r.top1), io::fmt(r.flops / 1e6, 2), io::fmt(r.train_images_per_s, 0)});
    std::printf("%swrote %s/results.csv, results.md, results.png\n", t.markdown().c_str(),
                f->out.c_str());
    return 0;
  };
}

}  // namespace moev::app
