// Pre-LayerNorm Vision Transformer (Dosovitskiy et al. 2021) with global average
// pooling, and its V-MoE variant (Riquelme et al. 2021): the MLP of the blocks
// chosen by the placement is replaced by the shared moe::MoELayer.
#pragma once

#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include "moev/models/model_config.h"

namespace moev::models {

class ViTBlockImpl : public torch::nn::Module {
 public:
  ViTBlockImpl(const ModelConfig& cfg, bool use_moe);
  // x: [B, N, D] -> [B, N, D]
  at::Tensor forward(const at::Tensor& x);
  at::Tensor dropout(const at::Tensor& x);
  at::Tensor linear(const torch::nn::Linear& l, const at::Tensor& x);  // in matmul_dtype

  int64_t heads;
  at::ScalarType matmul_dtype;  // from ModelConfig::precision
  torch::nn::LayerNorm ln1{nullptr}, ln2{nullptr};
  torch::nn::Linear qkv{nullptr}, proj{nullptr}, fc1{nullptr}, fc2{nullptr};
  moe::MoELayer moe{nullptr};
  double dropout_p = 0;  // after attention and MLP, from the thread's generator (nn/random.h)
};
TORCH_MODULE(ViTBlock);

class ViTImpl : public Classifier {
 public:
  explicit ViTImpl(const ModelConfig& cfg);
  // images: [B, C, H, W] -> logits: [B, L]
  at::Tensor forward(const at::Tensor& images) override;
  // images: [B, C, H, W] -> embedding: [B, D] (pooled and normalised, the head's input)
  at::Tensor embed(const at::Tensor& images) override;
  std::string decoder() const override { return "head"; }

  ModelConfig cfg;
  torch::nn::Conv2d stem{nullptr};  // 3x3, stride 1 (only with cfg.stem_channels > 0); its weights, run as a GEMM
  torch::nn::Conv2d patch_embed{nullptr};  // its weights; run as one GEMM over the patches
  at::Tensor pos_embed;  // [1, N, D]
  torch::nn::ModuleList blocks{nullptr};
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear head{nullptr};
  at::ScalarType matmul_dtype;  // from cfg.precision
};

}  // namespace moev::models
