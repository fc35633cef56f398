#include "moev/models/vit.h"

#include <cmath>

#include <torch/torch.h>

namespace moev::models {

namespace {
void init_linear(torch::nn::Linear& l) {
  torch::NoGradGuard ng;
  torch::nn::init::xavier_uniform_(l->weight);
  if (l->bias.defined()) l->bias.normal_(0, 1e-6);
}
}  // namespace

ViTBlockImpl::ViTBlockImpl(const ModelConfig& c, bool use_moe) : heads(c.heads) {
  const int64_t D = c.width;
  ln1 = register_module("ln1", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
  qkv = register_module("qkv", torch::nn::Linear(D, 3 * D));
  proj = register_module("proj", torch::nn::Linear(D, D));
  ln2 = register_module("ln2", torch::nn::LayerNorm(torch::nn::LayerNormOptions({D})));
  init_linear(qkv);
  init_linear(proj);
  if (use_moe) {
    moe = register_module("moe", moe::MoELayer(moe::MoELayerOptions(D, c.mlp_dim, c.router)
                                                   .aux(c.aux)));
  } else {
    fc1 = register_module("fc1", torch::nn::Linear(D, c.mlp_dim));
    fc2 = register_module("fc2", torch::nn::Linear(c.mlp_dim, D));
    init_linear(fc1);
    init_linear(fc2);
  }
  drop = register_module("drop", torch::nn::Dropout(c.dropout));
}

at::Tensor ViTBlockImpl::forward(const at::Tensor& x) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), dh = D / heads;
  // [B, N, 3, heads, dh] -> three [B, heads, N, dh]
  auto qkv_ = qkv->forward(ln1->forward(x)).view({B, N, 3, heads, dh}).permute({2, 0, 3, 1, 4});
  auto q = qkv_[0], k = qkv_[1], v = qkv_[2];
  auto attn = torch::softmax(torch::matmul(q, k.transpose(-2, -1)) * (1.0 / std::sqrt(double(dh))), -1);
  auto a = torch::matmul(attn, v).transpose(1, 2).reshape({B, N, D});
  auto h = x + drop->forward(proj->forward(a));
  auto z = ln2->forward(h);
  z = moe ? moe->forward(z) : fc2->forward(torch::gelu(fc1->forward(z)));
  return h + drop->forward(z);
}

ViTImpl::ViTImpl(const ModelConfig& c) : cfg(c) {
  const int64_t D = c.width, side = c.image_size / c.patch, N = side * side;
  patch_embed = register_module(
      "patch_embed",
      torch::nn::Conv2d(torch::nn::Conv2dOptions(c.channels, D, /*kernel_size=*/c.patch)
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

at::Tensor ViTImpl::forward(const at::Tensor& images) {
  auto x = patch_embed->forward(images).flatten(2).transpose(1, 2) + pos_embed;  // [B, N, D]
  for (auto& blk : *blocks) x = blk->as<ViTBlockImpl>()->forward(x);
  return head->forward(norm->forward(x).mean(1));
}

}  // namespace moev::models
