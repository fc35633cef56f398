// Turns an in-memory ImageSet into normalised float batches on a background
// thread. Order and augmentation are a pure function of (seed, epoch, batch
// index), so a run killed mid-epoch resumes with exactly the batches it would
// have seen (start_batch). Deliberately not torch::data: that API has no exact
// mid-epoch resume and does its augmentation with per-example tensor ops.
#pragma once

#include <torch/types.h>

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "moev/data/auto_augment.h"
#include "moev/data/image_set.h"

namespace moev::data {

struct LoaderOptions {
  int64_t batch_size = 128;  // examples per batch
  bool shuffle = true;       // a fresh permutation every epoch; false keeps file order
  bool drop_last = true;     // skip the final partial batch so every step has batch_size
  uint64_t seed = 0;         // with epoch and batch index, fixes order and augmentation
  bool augment = false;      // random crop and flip; for training only
  int64_t crop_padding = 4;  // random crop with zero padding: shift by up to this many pixels
  bool hflip = true;         // with augment, mirror half of the images left to right
  double random_erase = 0;   // with augment, probability an image gets one rectangle erased (Zhong et al. 2017)
  AutoAugmentPolicy auto_augment = AutoAugmentPolicy::kNone;  // with augment, AutoAugment after the crop and flip
  std::vector<float> mean{0.2860f};  // per-channel mean of pixel/255; one value for all channels
  std::vector<float> std{0.3530f};   // per-channel std of pixel/255; one value for all channels
  int prefetch = 2;                  // batches prepared ahead by the background thread
  int64_t rows_begin = 0;            // keep rows [rows_begin, rows_end) of every batch:
  int64_t rows_end = -1;             //   a data-parallel rank's share (-1: to the end)
};

// For passes that keep the last batch: the smallest batch size that cuts n
// examples into as few batches of at most max_batch as possible (n = 500,
// max_batch = 128: 125, four full batches; n = 129: 65, the last of 64), so
// the last batch falls short of the others by less than the batch count.
int64_t near_equal_batch_size(int64_t n, int64_t max_batch);

struct Batch {
  torch::Tensor x;      // float [B, C, H, W], normalised
  torch::Tensor y;      // int64 [B]
  torch::Tensor index;  // int64 [B]: each row's example in the set
  torch::Tensor aug;    // int64 [B]: its crop/flip variant, 0..num_augmentations()-1 (0 without augment),
                        //   or -1 when AutoAugment or erasing changed the image (no finite id names it)
  torch::Tensor t;      // float [B, T]: multi-label targets (undefined for a single-label set)
};

// Distinct augmentations an example can get: (2 pad + 1)^2 crop offsets x 2 flips.
// With the example index, Batch::aug identifies an augmented image exactly (what
// a teacher's cached prediction is keyed by).
int64_t num_augmentations(const LoaderOptions& options);

// One epoch of batches. A new loader per epoch keeps the epoch explicit in the
// seed and makes resuming a constructor argument rather than hidden state.
class BatchLoader {
 public:
  // Starts producing batches start_batch, start_batch+1, ... of `epoch` at once.
  // The set's tensors are shared, not copied; the set may go out of scope.
  BatchLoader(const ImageSet& set, LoaderOptions options, int64_t epoch, int64_t start_batch = 0);
  // Stops the producer and joins it, also mid-epoch.
  ~BatchLoader();
  BatchLoader(const BatchLoader&) = delete;
  BatchLoader& operator=(const BatchLoader&) = delete;

  // Fills batch with the next one; false at the end of the epoch. Rethrows an
  // exception raised while producing.
  bool next(Batch& batch);
  int64_t batches_per_epoch() const { return num_batches_; }
  const LoaderOptions& options() const { return options_; }

 private:
  void produce();
  Batch make_batch(int64_t index) const;

  torch::Tensor images_;  // uint8 [N, C, H, W], contiguous
  torch::Tensor labels_;  // int64 [N], contiguous
  torch::Tensor targets_;  // float [N, T] or undefined
  LoaderOptions options_;
  int64_t epoch_;
  int64_t start_batch_;
  int64_t num_batches_;
  std::vector<int64_t> order_;  // example index at each epoch position
  std::vector<float> lut_;      // [C * 256]: normalised value of each pixel value per channel

  std::mutex mutex_;
  std::condition_variable changed_;  // queue_, done_ or stop_ changed
  std::deque<Batch> queue_;
  bool done_ = false;  // producer finished (or failed)
  bool stop_ = false;  // destructor asks the producer to quit
  std::exception_ptr error_;
  std::thread thread_;  // declared last: it starts once everything above exists
};

// uint8 [B, C, H, W] or [C, H, W] -> float of the same shape, (x/255 - mean)/std
// per channel; bit-identical to what BatchLoader produces without augmentation.
torch::Tensor normalize_images(const torch::Tensor& u8, const std::vector<float>& mean,
                               const std::vector<float>& std);

// Per-channel mean and (population) std of pixel/255 over the whole set, for
// LoaderOptions::mean/std on a new data set.
std::pair<std::vector<float>, std::vector<float>> channel_stats(const ImageSet& set);

}  // namespace moev::data
