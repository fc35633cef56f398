#include "moev/train/adamw.h"

#include <cmath>

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include "moev/core/error.h"

namespace moev::train {

AdamW::AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions options)
    : options_(options) {
  for (auto& [name, p] : params) {
    if (!p.requires_grad()) continue;
    // Matrices and expert stacks decay; biases, norm scales and position
    // embeddings do not (decaying them only fights the model).
    const bool decay = p.dim() >= 2 && name.find("pos_embed") == std::string::npos;
    MOEV_CHECK(p.is_contiguous() && p.scalar_type() == at::kFloat && p.device().is_cpu(),
               "AdamW: parameter ", name, " must be a contiguous CPU float32 tensor");
    slots_.push_back({name, p, torch::zeros_like(p), torch::zeros_like(p), decay});
  }
}

void AdamW::zero_grad() {
  for (auto& s : slots_) s.param.mutable_grad() = at::Tensor();
}

namespace {

// The gradient sources of one parameter: the master's and the replicas'.
struct Sources {
  std::vector<const float*> g;
  int64_t numel = 0;
};

// sum_i (sum_sources g[i])^2 over [begin, end), in double with 8 independent
// accumulators (one long dependency chain would be latency-bound).
double sum_squares(const Sources& s, int64_t begin, int64_t end) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const size_t n = s.g.size();
  int64_t i = begin;
  auto at = [&](int64_t k) {
    float v = s.g[0][k];
    for (size_t j = 1; j < n; ++j) v += s.g[j][k];
    return double(v);
  };
  for (; i + 8 <= end; i += 8)
    for (int u = 0; u < 8; ++u) {
      const double v = at(i + u);
      acc[u] += v * v;
    }
  for (; i < end; ++i) acc[0] += at(i) * at(i);
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

}  // namespace

double AdamW::step(double lr, double max_grad_norm, const std::vector<std::vector<at::Tensor>>& extra,
                   const Parallel& parallel, int parts) {
  torch::NoGradGuard no_grad;
  std::vector<Sources> src(slots_.size());
  std::vector<int64_t> start(slots_.size() + 1, 0);  // element offset of each slot
  for (size_t i = 0; i < slots_.size(); ++i) {
    auto add = [&](const at::Tensor& g) {
      if (!g.defined()) return;
      MOEV_CHECK(g.is_contiguous() && g.scalar_type() == at::kFloat && g.device().is_cpu() &&
                     g.numel() == slots_[i].param.numel(),
                 "AdamW: ", slots_[i].name, ": expected a contiguous CPU float32 gradient");
      src[i].g.push_back(g.data_ptr<float>());
    };
    add(slots_[i].param.grad());
    for (const auto& r : extra) {
      MOEV_CHECK(r.size() == slots_.size(), "AdamW: a replica has ", r.size(), " gradients for ",
                 slots_.size(), " parameters");
      add(r[i]);
    }
    src[i].numel = src[i].g.empty() ? 0 : slots_[i].param.numel();
    start[i + 1] = start[i] + src[i].numel;
  }
  const int64_t total = start.back();
  if (parts <= 0) parts = std::max(1, at::get_num_threads());
  parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(parts, total)));
  // Runs fn(slot, begin, end) over part t's run of the concatenated elements.
  auto for_run = [&](int t, const std::function<void(size_t, int64_t, int64_t)>& fn) {
    const int64_t lo = total * t / parts, hi = total * (t + 1) / parts;
    for (size_t i = 0; i < slots_.size(); ++i) {
      const int64_t b = std::max(lo, start[i]), e = std::min(hi, start[i + 1]);
      if (b < e) fn(i, b - start[i], e - start[i]);
    }
  };
  auto run = [&](const std::function<void(int)>& fn) {
    if (parallel) parallel(parts, fn);
    else at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) fn(static_cast<int>(t));
      });
  };

  // Global gradient norm: partial sums per run, added in run order, so the
  // result does not depend on which thread finished first.
  std::vector<double> partial(parts, 0.0);
  run([&](int t) {
    for_run(t, [&](size_t i, int64_t b, int64_t e) { partial[t] += sum_squares(src[i], b, e); });
  });
  double sq = 0;
  for (double p : partial) sq += p;
  const double norm = std::sqrt(sq);
  const float coef = (max_grad_norm > 0 && norm > max_grad_norm) ? float(max_grad_norm / (norm + 1e-6)) : 1.0f;

  ++steps_;
  const float b1 = float(options_.beta1), b2 = float(options_.beta2), eps = float(options_.eps);
  const double bc1 = 1 - std::pow(options_.beta1, double(steps_));
  const double bc2 = 1 - std::pow(options_.beta2, double(steps_));
  const float step_size = float(lr / bc1), inv_sqrt_bc2 = float(1.0 / std::sqrt(bc2));
  // One fused pass per element: sum of sources, clip, moments, decay, update.
  run([&](int t) {
    for_run(t, [&](size_t i, int64_t b, int64_t e) {
      auto& s = slots_[i];
      const float decay = s.decay ? float(1.0 - lr * options_.weight_decay) : 1.0f;
      float* p = s.param.data_ptr<float>();
      float* m = s.exp_avg.data_ptr<float>();
      float* v = s.exp_avg_sq.data_ptr<float>();
      const auto& g = src[i].g;
      const float* g0 = g[0];
      const float* g1 = g.size() > 1 ? g[1] : nullptr;
      auto pass = [&](auto grad_at) {  // inlined per source count, so it vectorises
        for (int64_t k = b; k < e; ++k) {
          const float gk = grad_at(k) * coef;
          m[k] = b1 * m[k] + (1 - b1) * gk;
          v[k] = b2 * v[k] + (1 - b2) * gk * gk;
          p[k] = p[k] * decay - step_size * m[k] / (std::sqrt(v[k]) * inv_sqrt_bc2 + eps);
        }
      };
      if (g.size() == 1) pass([&](int64_t k) { return g0[k]; });
      else if (g.size() == 2) pass([&](int64_t k) { return g0[k] + g1[k]; });
      else pass([&](int64_t k) {
          float x = g0[k];
          for (size_t j = 1; j < g.size(); ++j) x += g[j][k];
          return x;
        });
    });
  });
  // The loop above wrote through raw pointers: tell readers that cache
  // something derived from a parameter (the experts' inference copies) that it
  // changed, as an in-place LibTorch op would.
  for (auto& s : slots_) s.param.unsafeGetTensorImpl()->bump_version();
  return norm;
}

std::map<std::string, at::Tensor> AdamW::state() const {
  std::map<std::string, at::Tensor> out;
  for (const auto& s : slots_) {
    out[s.name + ".exp_avg"] = s.exp_avg;
    out[s.name + ".exp_avg_sq"] = s.exp_avg_sq;
  }
  out["step"] = torch::tensor(steps_, torch::kLong);
  return out;
}

void AdamW::load_state(const std::map<std::string, at::Tensor>& state, const std::string& source) {
  torch::NoGradGuard no_grad;
  auto get = [&](const std::string& key, const at::Tensor& like) {
    auto it = state.find(key);
    MOEV_CHECK(it != state.end(), source, ": optimizer state has no tensor '", key, "'");
    MOEV_CHECK(it->second.sizes() == like.sizes(), source, ": optimizer tensor '", key,
               "' has shape ", it->second.sizes(), ", expected ", like.sizes());
    return it->second;
  };
  for (auto& s : slots_) {
    s.exp_avg.copy_(get(s.name + ".exp_avg", s.exp_avg));
    s.exp_avg_sq.copy_(get(s.name + ".exp_avg_sq", s.exp_avg_sq));
  }
  auto it = state.find("step");
  MOEV_CHECK(it != state.end(), source, ": optimizer state has no 'step'");
  steps_ = it->second.item<int64_t>();
}

}  // namespace moev::train
