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
  for (auto& s : slots_)
    if (s.param.grad().defined()) s.param.mutable_grad().zero_();
}

double AdamW::step(double lr, double max_grad_norm) {
  torch::NoGradGuard no_grad;
  // Global gradient norm, accumulated in double in a fixed order so that a
  // resumed run clips exactly as an uninterrupted one.
  double sq = 0;
  for (auto& s : slots_) {
    const auto& g = s.param.grad();
    if (!g.defined()) continue;
    MOEV_CHECK(g.is_contiguous() && g.scalar_type() == at::kFloat && g.device().is_cpu(),
               "AdamW: ", s.name, ": expected a contiguous CPU float32 gradient");
    const float* gp = g.data_ptr<float>();
    for (int64_t i = 0, n = g.numel(); i < n; ++i) sq += double(gp[i]) * double(gp[i]);
  }
  const double norm = std::sqrt(sq);
  const float coef = (max_grad_norm > 0 && norm > max_grad_norm) ? float(max_grad_norm / (norm + 1e-6)) : 1.0f;

  ++steps_;
  const float b1 = float(options_.beta1), b2 = float(options_.beta2), eps = float(options_.eps);
  const double bc1 = 1 - std::pow(options_.beta1, double(steps_));
  const double bc2 = 1 - std::pow(options_.beta2, double(steps_));
  const float step_size = float(lr / bc1), inv_sqrt_bc2 = float(1.0 / std::sqrt(bc2));
  for (auto& s : slots_) {
    const auto& g = s.param.grad();
    if (!g.defined()) continue;
    const float decay = s.decay ? float(1.0 - lr * options_.weight_decay) : 1.0f;
    float* p = s.param.data_ptr<float>();
    float* m = s.exp_avg.data_ptr<float>();
    float* v = s.exp_avg_sq.data_ptr<float>();
    const float* gp = g.data_ptr<float>();
    // One fused pass per parameter: clip, moments, decay, update.
    at::parallel_for(0, g.numel(), 1 << 15, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const float gi = gp[i] * coef;
        m[i] = b1 * m[i] + (1 - b1) * gi;
        v[i] = b2 * v[i] + (1 - b2) * gi * gi;
        p[i] = p[i] * decay - step_size * m[i] / (std::sqrt(v[i]) * inv_sqrt_bc2 + eps);
      }
    });
  }
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
