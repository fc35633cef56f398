// Sun et al.'s fusion module (section 2.3): with every branch of a trained
// multi-branch model frozen, train Linear(concat(E_1..E_N), classes) on the
// branch embeddings, so the model's output weighs the experts by what each one
// knows instead of averaging their logits. The layer starts as exactly that
// average (W = [W_1 .. W_N] / N, b = mean b_i), so training can only move it
// from the baseline it is compared with. The input checkpoint is not touched;
// the fused model is written as a new one.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "moev/train/evaluate.h"

namespace moev::train {

struct FusionOptions {
  int64_t epochs = 30;            // passes over the (augmented) training set
  int64_t batch_size = 128;       // B
  double lr = 1e-3;               // peak learning rate (AdamW, cosine to lr / 100)
  double weight_decay = 1e-4;     // AdamW decoupled weight decay of the fusion weights
  double label_smoothing = 0.1;   // cross-entropy label smoothing
  bool evaluate = true;           // test-set top-1 of the mean of branch logits and of the fusion
  std::ostream* progress = nullptr;  // progress bar (nullptr: none)
  bool interactive = false;
};

struct FusionOutcome {
  EvalResult mean_of_logits;  // the model before (evaluate = true)
  EvalResult fused;           // the fused model
  int64_t steps = 0;           // optimizer steps
  int64_t train_images = 0;    // the training set's size
  int64_t images_seen = 0;     // train_images x epochs: every image every epoch
  double train_seconds = 0;
};

// Trains the fusion layer of `checkpoint` (a model with model.branches >= 2) on
// its own training data (config's data section, same subset) and writes the
// fused model to `out`. Errors name the checkpoint.
FusionOutcome train_fusion(const std::string& checkpoint, const std::string& out, const FusionOptions& o);

// Each branch's predicted class and the model's (its forward: the mean of the
// branch logits, or the fusion) on every image of `set`, in eval mode, for
// analysis::branch_agreement.
struct BranchPredictions {
  std::vector<std::vector<int64_t>> branch;  // [N][I]
  std::vector<int64_t> model, labels;        // [I]
};
BranchPredictions predict_branches(models::Classifier& model, const data::ImageSet& set,
                                   const std::vector<float>& mean, const std::vector<float>& std,
                                   int64_t batch_size, std::ostream* progress = nullptr, bool interactive = false);

}  // namespace moev::train
