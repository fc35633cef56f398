// The [hardmoe] section of a config file: how a hard mixture of experts
// (Gross et al. 2017) is cut from a trained trunk and where its files go. The
// same file's [model], [data] and [train] sections train the trunk (`moev
// train`) and, with the overrides below, every expert, so one file describes
// the whole model.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "moev/io/run_config.h"

namespace moev::hardmoe {

struct HardMoEConfig {
  std::string trunk;                // the trunk's checkpoint ("": <train.out_dir>/checkpoint.pt of this file)
  std::string dir;                  // partition, centroids, experts, hardmoe.json ("": <train.out_dir>/hardmoe<k>)
  int64_t experts = 4;              // k: k-means clusters = experts
  int64_t kmeans_iters = 100;       // Lloyd iterations (mini-batch: batches)
  int64_t kmeans_batch = -1;        // mini-batch k-means batch (0: Lloyd; -1: 4096 above 200,000 images, else Lloyd)
  uint64_t seed = 0;                // k-means++ seeding and mini-batch sampling
  std::string init = "trunk";       // experts start from: trunk (its weights) | scratch
  bool share_decoder = true;        // experts keep the trunk's decoding layer, frozen: one embedding space
  int64_t expert_epochs = 0;        // epochs of each expert on its partition (0: train.epochs)
  double expert_lr = 0;             // peak learning rate of the experts (0: train.lr)
  int64_t expert_warmup_steps = -1; // warmup of the experts (-1: train.warmup_steps)
  int expert_threads = 1;           // threads of each expert process, fixed so its weights do not depend on how it is run (0: train.threads)
};

// The section (may be absent: defaults); unknown keys and bad values are
// errors naming `source`. run: the file's run config, for the defaults of
// trunk and dir.
HardMoEConfig parse_hardmoe_config(const nlohmann::json& file, const io::RunConfig& run, const std::string& source);

// <dir>/hardmoe.json: the assembled model (moev eval / predict take it).
std::string model_file(const std::string& dir);
// <dir>/expert_<i>: expert i's run directory.
std::string expert_dir(const std::string& dir, int64_t expert);

}  // namespace moev::hardmoe
