// An exponential moving average of a model's weights during training (Polyak
// averaging; the "model EMA" of ConvNeXt's recipe, Liu et al. 2022, decay 0.9999
// at ImageNet scale). The average is what eval, predict and distillation use;
// the raw weights keep training and are what a resumed run continues from, so
// the checkpoint holds both.
//
// Not a second model: the averages are plain tensors keyed like
// module_tensors(), swapped into the live model only while it is evaluated.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

namespace moev::train {

class WeightAverage {
 public:
  // decay in (0, 1): the weight of the old average at each step.
  WeightAverage(torch::nn::Module& model, double decay);

  // The decay after optimizer step `step` (0-based): min(decay, (1 + step) / (10
  // + step)), so the first steps' random weights fade out of the average fast.
  double decay_at(int64_t step) const;
  // Folds the model's current weights into the average, after optimizer step `step`.
  // Floating-point tensors are averaged; integer buffers (counters) are copied.
  void update(int64_t step);

  // The averaged tensors, named as module_tensors(model).
  const std::map<std::string, at::Tensor>& tensors() const { return avg_; }
  // Restores an average saved from a model of the same architecture.
  void load(const std::map<std::string, at::Tensor>& t, const std::string& source);

  // Runs fn with the model's weights replaced by the average, then puts the
  // training weights back (also when fn throws).
  void with_average(const std::function<void()>& fn);

 private:
  std::map<std::string, at::Tensor> live_;  // the model's tensors (shared storage)
  std::map<std::string, at::Tensor> avg_;
  double decay_;
};

}  // namespace moev::train
