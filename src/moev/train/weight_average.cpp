#include "moev/train/weight_average.h"

#include <algorithm>

#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/train/checkpoint.h"

namespace moev::train {

WeightAverage::WeightAverage(torch::nn::Module& model, double decay) : decay_(decay) {
  MOEV_CHECK(decay > 0 && decay < 1, "train.ema_decay = ", decay, ": expected in (0, 1), or 0 for no average");
  torch::NoGradGuard no_grad;
  live_ = module_tensors(model);
  for (const auto& [name, t] : live_) avg_[name] = t.detach().clone();
}

double WeightAverage::decay_at(int64_t step) const {
  return std::min(decay_, (1.0 + double(step)) / (10.0 + double(step)));
}

void WeightAverage::update(int64_t step) {
  torch::NoGradGuard no_grad;
  const double d = decay_at(step);
  for (auto& [name, a] : avg_) {
    const auto& w = live_.at(name);
    if (a.is_floating_point()) a.lerp_(w, 1.0 - d);
    else a.copy_(w);
  }
}

void WeightAverage::load(const std::map<std::string, at::Tensor>& t, const std::string& source) {
  torch::NoGradGuard no_grad;
  for (auto& [name, a] : avg_) {
    auto it = t.find(name);
    MOEV_CHECK(it != t.end(), source, ": weight average '", name, "' is missing (another architecture?)");
    MOEV_CHECK(it->second.sizes() == a.sizes(), source, ": weight average '", name, "' has shape ",
               it->second.sizes(), " but the model's tensor has ", a.sizes());
    a.copy_(it->second);
  }
  MOEV_CHECK(t.size() == avg_.size(), source, ": the weight average has ", t.size(), " tensors, the model ",
             avg_.size(), " (another architecture?)");
}

void WeightAverage::with_average(const std::function<void()>& fn) {
  std::map<std::string, at::Tensor> kept;
  {
    torch::NoGradGuard no_grad;
    for (auto& [name, w] : live_) {
      kept[name] = w.detach().clone();
      w.copy_(avg_.at(name));
    }
  }
  auto restore = [&] {
    torch::NoGradGuard no_grad;
    for (auto& [name, w] : live_) w.copy_(kept.at(name));
  };
  try {
    fn();
  } catch (...) {
    restore();
    throw;
  }
  restore();
}

}  // namespace moev::train
