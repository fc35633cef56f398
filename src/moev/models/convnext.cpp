#include "moev/models/convnext.h"

#include <torch/torch.h>

#include "moev/nn/depthwise_conv.h"
#include "moev/nn/layer_norm.h"
#include "moev/nn/layer_scale.h"
#include "moev/nn/linear.h"
#include "moev/nn/random.h"

namespace moev::models {

namespace {
// ConvNeXt's initialisation: truncated normal(0.02) weights, zero biases.
void init_trunc_normal(at::Tensor w, const at::Tensor& b) {
  torch::NoGradGuard ng;
  w.normal_(0, 0.02).clamp_(-0.04, 0.04);
  if (b.defined()) b.zero_();
}
}  // namespace

ConvNeXtBlockImpl::ConvNeXtBlockImpl(const ModelConfig& c, int64_t dim, bool use_moe,
                                     double drop_path_)
    : drop_path(drop_path_), matmul_dtype(nn::parse_precision(c.precision)) {
  dwconv = register_module(
      "dwconv", torch::nn::Conv2d(torch::nn::Conv2dOptions(dim, dim, 7).padding(3).groups(dim)));
  norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim}).eps(1e-6)));
  const int64_t hidden = 4 * dim;
  if (use_moe) {
    moe = register_module("moe", moe::MoELayer(moe::MoELayerOptions(dim, hidden, c.router)
                                                   .aux(c.aux)
                                                   .matmul_dtype(matmul_dtype)));
  } else {
    fc1 = register_module("fc1", torch::nn::Linear(dim, hidden));
    fc2 = register_module("fc2", torch::nn::Linear(hidden, dim));
    init_trunc_normal(fc1->weight, fc1->bias);
    init_trunc_normal(fc2->weight, fc2->bias);
  }
  init_trunc_normal(dwconv->weight, dwconv->bias);
  gamma = register_parameter("gamma", torch::full({dim}, c.layer_scale));
}

at::Tensor ConvNeXtBlockImpl::forward(const at::Tensor& x) {
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), D = x.size(3);
  // Tokens [B, H*W, D] for the MLP: every spatial position is one token.
  auto t = nn::depthwise_conv_layer_norm_nhwc(x, dwconv->weight, dwconv->bias, norm->weight, norm->bias,
                                              norm->options.eps())
               .view({B, H * W, D});
  const bool drops = is_training() && drop_path > 0;
  if (!moe && !drops)
    return nn::mlp_residual(t, fc1->weight, fc1->bias, fc2->weight, fc2->bias, gamma, x.reshape({B, H * W, D}),
                            matmul_dtype)
        .view({B, H, W, D});
  t = (moe ? moe->forward(t) : nn::mlp(t, fc1->weight, fc1->bias, fc2->weight, fc2->bias, matmul_dtype))
          .view({B, H, W, D});
  if (drops) {  // stochastic depth, per image
    return nn::layer_scale_residual(x, t, gamma, nn::drop_path_scale(B, drop_path, x.options()));
  }
  return nn::layer_scale_residual(x, t, gamma);
}

ConvNeXtImpl::ConvNeXtImpl(const ModelConfig& c) : cfg(c), matmul_dtype(nn::parse_precision(c.precision)) {
  const bool iso = c.family == "convnext-iso";
  const std::vector<int64_t> dims = iso ? std::vector<int64_t>{c.width} : c.dims;
  const std::vector<int64_t> depths = iso ? std::vector<int64_t>{c.depth} : c.depths;
  int64_t total = 0;
  for (auto d : depths) total += d;
  // The optional early convolution (as the ViT's, Xiao et al. 2021): the stem
  // then embeds local 3x3 features instead of raw pixels, at a few percent of FLOPs.
  if (c.stem_channels > 0) {
    early_conv = register_module(
        "early_conv", torch::nn::Conv2d(torch::nn::Conv2dOptions(c.channels, c.stem_channels, 3).padding(1)));
    init_trunc_normal(early_conv->weight, early_conv->bias);
  }
  stem = register_module("stem", torch::nn::Conv2d(torch::nn::Conv2dOptions(
                                                       c.stem_channels > 0 ? c.stem_channels : c.channels, dims[0],
                                                       c.patch)
                                                       .stride(c.patch)));
  init_trunc_normal(stem->weight, stem->bias);
  stem_norm = register_module("stem_norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dims[0]}).eps(1e-6)));
  down_norms = register_module("down_norms", torch::nn::ModuleList());
  down_convs = register_module("down_convs", torch::nn::ModuleList());
  stages = register_module("stages", torch::nn::ModuleList());
  const auto moe_at = moe_blocks(c.moe, total);
  int64_t block = 0;
  for (size_t s = 0; s < dims.size(); ++s) {
    if (s > 0) {
      down_norms->push_back(torch::nn::LayerNorm(torch::nn::LayerNormOptions({dims[s - 1]}).eps(1e-6)));
      auto conv = torch::nn::Conv2d(torch::nn::Conv2dOptions(dims[s - 1], dims[s], 2).stride(2));
      init_trunc_normal(conv->weight, conv->bias);
      down_convs->push_back(conv);
    }
    auto stage = torch::nn::ModuleList();
    for (int64_t i = 0; i < depths[s]; ++i, ++block) {
      const bool use_moe = std::find(moe_at.begin(), moe_at.end(), block) != moe_at.end();
      // Stochastic depth grows linearly from 0 at the first block to drop_path at the last.
      const double dp = total > 1 ? c.drop_path * double(block) / double(total - 1) : c.drop_path;
      stage->push_back(ConvNeXtBlock(c, dims[s], use_moe, dp));
    }
    stages->push_back(stage);
  }
  head_norm = register_module("head_norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({dims.back()}).eps(1e-6)));
  head = register_module("head", torch::nn::Linear(dims.back(), c.num_classes));
  init_trunc_normal(head->weight, head->bias);
}

at::Tensor ConvNeXtImpl::forward(const at::Tensor& images) { return head->forward(embed(images)); }

at::Tensor ConvNeXtImpl::embed(const at::Tensor& images) {
  auto pixels = early_conv ? nn::conv3x3_gelu_nhwc(images, early_conv->weight, early_conv->bias, matmul_dtype)
                           : images.permute({0, 2, 3, 1});  // [B, H, W, C]
  auto x = nn::layer_norm(stem_norm, nn::patchify_nhwc(pixels, stem->weight, stem->bias, matmul_dtype));  // [B, H, W, D]
  for (size_t s = 0; s < stages->size(); ++s) {
    if (s > 0) {
      const auto& down = *down_convs[s - 1]->as<torch::nn::Conv2dImpl>();
      x = nn::layer_norm(down_norms[s - 1]->as<torch::nn::LayerNormImpl>(), x);
      // A 2x2 stride-2 patchify of an odd side drops its last row and column
      // (7x7 -> 3x3 loses 13 of 49 positions); zeros after the norm keep them.
      if (cfg.pad_odd && (x.size(1) % 2 || x.size(2) % 2))
        x = at::constant_pad_nd(x, {0, 0, 0, x.size(2) % 2, 0, x.size(1) % 2});
      x = nn::patchify_nhwc(x, down.weight, down.bias, matmul_dtype);
    }
    for (auto& blk : *stages[s]->as<torch::nn::ModuleListImpl>())
      x = blk->as<ConvNeXtBlockImpl>()->forward(x);
  }
  return nn::layer_norm(head_norm, x.mean({1, 2}));
}

}  // namespace moev::models
