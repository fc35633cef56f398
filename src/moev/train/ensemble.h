// Test-time augmentation and weighted ensembles (Sun et al. section 3: ten
// crops and a larger input size at test time; a weighted score average of
// several models, higher weights for the better ones). Both average class
// probabilities, so models with different normalisations or architectures mix.
#pragma once

#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <nlohmann/json_fwd.hpp>

#include "moev/data/image_set.h"
#include "moev/models/classifier.h"
#include "moev/train/evaluate.h"
#include "moev/train/train_config.h"

namespace moev::train {

struct TtaOptions {
  bool enabled = false;  // off: the plain image alone
  int64_t shift = 2;     // crops: the centre and the four corners shifted by this many pixels
  bool flip = true;      // and each of them mirrored (5 crops x 2 = ten crops)
  double scale = 1.15;   // plus the image resized by this factor (0: none; needs a model with global pooling)
};

// The TTA views a model trained with `data` has seen: shifts up to its crop
// padding (at most the default 2), flips if it trained with them, and the
// larger view except for a ViT (`family`), whose token grid is fixed. A
// flip-only V-MoE lost 13 points on 2-pixel shifts it never saw.
TtaOptions tta_as_trained(const DataConfig& data, const std::string& family);

// u8 images [B, C, H, W] -> probabilities [B, L]: the mean of softmax over the
// TTA views (or of the image alone), the images normalised with mean/std.
at::Tensor predict_probs(models::Classifier& model, const at::Tensor& u8, const std::vector<float>& mean,
                         const std::vector<float>& std, const TtaOptions& tta);

struct EnsembleMember {
  std::string checkpoint;
  double weight = 1;  // its share of the mix: parse_ensemble makes the shares sum to 1
};

struct EnsembleConfig {
  std::vector<EnsembleMember> members;
  bool tta = false;                  // score every member through test-time views
  // Unset: as each member trained (tta_as_trained): views it never saw cost
  // accuracy (a flip-only model lost 13 points on 2-pixel shifts).
  std::optional<int64_t> tta_shift;  // crops shifted by this many pixels
  std::optional<bool> tta_flip;      // each view also mirrored
  std::optional<double> tta_scale;   // plus a view resized by this factor (0 or 1: none)
  bool other_data = false;  // allow members whose runs had another test set than the first member's
};

// The [ensemble] section of a config file: members = [paths], weights = [numbers]
// (default all 1), tta = bool, tta_shift, tta_flip, tta_scale, other_data = bool.
// Errors name `source`.
EnsembleConfig parse_ensemble(const nlohmann::json& section, const std::string& source);

struct EnsembleResult {
  std::vector<EvalResult> members;  // each member alone (with the same TTA)
  EvalResult ensemble;              // the weighted mean of their probabilities
  std::vector<std::string> unfinished;  // [member] a note when its run had not ended (unfinished_training), or ""
};

// Evaluates every member and their weighted ensemble on the first member's test
// set: its first `test_limit` images (0: all; unset: as that run's
// data.test_limit). Members must agree on image size and classes, and unless
// cfg.other_data, must come from runs with the same test set
// (test_data_difference): a model of other data would be scored on labels
// that mean something else to it.
EnsembleResult evaluate_ensemble(const EnsembleConfig& cfg, std::optional<int64_t> test_limit, int64_t batch_size,
                                 std::ostream* progress, bool interactive);

// top-1, top-5 and mean NLL of probabilities [N, L] against labels [N].
EvalResult score_probs(const at::Tensor& probs, const at::Tensor& labels);

}  // namespace moev::train
