#include "moev/train/adamw.h"

#include <cmath>

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
    slots_.push_back({name, p, torch::zeros_like(p), torch::zeros_like(p), decay});
  }
}

void AdamW::zero_grad() {
  for (auto& s : slots_)
    if (s.param.grad().defined()) s.param.mutable_grad().zero_();
}

void AdamW::step(double lr) {
  torch::NoGradGuard no_grad;
  ++steps_;
  const double b1 = options_.beta1, b2 = options_.beta2;
  const double bc1 = 1 - std::pow(b1, double(steps_)), bc2 = 1 - std::pow(b2, double(steps_));
  const double step_size = lr / bc1, inv_sqrt_bc2 = 1.0 / std::sqrt(bc2);
  for (auto& s : slots_) {
    const auto& g = s.param.grad();
    if (!g.defined()) continue;
    s.exp_avg.mul_(b1).add_(g, 1 - b1);
    s.exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2);
    if (s.decay && options_.weight_decay > 0) s.param.mul_(1 - lr * options_.weight_decay);
    auto denom = (s.exp_avg_sq.sqrt() * inv_sqrt_bc2).add_(options_.eps);
    s.param.addcdiv_(s.exp_avg, denom, -step_size);
  }
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
