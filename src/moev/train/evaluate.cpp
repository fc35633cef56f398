#include "moev/train/evaluate.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <limits>

#include <torch/torch.h>

#include "moev/analysis/routing_report.h"
#include "moev/core/keyed_permutation.h"
#include "moev/data/batch_loader.h"
#include "moev/moe/moe_layer.h"
#include "moev/train/multilabel.h"
#include "moev/train/replicas.h"
#include "moev/viz/progress_bar.h"

namespace moev::train {

namespace {

// What one replica saw of the batches it evaluated; merged at the end.
struct Tally {
  double loss_sum = 0;
  int64_t correct1 = 0, correct5 = 0;
  std::vector<std::vector<int64_t>> counts;  // [layer][expert] placed assignments
  std::vector<double> dropped;               // [layer] sum of dropped fraction x images
  std::vector<double> unrouted;              // [layer] sum of unrouted fraction x images
  std::vector<torch::Tensor> by_class;       // [layer] [E, classes]
  std::vector<torch::Tensor> gate_by_class;  // [layer] [E, classes] double: summed routing weights
  std::vector<torch::Tensor> class_tokens;   // [layer] [classes] double: tokens per class
  std::vector<analysis::ImageSpread> spread;  // [layer] per-image spread
  std::vector<std::vector<int32_t>> dealt;     // [layer] [images x E]: placed assignments of the tokens dealt to each
};

void accumulate(torch::Tensor& sum, const torch::Tensor& add) { sum = sum.defined() ? sum + add : add; }

// [E, b] int64 counts -> [expert][image]
analysis::Counts to_counts(const at::Tensor& c) {
  const auto a = c.contiguous();
  analysis::Counts out(a.size(0));
  for (int64_t e = 0; e < a.size(0); ++e) out[e].assign(a[e].data_ptr<int64_t>(), a[e].data_ptr<int64_t>() + a.size(1));
  return out;
}

// x: [b, C, H, W], y: [b], tags: [b, T] (multi-label sets; else undefined); the slice's images are
// first_image.. of the test set's `images` -> accumulated into t; returns the logits [b, L].
at::Tensor eval_slice(models::Classifier& model, const std::vector<moe::MoELayer>& layers,
                      const at::Tensor& x, const at::Tensor& y, const at::Tensor& tags, bool sigmoid_tags,
                      int64_t classes, bool routing_by_class, int64_t first_image, int64_t images, Tally& t) {
  const int64_t b = x.size(0);
  auto logits = model.forward(x);
  const int64_t k5 = std::min<int64_t>(5, logits.size(1));
  auto top = std::get<1>(logits.topk(k5, -1));
  at::Tensor hit;  // [b, k5]: is the r-th ranked class a right answer
  if (tags.defined()) {
    t.loss_sum += (sigmoid_tags ? sigmoid_bce(logits, tags) : softmax_over_tags(logits, tags)).item<double>() * double(b);
    hit = tags.gather(1, top).gt(0.5);
  } else {
    t.loss_sum += torch::cross_entropy_loss(logits, y).item<double>() * double(b);
    hit = top.eq(y.unsqueeze(1));
  }
  t.correct1 += hit.select(1, 0).sum().item<int64_t>();
  t.correct5 += hit.any(1).sum().item<int64_t>();
  t.counts.resize(layers.size());
  t.dropped.resize(layers.size(), 0.0);
  t.unrouted.resize(layers.size(), 0.0);
  t.by_class.resize(layers.size());
  t.gate_by_class.resize(layers.size());
  t.class_tokens.resize(layers.size());
  t.spread.resize(layers.size());
  t.dealt.resize(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& s = layers[l]->last_stats();
    if (t.counts[l].empty()) t.counts[l].assign(s.expert_count.size(), 0);
    for (size_t e = 0; e < s.expert_count.size(); ++e) t.counts[l][e] += s.expert_count[e];
    t.dropped[l] += s.dropped_fraction * double(b);
    t.unrouted[l] += s.unrouted_fraction * double(b);
    if (!routing_by_class) continue;
    const auto& rr = layers[l]->last_routing();
    const int64_t E = static_cast<int64_t>(rr.offsets.size()) - 1, placed = rr.offsets[E];
    const int64_t tokens_per_image = rr.combine_gates.size(0) / b;
    std::vector<int64_t> sizes(E);
    for (int64_t e = 0; e < E; ++e) sizes[e] = rr.offsets[e + 1] - rr.offsets[e];
    auto expert = torch::repeat_interleave(torch::arange(E, torch::kLong), torch::tensor(sizes, torch::kLong));
    auto token = rr.token_index.narrow(0, 0, placed).cpu();
    auto image = token.div(tokens_per_image, "floor");
    auto label = y.cpu().index_select(0, image);
    auto counts = torch::bincount(expert * classes + label, {}, E * classes).view({E, classes});
    accumulate(t.by_class[l], counts);
    auto gates = rr.combine_gates.reshape(-1).index_select(0, rr.gate_index.narrow(0, 0, placed)).cpu().to(torch::kDouble);
    auto gate_sums = torch::zeros({E * classes}, torch::kDouble).index_add_(0, expert * classes + label, gates);
    auto tokens = torch::bincount(y.cpu(), {}, classes).to(torch::kDouble) * double(tokens_per_image);
    accumulate(t.gate_by_class[l], gate_sums.view({E, classes}));
    accumulate(t.class_tokens[l], tokens);
    t.spread[l].add(to_counts(torch::bincount(expert * b + image, {}, E * b).view({E, b})));
    // The chance level: each position's tokens dealt to all the test images at
    // random (a fixed permutation per layer and position). Whole tokens move (a
    // token's K assignments go to K different experts) and each keeps its
    // position: routing that follows position alone spreads every image over the
    // same experts, and a shuffle across positions would count that as
    // image-specific. Dealt within each batch, the figure moved with the batch
    // size (a tiny ConvNeXt-MoE: 7.31 experts at --batch-size 8, 7.51 at 1000).
    auto& dealt = t.dealt[l];
    if (dealt.empty()) dealt.assign(static_cast<size_t>(images * E), 0);
    const auto tok = token.contiguous(), ex = expert.contiguous();
    const int64_t* tp = tok.data_ptr<int64_t>();
    const int64_t* ep = ex.data_ptr<int64_t>();
    // A token's K assignments share its deal: computed once per token (the placed list is in expert order).
    std::vector<int64_t> dealt_to(static_cast<size_t>(b * tokens_per_image), -1);
    for (int64_t a = 0; a < placed; ++a) {
      int64_t& to = dealt_to[static_cast<size_t>(tp[a])];
      if (to < 0) {
        const int64_t p = tp[a] % tokens_per_image;
        to = core::KeyedPermutation(images, (static_cast<uint64_t>(l) << 32) + static_cast<uint64_t>(p))(
            first_image + tp[a] / tokens_per_image);
      }
      ++dealt[static_cast<size_t>(to * E + ep[a])];
    }
  }
  return logits;
}

}  // namespace

double top5_or_nan(double correct5, double images, int64_t classes) {
  if (classes <= 5) return std::numeric_limits<double>::quiet_NaN();
  return images > 0 ? correct5 / images : 0;
}

std::string top5_text(double top5, const char* sep) {
  if (std::isnan(top5)) return "";
  char buf[48];
  std::snprintf(buf, sizeof buf, "%stop-5 %.4f", sep, top5);
  return buf;
}

int64_t eval_batch_size(int64_t batch_size, int64_t slice_multiple) {
  const int64_t g = std::max<int64_t>(1, slice_multiple);
  return std::max(g, batch_size / g * g);
}

EvalResult evaluate(Replicas& reps, const data::ImageSet& set, const std::vector<float>& mean,
                    const std::vector<float>& std, int64_t batch_size, const c10::Device& device,
                    std::ostream* progress, bool interactive, bool routing_by_class,
                    int64_t slice_multiple, bool sigmoid_tags, const std::function<bool()>& stop) {
  auto& model = reps.model(0);
  const bool was_training = model.is_training();
  reps.train(false);
  c10::InferenceMode guard;
  const auto& layers = reps.moe_layers(0);
  EvalResult r;
  for (const auto& item : model.named_modules("", /*include_self=*/false))
    if (std::dynamic_pointer_cast<moe::MoELayerImpl>(item.value())) r.layer_names.push_back(item.key());
  const int64_t classes = set.num_classes();
  std::vector<bool> kept(layers.size());
  for (size_t l = 0; l < layers.size(); ++l) kept[l] = layers[l]->options.keep_routing();
  for (int k = 0; k < reps.size(); ++k)
    for (auto& layer : reps.moe_layers(k))
      if (routing_by_class) layer->options.keep_routing(true);
  // Routing groups of slice_multiple images: a batch that is not a multiple of it ends in a smaller group, whose
  // capacity drops other tokens, so the figures moved with --batch-size (13 against 16).
  batch_size = eval_batch_size(batch_size, slice_multiple);
  std::vector<Tally> tally(reps.size());
  const int64_t n = set.size();
  // Multi-label sets: every image's scores, for the ranking metrics at the end.
  const bool ml = set.multilabel();
  at::Tensor scores = ml ? torch::empty({n, set.targets.size(1)}) : at::Tensor();
  viz::ProgressBar bar(progress, n, "eval", "img", interactive);
  const auto t0 = std::chrono::steady_clock::now();
  int64_t done = 0;  // images evaluated: n unless stopped
  for (int64_t i = 0; i < n; i += batch_size) {
    if (stop && stop()) {
      r.stopped = true;
      break;
    }
    const int64_t b = std::min(batch_size, n - i);
    auto x = data::normalize_images(set.images.narrow(0, i, b), mean, std).to(device);
    auto y = set.labels.narrow(0, i, b).to(device);
    const auto sizes = reps.slice_sizes(b, slice_multiple);
    const auto xs = x.split_with_sizes(sizes), ys = y.split_with_sizes(sizes);
    const auto ts = ml ? set.targets.narrow(0, i, b).to(device).split_with_sizes(sizes) : std::vector<at::Tensor>{};
    const auto out = ml ? scores.narrow(0, i, b).split_with_sizes(sizes) : std::vector<at::Tensor>{};
    std::vector<int64_t> first(sizes.size(), i);  // each slice's first image
    for (size_t k = 1; k < sizes.size(); ++k) first[k] = first[k - 1] + sizes[k - 1];
    reps.run(static_cast<int>(sizes.size()), [&](int k) {
      auto logits = eval_slice(reps.model(k), reps.moe_layers(k), xs[k], ys[k], ml ? ts[k] : at::Tensor(),
                               sigmoid_tags, classes, routing_by_class, first[k], n, tally[k]);
      // Probabilities, not logits: AP ranks images by one tag's score, and a
      // softmax model's logits carry a per-image offset (a hard MoE's, one per expert).
      if (ml) out[k].copy_(sigmoid_tags ? torch::sigmoid(logits) : torch::softmax(logits, 1));
    });
    done = i + b;
    bar.update(done);
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  bar.finish();
  Tally all;
  all.counts.resize(layers.size());
  all.dropped.assign(layers.size(), 0.0);
  all.unrouted.assign(layers.size(), 0.0);
  all.by_class.resize(layers.size());
  all.gate_by_class.resize(layers.size());
  all.class_tokens.resize(layers.size());
  all.spread.resize(layers.size());
  all.dealt.resize(layers.size());
  for (const auto& t : tally) {
    all.loss_sum += t.loss_sum;
    all.correct1 += t.correct1;
    all.correct5 += t.correct5;
    for (size_t l = 0; l < t.counts.size(); ++l) {
      if (all.counts[l].empty()) all.counts[l].assign(t.counts[l].size(), 0);
      for (size_t e = 0; e < t.counts[l].size(); ++e) all.counts[l][e] += t.counts[l][e];
      all.dropped[l] += t.dropped[l];
      all.unrouted[l] += t.unrouted[l];
      if (t.by_class[l].defined()) {
        accumulate(all.by_class[l], t.by_class[l]);
        accumulate(all.gate_by_class[l], t.gate_by_class[l]);
        accumulate(all.class_tokens[l], t.class_tokens[l]);
      }
      if (l < t.spread.size()) all.spread[l].merge(t.spread[l]);
      if (l < t.dealt.size() && !t.dealt[l].empty()) {
        auto& d = all.dealt[l];
        if (d.empty()) d.assign(t.dealt[l].size(), 0);
        for (size_t j = 0; j < d.size(); ++j) d[j] += t.dealt[l][j];
      }
    }
  }
  r.images = done;
  r.top1 = done ? double(all.correct1) / double(done) : 0;
  r.top5 = top5_or_nan(double(all.correct5), double(done), classes);
  r.loss = done ? all.loss_sum / double(done) : 0;
  r.images_per_s = secs > 0 ? double(done) / secs : 0;
  if (ml && done > 0) {
    const auto targets = set.targets.narrow(0, 0, done);
    // k: the mean number of tags per image, rounded (3 for 2x2 mosaics of 10 classes).
    const auto k = std::max<int64_t>(1, std::llround(targets.sum().item<double>() / double(done)));
    const auto m = multilabel_metrics(scores.narrow(0, 0, done), targets, k);
    r.multilabel = true;
    r.precision_at_k = m.precision_at_k;
    r.recall_at_k = m.recall_at_k;
    r.mean_ap = m.mean_ap;
    r.k = k;
  }
  r.expert_load.assign(layers.size(), {});
  r.dropped.assign(layers.size(), 0.0);
  r.unrouted.assign(layers.size(), 0.0);
  for (size_t l = 0; l < layers.size(); ++l) {
    int64_t total = 0;
    for (auto c : all.counts[l]) total += c;
    for (auto c : all.counts[l]) r.expert_load[l].push_back(total ? double(c) / double(total) : 0);
    r.dropped[l] = done ? all.dropped[l] / double(done) : 0;
    r.unrouted[l] = done ? all.unrouted[l] / double(done) : 0;
    for (int k = 0; k < reps.size(); ++k) reps.moe_layers(k)[l]->options.keep_routing(kept[l]);
    if (all.by_class[l].defined()) {
      auto c = all.by_class[l].contiguous();
      r.image_bits.push_back(all.spread[l].mean_bits());
      analysis::ImageSpread chance;
      const auto& d = all.dealt[l];
      const int64_t E = c.size(0);
      if (!d.empty()) {  // [images][E] -> [E][images]
        analysis::Counts by_image(static_cast<size_t>(E), std::vector<int64_t>(static_cast<size_t>(n)));
        for (int64_t img = 0; img < n; ++img)
          for (int64_t e = 0; e < E; ++e) by_image[e][img] = d[static_cast<size_t>(img * E + e)];
        chance.add(by_image);
      }
      r.chance_image_bits.push_back(chance.mean_bits());
      auto& out = r.class_counts.emplace_back();
      for (int64_t e = 0; e < c.size(0); ++e)
        out.emplace_back(c[e].data_ptr<int64_t>(), c[e].data_ptr<int64_t>() + classes);
      auto g = all.gate_by_class[l].contiguous();
      auto& gout = r.class_gate_sums.emplace_back();
      for (int64_t e = 0; e < g.size(0); ++e)
        gout.emplace_back(g[e].data_ptr<double>(), g[e].data_ptr<double>() + classes);
      auto ct = all.class_tokens[l].contiguous();
      r.class_tokens.emplace_back(ct.data_ptr<double>(), ct.data_ptr<double>() + classes);
    }
  }
  reps.train(was_training);
  return r;
}

EvalResult evaluate(models::Classifier& model, const data::ImageSet& set,
                    const std::vector<float>& mean, const std::vector<float>& std,
                    int64_t batch_size, const c10::Device& device, std::ostream* progress,
                    bool interactive, bool routing_by_class, bool sigmoid_tags,
                    const std::function<bool()>& stop) {
  Replicas one(std::static_pointer_cast<models::Classifier>(model.shared_from_this()), {}, 1, 1);
  // One replica, one slice: the batch alone must hold whole routing groups.
  int64_t group = 1;
  for (const auto& layer : moe::find_moe_layers(model)) group = std::max(group, layer->router_config().group_size);
  return evaluate(one, set, mean, std, batch_size, device, progress, interactive, routing_by_class, group,
                  sigmoid_tags, stop);
}

size_t apply_router_overrides(models::Classifier& model, const RouterOverrides& o) {
  auto layers = moe::find_moe_layers(model);
  for (auto& layer : layers) {
    auto cfg = layer->router_config();
    // Named by the flag: the router's own check said "moe.k = 9", a key the user did not set.
    MOEV_CHECK(!o.k || (*o.k >= 1 && *o.k <= cfg.num_experts), "--k ", o.k ? *o.k : 0, ": expected 1 to the ",
               "model's moe.num_experts = ", cfg.num_experts);
    MOEV_CHECK(!o.capacity || (*o.capacity > 0 && std::isfinite(*o.capacity)), "--capacity ",
               o.capacity ? *o.capacity : 0.0, ": expected a capacity ratio > 0");
    if (o.k) cfg.k = *o.k;
    if (o.capacity) cfg.capacity_factor = *o.capacity;
    if (o.bpr) cfg.bpr = *o.bpr;
    if (o.kind) cfg.kind = moe::parse_router_kind(*o.kind);
    if (o.dropless) cfg.dropless = *o.dropless;
    // Settings the routing would ignore: named, not scored as if they applied.
    const bool expert_choice = cfg.kind == moe::RouterKind::kExpertChoice;  // always picks C tokens per expert
    MOEV_CHECK(!o.capacity || !cfg.dropless || expert_choice, "--capacity ", *o.capacity, ": this model routes ",
               "without a capacity limit (moe.dropless = true), so none would apply; add --dropless off to route it "
               "with one");
    MOEV_CHECK(!o.bpr || !*o.bpr || !cfg.dropless || expert_choice, "--bpr on: this model routes without a capacity ",
               "limit (moe.dropless = true), so no token is dropped and their priority changes nothing; add ",
               "--dropless off to route it with one");
    MOEV_CHECK(!o.dropless || !expert_choice, "--dropless: expert-choice routing always takes a capacity of tokens ",
               "per expert, dropless or not");
    MOEV_CHECK(!o.bpr || !*o.bpr || !expert_choice, "--bpr on: expert-choice routing ",
               "has no token priority to change (BPR orders the tokens of top-K routing)");
    // A top-K model's own BPR, dropless or renormalised gates mean nothing to the router it is switched to.
    if (expert_choice) cfg.bpr = cfg.dropless = cfg.renormalize = false;
    layer->set_router(cfg);
  }
  return layers.size();
}

size_t route_each_image_alone(models::Classifier& model) {
  auto layers = moe::find_moe_layers(model);
  for (auto& layer : layers) {
    auto cfg = layer->router_config();
    if (cfg.kind == moe::RouterKind::kExpertChoice) cfg.group_size = 1;  // experts pick among one image's tokens
    else cfg.dropless = true;
    layer->set_router(cfg);
  }
  return layers.size();
}

}  // namespace moev::train
