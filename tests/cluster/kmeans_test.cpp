// k-means: recovers well-separated clusters, every point in exactly one
// cluster, assignment = nearest centroid, k-means++ spreads its seeds,
// deterministic per seed, clear errors.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "support/expect_error.h"
#include "moev/cluster/kmeans.h"

using namespace moev;

namespace {
// k blobs of n points around far-apart centres, shuffled; returns (x, true label).
std::pair<at::Tensor, at::Tensor> blobs(int64_t k, int64_t n, int64_t F, uint64_t seed) {
  auto g = at::detail::createCPUGenerator(seed);
  auto centres = torch::randn({k, F}, g) * 20;
  auto label = torch::arange(k).repeat_interleave(n);
  auto x = centres.index_select(0, label) + torch::randn({k * n, F}, g) * 0.5;
  auto perm = torch::randperm(k * n, g);
  return {x.index_select(0, perm), label.index_select(0, perm)};
}
// Whether the clustering equals the labelling up to renaming: k distinct
// (cluster, label) pairs with k clusters and k labels in use is a one-to-one
// map (the pairs alone pass a constant clustering of k labels).
bool same_partition(const at::Tensor& a, const at::Tensor& b, int64_t k) {
  auto distinct = [](const at::Tensor& t) { return std::get<0>(at::_unique(t)).numel(); };
  return distinct(a * k + b) == k && distinct(a) == k && distinct(b) == k;
}
}  // namespace

TEST(KMeans, RecoversWellSeparatedClusters) {
  for (uint64_t seed : {0, 1, 2}) {
    auto [x, label] = blobs(6, 200, 16, seed);
    cluster::KMeansOptions o;
    o.k = 6;
    o.seed = seed;
    auto r = cluster::kmeans(x, o);
    EXPECT_TRUE(same_partition(r.assignment, label, 6)) << "seed " << seed;
    EXPECT_EQ(torch::bincount(r.assignment, {}, 6).min().item<int64_t>(), 200);
    // Inertia of the true clusters: about N * F * 0.25.
    EXPECT_LT(r.inertia, 1200 * 16 * 0.25 * 1.2);
    o.batch_size = 256;  // mini-batch finds them too
    o.max_iters = 60;
    auto mb = cluster::kmeans(x, o);
    EXPECT_TRUE(same_partition(mb.assignment, label, 6)) << "mini-batch, seed " << seed;
  }
}

TEST(KMeans, AssignmentIsTheNearestCentroidAndEveryPointHasOne) {
  torch::manual_seed(0);
  auto x = torch::randn({500, 8});
  cluster::KMeansOptions o;
  o.k = 7;
  o.tol = 0;  // run to the fixed point
  auto r = cluster::kmeans(x, o);
  ASSERT_EQ(r.assignment.numel(), 500);
  EXPECT_GE(r.assignment.min().item<int64_t>(), 0);
  EXPECT_LT(r.assignment.max().item<int64_t>(), 7);
  EXPECT_EQ(torch::bincount(r.assignment, {}, 7).sum().item<int64_t>(), 500);
  EXPECT_GT(torch::bincount(r.assignment, {}, 7).min().item<int64_t>(), 0);  // no empty cluster
  // Brute force: each point against each centroid.
  auto d = (x.unsqueeze(1) - r.centroids.unsqueeze(0)).pow(2).sum(2);
  EXPECT_TRUE(torch::equal(std::get<1>(d.min(1)), r.assignment));
  EXPECT_TRUE(torch::equal(cluster::nearest_centroid(x, r.centroids), r.assignment));
  // Lloyd's fixed point: each centroid is the mean of its points.
  for (int64_t j = 0; j < 7; ++j) {
    auto mine = x.index_select(0, r.assignment.eq(j).nonzero().view({-1}));
    EXPECT_TRUE(torch::allclose(mine.mean(0), r.centroids[j], 1e-4, 1e-4)) << j;
  }
  auto again = cluster::kmeans(x, o);
  EXPECT_TRUE(torch::equal(again.centroids, r.centroids));
  // With the default tolerance too, Lloyd runs more than one step on overlapping data.
  cluster::KMeansOptions dflt;
  dflt.k = 7;
  auto def = cluster::kmeans(x, dflt);
  EXPECT_GT(def.iterations, 3);
  EXPECT_LE(def.inertia, r.inertia * 1.001);
}

TEST(KMeans, PlusPlusSeedsOnePointPerBlob) {
  auto [x, label] = blobs(5, 100, 4, 7);
  auto c = cluster::kmeans_pp_init(x, 5, 3);
  // Seeds are data points; with blobs 40 apart, D^2 sampling all but never picks two in one blob.
  auto seeds_blob = label.index_select(0, cluster::nearest_centroid(c, x));
  EXPECT_EQ(std::get<0>(at::_unique(seeds_blob)).numel(), 5);
}

TEST(KMeans, TooFewPointsIsAnError) {
  cluster::KMeansOptions o;
  o.k = 10;
  test::expect_error([&] { cluster::kmeans(torch::randn({5, 3}), o); }, {"5 points cannot make k = 10"});
}

// Mini-batch k-means on overlapping data with many clusters and tiny batches,
// where centroids drift off their seeds: still no empty cluster, the
// assignment is the nearest centroid, and a seed fixes the result.
TEST(KMeans, MiniBatchLeavesNoClusterEmptyAndIsDeterministic) {
  torch::manual_seed(3);
  auto x = torch::randn({300, 2});
  cluster::KMeansOptions o;
  o.k = 100;
  o.batch_size = 4;
  o.max_iters = 40;
  for (uint64_t seed : {0, 1, 2, 3}) {
    o.seed = seed;
    auto r = cluster::kmeans(x, o);
    EXPECT_GT(torch::bincount(r.assignment, {}, 100).min().item<int64_t>(), 0) << "seed " << seed;
    EXPECT_TRUE(torch::equal(cluster::nearest_centroid(x, r.centroids), r.assignment));
    EXPECT_TRUE(torch::equal(cluster::kmeans(x, o).centroids, r.centroids));
  }
}
