// `moev ensemble`: a weighted ensemble of trained models (Sun et al.'s weighted
// score average), optionally with test-time augmentation, from the [ensemble]
// section of a config file; prints each member and the ensemble.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "moev/core/error.h"
#include "moev/io/table.h"
#include "moev/train/ensemble.h"
#include "moev/train/trainer.h"

namespace moev::app {

namespace {
struct EnsembleFlags {
  std::string config, result;
  std::optional<int64_t> limit;
  int64_t batch_size = 256;
  int threads = 0;
  bool json = false;
};
}  // namespace

Runner add_ensemble(CLI::App& app) {
  auto* cmd = app.add_subcommand("ensemble", "evaluate a weighted ensemble of checkpoints (with optional "
                                             "test-time augmentation)");
  auto f = std::make_shared<EnsembleFlags>();
  cmd->add_option("-c,--config", f->config, "config file with an [ensemble] section: members, weights, tta")
      ->required();
  add_limit_option(cmd, f->limit);
  cmd->add_option("--batch-size", f->batch_size, "images per forward pass")->capture_default_str();
  cmd->add_option("--threads", f->threads, "threads, 0 = all cores");
  cmd->add_flag("--json", f->json, "print the result as JSON");
  cmd->add_option("--result", f->result, "also write it, as JSON, to this file");
  cmd->footer("\nExample config:\n  [ensemble]\n  members = [\"runs/a/fused.pt\", \"runs/b/checkpoint.pt\"]\n"
              "  weights = [3, 1]\n  tta = true   # ten crops and a 1.15x larger view");
  return [f]() {
    train::set_threads(f->threads);
    check_limit(f->limit);
    check_result_file(f->result);
    std::error_code ec;  // a config written as JSON is an object too
    MOEV_CHECK(f->result.empty() || !std::filesystem::equivalent(f->result, f->config, ec), "--result ", f->result,
               ": is the ensemble's own config (--config); name another file");
    auto j = io::read_config_file(f->config);
    MOEV_CHECK(j.is_object() && j.contains("ensemble"), f->config, ": no [ensemble] section (members, weights)");
    // Each member brings its own model, data and training: a [model] or [data] here was passed over.
    for (const auto& [section, value] : j.items())
      MOEV_CHECK(section == "ensemble", f->config, ": [", section, "]: an ensemble config holds [ensemble] only ",
                 "(each member is scored with its own run's settings; --limit and --batch-size set the scoring)");
    const auto cfg = train::parse_ensemble(j["ensemble"], f->config);
    auto r = train::evaluate_ensemble(cfg, f->limit, f->batch_size, f->json ? nullptr : &std::cerr,
                                      stderr_is_terminal());
    // What the table prints, the JSON holds: it lacked whether TTA was on and the members' top-5 and NLL.
    nlohmann::json out{{"top1", r.ensemble.top1}, {"top5", r.ensemble.top5}, {"loss", r.ensemble.loss},
                       {"images", r.ensemble.images}, {"tta", cfg.tta}, {"members", nlohmann::json::array()}};
    for (size_t i = 0; i < r.members.size(); ++i)
      out["members"].push_back({{"checkpoint", cfg.members[i].checkpoint}, {"weight", cfg.members[i].weight},
                                {"top1", r.members[i].top1}, {"top5", r.members[i].top5},
                                {"loss", r.members[i].loss}, {"finished", r.unfinished[i].empty()}});
    if (!f->result.empty()) {
      make_parent_directory(f->result, "--result");
      io::write_text_atomic(f->result, io::output_json(out) + "\n");
    }
    if (f->json) {  // the notes went to the progress stream, which --json leaves out
      for (const auto& note : r.unfinished)
        if (!note.empty()) std::cerr << "note: " << note << "\n";
      std::cout << io::output_json(out) << "\n";
      return 0;
    }
    io::Table t;
    t.header = {"model", "weight", "top-1", "top-5", "NLL"};
    // Undefined (NaN) with 5 classes or fewer, where every class is in the top 5.
    auto top5 = [](double v) { return std::isnan(v) ? std::string("-") : io::fmt(v); };
    for (size_t i = 0; i < r.members.size(); ++i)
      t.add({cfg.members[i].checkpoint, io::fmt(cfg.members[i].weight, 4), io::fmt(r.members[i].top1),
             top5(r.members[i].top5), io::fmt(r.members[i].loss)});
    t.add({"weighted ensemble", "", io::fmt(r.ensemble.top1), top5(r.ensemble.top5), io::fmt(r.ensemble.loss)});
    std::printf("%s on %lld test images%s\n%s", f->config.c_str(), (long long)r.ensemble.images,
                cfg.tta ? " with test-time augmentation" : "", t.markdown().c_str());
    return 0;
  };
}

}  // namespace moev::app
