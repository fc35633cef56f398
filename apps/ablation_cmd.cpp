// `moev ablation`: Sun et al.'s Table 1 at small scale (src/moev/train/ablation.h).
// Each run is a `moev train`, `moev fuse` or `moev ensemble` child process, J at a time, its
// output in <run>/output.log; a run is done once <run>/result.json exists, so
// running the command again resumes (a half-trained run continues from its
// checkpoint).
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <set>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <thread>

#include <nlohmann/json.hpp>

#include "children.h"
#include "commands.h"
#include "stop_signal.h"
#include "moev/core/error.h"
#include "moev/io/file_lock.h"
#include "moev/io/table.h"
#include "moev/train/ablation.h"
#include "moev/train/trainer.h"

namespace moev::app {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {
struct AblationFlags {
  std::string config, out = "runs/ablation";
  std::vector<std::string> sets;
  int jobs = 2;
  int64_t fusion_epochs = 30;
  std::vector<int64_t> branches, no_diversity;
  // kUnset: the flag was not given (the config's [ablation] value stands).
  static constexpr int64_t kUnset = std::numeric_limits<int64_t>::min();
  int64_t seeds = kUnset, first_seed = kUnset, teachers = kUnset;
  bool dry_run = false;
};

std::string result_file(const train::AblationTask& t) { return (fs::path(t.cfg.train.out_dir) / "result.json").string(); }

// The final test evaluation of a finished training run, from its log.
json train_result(const std::string& dir) {
  const json last = last_log_line(dir, "eval");
  MOEV_CHECK(!last.is_null(), dir, "/log.jsonl: the run finished without a test evaluation");
  // The run's training seconds, resumed processes included (elapsed_s, in logs written before train_s, counts
  // only the last process).
  return {{"top1", last["eval"]["top1"]}, {"seconds", last.value("train_s", last.value("elapsed_s", 0.0))}};
}

}  // namespace

Runner add_ablation(CLI::App& app) {
  auto* cmd = app.add_subcommand("ablation", "multi-branch MoE ablation (branches x diversity x distillation x "
                                             "fusion over seeds), as CSV, Markdown and a plot");
  auto f = std::make_shared<AblationFlags>();
  cmd->add_option("-c,--config", f->config, "config file: the runs' common config, and an [ablation] section")
      ->required();
  cmd->add_option("--out", f->out, "ablation directory (one run directory per row and seed)")->capture_default_str();
  cmd->add_option("--set", f->sets, "override a common config key, or an [ablation] one: section.key=value");
  cmd->add_option("-j,--jobs", f->jobs, "runs at a time (each gets cores / jobs threads)")->capture_default_str();
  cmd->add_option("--fusion-epochs", f->fusion_epochs, "epochs of each fusion training")->capture_default_str();
  cmd->add_option("--branches", f->branches, "N of the row groups (overrides ablation.branches)")->delimiter(',');
  cmd->add_option("--no-diversity", f->no_diversity, "N also run without the diversity loss (overrides "
                  "ablation.no_diversity; 0: none)")->delimiter(',');
  cmd->add_option("--seeds", f->seeds, "seeds per row (overrides ablation.seeds)");
  cmd->add_option("--first-seed", f->first_seed, "the first seed, so a table can grow by seeds or be split "
                  "across machines (overrides ablation.first_seed; default 0)");
  cmd->add_option("--teachers", f->teachers, "models in each distillation teacher, > 1: an ensemble trained on "
                  "the same images (overrides ablation.teachers)");
  cmd->add_flag("--dry-run", f->dry_run, "list the runs and exit");
  cmd->footer("\nRun it again with the same --out to resume.\nExample:\n"
              "  moev ablation --config configs/multibranch_fmnist.toml --out runs/ablation --jobs 2");
  return [f]() {
    MOEV_CHECK(f->jobs >= 1, "--jobs ", f->jobs, ": expected >= 1");
    auto j = io::read_config_file(f->config);
    // The [ablation] keys take --set as the runs' do ("ablation.seeds" was an unknown config key).
    auto run_sets = f->sets;
    const std::string grid_source = merge_section_sets(j, run_sets, "ablation", f->config);
    train::AblationGrid grid;
    if (j.is_object() && j.contains("ablation")) {
      grid = train::parse_ablation_grid(j["ablation"], grid_source);
      j.erase("ablation");
    }
    if (!f->branches.empty()) grid.branches = f->branches;
    if (!f->no_diversity.empty()) grid.no_diversity = f->no_diversity;
    // Checked here, not only by the plan, so the message names the flag.
    auto flag = [](int64_t v, int64_t min, const char* name, int64_t& into) {
      if (v == AblationFlags::kUnset) return;
      MOEV_CHECK(v >= min, name, " ", v, ": expected an integer >= ", min);
      into = v;
    };
    flag(f->seeds, 1, "--seeds", grid.seeds);
    flag(f->first_seed, 0, "--first-seed", grid.first_seed);
    flag(f->teachers, 1, "--teachers", grid.teachers);
    MOEV_CHECK(f->fusion_epochs >= 1, "--fusion-epochs ", f->fusion_epochs, ": expected >= 1 (checked before ",
               "any run, not after the training rows)");
    for (auto n : grid.branches) MOEV_CHECK(n >= 1, "--branches ", n, ": expected >= 1 branch");
    if (!f->no_diversity.empty()) train::check_no_diversity(grid, "--no-diversity");
    for (const auto& s : run_sets) j.merge_patch(io::override_json(s));
    auto tasks = train::plan_ablation(grid, j, f->out, f->config);
    const int cores = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    for (auto& t : tasks) {
      if (t.cfg.train.threads == 0) t.cfg.train.threads = std::max(1, cores / f->jobs);
      t.cfg.train.progress = false;
    }
    // Its own kind of directory: a run's or a sweep's took the rows' runs beside its files (--dry-run too).
    io::refuse_other_kinds(f->out, {".ablation.lock"}, "ablation --out");
    std::printf("%zu run%s in %s, %d at a time\n", tasks.size(), tasks.size() == 1 ? "" : "s", f->out.c_str(), f->jobs);
    std::fflush(stdout);  // before the runs' lines on stderr, when both go to one file
    if (f->dry_run) {
      for (const auto& t : tasks) std::printf("  %-28s %s\n", t.name.c_str(), t.row.c_str());
      return 0;
    }
    const io::RunDirectoryLock held(f->out, ".ablation.lock", "ablation --out " + f->out);
    std::map<std::string, size_t> by_name;
    for (size_t i = 0; i < tasks.size(); ++i) by_name[tasks[i].name] = i;
    enum State { kWaiting, kRunning, kDone };
    std::vector<State> state(tasks.size(), kWaiting);
    std::vector<double> top1(tasks.size()), seconds(tasks.size());
    auto read_result = [&](size_t i) {
      std::ifstream in(result_file(tasks[i]));
      auto r = json::parse(in, nullptr, false);
      MOEV_CHECK(r.is_object() && r.contains("top1"), result_file(tasks[i]),
                 ": not a result file (delete it to run ", tasks[i].name, " again)");
      top1[i] = r.at("top1").get<double>();
      seconds[i] = r.value("seconds", 0.0);
      state[i] = kDone;
    };
    // A run done under other settings (an edited config, another --set) would
    // stand in the table for one it is not.
    for (const auto& t : tasks) {
      const auto run = fs::path(t.cfg.train.out_dir) / "run.json";
      if (t.kind != train::AblationTask::kTrain || !fs::exists(run)) continue;
      std::ifstream in(run);
      const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      auto was = io::from_json_string(text, run.string());
      was.train.threads = t.cfg.train.threads;  // how it runs, not what it computes
      // The run's directory the plan derives from --out: the same run whether --out is named runs/abl, ./runs/abl
      // or absolutely (the refusal said to delete finished runs). Teachers are compared as files already.
      if (fs::path(was.train.out_dir).filename() == fs::path(t.cfg.train.out_dir).filename())
        was.train.out_dir = t.cfg.train.out_dir;
      std::string differ;
      for (const auto& d : io::config_differences(was, t.cfg)) differ += "\n  " + d;
      MOEV_CHECK(differ.empty(), run.string(), ": run ", t.name, " of this ablation directory was started with ",
                 "other settings than the ablation now plans:", differ, "\nuse another --out, or delete ",
                 t.cfg.train.out_dir, " to run it again");
    }
    size_t done = 0;
    for (size_t i = 0; i < tasks.size(); ++i)
      if (fs::exists(result_file(tasks[i]))) {
        read_result(i);
        ++done;
      }
    // The same for a fusion row fused for other epochs (results from before
    // fuse recorded its options carry none, and are taken as they are).
    for (size_t i = 0; i < tasks.size(); ++i) {
      if (tasks[i].kind != train::AblationTask::kFuse || state[i] != kDone) continue;
      std::ifstream in(result_file(tasks[i]));
      const auto r = json::parse(in, nullptr, false);
      const auto epochs = r.value(json::json_pointer("/options/epochs"), f->fusion_epochs);
      MOEV_CHECK(epochs == f->fusion_epochs, result_file(tasks[i]), ": ", tasks[i].name, " was fused for ", epochs,
                 " epochs, and the ablation now plans --fusion-epochs ", f->fusion_epochs, "; use another --out, or ",
                 "delete ", result_file(tasks[i]), " to fuse it again");
    }
    if (done) std::printf("%zu runs already done\n", done);
    Children children;
    auto& running = children.running;
    std::string failure;
    // A stop (Ctrl-C, a scheduler's SIGTERM) killed this process without a word, and a SIGTERM reached no run:
    // the runs going save, no other starts, and the same command continues.
    const auto* stop = stop_on_signals();
    const auto t0 = std::chrono::steady_clock::now();
    while (done < tasks.size()) {
      children.pass_on_stop(stop);
      // Start what can start.
      for (size_t i = 0; failure.empty() && !stop->load() && i < tasks.size() &&
                         static_cast<int>(running.size()) < f->jobs;
           ++i) {
        const auto& t = tasks[i];
        if (state[i] != kWaiting ||
            std::any_of(t.after.begin(), t.after.end(), [&](const auto& a) { return state[by_name.at(a)] != kDone; }))
          continue;
        fs::create_directories(t.cfg.train.out_dir);
        const std::string log = (fs::path(t.cfg.train.out_dir) / "output.log").string();
        std::vector<std::string> args;
        if (t.kind == train::AblationTask::kTrain) {
          const std::string run = (fs::path(t.cfg.train.out_dir) / "run.json").string();
          io::write_text_atomic(run, io::to_json_string(t.cfg) + "\n");
          args = {"moev", "train", "--config", run};
          if (fs::exists(train::checkpoint_path(t.cfg.train.out_dir))) args.push_back("--resume");
        } else if (t.kind == train::AblationTask::kFuse) {
          args = {"moev", "fuse", t.source_checkpoints.at(0), "--out",
                  (fs::path(t.cfg.train.out_dir) / "fused.pt").string(), "--result", result_file(t),
                  "--epochs", std::to_string(f->fusion_epochs), "--threads", std::to_string(t.cfg.train.threads)};
        } else {
          const std::string members = (fs::path(t.cfg.train.out_dir) / "ensemble.json").string();
          io::write_text_atomic(members, json{{"ensemble", {{"members", t.source_checkpoints}}}}.dump(2) + "\n");
          args = {"moev", "ensemble", "--config", members, "--result", result_file(t),
                  "--threads", std::to_string(t.cfg.train.threads)};
        }
        running[spawn_self(args, log, "ablation")] = i;
        state[i] = kRunning;
      }
      if (running.empty()) break;  // a failure stopped the rest
      int status = 0;
      const pid_t pid = ::waitpid(-1, &status, WNOHANG);  // not blocking: a stop is looked for between waits
      if (pid == 0 || (pid < 0 && errno == EINTR)) {
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
        continue;
      }
      MOEV_CHECK(pid > 0, "ablation: waiting for the runs failed: ", std::strerror(errno));
      if (!running.count(pid)) continue;
      const size_t i = running[pid];
      running.erase(pid);
      const auto& t = tasks[i];
      const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      if (!ok) {
        const bool asked = ended_by_stop(status, stop);  // saved, or had nothing to save: not broken
        if (failure.empty())
          failure = t.name + (asked ? " stopped on request (" : " failed (") +
                    wait_status_text(status) +
                    (asked ? "); the same command again continues it" : "); see ") +
                    (asked ? "" : (fs::path(t.cfg.train.out_dir) / "output.log").string());
        state[i] = kWaiting;
        continue;
      }
      try {
        if (t.kind == train::AblationTask::kTrain)
          io::write_text_atomic(result_file(t), train_result(t.cfg.train.out_dir).dump(2) + "\n");
        read_result(i);
      } catch (const std::exception& e) {  // the others finish; the table is not written
        if (failure.empty()) failure = t.name + ": " + e.what();
        state[i] = kWaiting;
        continue;
      }
      ++done;
      const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::fprintf(stderr, "[%3zu/%zu] %-28s top-1 %.4f  (%.0f s; %.0f s elapsed)\n", done, tasks.size(),
                   t.name.c_str(), top1[i], seconds[i], el);
    }
    if (stop->load() && done < tasks.size())  // a stop that came as the last run ended stops nothing
      throw Stopped("ablation: stopped after " + std::to_string(done) + " of " + std::to_string(tasks.size()) +
                    " runs" +
                    (failure.empty() || failure.find(" stopped on request") != std::string::npos
                         ? ""
                         : " (" + failure + ")") +
                    "; the same command continues (runs done are kept)");
    MOEV_CHECK(failure.empty(), "ablation: ", failure);
    auto rows = train::summarise_ablation(tasks, top1, seconds);
    train::write_ablation(rows, f->out);
    io::Table t;
    t.header = {"method", "top-1 mean (%)", "spread (sd)", "seeds"};
    for (const auto& r : rows)
      t.add({r.row, io::fmt(100 * r.mean, 2), io::fmt(100 * r.spread, 2), std::to_string(r.top1.size())});
    std::printf("%swrote %s/ablation.csv, ablation.md, ablation.png\n", t.markdown().c_str(), f->out.c_str());
    // The table holds this command's seeds; finished runs of other seeds in the directory (an earlier
    // --first-seed, another machine's share) are said, with the command that tabulates them all.
    std::set<uint64_t> others;
    uint64_t lo = tasks.front().seed, hi = lo;
    for (const auto& task : tasks) lo = std::min(lo, task.seed), hi = std::max(hi, task.seed);
    for (const auto& task : tasks) {
      const std::string stem = task.name.substr(0, task.name.rfind("_s") + 2);
      std::error_code ec;
      for (fs::directory_iterator it(f->out, ec), end; !ec && it != end; it.increment(ec)) {
        const std::string name = it->path().filename().string();
        if (name.rfind(stem, 0) != 0 || name.size() == stem.size() ||
            name.find_first_not_of("0123456789", stem.size()) != std::string::npos ||
            !fs::exists(it->path() / "result.json"))
          continue;
        const uint64_t seed = std::stoull(name.substr(stem.size()));
        if (seed < lo || seed > hi) others.insert(seed);
      }
    }
    if (!others.empty()) {
      const uint64_t first = std::min(lo, *others.begin()), last = std::max(hi, *others.rbegin());
      std::fprintf(stderr, "note: %s also holds finished runs of seed%s", f->out.c_str(), others.size() > 1 ? "s" : "");
      for (auto sd : others) std::fprintf(stderr, " %llu", static_cast<unsigned long long>(sd));
      std::fprintf(stderr, ", outside this table (seeds %llu..%llu); --first-seed %llu --seeds %llu tabulates "
                   "them all (runs done are kept)\n", static_cast<unsigned long long>(lo),
                   static_cast<unsigned long long>(hi), static_cast<unsigned long long>(first),
                   static_cast<unsigned long long>(last - first + 1));
    }
    return 0;
  };
}

}  // namespace moev::app
