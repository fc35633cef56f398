// `moev hardmoe`: Gross et al.'s hard mixture of experts from one config file
// whose [model]/[data]/[train] sections trained the trunk (`moev train`):
//   cluster       trunk features -> k-means -> partition.csv, centroids.pt, hardmoe.json
//   train-expert  expert i on its partition: one independent process (any machine)
//   train-all     every expert, J processes at a time, one progress line each
// Then `moev eval <dir>/hardmoe.json` and `moev predict --checkpoint <dir>/hardmoe.json`.
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <thread>

#include <nlohmann/json.hpp>

#include "children.h"
#include "commands.h"
#include "stop_signal.h"
#include "moev/core/error.h"
#include "moev/hardmoe/expert_training.h"
#include "moev/hardmoe/hardmoe_config.h"
#include "moev/hardmoe/partition.h"
#include "moev/train/checkpoint.h"
#include "moev/train/trainer.h"
#include "moev/viz/progress_bar.h"

namespace moev::app {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

struct HardMoEFlags {
  std::string config, dir, trunk;
  std::vector<std::string> sets;
  std::optional<int64_t> experts;  // unset: hardmoe.experts
  int64_t expert = -1;
  int threads = 0, jobs = 2;
  int64_t batch_size = 256;
};

// The file, its [hardmoe] settings (with the flags' overrides) and the
// expert runs' overrides (the file's other sections, then --set).
struct Resolved {
  hardmoe::HardMoEConfig hm;
  json overrides;
  std::string source;  // where the overrides came from, for messages about them
};

// The error a failed expert's output.log ends with ("" if none): the cause, in train-all's summary, which named
// only the log of each failed expert.
std::string last_error_line(const std::string& log) {
  std::ifstream in(log);
  std::string line, last;
  while (std::getline(in, line))
    if (line.rfind("moev: error: ", 0) == 0) last = line.substr(13);
  return last;
}

// Experts with fewer training images than a batch cannot take a step (the trainer drops a partial last batch):
// "" when every expert has a batch, else the list ("0 (18 images), 5 (7 images)").
std::string experts_below_a_batch(const hardmoe::Partition& p, int64_t batch_size, const std::vector<bool>& done) {
  std::string list;
  for (int64_t e = 0; e < p.experts; ++e)
    if (!done[static_cast<size_t>(e)] && p.counts[static_cast<size_t>(e)] < batch_size)
      list += (list.empty() ? "" : ", ") + std::to_string(e) + " (" + std::to_string(p.counts[static_cast<size_t>(e)]) +
              " image" + (p.counts[static_cast<size_t>(e)] == 1 ? "" : "s") + ")";
  return list;
}

Resolved resolve(const HardMoEFlags& f) {
  auto file = io::read_config_file(f.config);
  MOEV_CHECK(file.is_object(), f.config, ": expected a table of sections");
  io::RunConfig run;
  io::apply_json(run, file, f.config);
  MOEV_CHECK(!f.experts || *f.experts >= 1, "--experts ", f.experts.value_or(0), ": expected >= 1");
  if (f.experts) file["hardmoe"]["experts"] = *f.experts;
  // --set hardmoe.<key> goes over the file's [hardmoe] (parse_hardmoe_config checks the key), the others over
  // the expert runs' config.
  json sets = json::object();
  std::string hm_source = f.config;
  for (const auto& s : f.sets) {
    if (s.rfind("hardmoe.", 0) == 0) {
      file.merge_patch(io::assignment_json(s));
      hm_source += (hm_source == f.config ? " with --set " : ", --set ") + s;
    } else {
      sets.merge_patch(io::override_json(s));
    }
  }
  Resolved r;
  r.hm = hardmoe::parse_hardmoe_config(file, run, hm_source);
  if (!f.dir.empty()) r.hm.dir = f.dir;
  if (!f.trunk.empty()) r.hm.trunk = f.trunk;
  if (f.threads > 0) r.hm.expert_threads = f.threads;
  // A run key the [hardmoe] section sets for the experts would be dropped without a word (--set
  // train.lr=0.5 trained at hardmoe.expert_lr): refused, naming the key that decides.
  const json t = sets.value("train", json::object());
  auto decided = [&](const char* key, bool set_by_hardmoe, const char* hm_key, const std::string& hm_value) {
    MOEV_CHECK(!t.contains(key) || !set_by_hardmoe, "--set train.", key, "=", t.contains(key) ? t[key].dump() : "",
               ": the experts take hardmoe.", hm_key, " = ", hm_value, " (", f.config,
               " or --set hardmoe.", hm_key, "=...) in its place");
  };
  decided("epochs", r.hm.expert_epochs > 0, "expert_epochs", std::to_string(r.hm.expert_epochs));
  decided("lr", r.hm.expert_lr > 0, "expert_lr", json(r.hm.expert_lr).dump());
  decided("warmup_steps", r.hm.expert_warmup_steps >= 0, "expert_warmup_steps",
          std::to_string(r.hm.expert_warmup_steps));
  // expert_threads is 1 unless named: credited to the file, the default read as the user's setting.
  const bool threads_named = f.threads > 0 || (file.contains("hardmoe") && file["hardmoe"].is_object() &&
                                               file["hardmoe"].contains("expert_threads"));
  MOEV_CHECK(!t.contains("threads") || r.hm.expert_threads <= 0, "--set train.threads=", t.value("threads", json()).dump(),
             ": the experts take hardmoe.expert_threads = ", r.hm.expert_threads,
             f.threads > 0 ? " (--threads)" : threads_named ? " (" + hm_source + ")" : " (its default)",
             " in its place: give --threads N, or hardmoe.expert_threads = 0 to let train.threads decide");
  r.overrides = file;  // apply_json skips [hardmoe] (and other commands' sections)
  r.overrides.merge_patch(sets);
  r.source = f.config;
  for (const auto& s : f.sets) r.source += (&s == &f.sets.front() ? " with --set " : ", --set ") + s;
  return r;
}

void add_common(CLI::App* cmd, HardMoEFlags& f) {
  cmd->add_option("-c,--config", f.config, "config file: the trunk's run and a [hardmoe] section")->required();
  cmd->add_option("--experts", f.experts, "experts k (overrides hardmoe.experts)");
  cmd->add_option("--dir", f.dir, "hard MoE directory (overrides hardmoe.dir)");
  cmd->add_option("--trunk", f.trunk, "trunk checkpoint (overrides hardmoe.trunk)");
  cmd->add_option("--threads", f.threads, "threads of clustering, or of each expert (overrides hardmoe.expert_threads)");
}

}  // namespace

Runner add_hardmoe(CLI::App& app) {
  auto* cmd = app.add_subcommand("hardmoe", "hard mixture of experts: cluster the trunk's features, train experts "
                                            "as independent jobs");
  cmd->require_subcommand(1);
  auto f = std::make_shared<HardMoEFlags>();
  auto* cl = cmd->add_subcommand("cluster", "k-means on the trunk's embeddings: partition.csv, centroids.pt, "
                                            "hardmoe.json");
  add_common(cl, *f);
  cl->add_option("--batch-size", f->batch_size, "images per feature-extraction pass")->capture_default_str();
  auto* te = cmd->add_subcommand("train-expert", "train expert i on its partition (an independent process)");
  add_common(te, *f);
  te->add_option("--expert", f->expert, "expert index i (0..k-1)")->required();
  te->add_option("--set", f->sets, "override an expert run's config key: section.key=value");
  auto* ta = cmd->add_subcommand("train-all", "train every expert, J processes at a time");
  add_common(ta, *f);
  ta->add_option("-j,--jobs", f->jobs, "expert processes at a time (each with hardmoe.expert_threads threads)")
      ->capture_default_str();
  ta->add_option("--set", f->sets, "override an expert run's config key: section.key=value");
  cmd->footer(
      "\nExample (configs/hardmoe_mosaic.toml):\n"
      "  moev data mosaic --out data/mosaic\n"
      "  moev train --config configs/hardmoe_mosaic.toml            # the trunk\n"
      "  moev hardmoe cluster --config configs/hardmoe_mosaic.toml --experts 4\n"
      "  moev hardmoe train-expert --config configs/hardmoe_mosaic.toml --experts 4 --expert 0   # on any machine\n"
      "  moev hardmoe train-all --config configs/hardmoe_mosaic.toml --experts 4 --jobs 2\n"
      "  moev eval runs/hardmoe_mosaic/hardmoe4/hardmoe.json");

  return [f, cl, te, ta]() -> int {
    if (ta->parsed()) check_rereadable_config(f->config, "expert");  // before this process reads it
    const auto r = resolve(*f);
    const auto& hm = r.hm;
    if (cl->parsed()) {
      train::set_threads(f->threads);
      // The experts' runs checked now (the config's data and image size against
      // the trunk's), not after the clustering, in every expert.
      const auto expert_cfg = hardmoe::expert_run_config(
          hm, io::from_json_string(train::load_checkpoint(hm.trunk, train::CheckpointLoad::kConfig).config_json,
                                   hm.trunk),
          r.overrides, 0, r.source);
      const auto t0 = std::chrono::steady_clock::now();
      auto p = hardmoe::cluster_trunk(hm, f->batch_size, &std::cerr, stderr_is_terminal());
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("%lld expert%s from %s in %.1f s (k-means: %lld iterations, inertia %.4g)\nimages per expert:",
                  (long long)p.experts, p.experts == 1 ? "" : "s", p.trunk.c_str(), s, (long long)p.iterations,
                  p.inertia);
      for (auto c : p.counts) std::printf(" %lld", (long long)c);
      std::printf("\nwrote %s/partition.csv, centroids.pt, partition.json, partition.png, hardmoe.json\n", hm.dir.c_str());
      // Said now, not by each expert's run after the others have trained (train-all refuses to start them).
      const std::string small =
          experts_below_a_batch(p, expert_cfg.train.batch_size, std::vector<bool>(static_cast<size_t>(p.experts)));
      if (!small.empty())
        std::fprintf(stderr,
                     "note: expert%s %s get%s fewer training images than train.batch_size = %lld and cannot train; "
                     "cluster into fewer experts, or lower train.batch_size\n",
                     small.find(',') == std::string::npos ? "" : "s", small.c_str(),
                     small.find(',') == std::string::npos ? "s" : "", (long long)expert_cfg.train.batch_size);
      return 0;
    }
    if (te->parsed()) {
      train::TrainRunOptions o;
      o.progress = &std::cerr;
      o.interactive = stderr_is_terminal();
      o.stop = stop_on_signals();
      auto out = hardmoe::train_expert(hm, r.overrides, f->expert, r.source, o);
      if (out.already_done) {
        std::printf("expert %lld is already trained (%s); delete it to train again\n", (long long)f->expert,
                    hardmoe::expert_result_file(hm.dir, f->expert).c_str());
        return 0;
      }
      std::printf("expert %lld: %lld images, %lld steps in %.1f s; test precision@1 of this expert alone %.4f\n",
                  (long long)f->expert, (long long)out.images, out.result["steps"].get<long long>(),
                  out.result["train_seconds"].get<double>(), out.result["test_top1"].get<double>());
      std::printf("checkpoint: %s\n", train::checkpoint_path(hardmoe::expert_dir(hm.dir, f->expert)).c_str());
      return 0;
    }
    if (!ta->parsed()) return 1;
    // train-all: every expert a `moev hardmoe train-expert` child, so each is
    // exactly the process a cluster scheduler would run.
    MOEV_CHECK(f->jobs >= 1, "--jobs ", f->jobs, ": expected >= 1");
    const auto part = hardmoe::read_partition(hm.dir);
    const int64_t k = part.experts;
    MOEV_CHECK(!f->experts || *f->experts == k, "--experts ", f->experts.value_or(0), ": the partition in ", hm.dir,
               " has ", k, " experts");
    const int threads = hm.expert_threads;
    auto checked = hm;  // the trunk as each expert will find it (the recorded one, or --trunk for a moved directory)
    checked.trunk = hardmoe::checked_trunk(part, hm.dir, hm.trunk);
    const auto trunk_ckpt_cfg = io::from_json_string(
        train::load_checkpoint(checked.trunk, train::CheckpointLoad::kConfig).config_json, checked.trunk);
    std::vector<int64_t> total(k);
    std::vector<bool> done(static_cast<size_t>(k));
    int64_t batch_size = 0;
    for (int64_t e = 0; e < k; ++e) {
      hardmoe::check_expert_rows(part, hm.dir, e);  // before "done earlier" reported another clustering's expert
      auto c = hardmoe::expert_run_config(checked, trunk_ckpt_cfg, r.overrides, e, r.source);
      hardmoe::check_expert_settings(c, hm, e);  // before "done earlier" or a resume could keep other settings
      total[e] = part.counts[e] / c.train.batch_size * (c.train.epochs + c.train.cooldown_epochs);
      done[static_cast<size_t>(e)] = fs::exists(hardmoe::expert_result_file(hm.dir, e));
      batch_size = c.train.batch_size;
    }
    // Refused before any expert starts: they failed one by one after the others had trained.
    const std::string small = experts_below_a_batch(part, batch_size, done);
    const bool one = small.find(',') == std::string::npos;
    MOEV_CHECK(small.empty(), "hardmoe train-all: expert", one ? " " : "s ", small, " of ", hm.dir,
               one ? " has" : " have", " fewer training images than train.batch_size = ", batch_size,
               " and cannot train; lower it (--set train.batch_size=N) or cluster into fewer experts");
    enum State { kWaiting, kRunning, kDone, kFailed };
    std::vector<State> state(k, kWaiting);
    std::vector<std::string> line(k, "waiting");
    std::vector<std::chrono::steady_clock::time_point> started(k);
    std::vector<std::string> failures;
    for (int64_t e = 0; e < k; ++e)
      if (fs::exists(hardmoe::expert_result_file(hm.dir, e))) {
        state[e] = kDone;
        line[e] = "done earlier";
      }
    const bool tty = stderr_is_terminal();
    bool drawn = false;
    std::vector<int> printed_quarter(k, -1);
    auto draw = [&]() {
      if (tty) {
        if (drawn) std::fprintf(stderr, "\033[%lldA", (long long)k);
        for (int64_t e = 0; e < k; ++e) std::fprintf(stderr, "\r\033[Kexpert %-3lld %s\n", (long long)e, line[e].c_str());
        drawn = true;
        return;
      }
      // Not a terminal: a line per expert when it starts, at each quarter, and when it ends.
      for (int64_t e = 0; e < k; ++e) {
        int q = state[e] == kDone || state[e] == kFailed ? 4 : state[e] == kRunning ? 0 : -1;
        if (state[e] == kRunning) {
          auto j = last_log_line(hardmoe::expert_dir(hm.dir, e), "loss");
          if (!j.is_null() && total[e] > 0) q = static_cast<int>(4 * j["step"].get<int64_t>() / total[e]);
          q = std::min(q, 3);
        }
        if (q > printed_quarter[e]) {
          std::fprintf(stderr, "expert %-3lld %s\n", (long long)e, line[e].c_str());
          printed_quarter[e] = q;
        }
      }
    };
    auto status = [&](int64_t e) {
      const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - started[e]).count();
      auto j = last_log_line(hardmoe::expert_dir(hm.dir, e), "loss");
      const int64_t step = j.is_null() ? 0 : j["step"].get<int64_t>();
      const double frac = total[e] > 0 ? std::min(1.0, double(step) / double(total[e])) : 0.0;
      const int width = 24, fill = static_cast<int>(frac * width);
      std::string bar = "[" + std::string(fill, '#') + std::string(width - fill, '-') + "]";
      char buf[256];
      const double rate = j.is_null() ? 0.0 : j.value("images_per_s", 0.0);
      const std::string eta = step > 0 ? viz::ProgressBar::format_duration(el / frac * (1 - frac)) : "?";
      std::snprintf(buf, sizeof buf, "%s %3.0f%%  step %lld/%lld  %.0f img/s  ETA %s  loss %.4f", bar.c_str(),
                    100 * frac, (long long)step, (long long)total[e], rate, eta.c_str(),
                    j.is_null() ? 0.0 : j.value("loss", 0.0));
      return std::string(buf);
    };
    Children children;
    auto& running = children.running;
    // A stop (Ctrl-C, a scheduler's SIGTERM) killed this process without a word: the experts running save, no
    // other starts, and the same command continues them.
    const auto* stop = stop_on_signals();
    const auto t0 = std::chrono::steady_clock::now();
    for (;;) {
      children.pass_on_stop(stop);
      for (int64_t e = 0; e < k && !stop->load() && static_cast<int>(running.size()) < f->jobs; ++e) {
        if (state[e] != kWaiting) continue;
        const std::string dir = hardmoe::expert_dir(hm.dir, e);
        fs::create_directories(dir);
        std::vector<std::string> args = {"moev", "hardmoe", "train-expert", "--config", f->config, "--expert",
                                         std::to_string(e), "--dir", hm.dir, "--trunk", hm.trunk,
                                         "--experts", std::to_string(k)};
        if (f->threads > 0) {
          args.push_back("--threads");
          args.push_back(std::to_string(f->threads));
        }
        for (const auto& s : f->sets) {
          args.push_back("--set");
          args.push_back(s);
        }
        running[spawn_self(args, (fs::path(dir) / "output.log").string(), "hardmoe train-all")] = e;
        state[e] = kRunning;
        started[e] = std::chrono::steady_clock::now();
        line[e] = status(e);
      }
      if (running.empty()) break;
      int st = 0;
      const pid_t pid = ::waitpid(-1, &st, WNOHANG);
      if (pid < 0 && errno != EINTR) fail("hardmoe train-all: waiting for the experts failed: ", std::strerror(errno));
      if (pid > 0 && running.count(pid)) {
        const int64_t e = static_cast<int64_t>(running[pid]);
        running.erase(pid);
        const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - started[e]).count();
        if (WIFEXITED(st) && WEXITSTATUS(st) == 0 && fs::exists(hardmoe::expert_result_file(hm.dir, e))) {
          state[e] = kDone;
          line[e] = "done in " + viz::ProgressBar::format_duration(el) + " (" + std::to_string(part.counts[e]) +
                    " images)";
        } else {
          state[e] = kFailed;
          const std::string log = (fs::path(hardmoe::expert_dir(hm.dir, e)) / "output.log").string();
          const bool asked = ended_by_stop(st, stop);  // saved its checkpoint, or had none: not broken
          line[e] = asked ? "stopped on request (saved; rerun to continue)"
                          : "FAILED (" + wait_status_text(st) + "); see " + log;
          const std::string why = asked ? "" : last_error_line(log);
          failures.push_back("expert " + std::to_string(e) +
                             (asked ? " (stopped on request)"
                                    : " (" + wait_status_text(st) + (why.empty() ? "" : ": " + why) + "; see " + log +
                                          ")"));
        }
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(500));
      }
      for (const auto& [p, e] : running) line[e] = status(static_cast<int64_t>(e));
      draw();
    }
    draw();
    auto list = [](const std::vector<std::string>& v) {
      std::string all;
      for (const auto& x : v) all += (all.empty() ? "" : ", ") + x;
      return all;
    };
    std::vector<std::string> waiting;
    for (int64_t e = 0; e < k; ++e)
      if (state[e] == kWaiting) waiting.push_back(std::to_string(e));
    // A stop that came when every expert was done (or done as it came) stops nothing.
    if (stop->load() && (!failures.empty() || !waiting.empty())) {
      std::string what = list(failures);
      if (!waiting.empty())
        what += (what.empty() ? "" : "; ") + ("not started: expert" + std::string(waiting.size() > 1 ? "s " : " ")) +
                list(waiting);
      throw Stopped("hardmoe train-all: stopped: " + what + "; the same command continues (experts done are kept)");
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    // One failed expert leaves the others' results as they are; rerunning trains what is missing.
    MOEV_CHECK(failures.empty(), "hardmoe train-all: ", failures.size(), " of ", k, " experts failed: ",
               list(failures));
    std::printf("%lld expert%s trained in %s (%d at a time, %s thread%s each); the model: %s\n", (long long)k,
                k == 1 ? "" : "s", viz::ProgressBar::format_duration(s).c_str(), f->jobs,
                threads > 0 ? std::to_string(threads).c_str() : "train.threads", threads == 1 ? "" : "s",
                hardmoe::model_file(hm.dir).c_str());
    return 0;
  };
}

}  // namespace moev::app
