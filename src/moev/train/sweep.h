// `moev sweep`: where, and how many, experts pay off (Videau et al. 2024's
// question) on the user's data. A grid of model x experts x placement x K, dense
// baselines included, every run with the same data, seed and epoch budget, each
// in its own run directory so an interrupted sweep resumes: finished runs are
// read back, a half-trained one continues from its checkpoint. Results go to
// results.csv / results.md and accuracy against active FLOPs to results.png.
#pragma once

#include <atomic>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include <nlohmann/json_fwd.hpp>

#include "moev/io/run_config.h"

namespace moev::train {

struct SweepGrid {
  std::vector<std::string> models;                  // dense base presets, e.g. vit-tiny
  std::vector<int64_t> experts = {1, 4, 8, 16};     // E per MoE layer; 1 = the dense baseline
  std::vector<std::string> placements = {"last-2", "every-2", "all"};  // "all" = every block
  std::vector<int64_t> ks = {2};                    // experts per token (K > E is skipped)
};

// The [sweep] section of a config file: models, experts, placements, k. Unknown
// keys, empty lists and bad values are moev::Errors naming `source`.
SweepGrid parse_sweep_grid(const nlohmann::json& section, const std::string& source);

struct SweepRun {
  std::string name;  // directory name: <model>_dense or <model>_e<E>_<placement>_k<K>
  std::string model, placement;
  int64_t experts = 1, k = 0;
  io::RunConfig cfg;
};

// One RunConfig per grid point: the preset, then `base` (the file's other
// sections, already merged with CLI overrides) on top, then the grid's E, K and
// placement. Every placement is checked against its model here, before any
// training starts. Points skipped (K > E, or the same MoE blocks as an earlier
// placement of the model) are described in `skipped`.
std::vector<SweepRun> expand_grid(const SweepGrid& grid, const nlohmann::json& base, const std::string& source,
                                  std::vector<std::string>* skipped = nullptr);

struct SweepRow {
  std::string name, model, placement;
  int64_t experts = 1, k = 0;
  double top1 = 0;
  int64_t params = 0, active_params = 0;
  double flops = 0;             // forward FLOPs per image (K experts)
  double train_images_per_s = 0, eval_images_per_s = 0;
};

// Trains (or resumes, or reads back) every run under out_dir and writes the
// results table and plot there. progress: run-level progress (nullptr: quiet).
// stop (set by a signal handler, say): the run in progress saves its checkpoint
// and a moev::Stopped is thrown; the same sweep again continues it.
std::vector<SweepRow> run_sweep(const std::vector<SweepRun>& runs, const std::string& out_dir,
                                std::ostream* progress, bool interactive, const std::atomic<bool>* stop = nullptr);

}  // namespace moev::train
