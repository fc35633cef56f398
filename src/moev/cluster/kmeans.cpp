#include "moev/cluster/kmeans.h"

#include <cmath>
#include <random>

#include <torch/torch.h>

#include "moev/core/error.h"

namespace moev::cluster {

namespace {
constexpr int64_t kChunk = 8192;  // rows per distance block: [8192, k] floats

// Squared distances of x's rows to every centroid, [N, k], clamped at 0 (the
// expanded form can dip below by rounding).
at::Tensor sq_dist(const at::Tensor& x, const at::Tensor& c) {
  return (x.pow(2).sum(1, true) - 2 * x.matmul(c.t()) + c.pow(2).sum(1).unsqueeze(0)).clamp_min(0);
}

// Nearest centroid and its squared distance, in chunks.
std::pair<at::Tensor, at::Tensor> assign(const at::Tensor& x, const at::Tensor& c) {
  const int64_t N = x.size(0);
  auto idx = torch::empty({N}, torch::kInt64);
  auto d = torch::empty({N}, x.options());
  for (int64_t i = 0; i < N; i += kChunk) {
    const int64_t n = std::min(kChunk, N - i);
    auto [v, j] = sq_dist(x.narrow(0, i, n), c).min(1);
    idx.narrow(0, i, n).copy_(j);
    d.narrow(0, i, n).copy_(v);
  }
  return {idx, d};
}
}  // namespace

at::Tensor nearest_centroid(const at::Tensor& x, const at::Tensor& centroids) {
  MOEV_CHECK(x.dim() == 2 && centroids.dim() == 2 && x.size(1) == centroids.size(1), "nearest_centroid: features ",
             x.sizes(), " and centroids ", centroids.sizes(), " must be [N, F] and [k, F]");
  torch::NoGradGuard ng;
  return assign(x.to(torch::kFloat), centroids.to(torch::kFloat)).first;
}

at::Tensor kmeans_pp_init(const at::Tensor& xin, int64_t k, uint64_t seed) {
  torch::NoGradGuard ng;
  auto x = xin.to(torch::kFloat).contiguous();
  const int64_t N = x.size(0);
  MOEV_CHECK(k >= 1 && N >= k, "k-means: ", N, " points cannot make ", k, " clusters");
  std::mt19937_64 rng(seed);
  auto c = torch::empty({k, x.size(1)});
  c[0] = x[static_cast<int64_t>(rng() % static_cast<uint64_t>(N))];
  auto best = sq_dist(x, c.narrow(0, 0, 1)).view({-1});
  for (int64_t j = 1; j < k; ++j) {
    auto cum = best.to(torch::kDouble).cumsum(0);
    const double total = cum[N - 1].item<double>();  // the same sum the search runs over
    int64_t pick;
    if (total <= 0) {  // every point is already a centroid: take any
      pick = static_cast<int64_t>(rng() % static_cast<uint64_t>(N));
    } else {
      const double r = std::uniform_real_distribution<double>(0, total)(rng);
      pick = std::min<int64_t>(N - 1, torch::searchsorted(cum, torch::tensor({r}, torch::kDouble), false, true)
                                          .item<int64_t>());
    }
    c[j] = x[pick];
    best = torch::minimum(best, sq_dist(x, c.narrow(0, j, 1)).view({-1}));
  }
  return c;
}

KMeansResult kmeans(const at::Tensor& xin, const KMeansOptions& o) {
  MOEV_CHECK(xin.dim() == 2, "k-means: expected features [N, F], got ", xin.sizes());
  MOEV_CHECK(o.k >= 1 && xin.size(0) >= o.k, "k-means: ", xin.size(0), " points cannot make k = ", o.k, " clusters");
  MOEV_CHECK(o.max_iters >= 1 && o.batch_size >= 0, "k-means: max_iters >= 1 and batch_size >= 0 expected");
  torch::NoGradGuard ng;
  auto x = xin.to(torch::kFloat).contiguous();
  const int64_t N = x.size(0), k = o.k;
  KMeansResult r;
  auto c = kmeans_pp_init(x, k, o.seed);
  double prev = std::numeric_limits<double>::infinity();
  if (o.batch_size > 0) {
    std::mt19937_64 rng(o.seed ^ 0xB5AD4ECEDA1CE2A9ull);
    auto counts = torch::zeros({k});  // points each centroid has absorbed so far
    std::vector<int64_t> rows(static_cast<size_t>(std::min(o.batch_size, N)));
    for (int64_t it = 0; it < o.max_iters; ++it, ++r.iterations) {
      for (auto& v : rows) v = static_cast<int64_t>(rng() % static_cast<uint64_t>(N));
      auto xb = x.index_select(0, torch::tensor(rows, torch::kInt64));
      auto near = assign(xb, c).first;
      // Each centroid becomes the running mean of every point it has absorbed:
      // c += (sum of its batch points - n c) / count, Sculley's 1/count step
      // taken for the batch at once rather than point by point.
      auto sums = torch::zeros_like(c).index_add_(0, near, xb);
      auto n = torch::bincount(near, {}, k).to(torch::kFloat);
      counts += n;
      c += (sums - n.unsqueeze(1) * c) / counts.clamp_min(1).unsqueeze(1);
    }
    // A centroid no batch point reached may hold no point of the whole set:
    // it takes the point farthest from its centroid, as in Lloyd below.
    for (int64_t pass = 0; pass < k; ++pass) {
      auto [idx, d] = assign(x, c);
      auto empty = torch::bincount(idx, {}, k).eq(0);
      if (!empty.any().item<bool>()) break;
      const int64_t j = empty.nonzero()[0][0].item<int64_t>();
      c[j] = x[d.argmax().item<int64_t>()];
    }
  } else {
    auto [idx, d] = assign(x, c);
    for (int64_t it = 0; it < o.max_iters; ++it) {
      auto sums = torch::zeros_like(c).index_add_(0, idx, x);
      auto cnt = torch::bincount(idx, {}, k).to(torch::kFloat);
      auto empty = cnt.eq(0);
      c = torch::where(empty.unsqueeze(1), c, sums / cnt.clamp_min(1).unsqueeze(1));
      // Empty clusters take the points farthest from their centroids.
      if (empty.any().item<bool>()) {
        auto far = std::get<1>(d.topk(std::min<int64_t>(k, N)));
        int64_t next = 0;
        for (int64_t j = 0; j < k; ++j)
          if (empty[j].item<bool>()) c[j] = x[far[next++]];
      }
      auto [idx2, d2] = assign(x, c);
      ++r.iterations;
      const double inertia = d2.sum().item<double>();
      // A fixed point (no point changes cluster: each centroid is its points'
      // mean), or too little progress.
      const bool settled = torch::equal(idx2, idx);
      idx = idx2;
      d = d2;
      if (settled || (std::isfinite(prev) && prev - inertia <= o.tol * prev)) break;
      prev = inertia;
    }
  }
  auto [idx, d] = assign(x, c);
  r.centroids = c;
  r.assignment = idx;
  r.inertia = d.sum().item<double>();
  return r;
}

}  // namespace moev::cluster
