// The training loop shared by every moev classifier: AdamW with warmup + cosine
// (and an optional cool-down), label smoothing or soft targets (distillation
// from a teacher, mixup / cutmix, cosine loss), MoE auxiliary losses, the
// per-branch and diversity losses of multi-branch models, gradient clipping, atomic checkpoints,
// exact resume (model, optimizer, schedule position, data order, RNG), a JSONL
// log and a progress bar. Multi-label data (a manifest) trains with the
// softmax-over-tags or sigmoid loss instead of the cross-entropy.
#pragma once

#include <atomic>
#include <cstdint>
#include <map>
#include <ostream>
#include <set>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "moev/dist/communicator.h"
#include "moev/io/run_config.h"
#include "moev/train/evaluate.h"

namespace moev::train {

struct TrainRunOptions {
  bool resume = false;             // continue from <out_dir>/checkpoint.pt
  std::ostream* progress = nullptr;  // progress bar target (nullptr: none)
  bool interactive = false;        // redraw the bar in place (a terminal)
  // A data-parallel job (nullptr: this process alone). Each rank trains on its
  // share of every global batch of train.batch_size and the gradients are summed
  // over ranks, so W ranks take the steps one process would; rank 0 alone writes
  // the run directory and evaluates.
  dist::Communicator* comm = nullptr;
  // Train on these rows of the training set only (empty: all of it): a hard
  // MoE expert's partition. Normalisation still comes from the whole set.
  std::vector<int64_t> train_rows;
  // With train_rows: the training set's size they were chosen from (-1: any);
  // another size means the data changed since, an error.
  int64_t expect_train_size = -1;
  // With train_rows: data_fingerprint of that training set ("": not known, a partition from before it was kept).
  std::string expect_train_data;
  // Copied over the initial weights by name, in a fresh run only (after
  // train.init_from): a hard MoE expert's shared decoder.
  std::map<std::string, at::Tensor> init_tensors;
  // Set (by a signal handler, say) to stop early: the run finishes the step in
  // progress, saves its checkpoint and returns with `stopped`. A job's ranks
  // agree on the step through the step's figures, so every rank stops at it.
  // Set during a test-set evaluation, it ends that at its next batch and the
  // run saves as it was before it: the resumed run evaluates.
  const std::atomic<bool>* stop = nullptr;
  // The names the run's notes give train.warmup_steps and train.lr: the keys
  // the user set them with (a hard MoE expert's hardmoe.expert_*).
  std::string warmup_key = "train.warmup_steps", lr_key = "train.lr";
};

struct TrainOutcome {
  int64_t steps = 0;              // optimizer steps taken in all (incl. before resume)
  int64_t epochs_done = 0;        // completed epochs (a time budget spent inside one ends it: counted)
  int64_t steps_per_epoch = 0;    // the training set's batches per epoch
  bool budgeted = false;          // the run has a time budget (train.minutes, as saved)
  bool finished = false;          // all epochs done (false: stopped at max_steps or by opts.stop)
  bool stopped = false;           // ended early by opts.stop; --resume continues it
  double train_seconds = 0;       // wall time of this process's training steps
  double run_train_seconds = 0;   // the run's, this process and those it resumed from
  double train_images_per_s = 0;  // this process's training throughput
  int64_t teacher_images = 0;     // distillation: images the teacher ran on (once per image and crop/flip; every changed one)
  EvalResult eval;                // last test-set evaluation (if any)
};

std::string checkpoint_path(const std::string& out_dir);

// The train section's values, each out of range an error naming the key and
// what was expected (a negative learning rate climbed the loss at exit 0).
// Train and pretrain check the same keys alike.
void validate_train_config(const TrainConfig& tc);

// What a new run checks before it opens any data: the train section, the model,
// settings the model would ignore (a block listed twice, top-k keys of another
// router), the data keys and whether its weights and optimizer state fit in
// memory. `train --print-config` runs it too, so it does not print such a config.
void check_new_run_config(const io::RunConfig& cfg);

// train.branch_views: the seed of branch `view`'s batches and mix draws (view 0:
// the run's own, so branch 0 sees what the run without views would).
uint64_t branch_view_seed(uint64_t seed, int64_t view);

// The config a resumed run continues with: the one it was saved with, but for
// how it runs (threads, device, progress bar, max_steps, out_dir, the teacher's
// cache), taken from now.
io::RunConfig resumed_config(io::RunConfig saved, const io::RunConfig& now);

// The settings of `now` that resuming `saved` would drop, one "\n  key = now
// (was: old)" line each ("" when none); keys: only these, or all if empty.
std::string resume_differences(const io::RunConfig& saved, const io::RunConfig& now,
                               const std::set<std::string>& keys = {});

// Sets the intra-op thread count (0: all cores) once per process; returns it.
int set_threads(int threads);

TrainOutcome train_model(io::RunConfig cfg, const TrainRunOptions& opts);

}  // namespace moev::train
