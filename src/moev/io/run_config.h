// The one place where configs are filled: defaults <- preset <- config file (TOML
// or JSON) <- CLI overrides ("train.lr=0.001"). Every field has a dotted key;
// unknown keys and ill-typed values are errors naming the file and the key.
#pragma once

#include <set>
#include <initializer_list>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "moev/models/model_config.h"
#include "moev/train/train_config.h"

namespace moev::io {

struct RunConfig {
  models::ModelConfig model;  // architecture and routing
  train::DataConfig data;     // dataset and augmentation
  train::TrainConfig train;   // optimisation and run
};

// A run config from a .toml or .json file, starting from defaults (or from the
// preset named by its model.preset key).
RunConfig load_run_config(const std::string& path);
// Applies a config file's keys on top of `cfg`.
void apply_file(RunConfig& cfg, const std::string& path);

// A .toml or .json config file as JSON, not yet applied (for files with sections
// of their own, like a sweep's). Errors name the file and the line.
nlohmann::json read_config_file(const std::string& path);

// Applies a JSON object of {section: {key: value}}; `source` names it in errors.
void apply_json(RunConfig& cfg, const nlohmann::json& j, const std::string& source);

// Applies one "section.key=value" override (value parsed as JSON, else a string).
void apply_override(RunConfig& cfg, const std::string& assignment);
// The same override as {"section": {"key": value}}, for merging into a config
// document (the key is checked against the known fields).
nlohmann::json override_json(const std::string& assignment);

// Keys a sweep or an ablation ("a sweep") sets for each of its runs, {section, key, where from}: set in its base
// config (file or --set) they were replaced in every run without a word, so they are refused, naming `source`.
struct PlannedKey {
  const char* section;
  const char* key;
  const char* from;
};
void refuse_planned_keys(const nlohmann::json& base, const std::string& source, const char* planner,
                         std::initializer_list<PlannedKey> keys);
// As override_json, the key unchecked: for sections other commands read
// (moev pretrain's [pretrain]).
nlohmann::json assignment_json(const std::string& assignment);

// Every field, as nested JSON (stored in checkpoints, printed by --print-config).
nlohmann::json to_json(const RunConfig& cfg);
std::string to_json_string(const RunConfig& cfg);
RunConfig from_json_string(const std::string& text, const std::string& source);

// One file spelled two ways ("data/x" and "./data/x/") is the same file.
bool same_path(const std::string& x, const std::string& y);

// Where `now` differs from `was`, one "section.key = now (was: old)" line per
// dotted key (lists compared whole). Keys `now` leaves empty are skipped: the
// run fills them (data.mean from its images). keys: only these, or all if empty.
// Paths (data.path, train.init_from, ...) are compared as files.
std::vector<std::string> config_differences(const RunConfig& was, const RunConfig& now,
                                            const std::set<std::string>& keys = {});

// A placement as a config writes it: a string ("last-2", "3,5"), one block
// (5) or an array of blocks ([3, 5], as TOML lists are written); as the string
// models::parse_placement reads. `where` names the key in errors.
std::string placement_text(const nlohmann::json& v, const std::string& where);

// All dotted keys with their help text, for --help-config.
std::vector<std::pair<std::string, std::string>> config_keys();

}  // namespace moev::io
