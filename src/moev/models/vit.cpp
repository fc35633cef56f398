#include "moev/models/vit.h"

#include <cmath>

#include <torch/torch.h>

#include "moev/nn/attention.h"
#include "moev/nn/layer_norm.h"
#include "moev/nn/linear.h"
#include "moev/nn/random.h"

namespace moev::models {

namespace {
void init_linear(torch::nn::Linear& l) {
  torch::NoGradGuard ng;
  torch::nn::init::xavier_uniform_(l->weight);
  if (l->bias.defined()) l->bias.normal_(0, 1e-6);
}
}  // namespace

ViTBlockImpl::ViTBlockImpl(const ModelConfig& c, bool use_moe)
    : heads(c.heads), matmul_dtype(nn::parse_precision(c.precision)) {
  const int64_t D = c.width;
  ln1 = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
  qkv = register_module("qkv", torch::nn::Linear(D, 3 * D));
  proj = register_module("proj", torch::nn::Linear(D, D));
  ln2 = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
  init_linear(qkv);
  init_linear(proj);
  if (use_moe) {
    moe = register_module("moe", moe::MoELayer(moe::MoELayerOptions(D, c.mlp_dim, c.router)
                                                   .aux(c.aux)
                                                   .matmul_dtype(matmul_dtype)));
  } else {
    fc1 = register_module("fc1", torch::nn::Linear(D, c.mlp_dim));
    fc2 = register_module("fc2", torch::nn::Linear(c.mlp_dim, D));
    init_linear(fc1);
    init_linear(fc2);
  }
  dropout_p = c.dropout;
}

at::Tensor ViTBlockImpl::linear(const torch::nn::Linear& l, const at::Tensor& x) {
  return nn::linear(x, l->weight, l->bias, matmul_dtype);
}

at::Tensor ViTBlockImpl::dropout(const at::Tensor& x) {
  return nn::dropout(x, dropout_p, is_training());
}

at::Tensor ViTBlockImpl::forward(const at::Tensor& x) {
  auto qkv_ = linear(qkv, nn::layer_norm(ln1, x));  // [B, N, 3D]
  auto a = nn::attention(qkv_, heads, matmul_dtype);  // [B, N, D]
  auto h = x + dropout(linear(proj, a));
  auto z = nn::layer_norm(ln2, h);
  if (moe) {
    z = moe->forward(z);
  } else {
    z = nn::mlp(z, fc1->weight, fc1->bias, fc2->weight, fc2->bias, matmul_dtype);
  }
  return h + dropout(z);
}

ViTImpl::ViTImpl(const ModelConfig& c) : cfg(c), matmul_dtype(nn::parse_precision(c.precision)) {
  const int64_t D = c.width, side = c.image_size / c.patch, N = side * side;
  // The optional stem is Xiao et al.'s (2021) "early convolutions": a patch is
  // embedded from local edge features rather than raw pixels, which makes ViTs
  // on small data learn faster and generalise better, at a few percent of FLOPs.
  if (c.stem_channels > 0)
    stem = register_module("stem", torch::nn::Conv2d(torch::nn::Conv2dOptions(c.channels, c.stem_channels, 3)
                                                         .padding(1)));
  patch_embed = register_module(
      "patch_embed",
      torch::nn::Conv2d(torch::nn::Conv2dOptions(c.stem_channels > 0 ? c.stem_channels : c.channels, D,
                                                 /*kernel_size=*/c.patch)
                            .stride(c.patch)));
  pos_embed = register_parameter("pos_embed", torch::randn({1, N, D}) * 0.02);
  blocks = register_module("blocks", torch::nn::ModuleList());
  const auto moe_at = moe_blocks(c.moe, c.depth);
  for (int64_t b = 0; b < c.depth; ++b) {
    const bool use_moe = std::find(moe_at.begin(), moe_at.end(), b) != moe_at.end();
    blocks->push_back(ViTBlock(c, use_moe));
  }
  norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
  head = register_module("head", torch::nn::Linear(D, c.num_classes));
  torch::NoGradGuard ng;
  head->weight.zero_();  // ViT starts its head at zero so first logits are uniform
  head->bias.zero_();
}

at::Tensor ViTImpl::forward(const at::Tensor& images) { return head->forward(embed(images)); }

at::Tensor ViTImpl::embed(const at::Tensor& images) {
  // [B, H, W, C']
  auto pixels = stem ? nn::conv3x3_gelu_nhwc(images, stem->weight, stem->bias, matmul_dtype)
                     : images.permute({0, 2, 3, 1});
  auto x = nn::patchify_nhwc(pixels, patch_embed->weight, patch_embed->bias, matmul_dtype).flatten(1, 2) +
           pos_embed;  // [B, N, D], tokens in row-major patch order as Conv2d's flatten gives them
  for (auto& blk : *blocks) x = blk->as<ViTBlockImpl>()->forward(x);
  return nn::layer_norm(norm, x).mean(1);
}

}  // namespace moev::models
