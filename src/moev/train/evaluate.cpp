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
                    bool interactive, bool routing_by_class) {
  const bool was_training = model.is_training();
  model.eval();
  c10::InferenceMode guard;
  auto layers = moe::find_moe_layers(model);
  EvalResult r;
  for (const auto& item : model.named_modules("", /*include_self=*/false))
    if (std::dynamic_pointer_cast<moe::MoELayerImpl>(item.value())) r.layer_names.push_back(item.key());
  const int64_t classes = set.num_classes();
  std::vector<torch::Tensor> by_class(layers.size());
  std::vector<bool> kept(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    kept[l] = layers[l]->options.keep_routing();
    if (routing_by_class) layers[l]->options.keep_routing(true);
  }
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
      if (routing_by_class) {
        const auto& rr = layers[l]->last_routing();
        const int64_t E = static_cast<int64_t>(rr.offsets.size()) - 1, placed = rr.offsets[E];
        const int64_t tokens_per_image = rr.combine_gates.size(0) / b;
        std::vector<int64_t> sizes(E);
        for (int64_t e = 0; e < E; ++e) sizes[e] = rr.offsets[e + 1] - rr.offsets[e];
        auto expert = torch::repeat_interleave(torch::arange(E, torch::kLong),
                                               torch::tensor(sizes, torch::kLong));
        auto token = rr.token_index.narrow(0, 0, placed).cpu();
        auto label = y.cpu().index_select(0, token.div(tokens_per_image, "floor"));
        auto counts = torch::bincount(expert * classes + label, {}, E * classes).view({E, classes});
        by_class[l] = by_class[l].defined() ? by_class[l] + counts : counts;
      }
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
    layers[l]->options.keep_routing(kept[l]);
    if (by_class[l].defined()) {
      auto c = by_class[l].contiguous();
      auto& out = r.class_counts.emplace_back();
      for (int64_t e = 0; e < c.size(0); ++e)
        out.emplace_back(c[e].data_ptr<int64_t>(), c[e].data_ptr<int64_t>() + classes);
    }
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
