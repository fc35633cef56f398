// What every moev image classifier is to the trainer, evaluator and CLI: a module
// mapping normalised images to class logits. MoE layers inside it are found with
// moe::find_moe_layers, so the trainer needs no per-model code for them.
// Multi-branch models (Sun et al.'s N expert branches on a shared trunk) also
// show the trainer each branch's logits and embedding, for the per-branch losses
// and the diversity loss; to everyone else they are one classifier. Each model
// also names its decoding layer and the embedding it reads (the hard MoE's
// gater features and shared decoder).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/nn/module.h>

#include "moev/core/error.h"

namespace moev::models {

struct BranchOutputs {
  std::vector<at::Tensor> logits;      // N x [B, L]
  std::vector<at::Tensor> embeddings;  // N x [B, F] (empty for single-branch models)
};

class Classifier : public torch::nn::Module {
 public:
  // images: [B, C, H, W] -> logits: [B, L]
  virtual at::Tensor forward(const at::Tensor& images) = 0;

  // images: [B, C, H, W] -> embedding: [B, F], what the decoding layer reads:
  // a hard MoE's gater clusters it, and its experts share that layer.
  virtual at::Tensor embed(const at::Tensor& images) = 0;
  // The decoding layer's module path (a Linear(F, L)), e.g. "head".
  virtual std::string decoder() const = 0;

  virtual int64_t num_branches() const { return 1; }
  // images: [B, C, H, W] -> N x logits [B, L] and N x embeddings [B, F]
  virtual BranchOutputs forward_branches(const at::Tensor& images) { return {{forward(images)}, {}}; }
  // views: N x [B, C, H, W] -> N x logits [B, L] and N x embeddings [B, F]:
  // branch i on views[i] alone (train.branch_views), the shared trunk on all.
  virtual BranchOutputs forward_views(const std::vector<at::Tensor>& views) {
    MOEV_CHECK(views.size() == 1, "forward_views: ", views.size(), " views for a model of one branch");
    return forward_branches(views[0]);
  }
};

using ClassifierPtr = std::shared_ptr<Classifier>;

}  // namespace moev::models
