// The one place where CLI flags become config values.
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <iostream>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "moev/core/error.h"
#include "moev/models/model_config.h"
#include "moev/nn/linear.h"
#include "moev/train/trained_model.h"
#include "moev/train/trainer.h"

namespace moev::app {

bool stderr_is_terminal() { return ::isatty(STDERR_FILENO) == 1; }

void warn_precision(const models::ModelConfig& model) {
  if (model.family != "resnest" && model.precision == "bf16" && !nn::native_bf16())
    std::cerr << "moev: note: model.precision = bf16, but this CPU has no native bf16 dot products "
                 "(AVX512_BF16 or AMX); running the GEMMs in fp32\n";
}

void note_trained(const train::TrainedModel& t) {
  warn_precision(t.cfg.model);
  if (!t.unfinished.empty()) std::cerr << "note: " << t.unfinished << "\n";
}

void add_limit_option(CLI::App* cmd, std::optional<int64_t>& limit) {
  cmd->add_option("--limit", limit, "the first N test images only (0: all; default: as the run was evaluated)");
}

void check_limit(const std::optional<int64_t>& limit) {
  MOEV_CHECK(!limit || *limit >= 0, "--limit ", limit.value_or(0), ": expected a number of test images >= 0 (0: all)");
}

void check_result_file(const std::string& path, const char* flag) {
  namespace fs = std::filesystem;
  if (path.empty()) return;
  std::error_code ec;
  MOEV_CHECK(!fs::is_directory(path, ec), flag, " ", path, ": is a directory; expected a file to write");
  // An empty file (mktemp's) is there to be written; a JSON object is an earlier result only with its figures
  // (a run's config.json or a hard MoE's hardmoe.json are objects too).
  if (fs::exists(path, ec) && fs::file_size(path, ec) > 0) {
    std::ifstream in(path, std::ios::binary);
    const auto j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    MOEV_CHECK(j.is_object() && j.contains("top1"), flag, " ", path, ": exists and is not an earlier result (a JSON ",
               "object with top1): a checkpoint, a config or another file, which it would replace; remove it or name ",
               "another file");
  }
  check_parent_directory(path, flag);
}

void check_parent_directory(const std::string& path, const char* flag) {
  namespace fs = std::filesystem;
  std::error_code ec;
  fs::path above = fs::absolute(path, ec).parent_path();
  while (!fs::exists(above, ec) && above.has_relative_path()) above = above.parent_path();
  MOEV_CHECK(fs::is_directory(above, ec), flag, " ", path, ": cannot make its directory: ", above.string(),
             " is a file, not a directory");
  MOEV_CHECK(access(above.c_str(), W_OK | X_OK) == 0, flag, " ", path, ": cannot write in ", above.string(),
             " (no permission)");
}

void make_parent_directory(const std::string& path, const char* flag) {
  namespace fs = std::filesystem;
  const fs::path parent = fs::path(path).parent_path();
  std::error_code ec;
  if (!parent.empty()) fs::create_directories(parent, ec);
  MOEV_CHECK(parent.empty() || fs::is_directory(parent), flag, " ", path, ": cannot make its directory ",
             parent.string(), ec ? " (" + ec.message() + ")" : "");
}

void ConfigFlags::add_to(CLI::App* cmd) {
  cmd->add_option("-c,--config", config_file,
                  "config file (.toml or .json; another name is read as JSON if it starts with {)")
      // "" ran the defaults without a word (an unset shell variable, --config "$CFG").
      ->check([](const std::string& v) {
        return v.empty() ? std::string("an empty path: expected a config file") : std::string();
      });
  std::string presets;  // from the preset table itself, so the help cannot fall behind it
  for (const auto& n : models::preset_names()) presets += (presets.empty() ? "" : ", ") + n;
  cmd->add_option("-m,--model", preset, "model preset: " + presets);
  // Callbacks as each is parsed: of two values for one key, the one later on the line wins.
  cmd->add_option_function<std::vector<std::string>>(
         "--set",
         [this](const std::vector<std::string>& v) {
           sets.insert(sets.end(), v.begin(), v.end());
           in_order.insert(in_order.end(), v.begin(), v.end());
         },
         "override any config key: section.key=value (repeatable; the last value given for a key wins)")
      ->trigger_on_parse();
  auto shorthand_flag = [this, cmd](const std::string& flag, const std::string& key,
                                    const std::string& help) {
    cmd->add_option_function<std::string>(
        flag,
        [this, key](const std::string& v) {
          shorthand.push_back(key + "=" + v);
          in_order.push_back(key + "=" + v);
        },
        help + " (= --set " + key + "=...)")
        ->trigger_on_parse();
  };
  shorthand_flag("--epochs", "train.epochs", "training epochs");
  shorthand_flag("--batch-size", "train.batch_size", "batch size");
  shorthand_flag("--lr", "train.lr", "peak learning rate");
  shorthand_flag("--seed", "train.seed", "random seed");
  shorthand_flag("--threads", "train.threads", "threads, 0 = all cores");
  shorthand_flag("--device", "train.device", "cpu or cuda[:N]");
  shorthand_flag("--out", "train.out_dir", "run directory");
  shorthand_flag("--max-steps", "train.max_steps", "pause after N steps (--resume continues)");
  shorthand_flag("--minutes", "train.minutes", "time budget of the training steps");
  shorthand_flag("--data", "data.path", "dataset directory");
  shorthand_flag("--format", "data.format", "fashion-mnist, cifar10, folder or manifest");
  shorthand_flag("--experts", "moe.num_experts", "experts per MoE layer");
  shorthand_flag("--moe", "model.moe", "MoE placement: none, every-N, last-N or 3,5");
  cmd->add_flag("--print-config", print_config, "print the resolved config as JSON and exit");
  cmd->add_flag("--help-config", help_config, "list every config key and exit");
}

std::optional<io::RunConfig> ConfigFlags::resolve_or_print() const {
  if (help_config) {
    for (auto& [k, h] : io::config_keys()) std::cout << "  " << k << "  " << h << "\n";
    return std::nullopt;
  }
  io::RunConfig cfg = resolve();
  if (print_config) {
    std::cout << io::to_json_string(cfg) << "\n";
    return std::nullopt;
  }
  return cfg;
}

void check_rereadable_config(const std::string& path, const char* reader) {
  std::error_code ec;
  MOEV_CHECK(!std::filesystem::exists(path, ec) || std::filesystem::is_regular_file(path, ec), "--config ", path,
             ": not a regular file; each ", reader, " reads the config itself, and a pipe gives its text to the ",
             "first reader only: write it to a file first");
}

std::set<std::string> ConfigFlags::named_keys() const {
  std::set<std::string> named;
  for (const auto* list : {&shorthand, &sets})
    for (const auto& kv : *list) named.insert(kv.substr(0, kv.find('=')));
  return named;
}

bool ConfigFlags::names_key(const std::string& key) const {
  if (named_keys().count(key)) return true;
  if (config_file.empty()) return false;
  const auto dot = key.find('.');
  const auto section = key.substr(0, dot), name = key.substr(dot + 1);
  const auto& f = file();
  return f.is_object() && f.contains(section) && f[section].is_object() && f[section].contains(name);
}

void check_resume_overrides(const ConfigFlags& flags, const io::RunConfig& saved, const io::RunConfig& cfg,
                            const std::string& path) {
  auto keys = flags.named_keys();
  const bool all = !flags.config_file.empty();
  if (!flags.preset.empty())
    for (const auto& [key, help] : io::config_keys())
      if (key.rfind("model.", 0) == 0 || key.rfind("moe.", 0) == 0) keys.insert(key);
  if (!all && keys.empty()) return;
  const auto differ = train::resume_differences(saved, cfg, all ? std::set<std::string>{} : keys);
  MOEV_CHECK(differ.empty(), "--resume continues ", path, " as it was saved; these settings differ from it:",
             differ, all ? "\nwith --config, every key is compared, the file's and the defaults it leaves: resume "
                             "with --out DIR --resume alone (it takes the run's own settings), or start a new run "
                             "with another --out"
                           : "\ndrop them to resume, or start a new run with another --out");
}

std::string merge_section_sets(nlohmann::json& j, std::vector<std::string>& sets, const std::string& section,
                               const std::string& config) {
  std::string source = config;
  std::vector<std::string> rest;
  for (const auto& s : sets) {
    if (s.rfind(section + ".", 0) != 0) {
      rest.push_back(s);
      continue;
    }
    j.merge_patch(io::assignment_json(s));
    source += (source == config ? " with --set " : ", --set ") + s;
  }
  sets = std::move(rest);
  return source;
}

void keep_saved_run_settings(const ConfigFlags& flags, const io::RunConfig& saved, io::RunConfig& cfg,
                             bool keep_threads) {
  if (keep_threads && !flags.names_key("train.threads")) cfg.train.threads = saved.train.threads;
  if (!flags.names_key("train.checkpoint_every")) cfg.train.checkpoint_every = saved.train.checkpoint_every;
}

const nlohmann::json& ConfigFlags::file() const {
  if (!file_) file_ = std::make_shared<const nlohmann::json>(io::read_config_file(config_file));
  return *file_;
}

namespace {
// Model keys only some families build from, by family: set for another, they trained as if unset (a ConvNeXt
// with model.heads = 3). model.drop_path and model.branches have their own messages (models::validate).
const std::map<std::string, std::set<std::string>>& family_keys() {
  static const std::map<std::string, std::set<std::string>> keys = {
      {"model.width", {"vit", "convnext-iso"}},
      {"model.depth", {"vit", "convnext-iso"}},
      {"model.heads", {"vit"}},
      {"model.dims", {"convnext", "resnest"}},
      {"model.depths", {"convnext", "resnest"}},
      {"model.pad_odd", {"convnext"}},
      {"model.layer_scale", {"convnext", "convnext-iso"}},
      {"model.shared_stages", {"resnest"}},
      {"model.radix", {"resnest"}},
      {"model.cardinality", {"resnest"}},
      {"model.blur_pool", {"resnest"}},
  };
  return keys;
}
}  // namespace

// The keys this command's --set and shorthands set, and the model they build: a key its model does not read is
// refused, naming the family (or the placement) that leaves it unread. A config file's keys are not: a run's
// config.json, which `moev train --config` takes again, holds every key of every family.
void ConfigFlags::check_keys_apply(const io::RunConfig& cfg) const {
  if (resuming) return;
  const auto& family = cfg.model.family;
  for (const auto& key : named_keys()) {
    const auto at = family_keys().find(key);
    if (at != family_keys().end() && !at->second.count(family)) {
      std::string which;
      for (const auto& f : at->second) which += (which.empty() ? "" : ", ") + f;
      fail(key, " is set, but a ", family, " model does not read it (", which, " models do): drop it, or choose ",
           "a model of that family");
    }
    // ResNeSt's experts are branches; its own check names them (models::validate).
    if (key.rfind("moe.", 0) == 0 && cfg.model.moe.kind == "none" && family != "resnest")
      fail(key, " is set, but model.moe = none: the model has no MoE layers to read it; place some (e.g. --moe ",
           "last-2, or --model vmoe-tiny) or drop it");
  }
}

int ConfigFlags::naming_the_file(const std::function<int()>& body) const {
  try {
    return body();
  } catch (const Stopped&) {
    throw;
  } catch (const Error& e) {
    const std::string what = e.what();
    const auto space = what.find(' ');
    const std::string key = what.substr(0, space);
    if (config_file.empty() || space == std::string::npos || what.compare(space, 3, " = ") != 0 ||
        named_keys().count(key) || !names_key(key) || what.find(config_file) != std::string::npos)
      throw;
    throw Error(what + " (set in " + config_file + ")");
  }
}

io::RunConfig ConfigFlags::resolve() const {
  // --model names the preset in place of the file's (which replaced it without
  // a word); the file's other model and moe keys still go over it. Shorthands
  // and --set then go in the order given: --set went last, so
  // `--set train.epochs=5 --epochs 3` ran 5 epochs.
  io::RunConfig cfg;
  // Both: the --set went over --model wherever it stood on the line, against "the later one wins".
  MOEV_CHECK(preset.empty() || !named_keys().count("model.preset"), "--model ", preset,
             " and --set model.preset both name the model preset; give one of them");
  if (!preset.empty()) cfg.model = models::preset(preset);
  if (!config_file.empty()) {
    auto file = this->file();
    if (!preset.empty() && file.is_object() && file.contains("model") && file["model"].is_object())
      file["model"].erase("preset");
    io::apply_json(cfg, file, config_file);
  }
  for (const auto& s : in_order) io::apply_override(cfg, s);
  check_keys_apply(cfg);
  warn_precision(cfg.model);
  return cfg;
}

}  // namespace moev::app
