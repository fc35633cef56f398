// `moev ablation`: the structure of Sun et al.'s Table 1 at small scale. Rows
// N = 1, 3, 5 expert branches; for each N the plain model (with the diversity
// loss when N > 1), for N = 1 also the backbone without stochastic depth (the
// paper's MoE-RS-50 against MoE-RS-SD-50: stochastic depth is part of its
// recipe), without the diversity loss (for the N listed), with
// distillation from the plain model of the same N and seed as the teacher, and
// for N > 1 with the fusion layer trained on the distilled model. With
// `teachers` = M > 1 the teacher is an ensemble: the plain model and M - 1 more
// of the same N trained on the same images from other initialisations (seed s's
// member t: train.seed = s + 1000 t), reported as its own row. Each row runs
// over several seeds (seed s: init, data order, and the per-class subset) and is
// reported as mean and spread. Every run has its own directory, so an
// interrupted ablation resumes where it stopped.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "moev/io/run_config.h"

namespace moev::train {

struct AblationGrid {
  std::vector<int64_t> branches = {1, 3, 5};     // N of each row group
  std::vector<int64_t> no_diversity = {3};       // N also run without the diversity loss
  int64_t seeds = 3;                             // seeds first_seed .. first_seed + seeds - 1
  int64_t first_seed = 0;                        // the first seed (a table grown, or split across machines)
  bool distill = true;                           // rows with distillation
  bool fusion = true;                            // rows with fusion (N > 1)
  int64_t teachers = 1;                          // models in each distillation teacher (> 1: an ensemble)
  bool no_stochastic_depth = true;               // N = 1 also without stochastic depth (Table 1's first row)
};

// The [ablation] section of a config file (branches, no_diversity, seeds,
// first_seed, distill, fusion, teachers, no_stochastic_depth); unknown keys and bad values are errors naming `source`.
AblationGrid parse_ablation_grid(const nlohmann::json& section, const std::string& source);

struct AblationTask {
  // kTrain: `moev train`; kFuse: `moev fuse` on source_checkpoints[0];
  // kEnsemble: `moev ensemble` over source_checkpoints (the teacher's accuracy).
  enum Kind { kTrain, kFuse, kEnsemble } kind = kTrain;
  std::string name;   // run directory under the ablation's, e.g. n3_distill_s0
  std::string row;    // table row, e.g. "N=3 + distill"; "" for a teacher member, not reported
  int64_t branches = 1;
  bool diversity = true, distill = false, fusion = false, teacher = false, stochastic_depth = true;
  uint64_t seed = 0;
  std::vector<std::string> after;  // the tasks that must finish first (teachers, model to fuse)
  io::RunConfig cfg;  // kTrain: the run (out_dir set); otherwise out_dir is the task's directory
  std::vector<std::string> source_checkpoints;  // kFuse: the model to fuse; kEnsemble: the members
};

// An N listed to run without the diversity loss that is not a row of at least
// two branches would be left out without a word: an error naming `source`.
// The command checks it where the user gave both lists (a config section, a flag).
void check_no_diversity(const AblationGrid& g, const std::string& source);

// Every task, in an order that respects `after`. base: the common config (file
// sections and overrides) on top of the defaults; its model must be a ResNeSt.
std::vector<AblationTask> plan_ablation(const AblationGrid& grid, const nlohmann::json& base,
                                        const std::string& out_dir, const std::string& source);

struct AblationRow {
  std::string row;
  int64_t branches = 1;
  bool diversity = true, distill = false, fusion = false, teacher = false, stochastic_depth = true;
  std::vector<double> top1;       // per seed
  double mean = 0, spread = 0;    // mean and sample standard deviation of top1
  double seconds = 0;             // mean training seconds per seed (fusion: of the fusion step)
  std::vector<double> seed_seconds;  // per seed, as top1
  std::vector<uint64_t> seeds;       // which seed each is (--first-seed: not 0, 1, ...)
};

// Groups the finished tasks' results (top1[i], seconds[i] for tasks[i]) into
// rows; tasks without a row (teacher members) are left out.
std::vector<AblationRow> summarise_ablation(const std::vector<AblationTask>& tasks,
                                            const std::vector<double>& top1,
                                            const std::vector<double>& seconds);

// ablation.csv (every seed), ablation.md (mean ± spread) and ablation.png under out_dir.
void write_ablation(const std::vector<AblationRow>& rows, const std::string& out_dir);

}  // namespace moev::train
