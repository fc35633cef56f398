// Subcommands of the `moev` program. Each registers its flags on a CLI11
// subcommand and returns the function that runs it; all flag parsing that fills
// configs goes through ConfigFlags (apps/config_flags_cmd.cpp).
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "moev/dist/communicator.h"
#include "moev/io/run_config.h"

namespace moev::train {
struct TrainedModel;
}  // namespace moev::train

namespace moev::app {

using Runner = std::function<int()>;

// Flags that fill an io::RunConfig: --config, --model, --set and shorthands.
struct ConfigFlags {
  std::string config_file;
  std::string preset;
  std::vector<std::string> sets;
  std::vector<std::string> shorthand;  // filled by the shorthand flags, as key=value
  std::vector<std::string> in_order;   // shorthands and --set values as key=value, in command-line order
  bool print_config = false;
  bool help_config = false;
  void add_to(CLI::App* cmd);
  io::RunConfig resolve() const;  // defaults <- preset (--model's over the file's) <- file <- flags in order
  // The config file as JSON, read once: a pipe (`--config <(...)`) read twice
  // gave nothing the second time, and the run its defaults.
  const nlohmann::json& file() const;
  // resolve(), unless --help-config or --print-config asked for a listing: then
  // it is printed and nothing is returned (the command exits 0).
  std::optional<io::RunConfig> resolve_or_print() const;
  // The keys the flags set (--set and the shorthands), as section.key.
  std::set<std::string> named_keys() const;
  // `key` ("train.threads") is set by a flag or by the config file.
  bool names_key(const std::string& key) const;
  // Refuses a key this command sets that the resolved model does not read (moev::Error naming it). Not for a
  // resumed run, whose model is the saved one (check_resume_overrides compares the keys with it).
  void check_keys_apply(const io::RunConfig& cfg) const;
  bool resuming = false;  // set by a command before resolve(): --resume
  // body(), an error about a key that only the config file set ("train.epochs = 1e12: expected ...") naming
  // the file: the message named the key alone.
  int naming_the_file(const std::function<int()>& body) const;

 private:
  mutable std::shared_ptr<const nlohmann::json> file_;
};

// The thread count sets the order of floating-point sums, so a run resumed on
// another count does not repeat bit for bit. Unless the command names one
// (--threads, --set train.threads, a config file's), a resumed run keeps the
// count it was saved with (`saved`): `moev train --out DIR --resume` took all cores (keep_threads false: a job's
// ranks split the cores their own way). How often it saves is the run's own too unless the command names it (a
// preempted job may save more often): `moev pretrain --out DIR --resume` saved every 200 steps, not its 5.
void keep_saved_run_settings(const ConfigFlags& flags, const io::RunConfig& saved, io::RunConfig& cfg,
                             bool keep_threads);

// --resume continues a run as it was saved (only threads, device, progress,
// max_steps and out come from now). A key the user set that differs from the
// saved run would be dropped without a word: refused, naming each. With a
// config file every key counts; with --model the model's (model.*, moe.*: the
// defaults of the others were listed as differences nobody asked for); else
// only the keys named by flags, so `moev train --out DIR --resume` alone stays valid.
void check_resume_overrides(const ConfigFlags& flags, const io::RunConfig& saved, const io::RunConfig& cfg,
                            const std::string& path);

// `--set SECTION.key=value` for a command's own section of `config` ([sweep],
// [ablation]): merged into the config document `j` (the section's parser checks
// the keys) and taken out of `sets`, which keeps the run config's. Returns the
// source the section's errors name ("x.toml with --set sweep.k=1").
std::string merge_section_sets(nlohmann::json& j, std::vector<std::string>& sets, const std::string& section,
                               const std::string& config);

// Refuses a config that is not a regular file (`--config <(...)`) where each of
// several processes (a rank, a hard MoE expert) reads it again itself: a pipe
// gives its text to the first reader only. `reader` names one of them.
void check_rereadable_config(const std::string& path, const char* reader);

Runner add_train(CLI::App& app);
Runner add_eval(CLI::App& app);
Runner add_predict(CLI::App& app);
Runner add_analyze(CLI::App& app);
Runner add_sweep(CLI::App& app);
Runner add_launch(CLI::App& app);
Runner add_checkpoint(CLI::App& app);
Runner add_fuse(CLI::App& app);
Runner add_ablation(CLI::App& app);
Runner add_ensemble(CLI::App& app);
Runner add_data(CLI::App& app);
Runner add_hardmoe(CLI::App& app);
Runner add_pretrain(CLI::App& app);

// The job this process belongs to, from the torchrun environment (RANK,
// WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, GLOO_SOCKET_IFNAME); unset:
// a job of one. The deadline comes from train.dist_timeout.
dist::DistConfig dist_from_environment(const io::RunConfig& cfg);
// LOCAL_WORLD_SIZE: ranks sharing this machine's cores (1 when unset).
int local_world_size();

bool stderr_is_terminal();

// One stderr line when the model asks for bf16 on a CPU that would run it as
// fp32 (nn::parse_precision), so the figures a user reads are not a surprise.
// Silent for ResNeSt, which refuses bf16 with an error of its own.
void warn_precision(const models::ModelConfig& model);

// What eval, predict and analyze say of a model they loaded: warn_precision, and
// a note when its run had not ended (train::unfinished_training).
void note_trained(const train::TrainedModel& t);

// --limit N of eval, analyze and ensemble: the first N test images (0: all of
// them); unset keeps the run's data.test_limit. check_limit refuses N < 0.
void add_limit_option(CLI::App* cmd, std::optional<int64_t>& limit);
void check_limit(const std::optional<int64_t>& limit);

// --result FILE of fuse and ensemble (eval's --json is printed): a new file, or an earlier result (a JSON object),
// which it replaces; anything else (a checkpoint, the command's own config, a directory) is refused before the
// work, as a typo replaced a trained checkpoint at exit 0. The directory it lies in must exist or be makeable
// (check_parent_directory).
void check_result_file(const std::string& path, const char* flag = "--result");

// Before the work: the directory a file named by `flag` goes into exists, or the nearest existing directory
// above it is one this process can write in; nothing is made, so a command refused later (its inputs checked
// after its flags) leaves no empty directory behind. make_parent_directory makes it when the file is written.
void check_parent_directory(const std::string& path, const char* flag);
void make_parent_directory(const std::string& path, const char* flag);

}  // namespace moev::app
