#include "moev/train/sweep.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <tuple>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "moev/core/error.h"
#include "moev/io/file_lock.h"
#include "moev/io/table.h"
#include "moev/models/cost.h"
#include "moev/models/placement.h"
#include "moev/train/evaluate.h"
#include "moev/train/checkpoint.h"
#include "moev/train/trainer.h"
#include "moev/viz/plot.h"
#include "moev/viz/progress_bar.h"

namespace moev::train {

namespace {
using json = nlohmann::json;

template <typename T>
std::vector<T> read_list(const json& section, const char* key, const std::string& source,
                         std::vector<T> fallback) {
  if (!section.contains(key)) return fallback;
  const auto& v = section[key];
  MOEV_CHECK(v.is_array() && !v.empty(), source, ": sweep.", key, ": expected a non-empty list");
  std::vector<T> out;
  for (const auto& x : v) {
    // nlohmann would truncate 4.5 to 4 without a word.
    MOEV_CHECK(!std::is_integral_v<T> || x.is_number_integer(), source, ": sweep.", key, ": ", x.dump(),
               ": expected an integer");
    try {
      out.push_back(x.get<T>());
    } catch (const json::exception&) {
      fail(source, ": sweep.", key, ": ", x.dump(), " has the wrong type");
    }
  }
  return out;
}

std::string placement_spec(const std::string& p) { return p == "all" ? "every-1" : p; }

// A grid point's directory name: <model>_e<E>_<placement>_k<K>.
std::string moe_run_name(const std::string& model, int64_t E, const std::string& placement, int64_t K) {
  return model + "_e" + std::to_string(E) + "_" + placement + "_k" + std::to_string(K);
}
}  // namespace

namespace {
// A repeated entry would train one model twice and tabulate it twice.
template <typename T, typename Key>
void check_no_repeats(const std::vector<T>& list, const char* key, const std::string& source, Key key_of) {
  for (size_t i = 0; i < list.size(); ++i)
    for (size_t j = 0; j < i; ++j)
      MOEV_CHECK(key_of(list[i]) != key_of(list[j]), source, ": sweep.", key, ": ", nlohmann::json(list[i]).dump(),
                 " repeats ", nlohmann::json(list[j]).dump());
}
}  // namespace

SweepGrid parse_sweep_grid(const json& section, const std::string& source) {
  MOEV_CHECK(section.is_object(), source, ": [sweep]: expected a table with models, experts, ",
             "placements, k");
  for (auto it = section.begin(); it != section.end(); ++it)
    MOEV_CHECK(it.key() == "models" || it.key() == "experts" || it.key() == "placements" ||
                   it.key() == "k",
               source, ": sweep.", it.key(), ": unknown key; expected models, experts, placements, k");
  SweepGrid g;
  MOEV_CHECK(section.contains("models"), source, ": sweep.models: missing (the dense presets to ",
             "sweep, e.g. [\"vit-tiny\", \"convnext-tiny\"])");
  g.models = read_list<std::string>(section, "models", source, {});
  g.experts = read_list<int64_t>(section, "experts", source, g.experts);
  if (section.contains("placements")) {
    const auto& v = section["placements"];
    MOEV_CHECK(v.is_array() && !v.empty(), source, ": sweep.placements: expected a non-empty list");
    g.placements.clear();
    // Each as model.moe takes it: "last-2", "3,5", 5 or [3, 5].
    for (const auto& p : v) g.placements.push_back(io::placement_text(p, source + ": sweep.placements"));
  }
  g.ks = read_list<int64_t>(section, "k", source, g.ks);
  const auto same = [](const auto& x) { return x; };
  check_no_repeats(g.models, "models", source, same);
  check_no_repeats(g.experts, "experts", source, same);
  check_no_repeats(g.ks, "k", source, same);
  check_no_repeats(g.placements, "placements", source, placement_spec);  // "all" is "every-1"
  for (auto e : g.experts) MOEV_CHECK(e >= 1, source, ": sweep.experts: ", e, " is not >= 1");
  for (auto k : g.ks) MOEV_CHECK(k >= 1, source, ": sweep.k: ", k, " is not >= 1");
  for (const auto& p : g.placements) {
    MOEV_CHECK(!p.empty(), source, ": sweep.placements: an empty placement; expected none, every-N, last-N or ",
               "blocks like \"3,5\" or [3, 5]");
    try {
      // A block listed twice, refused by every new run, is refused here, before any run of the grid trains.
      models::refuse_repeated_blocks(models::parse_placement(placement_spec(p)));
    } catch (const Error& e) {
      fail(source, ": sweep.placements: ", e.what());
    }
  }
  return g;
}

std::vector<SweepRun> expand_grid(const SweepGrid& grid, const json& base, const std::string& source,
                                  std::vector<std::string>* skipped) {
  MOEV_CHECK(!(base.contains("model") && base["model"].contains("preset")), source,
             ": model.preset: a sweep takes its models from sweep.models");
  // Each run's own: the grid replaced them in every run without a word.
  io::refuse_planned_keys(base, source, "a sweep",
                          {{"model", "moe", "sweep.placements (and sweep.experts = 1 for dense)"},
                           {"moe", "num_experts", "sweep.experts"},
                           {"moe", "k", "sweep.k"},
                           {"train", "out_dir", "--out and the run's name"}});
  std::vector<SweepRun> runs;
  // Two placements can pick the same blocks of one model (last-2 and every-2
  // of a 4-block one): trained once, under the first name.
  std::map<std::tuple<std::string, int64_t, int64_t, std::vector<int64_t>>, std::string> seen;
  auto skip = [&](const std::string& why) {
    if (skipped) skipped->push_back(why);
  };
  auto add = [&](SweepRun r, const std::vector<int64_t>& blocks) {
    const auto [it, fresh] = seen.emplace(std::make_tuple(r.model, r.experts, r.k, blocks), r.name);
    if (fresh) runs.push_back(std::move(r));
    else skip(r.name + ": the same MoE blocks as " + it->second);
  };
  for (const auto& m : grid.models) {
    io::RunConfig start;
    try {
      start.model = models::preset(m);
    } catch (const Error& e) {
      fail(source, ": sweep.models: ", e.what());
    }
    io::apply_json(start, base, source);
    const int64_t blocks = models::num_blocks(start.model);
    for (auto E : grid.experts) {
      if (E == 1) {
        SweepRun r{m + "_dense", m, "none", 1, 0, start};
        r.cfg.model.moe = models::parse_placement("none");
        add(std::move(r), {});
        continue;
      }
      for (const auto& p : grid.placements)
        for (auto K : grid.ks) {
          if (K > E) {
            skip(moe_run_name(m, E, p, K) + ": K > E");
            continue;
          }
          SweepRun r{moe_run_name(m, E, p, K), m, p, E, K, start};
          r.cfg.model.moe = models::parse_placement(placement_spec(p));
          r.cfg.model.router.num_experts = E;
          r.cfg.model.router.k = K;
          std::vector<int64_t> at;
          try {
            at = models::moe_blocks(r.cfg.model.moe, blocks);
            models::validate(r.cfg.model);
          } catch (const Error& e) {
            fail(source, ": sweep run ", r.name, ": ", e.what());
          }
          MOEV_CHECK(!at.empty(), source, ": sweep.placements: '", p, "' puts no MoE layer in ", m,
                     " (the dense baseline is experts = 1)");
          add(std::move(r), at);
        }
    }
  }
  MOEV_CHECK(!runs.empty(), source, ": the sweep grid is empty (every K larger than every E?)");
  return runs;
}

namespace {
json row_json(const SweepRow& r) {
  return {{"name", r.name},     {"model", r.model},   {"placement", r.placement},
          {"experts", r.experts}, {"k", r.k},         {"top1", r.top1},
          {"params", r.params}, {"active_params", r.active_params}, {"flops", r.flops},
          {"train_images_per_s", r.train_images_per_s},
          {"eval_images_per_s", r.eval_images_per_s}};
}
SweepRow row_from_json(const json& j) {
  SweepRow r;
  r.name = j.at("name");
  r.model = j.at("model");
  r.placement = j.at("placement");
  r.experts = j.at("experts");
  r.k = j.at("k");
  r.top1 = j.at("top1");
  r.params = j.at("params");
  r.active_params = j.at("active_params");
  r.flops = j.at("flops");
  r.train_images_per_s = j.at("train_images_per_s");
  r.eval_images_per_s = j.at("eval_images_per_s");
  return r;
}

void write_results(const std::vector<SweepRow>& rows, const std::string& out_dir) {
  namespace fs = std::filesystem;
  io::Table t;
  t.header = {"run", "model", "E", "placement", "K", "top1", "params", "active params",
              "MFLOPs/img", "train img/s", "eval img/s"};
  for (const auto& r : rows)
    t.add({r.name, r.model, std::to_string(r.experts), r.placement,
           r.k ? std::to_string(r.k) : "-", io::fmt(r.top1), std::to_string(r.params),
           std::to_string(r.active_params), io::fmt(r.flops / 1e6, 2), io::fmt(r.train_images_per_s, 0),
           io::fmt(r.eval_images_per_s, 0)});
  const auto base = (fs::path(out_dir) / "results").string();
  io::write_text_atomic(base + ".csv", t.csv());
  io::write_text_atomic(base + ".md", "# Sweep results\n\n" + t.markdown());

  viz::PlotSpec plot;
  plot.title = "top-1 against active forward FLOPs per image";
  plot.xlabel = "MFLOPs per image (active)";
  plot.ylabel = "test top-1";
  std::map<std::string, size_t> series_of;
  for (const auto& r : rows) {
    if (!series_of.count(r.model)) {
      series_of[r.model] = plot.series.size();
      plot.series.push_back({});
      plot.series.back().name = r.model;
      plot.series.back().lines = false;
    }
    auto& s = plot.series[series_of[r.model]];
    s.x.push_back(r.flops / 1e6);
    s.y.push_back(r.top1);
    s.point_labels.push_back(r.experts == 1 ? "dense"
                                            : "E" + std::to_string(r.experts) + " " + r.placement +
                                                  " K" + std::to_string(r.k));
  }
  viz::write_plot(plot, base + ".png");
}
// A run directory is read back or resumed only if it holds the run asked for
// now: a sweep rerun with other settings into the same --out used to report
// the old results as the new ones, or resume half-done runs with old settings.
void check_run_settings(const io::RunConfig& want, const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  const fs::path ckpt = dir / "checkpoint.pt", file = dir / "config.json";
  if (!fs::exists(dir / "result.json") && !fs::exists(ckpt)) return;
  io::RunConfig saved;
  if (fs::exists(file)) {
    saved = io::from_json_string(io::read_text(file.string()), file.string());
  } else {
    saved = io::from_json_string(load_checkpoint(ckpt.string(), CheckpointLoad::kConfig).config_json, ckpt.string());
  }
  const auto differ = resume_differences(saved, want);
  MOEV_CHECK(differ.empty(), "sweep run ", dir.string(), " was trained with other settings than this sweep asks for:",
             differ, "\nsweep into another --out, or delete ", dir.string(), " to train it again");
}
}  // namespace

namespace {

std::vector<SweepRow> run_sweep_locked(const std::vector<SweepRun>& runs, const std::string& out_dir,
                                       std::ostream* progress, bool interactive, const std::atomic<bool>* stop) {
  namespace fs = std::filesystem;
  std::vector<SweepRow> rows;
  // Runs finished before are counted from the start, not into this process's rate: a resumed sweep read
  // "3530.1 run/s ETA 0:00" and then an ETA of the runs left at that rate.
  int64_t before = 0, fresh = 0;
  for (const auto& run : runs) before += fs::exists(fs::path(out_dir) / run.name / "result.json");
  viz::ProgressBar bar(progress, static_cast<int64_t>(runs.size()), "sweep", "run", interactive, before);
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& run = runs[i];
    const fs::path dir = fs::path(out_dir) / run.name;
    const fs::path result = dir / "result.json";
    io::RunConfig cfg = run.cfg;
    cfg.train.out_dir = dir.string();
    cfg.train.eval_each_epoch = false;
    check_run_settings(cfg, dir);
    if (fs::exists(result)) {  // finished before an interruption
      const std::string text = io::read_text(result.string(), "sweep result");
      try {
        rows.push_back(row_from_json(json::parse(text)));
      } catch (const json::exception& e) {
        fail(result.string(), ": unreadable sweep result (", e.what(), "); delete it to rerun");
      }
      bar.update(before + fresh, run.name + " (done before)");
      continue;
    }
    if (stop && stop->load())  // asked while the last run was evaluated
      throw Stopped("sweep stopped with " + std::to_string(i) + " of " + std::to_string(runs.size()) +
                    " runs done: the same sweep command again continues it");
    TrainRunOptions o;
    o.resume = fs::exists(dir / "checkpoint.pt");
    o.progress = progress;
    o.interactive = interactive;
    o.stop = stop;
    auto outcome = train_model(cfg, o);
    if (outcome.stopped)
      throw Stopped("sweep stopped in run " + run.name + " at step " + std::to_string(outcome.steps) + " (" +
                    std::to_string(i) + " of " + std::to_string(runs.size()) +
                    " runs done); its checkpoint is saved: the same sweep command again continues it");

    // The run's own last evaluation scored the weights it saved on this test set: loading the checkpoint to
    // score it again doubled each run's evaluation time.
    MOEV_CHECK(outcome.finished, "sweep run ", run.name, " paused at train.max_steps = ", cfg.train.max_steps,
               " (step ", outcome.steps, "), before its last epoch: a sweep scores finished runs; drop max_steps ",
               "(its checkpoint is kept, and the same sweep command continues it)");
    const EvalResult& e = outcome.eval;  // a finished run's: evaluated at its end, or again when resumed after it
    const auto cost = models::model_cost(cfg.model);
    SweepRow r{run.name, run.model, run.placement, run.experts, run.k, e.top1, cost.params,
               cost.active_params, cost.flops, outcome.train_images_per_s, e.images_per_s};
    io::write_text_atomic(result.string(), row_json(r).dump(1) + "\n");
    rows.push_back(r);
    write_results(rows, out_dir);  // a partial table is there to look at while it runs
    bar.update(before + ++fresh, run.name + " top-1 " + io::fmt(r.top1));
  }
  bar.finish();
  write_results(rows, out_dir);
  return rows;
}

}  // namespace

std::vector<SweepRow> run_sweep(const std::vector<SweepRun>& runs, const std::string& out_dir,
                                std::ostream* progress, bool interactive, const std::atomic<bool>* stop) {
  namespace fs = std::filesystem;
  // A training run's directory took the grid's runs beside its own checkpoint; the sweep's own lock file marks
  // its directory, which `train` refuses in turn.
  io::refuse_other_kinds(out_dir, {".sweep.lock"}, "sweep --out");
  return io::in_run_directory(out_dir, ".sweep.lock", "sweep --out " + out_dir,
                              [&] { return run_sweep_locked(runs, out_dir, progress, interactive, stop); });
}

}  // namespace moev::train
