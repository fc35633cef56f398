#include "moev/train/multilabel.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include <torch/torch.h>

#include "moev/core/error.h"

namespace moev::train {

at::Tensor sigmoid_bce(const at::Tensor& logits, const at::Tensor& targets) {
  return torch::binary_cross_entropy_with_logits(logits, targets.to(logits.scalar_type()));
}

at::Tensor softmax_over_tags(const at::Tensor& logits, const at::Tensor& targets) {
  auto t = targets.to(logits.scalar_type());
  auto dist = t / t.sum(1, true).clamp_min(1);
  return -(dist * torch::log_softmax(logits, 1)).sum(1).mean();
}

MultiLabelMetrics multilabel_metrics(const at::Tensor& scores_in, const at::Tensor& targets_in, int64_t k) {
  MOEV_CHECK(scores_in.dim() == 2 && scores_in.sizes() == targets_in.sizes(), "multilabel_metrics: scores ",
             scores_in.sizes(), " and targets ", targets_in.sizes(), " must both be [N, T]");
  MOEV_CHECK(k >= 1 && k <= scores_in.size(1), "multilabel_metrics: k = ", k, ": expected 1..", scores_in.size(1));
  auto scores = scores_in.to(torch::kDouble).contiguous();
  auto targets = targets_in.to(torch::kDouble).contiguous();
  const int64_t N = scores.size(0), T = scores.size(1);
  const double* s = scores.data_ptr<double>();
  const double* y = targets.data_ptr<double>();
  MultiLabelMetrics m;
  m.k = k;
  m.images = N;
  if (N == 0) return m;
  int64_t with_tags = 0;
  std::vector<int64_t> order(static_cast<size_t>(T));
  for (int64_t i = 0; i < N; ++i) {
    std::iota(order.begin(), order.end(), 0);
    const double* si = s + i * T;
    const double* yi = y + i * T;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return si[a] > si[b]; });
    double hits = 0, total = 0;
    for (int64_t t = 0; t < T; ++t) total += yi[t] > 0.5;
    for (int64_t r = 0; r < k; ++r) hits += yi[order[r]] > 0.5;
    m.precision_at_1 += yi[order[0]] > 0.5;
    m.precision_at_k += hits / double(k);
    if (total > 0) {
      m.recall_at_k += hits / total;
      ++with_tags;
    }
  }
  m.precision_at_1 /= double(N);
  m.precision_at_k /= double(N);
  m.recall_at_k = with_tags ? m.recall_at_k / double(with_tags) : 0.0;
  // Average precision per tag: images ranked by the tag's score; the mean over
  // the tag's positives of the precision at each positive's rank.
  std::vector<int64_t> rank(static_cast<size_t>(N));
  int64_t tags = 0;
  for (int64_t t = 0; t < T; ++t) {
    std::iota(rank.begin(), rank.end(), 0);
    std::stable_sort(rank.begin(), rank.end(), [&](int64_t a, int64_t b) { return s[a * T + t] > s[b * T + t]; });
    double pos = 0, ap = 0;
    for (int64_t r = 0; r < N; ++r) {
      if (y[rank[r] * T + t] > 0.5) {
        ++pos;
        ap += pos / double(r + 1);
      }
    }
    if (pos > 0) {
      m.mean_ap += ap / pos;
      ++tags;
    }
  }
  m.mean_ap = tags ? m.mean_ap / double(tags) : 0.0;
  return m;
}

}  // namespace moev::train
