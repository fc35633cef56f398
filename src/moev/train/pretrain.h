// Self-supervised pre-training on the training images themselves, the step Sun
// et al. (section 3.1) put before every model: "each model would be
// self-supervised pretrained by MoCo-v2 on training data, and then used for
// parameters initialization". No label is read for training; nothing but the
// run's own images is seen, so the data-efficient setting stays intact.
//
// MoCo v2 (He et al. 2020, Chen et al. 2020): a query encoder (the model being
// trained plus an MLP projection per branch) and a key encoder, its momentum
// average; two random views of each image; InfoNCE over the positive key and
// a queue of keys from earlier batches. A multi-branch model gives every branch
// its own projection, keys and queue, and the branch losses are summed, as its
// supervised losses are, so the branches start apart and the trunk learns from
// all of them. The key encoder runs its batch in two halves of a random order
// (MoCo's shuffle BN, approximated on one device): each key is normalised with
// a random half of the batch rather than with exactly the images its query
// was, which weakens matching a pair through their BatchNorm statistics.
//
// The result is a checkpoint of the model (heads untouched) that a supervised
// run starts from with train.init_from.
#pragma once

#include <atomic>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <nlohmann/json_fwd.hpp>

#include "moev/io/run_config.h"

namespace moev::train {

struct PretrainOptions {
  int64_t epochs = 200;             // passes over the training images (labels unused)
  double lr = 2e-3;                 // peak AdamW learning rate: warmup 10 epochs, cosine to lr / 100
  double weight_decay = 0.05;       // AdamW decoupled weight decay (matrices only)
  double temperature = 0.2;         // InfoNCE temperature (MoCo v2: 0.2)
  double momentum = 0.99;           // key encoder: key <- m key + (1 - m) query, every step
  int64_t queue = 256;              // negative keys per branch; from a batch to the training images minus a batch
  int64_t proj_dim = 128;           // projection head output width
  double min_scale = 0.25;          // random resized crop: area fraction drawn from [min_scale, 1]
  double jitter = 0.4;              // contrast factor in [1 - j, 1 + j], brightness shift in [-j, j] (data stds)
  int64_t knn_k = 20;               // neighbours of the kNN probe on the test set (0: no probe)
  bool resume = false;              // continue from <out_dir>/pretrain.pt
  std::ostream* progress = nullptr;  // progress bar (nullptr or train.progress = false: none)
  bool interactive = false;
  // Set (by a signal handler, say) to stop early: the step in progress ends,
  // pretrain.pt is saved and pretrain() returns with `stopped`.
  const std::atomic<bool>* stop = nullptr;
};

struct PretrainOutcome {
  int64_t steps = 0;
  double final_loss = 0;        // InfoNCE summed over branches, mean of the last epoch's steps
  double knn_top1_init = -1;    // kNN probe before pre-training (-1: not run)
  double knn_top1 = -1;         // and after
  double seconds = 0;           // training steps only
  std::string checkpoint;       // <out_dir>/pretrain.pt
  bool stopped = false;         // ended early by PretrainOptions::stop (no probe, no pretrain.json); --resume continues
  bool finished = false;        // every planned step done (else stopped, or paused at train.max_steps, as stopped)
};

// An option of PretrainOptions as a config file's [pretrain] section, `--set
// pretrain.<key>=...`, moev pretrain's flag and pretrain.json name it: one
// table, so the four cannot drift apart.
struct PretrainKey {
  const char* key;                               // [pretrain] key, pretrain.json name
  const char* flag;                              // moev pretrain's CLI flag
  const char* help;                              // one line
  int64_t PretrainOptions::*integer = nullptr;   // the field: exactly one of the two is set
  double PretrainOptions::*real = nullptr;
};
const std::vector<PretrainKey>& pretrain_keys();

// Sets o's fields from a [pretrain] table; a key not in pretrain_keys() or a
// value of another type is an error naming source and the key. Ranges are
// checked by pretrain().
void apply_pretrain_section(PretrainOptions& o, const nlohmann::json& section, const std::string& source);
// o as a [pretrain] table, every key of pretrain_keys().
nlohmann::json pretrain_section(const PretrainOptions& o);

// Pre-trains cfg's model on cfg's training images (the data section's subset,
// cfg.train's batch size, seed, threads, checkpoint_every, log_every and
// max_steps, which stops the run early for a later resume) and
// writes <out_dir>/pretrain.pt (atomically, every checkpoint_every steps and at
// the end; a killed run resumes from it with o.resume, exactly),
// pretrain_log.jsonl, pretrain.json and pretrain.png (the loss curve).
// Throws moev::Error naming the option outside its range (pretrain checks them; so does --print-config).
void validate_pretrain_options(const PretrainOptions& o);

PretrainOutcome pretrain(const io::RunConfig& cfg, const std::string& out_dir, const PretrainOptions& o);

// Refuses a pre-training checkpoint (its heads are as initialised) where a
// trained model is expected (eval, predict, fuse, a teacher), naming `path`.
void refuse_pretraining_checkpoint(const std::string& state_json, const std::string& path);

// A random view of each image: a random resized crop (area in [min_scale, 1],
// aspect ratio in [3/4, 4/3]) resampled to the input size, a horizontal flip
// with probability 1/2 when flip is set, a contrast factor in [1 - jitter,
// 1 + jitter] about the image's mean and a brightness shift in [-jitter, jitter]
// (normalised units: data stds). Draws come from `seed` alone.
// x: [B, C, H, W] (normalised) -> [B, C, H, W]
at::Tensor random_view(const at::Tensor& x, uint64_t seed, double min_scale, bool flip, double jitter);

// InfoNCE of MoCo: row i's positive is k[i], its negatives the queue's rows.
// q, k: [B, P], queue: [K, P], all L2-normalised -> scalar, the mean over rows of
// -log softmax([q_i . k_i, q_i . queue^T] / temperature)[0]
at::Tensor info_nce(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, double temperature);

// Weighted kNN classification (Wu et al. 2018): each test embedding votes with
// its k most cosine-similar training embeddings, weight exp(similarity / 0.07).
// The test rows go in blocks whose similarities hold at most block_floats
// (2^26: 256 MB, however many training rows; 1024 rows x 1.28M would be 5 GB).
// train: [M, F], train_labels: [M], test: [T, F], test_labels: [T] -> top-1 fraction
double knn_top1(const at::Tensor& train, const at::Tensor& train_labels, const at::Tensor& test,
                const at::Tensor& test_labels, int64_t k, int64_t num_classes,
                int64_t block_floats = int64_t{1} << 26);

}  // namespace moev::train
