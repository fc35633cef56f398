// ResNeSt (Zhang et al. 2020) with the changes Sun et al. 2022 make for
// data-efficient training, and their multi-branch MoE on top of it.
//
// Block: a bottleneck whose 3x3 convolution is split attention: R radix splits
// per cardinal group (G groups), their sum pooled globally, two 1x1 layers, and
// a softmax over the R splits (sigmoid when R = 1) weighting them per channel.
// Downsampling is a blur pool (nn/blur_pool.h) after the 3x3 conv, on the
// shortcut too, instead of a strided conv; stochastic depth drops the residual
// branch per image, its rate growing linearly with depth.
//
// Multi-branch MoE: the stem and the first `shared_stages` stages are shared;
// each of N branches has its own later stages, global pool and linear head, and
// gives logits of its own (trained each against the target, plus the diversity
// loss, in the trainer). The model's logits are the mean of the branch logits,
// or, once a fusion layer has been trained (train/fusion.h), Linear(concat of
// the N embeddings). N = 1 is a plain ResNeSt classifier.
#pragma once

#include <torch/nn/modules/batchnorm.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>

#include "moev/models/model_config.h"

namespace moev::models {

class SplitAttentionConvImpl : public torch::nn::Module {
 public:
  SplitAttentionConvImpl(int64_t channels, int64_t radix, int64_t cardinality);
  // x: [B, W, H', W'] -> [B, W, H', W'] (W = group width; 3x3, stride 1)
  at::Tensor forward(const at::Tensor& x);

  int64_t radix, cardinality;
  torch::nn::Conv2d conv{nullptr}, fc1{nullptr}, fc2{nullptr};
  torch::nn::BatchNorm2d bn0{nullptr}, bn1{nullptr};
};
TORCH_MODULE(SplitAttentionConv);

class ResNeStBlockImpl : public torch::nn::Module {
 public:
  // in -> out channels, group width out/4; stride 1 or 2.
  ResNeStBlockImpl(const ModelConfig& cfg, int64_t in, int64_t out, int64_t stride, double drop_path);
  // x: [B, Ci, H, W] -> [B, Co, H/stride, W/stride] (rounded up)
  at::Tensor forward(const at::Tensor& x);

  int64_t stride;
  bool blur;
  double drop_path;  // probability of skipping the residual branch per image
  torch::nn::Conv2d conv1{nullptr}, conv3{nullptr}, shortcut{nullptr};
  torch::nn::BatchNorm2d bn1{nullptr}, bn3{nullptr}, shortcut_bn{nullptr};
  SplitAttentionConv attn{nullptr};
};
TORCH_MODULE(ResNeStBlock);

class ResNeStImpl : public Classifier {
 public:
  explicit ResNeStImpl(const ModelConfig& cfg);
  // images: [B, C, H, W] -> logits: [B, L] (fusion layer if trained, else the mean of the branches)
  at::Tensor forward(const at::Tensor& images) override;
  int64_t num_branches() const override { return cfg.branches; }
  // images: [B, C, H, W] -> N x logits [B, L], N x embeddings [B, F] (F = dims.back())
  BranchOutputs forward_branches(const at::Tensor& images) override;
  // forward_branches' outputs -> logits [B, L]: what forward returns from them.
  at::Tensor combine(const BranchOutputs& out);
  // views: N x [B, C, H, W] -> N x logits [B, L], N x embeddings [B, F]: the trunk
  // runs once on all N B images (its BatchNorm sees them together), branch i on
  // its own view's features.
  BranchOutputs forward_views(const std::vector<at::Tensor>& views) override;
  // images: [B, C, H, W] -> embedding: [B, F] (one branch) or [B, N * F] (the fusion layer's input)
  at::Tensor embed(const at::Tensor& images) override;
  // One branch: its head; N branches: the fusion layer (what a fused model decodes with).
  std::string decoder() const override { return cfg.branches == 1 ? "heads.0" : "fusion"; }

  // Whether forward uses the fusion layer (set by fusion training; saved as a buffer).
  bool fused() const { return fusion_on.item<int64_t>() != 0; }
  void set_fused(bool on);

  ModelConfig cfg;
  torch::nn::ModuleList stem{nullptr};     // conv/BN pairs (see resnest.cpp)
  torch::nn::ModuleList shared{nullptr};   // blocks of the shared stages, in order
  torch::nn::ModuleList branches{nullptr}; // each a ModuleList of blocks
  torch::nn::ModuleList heads{nullptr};    // Linear(F, L) per branch
  torch::nn::Linear fusion{nullptr};       // Linear(N * F, L)
  at::Tensor fusion_on;                    // int64 scalar buffer: 1 once fusion is trained

 private:
  at::Tensor trunk(const at::Tensor& images);  // stem and shared stages
  // features: [P B, ...] trunk output of P = 1 or N equal parts; branch i reads
  // part i (all of it when P = 1).
  BranchOutputs run_branches(const at::Tensor& features, int64_t parts);
};

}  // namespace moev::models
