// Training one expert of a hard mixture of experts (Gross et al. 2017) on its
// partition: a process that shares nothing with the other experts but the
// files it reads (trunk checkpoint, partition) and the directory it writes
// (<dir>/expert_<i>), so experts can train on different machines at once.
// The expert's weights are a function of its config and seed alone: which
// other experts run, where, and in which order does not change a bit.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "moev/hardmoe/hardmoe_config.h"
#include "moev/io/run_config.h"
#include "moev/train/trainer.h"

namespace moev::hardmoe {

// Expert i's run: the trunk's run (its data, normalisation and tags, so the
// partition's rows and the gater's inputs mean the same images), then
// `overrides` (the config file's sections and --set flags; the data set itself
// stays the trunk's), then the [hardmoe] settings: epochs, lr, warmup, seed =
// train.seed + i, out_dir = <dir>/expert_<i>, init_from the trunk, the
// trunk's decoding layer frozen when shared, one test evaluation at the end.
io::RunConfig expert_run_config(const HardMoEConfig& c, const io::RunConfig& trunk, const nlohmann::json& overrides,
                                int64_t expert, const std::string& source);

struct ExpertOutcome {
  bool already_done = false;  // <dir>/expert_<i>/result.json existed: nothing ran
  int64_t images = 0;         // training images in the partition
  nlohmann::json result;      // what result.json holds
};

// Trains expert i (resuming its own checkpoint if one exists) and writes
// <dir>/expert_<i>/result.json once it finished. An expert index outside the
// partition or an empty partition is an error before anything is written.
ExpertOutcome train_expert(const HardMoEConfig& c, const nlohmann::json& overrides, int64_t expert,
                           const std::string& source, train::TrainRunOptions opts);

// Refuses to go on with expert i's saved run in <dir>/expert_<i> (its checkpoint, done or half-way)
// under other settings than `cfg`, naming each differing key: the saved ones
// won without a word, so a changed --set or config key trained (or reported
// done) an expert as it was first asked for. No checkpoint: nothing to check.
// A key that a set [hardmoe] key of `hm` decides is named by that key.
void check_expert_settings(const io::RunConfig& cfg, const HardMoEConfig& hm, int64_t expert);

// <dir>/expert_<i>/result.json (what train_expert writes when expert i is done).
std::string expert_result_file(const std::string& dir, int64_t expert);

}  // namespace moev::hardmoe
