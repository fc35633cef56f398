#include "moev/models/cost.h"

#include <algorithm>

#include "moev/models/placement.h"

namespace moev::models {

namespace {
struct Acc {
  ModelCost c;
  // A dense layer applied to `tokens` tokens: in -> out with bias.
  void linear(double tokens, int64_t in, int64_t out, bool bias = true) {
    c.params += in * out + (bias ? out : 0);
    c.active_params += in * out + (bias ? out : 0);
    c.flops += 2.0 * tokens * double(in) * double(out);
  }
  void norm(int64_t dim) {  // LayerNorm: weight and bias
    c.params += 2 * dim;
    c.active_params += 2 * dim;
  }
  // MLP D -> H -> D, or an MoE layer of E such experts with K per token.
  void ffn(double tokens, int64_t D, int64_t H, bool moe, const ModelConfig& cfg) {
    const int64_t expert = D * H + H + H * D + D;
    if (!moe) {
      c.params += expert;
      c.active_params += expert;
      c.flops += 2.0 * tokens * 2.0 * double(D) * double(H);
      return;
    }
    const int64_t E = cfg.router.num_experts, K = std::min(cfg.router.k, E);
    int64_t router = E * D;
    if (cfg.router.logits == "cosine") router = E * cfg.router.cosine_dim + cfg.router.cosine_dim * D + 1;
    c.params += E * expert + router;
    c.active_params += K * expert + router;
    c.flops += 2.0 * tokens * (double(K) * 2.0 * double(D) * double(H) + double(router));
  }
  // A k x k convolution at `pixels` output positions (groups split the inputs).
  void conv(double pixels, int64_t in, int64_t out, int64_t k, int64_t groups = 1, bool bias = false) {
    const int64_t w = out * (in / groups) * k * k + (bias ? out : 0);
    c.params += w;
    c.active_params += w;
    c.flops += 2.0 * pixels * double(out * (in / groups) * k * k);
  }
};

// ResNeSt (models/resnest.h): every branch runs, so active = all parameters.
ModelCost resnest_cost(const ModelConfig& cfg) {
  Acc a;
  auto half = [](int64_t s) { return (s + 1) / 2; };  // blur pool and the 3x3 stride-2 pools
  int64_t s = cfg.image_size;
  const int64_t sw = cfg.stem_channels;
  a.conv(double(s * s), cfg.channels, sw, 3);
  a.norm(sw);
  for (int64_t p = cfg.patch; p > 1; p /= 2) {
    s = half(s);
    a.conv(double(s * s), sw, sw, 3);
    a.norm(sw);
  }
  auto block = [&](Acc& acc, int64_t& side, int64_t in, int64_t out, int64_t stride) {
    const int64_t w = out / 4, R = cfg.radix, G = cfg.cardinality;
    int64_t inter = std::max<int64_t>(w * R / 4, 16);
    inter = (inter + G - 1) / G * G;
    const double px = double(side * side);
    acc.conv(px, in, w, 1);
    acc.norm(w);
    acc.conv(px, w, w * R, 3, G * R);
    acc.norm(w * R);
    acc.conv(1, w, inter, 1, G, true);
    acc.norm(inter);
    acc.conv(1, inter, w * R, 1, G, true);
    if (stride > 1) side = half(side);
    acc.conv(double(side * side), w, out, 1);
    acc.norm(out);
    if (in != out || stride > 1) {
      acc.conv(double(side * side), in, out, 1);
      acc.norm(out);
    }
  };
  auto stage = [&](Acc& acc, int64_t& side, size_t st) {
    for (int64_t i = 0; i < cfg.depths[st]; ++i)
      block(acc, side, i == 0 ? (st == 0 ? sw : cfg.dims[st - 1]) : cfg.dims[st], cfg.dims[st],
            i == 0 && st > 0 ? 2 : 1);
  };
  for (int64_t st = 0; st < cfg.shared_stages; ++st) stage(a, s, static_cast<size_t>(st));
  Acc branch;
  int64_t bs = s;
  for (size_t st = static_cast<size_t>(cfg.shared_stages); st < cfg.dims.size(); ++st) stage(branch, bs, st);
  branch.linear(1, cfg.dims.back(), cfg.num_classes);
  a.c.params += cfg.branches * branch.c.params;
  a.c.active_params += cfg.branches * branch.c.params;
  a.c.flops += double(cfg.branches) * branch.c.flops;
  const int64_t fusion = cfg.branches * cfg.dims.back() * cfg.num_classes + cfg.num_classes;
  a.c.params += fusion;  // used instead of the heads' mean once trained: FLOPs negligible
  a.c.active_params += fusion;
  return a.c;
}
}  // namespace

ModelCost model_cost(const ModelConfig& cfg) {
  if (cfg.family == "resnest") return resnest_cost(cfg);
  Acc a;
  const int64_t blocks = num_blocks(cfg);
  const auto moe_at = moe_blocks(cfg.moe, blocks);
  auto is_moe = [&](int64_t b) { return std::find(moe_at.begin(), moe_at.end(), b) != moe_at.end(); };
  const int64_t side = cfg.image_size / cfg.patch;
  const double tokens = double(side * side);
  int64_t in = cfg.channels;  // channels the patch embedding / stem reads
  if (cfg.stem_channels > 0) {  // the early 3x3 conv at every pixel
    a.linear(double(cfg.image_size * cfg.image_size), cfg.channels * 9, cfg.stem_channels);
    in = cfg.stem_channels;
  }
  if (cfg.family == "vit") {
    const int64_t D = cfg.width;
    a.linear(tokens, in * cfg.patch * cfg.patch, D);  // patch embedding
    a.c.params += side * side * D;                              // position embedding
    a.c.active_params += side * side * D;
    for (int64_t b = 0; b < blocks; ++b) {
      a.norm(D);
      a.linear(tokens, D, 3 * D);
      a.c.flops += 2.0 * 2.0 * tokens * tokens * double(D);  // q k^T and p v
      a.linear(tokens, D, D);
      a.norm(D);
      a.ffn(tokens, D, cfg.mlp_dim, is_moe(b), cfg);
    }
    a.norm(D);
    a.linear(1, D, cfg.num_classes);
    return a.c;
  }
  const bool iso = cfg.family == "convnext-iso";
  const std::vector<int64_t> dims = iso ? std::vector<int64_t>{cfg.width} : cfg.dims;
  const std::vector<int64_t> depths = iso ? std::vector<int64_t>{cfg.depth} : cfg.depths;
  int64_t s = side, b = 0;
  a.linear(double(s * s), in * cfg.patch * cfg.patch, dims[0]);  // patchify stem
  a.norm(dims[0]);
  for (size_t st = 0; st < dims.size(); ++st) {
    const int64_t d = dims[st];
    if (st > 0) {
      a.norm(dims[st - 1]);
      s = cfg.pad_odd ? (s + 1) / 2 : s / 2;
      a.linear(double(s * s), dims[st - 1] * 4, d);  // 2x2 stride-2 convolution
    }
    for (int64_t i = 0; i < depths[st]; ++i, ++b) {
      const double t = double(s * s);
      a.c.params += d * 49 + d;  // 7x7 depthwise
      a.c.active_params += d * 49 + d;
      a.c.flops += 2.0 * t * double(d) * 49.0;
      a.norm(d);
      a.ffn(t, d, 4 * d, is_moe(b), cfg);
      a.c.params += d;  // layer scale
      a.c.active_params += d;
    }
  }
  a.norm(dims.back());
  a.linear(1, dims.back(), cfg.num_classes);
  return a.c;
}

}  // namespace moev::models
