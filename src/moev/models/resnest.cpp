#include "moev/models/resnest.h"

#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/nn/batch_norm.h"
#include "moev/nn/blur_pool.h"
#include "moev/nn/random.h"

namespace moev::models {

namespace F = torch::nn::functional;

namespace {
torch::nn::Conv2d conv(int64_t in, int64_t out, int64_t k, int64_t groups = 1, bool bias = false) {
  auto c = torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, k).padding(k / 2).groups(groups).bias(bias));
  torch::NoGradGuard ng;
  // He et al.'s fan-out init for ReLU networks, as ResNe(S)t use.
  torch::nn::init::kaiming_normal_(c->weight, 0.0, torch::kFanOut, torch::kReLU);
  return c;
}
torch::nn::BatchNorm2d bn(int64_t c, bool zero = false) {
  auto b = torch::nn::BatchNorm2d(c);
  // A block whose last BN starts at zero starts as the identity: deep residual
  // stacks then train from the first step (Goyal et al. 2017).
  if (zero) {
    torch::NoGradGuard ng;
    b->weight.zero_();
  }
  return b;
}
// The downsampling of the block and of the stem: blur pool, or without it the
// 3x3 stride-2 average pool of ResNeSt's "avd" (the 3x3 max pool in the stem).
at::Tensor downsample(const at::Tensor& x, bool blur, bool max_pool = false) {
  if (blur) return nn::blur_pool2d(x);
  if (max_pool) return F::max_pool2d(x, F::MaxPool2dFuncOptions(3).stride(2).padding(1));
  return F::avg_pool2d(x, F::AvgPool2dFuncOptions(3).stride(2).padding(1).count_include_pad(false));
}
// Stochastic depth's per-sample scale of the residual branch, keep / (1 - p),
// or undefined when nothing is dropped.
at::Tensor drop_scale(const at::Tensor& t, double p, bool training) {
  if (!training || p <= 0) return {};
  return nn::drop_path_keep(t.size(0), p, t.options()) / (1.0 - p);
}
}  // namespace

SplitAttentionConvImpl::SplitAttentionConvImpl(int64_t channels, int64_t radix_, int64_t cardinality_)
    : radix(radix_), cardinality(cardinality_) {
  // A grouped 3x3 conv of G*R groups: each group maps W/(G*R) input channels to
  // W/G outputs, and the outputs come radix-major (R splits of W channels).
  conv = register_module("conv", models::conv(channels, channels * radix, 3, cardinality * radix));
  bn0 = register_module("bn0", bn(channels * radix));
  // Bottleneck of the attention MLP: a quarter of the splits' width, at least 16,
  // rounded up to whole groups (ResNeSt's reduction factor 4).
  int64_t inter = std::max<int64_t>(channels * radix / 4, 16);
  inter = (inter + cardinality - 1) / cardinality * cardinality;
  fc1 = register_module("fc1", models::conv(channels, inter, 1, cardinality, /*bias=*/true));
  bn1 = register_module("bn1", bn(inter));
  fc2 = register_module("fc2", models::conv(inter, channels * radix, 1, cardinality, /*bias=*/true));
}

at::Tensor SplitAttentionConvImpl::forward(const at::Tensor& x) {
  const int64_t B = x.size(0), Wd = x.size(1), G = cardinality, R = radix;
  auto y = nn::batch_norm2d(conv->forward(x), *bn0, /*relu=*/true);  // [B, R*W, H, W'] radix-major
  const int64_t H = y.size(2), Wi = y.size(3);
  auto splits = y.view({B, R, Wd, H, Wi});
  auto gap = (R > 1 ? splits.sum(1) : y).mean({2, 3}, /*keepdim=*/true);  // [B, W, 1, 1]
  auto a = fc2->forward(nn::batch_norm2d(fc1->forward(gap), *bn1, /*relu=*/true));  // [B, G*R*c, 1, 1] group-major
  if (R == 1) return y * torch::sigmoid(a);
  // Per cardinal group, a softmax over its R splits; then back to radix-major.
  auto w = a.view({B, G, R, Wd / G}).softmax(2).transpose(1, 2).reshape({B, R, Wd, 1, 1});
  return (splits * w).sum(1);
}

ResNeStBlockImpl::ResNeStBlockImpl(const ModelConfig& c, int64_t in, int64_t out, int64_t stride_,
                                   double drop_path_)
    : stride(stride_), blur(c.blur_pool), drop_path(drop_path_) {
  const int64_t width = out / 4;
  conv1 = register_module("conv1", conv(in, width, 1));
  bn1 = register_module("bn1", bn(width));
  attn = register_module("attn", SplitAttentionConv(width, c.radix, c.cardinality));
  conv3 = register_module("conv3", conv(width, out, 1));
  bn3 = register_module("bn3", bn(out, /*zero=*/true));
  if (in != out || stride != 1) {
    shortcut = register_module("shortcut", conv(in, out, 1));
    shortcut_bn = register_module("shortcut_bn", bn(out));
  }
}

at::Tensor ResNeStBlockImpl::forward(const at::Tensor& x) {
  auto t = attn->forward(nn::batch_norm2d(conv1->forward(x), *bn1, /*relu=*/true));
  if (stride > 1) t = downsample(t, blur);
  t = conv3->forward(t);
  at::Tensor s = x;
  if (shortcut) {
    // The shortcut pools before its 1x1 conv (ResNet-D's "avg down"): a strided
    // 1x1 conv would discard three quarters of the input.
    s = nn::batch_norm2d(shortcut->forward(stride > 1 ? downsample(x, blur) : x), *shortcut_bn, /*relu=*/false);
  }
  return nn::batch_norm2d_add_relu(t, *bn3, s, drop_scale(t, drop_path, is_training()));
}

ResNeStImpl::ResNeStImpl(const ModelConfig& c) : cfg(c) {
  const int64_t S = static_cast<int64_t>(c.dims.size());
  const int64_t sw = c.stem_channels;
  stem = register_module("stem", torch::nn::ModuleList());
  stem->push_back(conv(c.channels, sw, 3));
  stem->push_back(bn(sw));
  for (int64_t p = c.patch; p > 1; p /= 2) {  // one downsample + conv per halving
    stem->push_back(conv(sw, sw, 3));
    stem->push_back(bn(sw));
  }
  int64_t total = 0;
  for (auto d : c.depths) total += d;
  // Stochastic depth grows linearly from 0 at the first block to drop_path at the
  // last (Huang et al. 2016), counted along one path through the network.
  auto rate = [&](int64_t block) { return total > 1 ? c.drop_path * double(block) / double(total - 1) : c.drop_path; };
  auto add_stage = [&](torch::nn::ModuleList& list, int64_t s, int64_t& block) {
    const int64_t in = s == 0 ? sw : c.dims[s - 1];
    for (int64_t i = 0; i < c.depths[s]; ++i, ++block)
      list->push_back(ResNeStBlock(c, i == 0 ? in : c.dims[s], c.dims[s], i == 0 && s > 0 ? 2 : 1, rate(block)));
  };
  shared = register_module("shared", torch::nn::ModuleList());
  int64_t block = 0;
  for (int64_t s = 0; s < c.shared_stages; ++s) add_stage(shared, s, block);
  branches = register_module("branches", torch::nn::ModuleList());
  heads = register_module("heads", torch::nn::ModuleList());
  for (int64_t b = 0; b < c.branches; ++b) {
    auto list = torch::nn::ModuleList();
    int64_t bb = block;
    for (int64_t s = c.shared_stages; s < S; ++s) add_stage(list, s, bb);
    branches->push_back(list);
    heads->push_back(torch::nn::Linear(c.dims.back(), c.num_classes));
  }
  fusion = register_module("fusion", torch::nn::Linear(c.branches * c.dims.back(), c.num_classes));
  fusion_on = register_buffer("fusion_on", torch::zeros({}, torch::kInt64));
}

void ResNeStImpl::set_fused(bool on) { fusion_on.fill_(on ? 1 : 0); }

at::Tensor ResNeStImpl::trunk(const at::Tensor& images) {
  auto x = images;
  for (size_t i = 0; i + 1 < stem->size(); i += 2) {
    if (i > 0) x = downsample(x, cfg.blur_pool, /*max_pool=*/true);
    x = nn::batch_norm2d(stem[i]->as<torch::nn::Conv2dImpl>()->forward(x),
                         *stem[i + 1]->as<torch::nn::BatchNorm2dImpl>(), /*relu=*/true);
  }
  for (auto& blk : *shared) x = blk->as<ResNeStBlockImpl>()->forward(x);
  return x;
}

BranchOutputs ResNeStImpl::forward_branches(const at::Tensor& images) { return run_branches(trunk(images), 1); }

BranchOutputs ResNeStImpl::forward_views(const std::vector<at::Tensor>& views) {
  MOEV_CHECK(static_cast<int64_t>(views.size()) == cfg.branches, "forward_views: ", views.size(),
             " views for ", cfg.branches, " branches");
  for (const auto& v : views)
    MOEV_CHECK(v.sizes() == views[0].sizes(), "forward_views: views of shapes ", views[0].sizes(), " and ",
               v.sizes(), ": expected one shape");
  return run_branches(trunk(torch::cat(views)), cfg.branches);
}

BranchOutputs ResNeStImpl::run_branches(const at::Tensor& x, int64_t parts) {
  const auto part = x.chunk(parts);
  BranchOutputs out;
  for (int64_t b = 0; b < cfg.branches; ++b) {
    auto h = parts == 1 ? x : part[b];
    for (auto& blk : *branches[b]->as<torch::nn::ModuleListImpl>()) h = blk->as<ResNeStBlockImpl>()->forward(h);
    auto e = h.mean({2, 3});  // [B, F]
    // Dropout before each head in training (Sun et al.'s recipe: 0.2); the
    // embeddings the fusion layer reads stay whole.
    out.logits.push_back(heads[b]->as<torch::nn::LinearImpl>()->forward(nn::dropout(e, cfg.dropout, is_training())));
    out.embeddings.push_back(e);
  }
  return out;
}

at::Tensor ResNeStImpl::embed(const at::Tensor& images) {
  auto out = forward_branches(images);
  return cfg.branches == 1 ? out.embeddings[0] : torch::cat(out.embeddings, 1);
}

at::Tensor ResNeStImpl::forward(const at::Tensor& images) { return combine(forward_branches(images)); }

at::Tensor ResNeStImpl::combine(const BranchOutputs& out) {
  if (fused()) return fusion->forward(torch::cat(out.embeddings, 1));
  if (cfg.branches == 1) return out.logits[0];
  return torch::stack(out.logits).mean(0);
}

}  // namespace moev::models
