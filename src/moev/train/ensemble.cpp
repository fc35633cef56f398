#include "moev/train/ensemble.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/data/batch_loader.h"
#include "moev/train/datasets.h"
#include "moev/train/teacher.h"
#include "moev/train/trained_model.h"
#include "moev/viz/progress_bar.h"

namespace moev::train {

using nlohmann::json;

TtaOptions tta_as_trained(const DataConfig& data, const std::string& family) {
  TtaOptions t;
  t.enabled = true;
  t.shift = data.augment ? std::min(t.shift, data.crop_padding) : 0;
  t.flip = data.augment && data.hflip;
  if (family == "vit") t.scale = 0;
  return t;
}

at::Tensor predict_probs(models::Classifier& model, const at::Tensor& u8, const std::vector<float>& mean,
                         const std::vector<float>& std, const TtaOptions& tta) {
  torch::NoGradGuard ng;
  auto x = data::normalize_images(u8, mean, std);
  if (!tta.enabled) return torch::softmax(model.forward(x), 1);
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3), s = tta.shift;
  // The value a black pixel normalises to: what the training crops padded with.
  std::vector<float> black;
  for (int64_t c = 0; c < C; ++c) black.push_back(-mean[c] / std[c]);
  auto bg = torch::tensor(black).view({1, C, 1, 1});
  auto padded = torch::constant_pad_nd(x - bg, {s, s, s, s}) + bg;
  std::vector<at::Tensor> views;
  const int64_t offsets[5][2] = {{0, 0}, {-s, -s}, {-s, s}, {s, -s}, {s, s}};
  for (const auto& o : offsets) {
    if (s == 0 && (o[0] || o[1])) continue;
    views.push_back(padded.narrow(2, s + o[0], H).narrow(3, s + o[1], W));
  }
  if (tta.scale > 0 && tta.scale != 1) {
    const auto side = [&](int64_t n) { return static_cast<int64_t>(std::lround(double(n) * tta.scale)); };
    views.push_back(torch::nn::functional::interpolate(
        x, torch::nn::functional::InterpolateFuncOptions()
               .size(std::vector<int64_t>{side(H), side(W)})
               .mode(torch::kBilinear)
               .align_corners(false)));
  }
  at::Tensor sum;
  int64_t n = 0;
  for (const auto& v : views) {
    for (int f = 0; f < (tta.flip ? 2 : 1); ++f) {
      auto p = torch::softmax(model.forward(f ? v.flip(3).contiguous() : v.contiguous()), 1);
      sum = sum.defined() ? sum + p : p;
      ++n;
    }
  }
  return sum / double(n);
}

EnsembleConfig parse_ensemble(const json& s, const std::string& source) {
  EnsembleConfig e;
  MOEV_CHECK(s.is_object(), source, ": [ensemble] must be a table");
  std::vector<double> weights;
  for (auto it = s.begin(); it != s.end(); ++it) {
    const auto& k = it.key();
    const auto& v = *it;
    if (k == "members") {
      MOEV_CHECK(v.is_array() && !v.empty(), source, ": ensemble.members: expected a non-empty list of checkpoints");
      for (const auto& m : v) {
        MOEV_CHECK(m.is_string(), source, ": ensemble.members: expected checkpoint paths, got ", m.dump());
        e.members.push_back({m.get<std::string>(), 1.0});
      }
    } else if (k == "weights") {
      MOEV_CHECK(v.is_array(), source, ": ensemble.weights: expected a list of numbers");
      for (const auto& w : v) {
        MOEV_CHECK(w.is_number() && w.get<double>() >= 0 && std::isfinite(w.get<double>()), source,
                   ": ensemble.weights: expected finite numbers >= 0, got ",
                   w.dump());
        weights.push_back(w.get<double>());
      }
    } else if (k == "tta" || k == "tta_flip" || k == "other_data") {
      MOEV_CHECK(v.is_boolean(), source, ": ensemble.", k, ": expected true or false");
      if (k == "tta_flip") e.tta_flip = v.get<bool>();
      else (k == "tta" ? e.tta : e.other_data) = v.get<bool>();
    } else if (k == "tta_shift") {
      MOEV_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0, source, ": ensemble.tta_shift: expected an integer >= 0");
      e.tta_shift = v.get<int64_t>();
    } else if (k == "tta_scale") {
      MOEV_CHECK(v.is_number() && v.get<double>() >= 0, source, ": ensemble.tta_scale: expected a number >= 0");
      e.tta_scale = v.get<double>();
    } else {
      fail(source, ": ensemble.", k, " is not a key (members, weights, tta, tta_shift, tta_flip, tta_scale, other_data)");
    }
  }
  MOEV_CHECK(!e.members.empty(), source, ": [ensemble] needs members = [checkpoint, ...]");
  // The views' keys without tta = true were passed over without a word.
  for (const char* k : {"tta_shift", "tta_flip", "tta_scale"})
    MOEV_CHECK(e.tta || !s.contains(k), source, ": ensemble.", k, " without tta = true: the members are scored on ",
               "the image alone; add tta = true, or drop ", k);
  if (weights.empty()) weights.assign(e.members.size(), 1.0);
  {
    MOEV_CHECK(weights.size() == e.members.size(), source, ": ensemble.weights has ", weights.size(),
               " numbers for ", e.members.size(), " members");
    // Each member's share of the mix, scaled by the largest weight first: the
    // sum of [1e308, 1e308] overflowed to inf and every member then weighed 0.
    const double largest = *std::max_element(weights.begin(), weights.end());
    MOEV_CHECK(largest > 0, source, ": ensemble.weights are all 0");
    double total = 0;
    for (double w : weights) total += w / largest;
    for (size_t i = 0; i < weights.size(); ++i) e.members[i].weight = weights[i] / largest / total;
  }
  return e;
}

EvalResult score_probs(const at::Tensor& probs, const at::Tensor& labels) {
  EvalResult r;
  r.images = labels.size(0);
  if (r.images == 0) return r;
  auto y = labels.view({-1, 1});
  const int64_t k = std::min<int64_t>(5, probs.size(1));
  auto top = std::get<1>(probs.topk(k, 1));
  r.top1 = top.narrow(1, 0, 1).eq(y).sum().item<double>() / double(r.images);
  r.top5 = top5_or_nan(top.eq(y).any(1).sum().item<double>(), double(r.images), probs.size(1));
  r.loss = -probs.gather(1, y).clamp_min(1e-12).log().mean().item<double>();
  return r;
}

EnsembleResult evaluate_ensemble(const EnsembleConfig& cfg, std::optional<int64_t> test_limit, int64_t batch_size,
                                 std::ostream* progress, bool interactive) {
  MOEV_CHECK(!cfg.members.empty(), "ensemble: no members");
  MOEV_CHECK(batch_size >= 1, "ensemble: batch size ", batch_size, ": expected >= 1");
  std::vector<TrainedModel> models;
  for (const auto& m : cfg.members) {
    models.push_back(load_trained(m.checkpoint, c10::Device(c10::kCPU)));
    if (progress && !models.back().unfinished.empty()) *progress << "note: " << models.back().unfinished << "\n";
    const auto& a = models.front().cfg.model;
    const auto& b = models.back().cfg.model;
    MOEV_CHECK(a.image_size == b.image_size && a.channels == b.channels && a.num_classes == b.num_classes,
               "ensemble: ", m.checkpoint, " takes ", b.channels, "x", b.image_size, " images into ", b.num_classes,
               " classes, but ", cfg.members.front().checkpoint, " ", a.channels, "x", a.image_size, " into ",
               a.num_classes);
    MOEV_CHECK(!cfg.tta || !cfg.tta_scale || *cfg.tta_scale == 0 || *cfg.tta_scale == 1 || b.family != "vit",
               "ensemble: ", m.checkpoint, " is a ViT (fixed token grid): tta_scale = ", cfg.tta_scale.value_or(0),
               " cannot resize its input; set tta_scale = 0, or leave it out");
    const auto diff = test_data_difference(models.front().cfg.data, models.back().cfg.data);
    MOEV_CHECK(cfg.other_data || diff.empty(), "ensemble: ", m.checkpoint, " comes from a run with another test set ",
               "than ", cfg.members.front().checkpoint, " (", diff, "); the ensemble is scored on the first member's, ",
               "so every member should come from runs on the same data. Set other_data = true in [ensemble] if ",
               "these are the same images");
  }
  MOEV_CHECK(!test_limit || *test_limit >= 0, "ensemble: test image limit ", test_limit.value_or(0),
             ": expected >= 0 (0: all)");
  auto data = models.front().cfg.data;
  if (test_limit) data.test_limit = *test_limit;
  auto ds = open_test_set(models.front(), data, cfg.members.front().checkpoint);
  // Scored as top-1 against each image's first tag, a tagged set read as 0.16 where eval gave precision@1 0.56.
  MOEV_CHECK(!ds.test.multilabel(), "ensemble: ", cfg.members.front().checkpoint, " was trained on tagged images (",
             ds.test.source, "), and ensembles and test-time augmentation score single-label test sets only; ",
             "evaluate it with moev eval, without --tta");
  // Views past the image: a shift of half a side shows mostly padding (top-1 0.46 -> 0.11 at 28 pixels), and
  // a scale of 1000 asked for 627 GB.
  const int64_t side = models.front().cfg.model.image_size;
  MOEV_CHECK(!cfg.tta || !cfg.tta_shift || 4 * *cfg.tta_shift <= side, "ensemble.tta_shift = ",
             cfg.tta_shift.value_or(0), ": expected at most a quarter of the ", side, "-pixel image (", side / 4, ")");
  MOEV_CHECK(!cfg.tta || !cfg.tta_scale || *cfg.tta_scale == 0 || (*cfg.tta_scale >= 0.5 && *cfg.tta_scale <= 2),
             "ensemble.tta_scale = ", cfg.tta_scale.value_or(0), ": expected 0 (no resized view) or 0.5..2");
  // The probabilities are mixed class by class: a member that lists the classes in another order (one trained
  // on a folder, another on the IDX files) has its columns put in the test set's order.
  std::vector<at::Tensor> columns(models.size());  // undefined: in order already
  for (size_t m = 1; m < models.size(); ++m) {
    const auto& names = models[m].class_names;
    if (!models[m].class_names_stored || ds.test.multilabel() || names == ds.test.class_names) continue;
    std::vector<int64_t> at(ds.test.class_names.size());
    for (size_t c = 0; c < at.size(); ++c) {
      const auto it = find_class(names, ds.test.class_names[c], "ensemble: " + cfg.members[m].checkpoint,
                                 "the test set of " + cfg.members.front().checkpoint);
      MOEV_CHECK(it != names.end(), "ensemble: ", cfg.members[m].checkpoint, " has no class '",
                 ds.test.class_names[c], "', which ", cfg.members.front().checkpoint, " and its test set have; ",
                 "expected members trained on the same classes");
      at[c] = static_cast<int64_t>(it - names.begin());
    }
    columns[m] = torch::tensor(at, torch::kLong);
  }
  const int64_t N = ds.test.size(), L = models.front().cfg.model.num_classes;
  std::vector<at::Tensor> probs(models.size());
  for (auto& p : probs) p = torch::empty({N, L});
  viz::ProgressBar bar(progress, N * static_cast<int64_t>(models.size()), "ensemble", "img", interactive);
  int64_t done = 0;
  EnsembleResult res;
  for (const auto& m : models) res.unfinished.push_back(m.unfinished);
  for (size_t m = 0; m < models.size(); ++m) {
    TtaOptions tta = tta_as_trained(models[m].cfg.data, models[m].cfg.model.family);
    tta.enabled = cfg.tta;
    if (cfg.tta_shift) tta.shift = *cfg.tta_shift;
    if (cfg.tta_flip) tta.flip = *cfg.tta_flip;
    if (cfg.tta_scale) tta.scale = *cfg.tta_scale;
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < N; i += batch_size) {
      const int64_t b = std::min(batch_size, N - i);
      auto p = predict_probs(*models[m].model, ds.test.images.narrow(0, i, b), models[m].cfg.data.mean,
                             models[m].cfg.data.std, tta);
      probs[m].narrow(0, i, b).copy_(columns[m].defined() ? p.index_select(1, columns[m]) : p);
      done += b;
      bar.update(done, cfg.members[m].checkpoint);
    }
    res.members.push_back(score_probs(probs[m], ds.test.labels));
    res.members.back().images_per_s =
        double(N) / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  bar.finish();
  double total = 0;
  for (const auto& m : cfg.members) total += m.weight;
  auto mix = torch::zeros({N, L});
  for (size_t m = 0; m < models.size(); ++m) mix += probs[m] * (cfg.members[m].weight / total);
  res.ensemble = score_probs(mix, ds.test.labels);
  return res;
}

}  // namespace moev::train
