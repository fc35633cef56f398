// What every moev image classifier is to the trainer, evaluator and CLI: a module
// mapping normalised images to class logits. MoE layers inside it are found with
// moe::find_moe_layers, so the trainer needs no per-model code for them.
#pragma once

#include <memory>

#include <torch/nn/module.h>

namespace moev::models {

class Classifier : public torch::nn::Module {
 public:
  // images: [B, C, H, W] -> logits: [B, L]
  virtual at::Tensor forward(const at::Tensor& images) = 0;
};

using ClassifierPtr = std::shared_ptr<Classifier>;

}  // namespace moev::models
