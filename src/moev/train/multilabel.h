// Multi-label (hashtag) prediction, as Gross et al. train their hard MoE: each
// image has a set of tags; the losses are sigmoid binary cross-entropy and the
// softmax over tags (targets spread evenly over an image's tags); the metrics
// precision@k, recall@k and mean average precision.
#pragma once

#include <cstdint>

#include <ATen/core/Tensor.h>

namespace moev::train {

// logits [N, T], targets {0, 1} [N, T] -> scalar: mean over N and T of BCE.
at::Tensor sigmoid_bce(const at::Tensor& logits, const at::Tensor& targets);
// The same -> mean over images of -sum_t (y_t / |y|) log softmax(logits)_t (images with no tag count 0).
at::Tensor softmax_over_tags(const at::Tensor& logits, const at::Tensor& targets);

struct MultiLabelMetrics {
  double precision_at_1 = 0;
  double precision_at_k = 0;  // k = the k asked for
  double recall_at_k = 0;     // over images with at least one tag
  double mean_ap = 0;         // mean over tags with at least one positive of their average precision
  int64_t k = 0, images = 0;
};

// scores [N, T] (any monotone score), targets {0, 1} [N, T]. Ties rank the lower
// tag / image index first, so the figures are deterministic.
MultiLabelMetrics multilabel_metrics(const at::Tensor& scores, const at::Tensor& targets, int64_t k);

}  // namespace moev::train
