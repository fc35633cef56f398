// The gater's side of a hard mixture of experts (Gross et al. 2017): the
// trunk's embeddings of every training image, k-means on them, and the
// partition (which training image goes to which expert) with the centroids,
// as files that expert jobs on other machines read. Nothing here trains.
#pragma once

#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <torch/types.h>

#include "moev/data/image_set.h"
#include "moev/hardmoe/hardmoe_config.h"
#include "moev/models/classifier.h"

namespace moev::hardmoe {

// images of `set`, normalised, through model.embed in eval mode, in batches:
// -> float [N, F]. No augmentation, so the same image always gets the same row.
at::Tensor extract_features(models::Classifier& model, const data::ImageSet& set, const std::vector<float>& mean,
                            const std::vector<float>& std, int64_t batch_size, const c10::Device& device,
                            std::ostream* progress = nullptr, bool interactive = false);

struct Partition {
  int64_t experts = 0;
  std::vector<int64_t> expert_of;  // [N]: each training image's expert
  std::vector<int64_t> counts;     // [k]: training images per expert
  at::Tensor centroids;            // float [k, F]
  double inertia = 0;              // k-means objective on the trunk's features
  int64_t iterations = 0;
  std::string trunk;               // the checkpoint whose embeddings were clustered (absolute)
  int64_t trunk_step = -1;         // its training step then: a retrained trunk is caught (-1: unknown)
  std::string trunk_weights;       // weights_fingerprint of its weights then ("": unknown, older directories)
  std::string training_data;       // data_fingerprint of the images clustered ("": unknown, older directories)
  std::string assignment;          // index_fingerprint of expert_of, as cluster wrote it ("": older directories)
  std::string centroids_weights;   // weights_fingerprint of the centroids cluster wrote ("": older directories)
};

// An error naming `file` unless `centroids` (read from it) are the ones the partition records: centroids of another
// clustering, or damaged ones (the pickle has no checksum), send test images to experts that never saw their kind.
void check_centroids(const Partition& p, const at::Tensor& centroids, const std::string& file);

// Runs the trunk over its own training set (as the trunk's checkpoint names
// it), clusters the embeddings and writes into c.dir: partition.csv (row,
// expert for every training image), centroids.pt, partition.json (summary,
// with each expert's share of images per tag), partition.png (that share as
// a heatmap) and hardmoe.json (the model, whose experts are trained later). Files are
// written atomically; experts already trained in c.dir are not touched, but
// a new partition with a different result is an error while they exist.
Partition cluster_trunk(const HardMoEConfig& c, int64_t batch_size, std::ostream* progress, bool interactive);

// What cluster_trunk wrote to `dir`; a missing or malformed file is an error
// naming it, and so is a partition.csv that is not the one partition.json
// records (edited by hand or copied from another clustering: the centroids
// would send images to experts trained on others). The trunk is stored
// relative to `dir`, so the directory moves with its trunk.
Partition read_partition(const std::string& dir);

// centroids.pt: the [k, F] tensor (a pickled tensor; torch.load in Python reads it too).
at::Tensor load_centroids(const std::string& path);

// The training rows of `expert`: an index outside 0..k-1 or an empty partition
// is an error naming the expert and the directory.
std::vector<int64_t> partition_rows(const Partition& p, int64_t expert, const std::string& dir);

// The index_fingerprint of the rows expert `expert` trained on, as its checkpoint in `run_dir` records it
// ("": no checkpoint, or one from before it was kept).
std::string trained_rows(const std::string& run_dir);

// Refuses expert `expert` of `dir` when its checkpoint records other rows than the partition `p` gives it (an
// expert copied in from another clustering). Nothing recorded (no checkpoint, an older one): nothing to check.
void check_expert_rows(const Partition& p, const std::string& dir, int64_t expert);

// The trunk checkpoint a hard MoE in `dir` was clustered from, checked to be
// the same training state (step) and the same weights (a trunk retrained to the
// same step, from another seed or data, would put images into the old
// clusters' feature space); `given` (a config's or flag's trunk, may be empty)
// must name the same file, unless the recorded one is gone (the directory moved
// away from its trunk): then `given` is used, if it is that trunk by step and weights.
std::string checked_trunk(const Partition& p, const std::string& dir, const std::string& given = "");

}  // namespace moev::hardmoe
