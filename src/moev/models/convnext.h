// ConvNeXt (Liu et al. 2022) and its MoE variant (Videau et al. 2024): blocks of
// 7x7 depthwise convolution, LayerNorm, pointwise MLP (4x expansion, GELU),
// layer scale and stochastic depth. Two forms: hierarchical (patchify stem, then
// stages whose width doubles and resolution halves) and isotropic (one stage at
// constant resolution, like a ViT). In the blocks chosen by the placement the
// pointwise MLP is the shared moe::MoELayer, every spatial position a token.
// Blocks are numbered 0.. across all stages for placement. Activations stay
// channels-last ([B, H, W, D]) from the stem to the head: LayerNorm, the MLP and
// the depthwise kernel (nn/depthwise_conv.h) all want D innermost, so no block
// permutes. Parameters keep the shapes of the NCHW Conv2d modules.
#pragma once

#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>

#include "moev/models/model_config.h"

namespace moev::models {

class ConvNeXtBlockImpl : public torch::nn::Module {
 public:
  ConvNeXtBlockImpl(const ModelConfig& cfg, int64_t dim, bool use_moe, double drop_path);
  // x: [B, H, W, D] -> [B, H, W, D] (channels-last; the MLP sees N = H * W tokens)
  at::Tensor forward(const at::Tensor& x);

  torch::nn::Conv2d dwconv{nullptr};
  torch::nn::LayerNorm norm{nullptr};
  torch::nn::Linear fc1{nullptr}, fc2{nullptr};
  moe::MoELayer moe{nullptr};
  at::Tensor gamma;  // [D] layer scale
  double drop_path;  // probability of skipping the residual branch per image
  at::ScalarType matmul_dtype;
};
TORCH_MODULE(ConvNeXtBlock);

class ConvNeXtImpl : public Classifier {
 public:
  explicit ConvNeXtImpl(const ModelConfig& cfg);
  // images: [B, C, H, W] -> logits: [B, L]
  at::Tensor forward(const at::Tensor& images) override;
  // images: [B, C, H, W] -> embedding: [B, D] (pooled and normalised, the head's input)
  at::Tensor embed(const at::Tensor& images) override;
  std::string decoder() const override { return "head"; }

  ModelConfig cfg;
  torch::nn::Conv2d early_conv{nullptr};  // 3x3 stride 1 before the stem (cfg.stem_channels > 0); run as a GEMM
  torch::nn::Conv2d stem{nullptr};        // patchify, cfg.patch
  torch::nn::LayerNorm stem_norm{nullptr};
  // downsample[s] (s >= 1) precedes stage s: LayerNorm then 2x2 stride-2 conv.
  torch::nn::ModuleList down_norms{nullptr}, down_convs{nullptr};
  torch::nn::ModuleList stages{nullptr};  // each a ModuleList of blocks
  at::ScalarType matmul_dtype;
  torch::nn::LayerNorm head_norm{nullptr};
  torch::nn::Linear head{nullptr};
};

}  // namespace moev::models
