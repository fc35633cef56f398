// Evaluation of a classifier on an image set: top-1/top-5, loss, throughput and
// what the MoE layers did (per-layer expert load and dropped fraction); on a
// multi-label set also precision@k, recall@k and mAP, ranked by the model's
// probabilities: the softmax over tags, or per-tag sigmoids (sigmoid_tags) for
// a model trained with train.multilabel_loss = "sigmoid"; the loss is that one.
// `stop`, when given, is asked before every batch: true ends the evaluation
// there (a stop request during training's evaluation; the caller decides what a
// partial result means), so a long test set does not outlast a grace period.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "moev/data/image_set.h"
#include "moev/models/classifier.h"
#include "moev/moe/router.h"

namespace moev::train {

struct EvalResult {
  // Multi-label sets: top1 is precision@1 (the top class is one of the image's
  // tags), top5 whether any of the top 5 is, loss the softmax-over-tags loss.
  // With 5 classes (tags) or fewer every class is in the top 5: top5 is NaN
  // then, null in JSON and left out of printed lines (it read 1.0000).
  double top1 = 0, top5 = 0, loss = 0;       // fractions and mean cross-entropy
  bool multilabel = false;                   // the figures below are set
  double precision_at_k = 0, recall_at_k = 0, mean_ap = 0;
  int64_t k = 0;                             // the mean tag count per image, rounded
  double images_per_s = 0;                   // forward throughput
  int64_t images = 0;                        // images the figures cover
  // Ended early by the stop predicate: the figures cover the first `images` only.
  bool stopped = false;
  std::vector<std::vector<double>> expert_load;  // [layer][expert] share of filled slots
  std::vector<double> dropped;                   // [layer] fraction of assignments dropped (EC: of tokens)
  std::vector<double> unrouted;                  // [layer] fraction of tokens that got no expert
  std::vector<std::string> layer_names;          // [layer] module path, e.g. blocks.5.moe
  // With routing_by_class: placed assignments per expert and true class of the
  // image the token came from, [layer][expert][class].
  std::vector<std::vector<std::vector<int64_t>>> class_counts;
  // With routing_by_class: the routing weights (gates) of those assignments
  // summed per expert and class, [layer][expert][class], and the tokens each
  // class's images sent into the layer, [layer][class].
  std::vector<std::vector<std::vector<double>>> class_gate_sums;
  std::vector<std::vector<double>> class_tokens;
  // With routing_by_class: [layer] H(expert | image) in bits, and the same with
  // each position's tokens shuffled over all the test images (the chance level).
  std::vector<double> image_bits, chance_image_bits;
};

// top5 as figures are computed: NaN where 5 classes or fewer put every class in the top 5.
double top5_or_nan(double correct5, double images, int64_t classes);
// " top-5 0.8123" with the given separator before it, or "" when top5 is undefined (NaN).
std::string top5_text(double top5, const char* sep = " ");

// The largest multiple of slice_multiple (a routing group's images) at most
// batch_size, and at least one group: the batch evaluate runs.
int64_t eval_batch_size(int64_t batch_size, int64_t slice_multiple);

EvalResult evaluate(models::Classifier& model, const data::ImageSet& set,
                    const std::vector<float>& mean, const std::vector<float>& std,
                    int64_t batch_size, const c10::Device& device, std::ostream* progress = nullptr,
                    bool interactive = false, bool routing_by_class = false, bool sigmoid_tags = false,
                    const std::function<bool()>& stop = {});

// The same, with the batches split over data-parallel replicas (one thread each),
// in slices of whole routing groups (slice_multiple images). The batch size is
// eval_batch_size's, so that every batch holds whole groups.
class Replicas;
EvalResult evaluate(Replicas& reps, const data::ImageSet& set, const std::vector<float>& mean,
                    const std::vector<float>& std, int64_t batch_size, const c10::Device& device,
                    std::ostream* progress = nullptr, bool interactive = false,
                    bool routing_by_class = false, int64_t slice_multiple = 1, bool sigmoid_tags = false,
                    const std::function<bool()>& stop = {});

// Sets K, capacity, BPR, router kind or droplessness of every MoE layer (the
// model keeps E). Unset values leave that setting as it is; bad values, and a
// capacity on a dropless layer or BPR on expert choice, are moev::Errors.
struct RouterOverrides {
  std::optional<int64_t> k;            // experts per token
  std::optional<double> capacity;      // capacity ratio C
  std::optional<bool> bpr;             // Batch Priority Routing
  std::optional<std::string> kind;     // topk | expert_choice
  std::optional<bool> dropless;        // no capacity limit
  bool any() const { return k || capacity || bpr || kind || dropless; }
};
// Returns the number of MoE layers changed (0 for a model without any).
size_t apply_router_overrides(models::Classifier& model, const RouterOverrides& o);

// Makes every MoE layer route each image independently of the others in its
// batch, for `moev predict`: top-K layers without a capacity limit (each
// token then goes to its own top K, whatever shares its group; a capacity
// sized for one image's tokens dropped ~3x the assignments that groups of 8
// drop), expert-choice layers in groups of one image. Returns the layers changed.
size_t route_each_image_alone(models::Classifier& model);

}  // namespace moev::train
