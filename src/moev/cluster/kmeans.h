// k-means on LibTorch tensors: the gater of a hard mixture of experts (Gross et
// al. 2017) partitions the training images by clustering the trunk's features,
// and at inference sends an image to the expert of its nearest centroid.
// k-means++ seeding (Arthur & Vassilvitskii 2007); Lloyd iterations, or
// mini-batch updates with per-centroid step sizes 1/count (Sculley 2010) for
// data too large to sweep every iteration. Deterministic for a seed.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace moev::cluster {

struct KMeansOptions {
  int64_t k = 8;            // clusters
  int64_t max_iters = 100;  // Lloyd iterations (mini-batch: batches)
  double tol = 1e-6;        // stop when the inertia improves by less than this fraction
  int64_t batch_size = 0;   // > 0: mini-batch k-means with batches of this many points
  uint64_t seed = 0;        // seeding and batch sampling
};

struct KMeansResult {
  at::Tensor centroids;   // float [k, F]
  at::Tensor assignment;  // int64 [N]: nearest centroid of each point
  double inertia = 0;     // sum of squared distances to the assigned centroids
  int64_t iterations = 0;
};

// x: float [N, F] with N >= k -> centroids and assignment. An empty cluster is
// reseeded with the point farthest from its centroid, so every cluster ends
// with at least one point.
KMeansResult kmeans(const at::Tensor& x, const KMeansOptions& options);

// x: [N, F], centroids [k, F] -> int64 [N], index of the nearest centroid (ties:
// the lower index). Squared distances in chunks, so N may be large.
at::Tensor nearest_centroid(const at::Tensor& x, const at::Tensor& centroids);

// k-means++ seeding: the first centroid uniform, each next one drawn with
// probability proportional to the squared distance to the nearest chosen one.
at::Tensor kmeans_pp_init(const at::Tensor& x, int64_t k, uint64_t seed);

}  // namespace moev::cluster
