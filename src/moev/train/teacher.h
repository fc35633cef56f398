// Distillation's teacher (Sun et al. section 2.1): a trained model of the
// student's architecture whose probabilities join the training target,
// target = lambda * label-smoothed + (1 - lambda) * teacher(image). The teacher
// runs once per image and augmentation: its probabilities are cached under
// (example index, augmentation id) from the loader, so with the 50 crop/flip
// variants of a 28 px image and a few hundred epochs it stops running after
// the first few dozen epochs. Mixed images (train.teacher_on_mix) and images
// AutoAugment or erasing changed have no key: the teacher runs on each, as in
// Beyer et al.'s consistent teaching. Several
// checkpoints make one teacher, an ensemble whose probabilities are averaged:
// with 50 images per class a single model is a weak teacher, and an ensemble of
// models trained on the same images is a stronger one that saw no more data.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

#include "moev/io/run_config.h"
#include "moev/models/classifier.h"

namespace moev::train {

class Teacher {
 public:
  // Loads `checkpoints`, one or more (an error names the one that is not a
  // model of the student's architecture or classes). student_mean/std: the
  // normalisation of the images it will be given. With student_data, a member
  // trained on other images than those (training_data_difference) is an error
  // too: in a data-efficient run it would pass on labels the student may not see.
  // student_classes (the training set's class names; empty: not checked): a member that lists them in another
  // order (one trained on a folder, the student on the IDX files) has its probabilities put in the student's,
  // names matched as eval matches them; a member lacking one of them is an error.
  Teacher(const std::vector<std::string>& checkpoints, const models::ModelConfig& student,
          const std::vector<float>& student_mean, const std::vector<float>& student_std,
          const DataConfig* student_data = nullptr, const std::vector<std::string>& student_classes = {});

  // x: [B, C, H, W] normalised as the student's, index/aug: int64 [B] from the
  // loader -> probabilities [B, L]; runs the teacher on the rows not cached yet
  // and on every row with aug < 0 (not cached: no key names its image).
  at::Tensor probs(const at::Tensor& x, const at::Tensor& index, const at::Tensor& aug,
                   int64_t num_augmentations);

  // x: [B, C, H, W] normalised as the student's -> probabilities [B, L], not
  // cached: for images no key names (mixup and cutmix blends).
  at::Tensor probs_uncached(const at::Tensor& x);

  int64_t images_run() const { return images_run_; }  // teacher forwards so far
  // What the student's run should say of its teacher: a member whose run had not ended (unfinished_training).
  const std::vector<std::string>& notes() const { return notes_; }

  // At most `megabytes` of cached probabilities (map entries included): past
  // it, new keys are taught uncached, each time they come. The cache's size is
  // images x crop/flip variants x classes, unbounded in the data: 50 images
  // per class of ImageNet's 1000 classes with 162 variants each would want
  // 32 GB. A probability is the same cached or not up to float rounding: the
  // kernels' blocking puts an image's row of a batch through other code at
  // some positions (~1e-7 apart), which a long run amplifies. Hence a resumed
  // run starts with the cache its checkpoint holds (cache_tensors), not an
  // empty one refilled from other batches.
  void limit_cache(double megabytes);
  int64_t cached() const { return static_cast<int64_t>(rows_.size()); }  // keys held
  bool cache_full() const { return cached() >= max_rows_; }

  // The cache in the order it was filled: keys int64 [R], probabilities float [R, L].
  std::pair<at::Tensor, at::Tensor> cache_tensors() const;
  // Fills an empty cache from cache_tensors() of an earlier process (up to the limit); `source` for messages.
  void restore_cache(const at::Tensor& keys, const at::Tensor& probs, const std::string& source);

  // A digest of every member's weights, in order: a resumed run checks it is taught by the same teacher.
  const std::string& fingerprint() const { return fingerprint_; }

 private:
  // x: [M, C, H, W] in the student's normalisation -> [M, L], the members' mean.
  at::Tensor forward_chunks(const at::Tensor& x);

  struct Member {
    models::ClassifierPtr model;
    at::Tensor scale, shift;  // [1, C, 1, 1]: student normalisation -> this member's
    at::Tensor columns;       // int64 [L]: its column of each student class (undefined: the same order)
  };
  std::vector<Member> members_;
  int64_t classes_ = 0;
  static constexpr int64_t kCacheChunkRows = 4096;
  const float* cached_row(int64_t row) const {
    return chunks_[static_cast<size_t>(row / kCacheChunkRows)].data() + (row % kCacheChunkRows) * classes_;
  }
  std::unordered_map<int64_t, int64_t> rows_;  // key -> cached row
  std::vector<std::vector<float>> chunks_;     // kCacheChunkRows rows of `classes_` probabilities each
  int64_t max_rows_ = INT64_MAX;                // the cache's limit, in keys
  int64_t images_run_ = 0;
  std::string fingerprint_;
  std::vector<std::string> notes_;
};

// The fields of two model configs that make them different architectures ("" when
// they are the same network), e.g. "model.branches 1 vs 3".
std::string architecture_difference(const models::ModelConfig& a, const models::ModelConfig& b);

// The fields of two data configs that make their training images different
// ("" when both train on the same images), e.g. "data.per_class 500 vs 50".
// Augmentation and normalisation do not count; paths are compared as files.
std::string training_data_difference(const DataConfig& a, const DataConfig& b);

// The fields of two data configs that make their test sets different ("" when
// both are scored on the same images), e.g. "data.path \"a\" vs \"b\"": the
// format, the file or folder the test images are read from (as files), and a
// manifest's tag vocabulary. Members of one ensemble must agree on these.
std::string test_data_difference(const DataConfig& a, const DataConfig& b);

}  // namespace moev::train
