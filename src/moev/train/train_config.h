// Plain configs of data and training, with defaults and a comment per field.
// They are filled in one place (moev/io/run_config.h) from files and flags.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moev::train {

struct DataConfig {
  std::string format = "fashion-mnist";  // fashion-mnist | folder | cifar10 | manifest (multi-label CSV)
  std::string path = "/usr/share/datasets/fashion-mnist";  // dataset dir (folder: train root; manifest: train CSV)
  std::string test_path;                 // folder: test root; manifest: test CSV (other formats: = path)
  std::vector<std::string> tags;         // manifest: tag vocabulary, column order (empty: the training manifest's, sorted)
  std::vector<float> mean;               // per-channel normalisation; empty: from training set
  std::vector<float> std;                // per-channel std; empty: from training set
  bool augment = true;                   // random crop (padding 4 px... see crop_padding) + flip
  int64_t crop_padding = 2;              // zero padding of the random crop, pixels
  bool hflip = true;                     // random horizontal flip
  double random_erase = 0;               // probability of erasing one random rectangle per image (0: off)
  std::string auto_augment = "none";     // AutoAugment policy after crop and flip: none | imagenet (Cubuk et al.)
  std::string resize = "stretch";        // folder/manifest images of another aspect ratio: stretch | center_crop
  int64_t train_limit = 0;               // use only the first N training images (0: all)
  int64_t test_limit = 0;                // evaluate on the first N test images (0: all)
  int64_t per_class = 0;                 // train on K images per class, a seeded class-balanced subset (0: all)
  uint64_t subset_seed = 0;              // seed of the per_class subset
};

struct TrainConfig {
  int64_t epochs = 10;            // passes over the training set
  int64_t batch_size = 128;       // B
  double lr = 2e-3;               // peak learning rate (AdamW)
  double min_lr = 1e-5;           // learning rate at the end of the cosine decay
  int64_t warmup_steps = 300;     // linear warmup from 0 to lr
  double weight_decay = 0.05;     // decoupled weight decay on weight matrices
  double beta1 = 0.9;             // AdamW beta1
  double beta2 = 0.999;           // AdamW beta2
  double label_smoothing = 0.1;   // cross-entropy label smoothing
  double cosine_loss = 0;         // weight of the cosine loss 1 - cos(target, softmax) (Sun et al.: 1)
  double mixup_alpha = 0;         // mixup Beta(alpha, alpha) (0: off)
  double cutmix_alpha = 0;        // cutmix Beta(alpha, alpha) (0: off)
  double mix_prob = 1.0;          // probability a batch is mixed (with mixup or cutmix on)
  double mix_switch_prob = 0.5;   // with both on: probability of cutmix rather than mixup
  int64_t mix_off_epochs = 0;     // the last epochs (of train.epochs) train on unmixed images
  int64_t cooldown_epochs = 0;    // epochs after the cosine schedule, at cooldown_lr
  double cooldown_lr = 1e-5;      // learning rate of the cool-down epochs
  std::vector<std::string> teacher;  // distillation: the teacher's checkpoint(s), same architecture; several average their probabilities
  double distill_lambda = 0.5;    // target = lambda * label-smoothed + (1 - lambda) * teacher probs
  bool teacher_on_mix = false;    // the teacher also runs on mixup/cutmix images (uncached), not their parts' mixed probs
  double teacher_cache_mb = 2048;  // distillation: memory for cached teacher probabilities; past it, taught uncached (0: none)
  bool teacher_other_data = false;  // distillation: allow a teacher trained on other images than the student (e.g. all labels)
  double diversity_weight = 0.2;  // multi-branch models: weight of the diversity loss (Sun et al.: 0.2)
  double online_distill = 0;      // multi-branch: weight of online distillation towards the branches' mean (Lan et al. 2018; 0: off)
  double online_distill_temperature = 3;  // its softmax temperature (ONE: 3)
  bool diversity_off_target = false;  // the diversity loss leaves out the classes each row's target supports
  bool branch_views = false;      // multi-branch: each branch trains on batches of its own (order, crops, mixes), the trunk on all
  double clip_grad_norm = 1.0;    // global gradient norm clip (0: off)
  double ema_decay = 0;           // decay of the weight average eval and checkpoints' users get (0: none; e.g. 0.999)
  uint64_t seed = 0;              // seeds init, data order, augmentation and router noise
  int threads = 0;                // intra-op threads (0: all cores)
  int replicas = 0;               // data-parallel model replicas, one thread each (0: one per thread)
  std::string device = "cpu";     // cpu | cuda[:N]
  std::string out_dir = "runs/default";  // checkpoints, log.jsonl
  std::string init_from;          // start from this checkpoint's weights (fine-tuning)
  std::vector<std::string> freeze;  // parameters kept fixed: a name, or a module whose parameters all are (e.g. "head")
  std::string multilabel_loss = "softmax";  // multi-label data: softmax (over tags, Gross et al.) | sigmoid (BCE per tag)
  int64_t checkpoint_every = 200; // steps between checkpoints (0: only at the end)
  int64_t log_every = 50;         // steps between log.jsonl lines
  int64_t max_steps = 0;          // stop after this many steps (0: epochs decide)
  double minutes = 0;             // time budget of the training steps (evaluations excluded); epochs cap it (0: off)
  bool eval_each_epoch = true;    // evaluate on the test set after every epoch
  bool progress = true;           // progress bar on stderr
  double dist_timeout = 120;      // distributed job: seconds a rank waits for the others before failing
  bool expert_parallel = false;   // distributed job: split each MoE layer's experts over the ranks
};

}  // namespace moev::train
