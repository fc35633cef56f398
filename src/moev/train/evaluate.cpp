#include "moev/train/evaluate.h"

#include <chrono>

#include <torch/torch.h>

#include "moev/data/batch_loader.h"
#include "moev/moe/moe_layer.h"
#include "moev/viz/progress_bar.h"

namespace moev::train {

EvalResult evaluate(models::Classifier& model, const data::ImageSet& set,
                    const std::vector<float>& mean, const std::vector<float>& std,
                    int64_t batch_size, const c10::Device& device, std::ostream* progress,
                    bool interactive) {
  const bool was_training = model.is_training();
  model.eval();
  c10::InferenceMode guard;
  auto layers = moe::find_moe_layers(model);
  EvalResult r;
  r.expert_load.assign(layers.size(), {});
  r.dropped.assign(layers.size(), 0.0);
  std::vector<std::vector<int64_t>> counts(layers.size());
  const int64_t n = set.size();
  int64_t correct1 = 0, correct5 = 0, batches = 0;
  double loss_sum = 0;
  viz::ProgressBar bar(progress, n, "eval", "img", interactive);
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < n; i += batch_size) {
    const int64_t b = std::min(batch_size, n - i);
    auto x = data::normalize_images(set.images.narrow(0, i, b), mean, std).to(device);
    auto y = set.labels.narrow(0, i, b).to(device);
    auto logits = model.forward(x);
    loss_sum += torch::cross_entropy_loss(logits, y).item<double>() * double(b);
    const int64_t k5 = std::min<int64_t>(5, logits.size(1));
    auto top = std::get<1>(logits.topk(k5, -1));
    auto hit = top.eq(y.unsqueeze(1));
    correct1 += hit.select(1, 0).sum().item<int64_t>();
    correct5 += hit.any(1).sum().item<int64_t>();
    for (size_t l = 0; l < layers.size(); ++l) {
      const auto& s = layers[l]->last_stats();
      if (counts[l].empty()) counts[l].assign(s.expert_count.size(), 0);
      for (size_t e = 0; e < s.expert_count.size(); ++e) counts[l][e] += s.expert_count[e];
      r.dropped[l] += s.dropped_fraction * double(b);
    }
    ++batches;
    bar.update(i + b);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  bar.finish();
  r.images = n;
  r.top1 = n ? double(correct1) / double(n) : 0;
  r.top5 = n ? double(correct5) / double(n) : 0;
  r.loss = n ? loss_sum / double(n) : 0;
  r.images_per_s = secs > 0 ? double(n) / secs : 0;
  for (size_t l = 0; l < layers.size(); ++l) {
    int64_t total = 0;
    for (auto c : counts[l]) total += c;
    for (auto c : counts[l]) r.expert_load[l].push_back(total ? double(c) / double(total) : 0);
    r.dropped[l] = n ? r.dropped[l] / double(n) : 0;
  }
  model.train(was_training);
  return r;
}

void apply_router_overrides(models::Classifier& model, const RouterOverrides& o) {
  for (auto& layer : moe::find_moe_layers(model)) {
    auto cfg = layer->router_config();
    if (o.k) cfg.k = *o.k;
    if (o.capacity) cfg.capacity_factor = *o.capacity;
    if (o.bpr) cfg.bpr = *o.bpr;
    if (o.kind) cfg.kind = moe::parse_router_kind(*o.kind);
    layer->set_router(cfg);
  }
}

}  // namespace moev::train
