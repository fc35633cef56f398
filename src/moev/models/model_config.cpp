// Presets, validation and the model factory.
#include "moev/models/model_config.h"

#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/models/convnext.h"
#include "moev/models/resnest.h"
#include "moev/models/vit.h"
#include "moev/nn/linear.h"

namespace moev::models {

namespace {
ModelConfig vit_tiny() {
  ModelConfig c;  // the defaults are the tiny Fashion-MNIST ViT: 28px, patch 4, D 128, 6 blocks
  return c;
}
ModelConfig vit_s32() {
  ModelConfig c;
  c.image_size = 224;
  c.channels = 3;
  c.num_classes = 1000;
  c.patch = 32;
  c.width = 512;
  c.depth = 8;
  c.heads = 8;
  c.mlp_dim = 2048;
  return c;
}
// Tiny hierarchical ConvNeXt for 28 px inputs: patchify stem 2 (14x14), stages
// 32/64/128 wide at 14, 7 and 3 px with 2, 2 and 4 blocks.
ModelConfig convnext_tiny() {
  ModelConfig c;
  c.family = "convnext";
  c.patch = 2;
  c.dims = {32, 64, 128};
  c.depths = {2, 2, 4};
  c.drop_path = 0.0;
  return c;
}
// Isotropic: patch 4 (7x7 tokens) at width 128, 8 blocks.
ModelConfig convnext_iso_tiny() {
  ModelConfig c;
  c.family = "convnext-iso";
  c.patch = 4;
  c.width = 128;
  c.depth = 8;
  return c;
}
// ResNeSt for 28 px inputs: a stem of two 3x3 convs with a blur pool between
// them (28 -> 14 px), stages 32/64/128 wide at 14, 7 and 4 px; the first two
// shared, the last one per branch. Stochastic depth 0.1 at the last block;
// radix 2. (Measured on the AVX2 EPYC, 1 thread: 713 img/s training; the same
// stages at 28 px trained at 393.)
ModelConfig resnest_tiny() {
  ModelConfig c;
  c.family = "resnest";
  c.patch = 2;
  c.stem_channels = 32;
  c.dims = {32, 64, 128};
  c.depths = {1, 1, 1};
  c.shared_stages = 2;
  c.drop_path = 0.1;
  return c;
}
// CIFAR-sized (32 px RGB): the tiny layout twice as wide and two blocks per stage.
ModelConfig resnest_cifar() {
  ModelConfig c = resnest_tiny();
  c.image_size = 32;
  c.channels = 3;
  c.stem_channels = 64;
  c.dims = {64, 128, 256};
  c.depths = {2, 2, 2};
  return c;
}
// ResNeSt-50 (2s1x64d) for 224 px: stem 4x down, 3-4-6-3 blocks, the last stage per branch.
ModelConfig resnest_50() {
  ModelConfig c;
  c.family = "resnest";
  c.image_size = 224;
  c.channels = 3;
  c.num_classes = 1000;
  c.patch = 4;
  c.stem_channels = 64;
  c.dims = {256, 512, 1024, 2048};
  c.depths = {3, 4, 6, 3};
  c.shared_stages = 3;
  c.drop_path = 0.2;
  return c;
}
ModelConfig with_branches(ModelConfig c, int64_t n) {
  c.branches = n;
  return c;
}
// Videau et al.'s most robust placement: MoE in the final two blocks.
ModelConfig with_final_moe(ModelConfig c, int64_t experts) {
  const int64_t n = num_blocks(c);
  c.moe.kind = "list";
  c.moe.blocks = {n - 2, n - 1};
  c.router.num_experts = experts;
  c.router.k = 2;
  return c;
}
ModelConfig with_vmoe(ModelConfig c, int64_t experts) {
  c.moe.kind = "last";
  c.moe.n = 2;
  c.router.num_experts = experts;
  c.router.k = 2;
  return c;
}
void validate_resnest(const ModelConfig& c) {
  MOEV_CHECK(c.branches >= 1, "model.branches = ", c.branches, ": expected >= 1 expert branch");
  MOEV_CHECK(!c.dims.empty() && c.dims.size() == c.depths.size(), "model.dims and model.depths: ",
             "expected lists of the same non-zero length, got ", c.dims.size(), " and ", c.depths.size());
  const auto S = static_cast<int64_t>(c.dims.size());
  MOEV_CHECK(c.shared_stages >= 0 && c.shared_stages < S, "model.shared_stages = ", c.shared_stages,
             ": expected 0..", S - 1, " (at least the last of the ", S, " stages belongs to each branch)");
  MOEV_CHECK(c.stem_channels >= 1, "model.stem_channels = ", c.stem_channels, ": ResNeSt needs a stem width >= 1");
  MOEV_CHECK(c.patch == 1 || c.patch == 2 || c.patch == 4, "model.patch = ", c.patch,
             ": the ResNeSt stem downsamples by 1, 2 or 4");
  MOEV_CHECK(c.radix >= 1 && c.cardinality >= 1, "model.radix and model.cardinality must be >= 1");
  for (int64_t s = 0; s < S; ++s) {
    MOEV_CHECK(c.depths[s] >= 1 && c.dims[s] >= 4 && c.dims[s] % 4 == 0, "model.dims / model.depths: stage ", s,
               " must have depth >= 1 and a width divisible by 4 (the bottleneck is a quarter), got ", c.dims[s]);
    MOEV_CHECK((c.dims[s] / 4) % (c.cardinality * c.radix) == 0, "model.dims[", s, "] = ", c.dims[s],
               ": its bottleneck width ", c.dims[s] / 4, " must divide into model.cardinality x model.radix = ",
               c.cardinality * c.radix, " groups (the split-attention conv)");
  }
  MOEV_CHECK(c.moe.kind == "none", "model.moe = '", models::to_string(c.moe),
             "': ResNeSt has expert branches (model.branches), not token-routed MoE layers");
  // Its convolutions run in fp32: accepting bf16 would run fp32 under a bf16 label.
  MOEV_CHECK(c.precision == "fp32", "model.precision = '", c.precision,
             "': ResNeSt runs fp32 only (bf16 applies to the GEMMs of vit and convnext)");
}

}  // namespace

std::vector<std::string> preset_names() {
  return {"vit-tiny",      "vmoe-tiny",         "vit-s32",           "vmoe-s32",
          "convnext-tiny", "convnext-moe-tiny", "convnext-iso-tiny", "convnext-iso-moe-tiny",
          "resnest-tiny",  "resnest-mb-tiny",   "resnest-cifar",     "resnest-mb-cifar",
          "resnest-50",    "resnest-mb-50"};
}

int64_t num_blocks(const ModelConfig& c) {
  if (c.family != "convnext" && c.family != "resnest") return c.depth;
  int64_t n = 0;
  for (auto d : c.depths) n += d;
  return n;
}

ModelConfig preset(const std::string& name) {
  if (name == "vit-tiny") return vit_tiny();
  if (name == "vmoe-tiny") return with_vmoe(vit_tiny(), 8);
  if (name == "vit-s32") return vit_s32();
  if (name == "vmoe-s32") return with_vmoe(vit_s32(), 32);
  if (name == "convnext-tiny") return convnext_tiny();
  if (name == "convnext-moe-tiny") return with_final_moe(convnext_tiny(), 8);
  if (name == "convnext-iso-tiny") return convnext_iso_tiny();
  if (name == "convnext-iso-moe-tiny") return with_final_moe(convnext_iso_tiny(), 8);
  if (name == "resnest-tiny") return resnest_tiny();
  if (name == "resnest-mb-tiny") return with_branches(resnest_tiny(), 3);
  if (name == "resnest-cifar") return resnest_cifar();
  if (name == "resnest-mb-cifar") return with_branches(resnest_cifar(), 3);
  if (name == "resnest-50") return resnest_50();
  if (name == "resnest-mb-50") return with_branches(resnest_50(), 3);
  std::string names;
  for (auto& n : preset_names()) names += " " + n;
  fail("model preset '", name, "' is unknown; presets:", names);
}

void validate(const ModelConfig& c) {
  MOEV_CHECK(c.family == "vit" || c.family == "convnext" || c.family == "convnext-iso" || c.family == "resnest",
             "model.family = '", c.family, "': expected vit, convnext, convnext-iso or resnest");
  MOEV_CHECK(c.image_size >= 1, "model.image_size = ", c.image_size, ": expected >= 1 (pixels per side)");
  MOEV_CHECK(c.channels >= 1, "model.channels = ", c.channels, ": expected >= 1 (1: gray, 3: RGB)");
  MOEV_CHECK(c.num_classes >= 2, "model.num_classes = ", c.num_classes, ": expected >= 2");
  // Sizes past these are typing slips, not models: say so, rather than fail
  // in the allocator with a byte count and no key.
  constexpr int64_t kMaxSide = 1 << 14, kMaxWidth = 1 << 16, kMaxClasses = 1 << 22, kMaxDepth = 1 << 10;
  auto at_most = [](const char* key, int64_t v, int64_t max) {
    MOEV_CHECK(v <= max, "model.", key, " = ", v, ": expected at most ", max);
  };
  at_most("image_size", c.image_size, kMaxSide);
  at_most("channels", c.channels, kMaxWidth);
  at_most("num_classes", c.num_classes, kMaxClasses);
  at_most("width", c.width, kMaxWidth);
  at_most("mlp_dim", c.mlp_dim, 4 * kMaxWidth);
  at_most("stem_channels", c.stem_channels, kMaxWidth);
  at_most("heads", c.heads, kMaxWidth);
  at_most("depth", c.depth, kMaxDepth);
  for (auto d : c.dims) at_most("dims", d, kMaxWidth);
  for (auto d : c.depths) at_most("depths", d, kMaxDepth);
  MOEV_CHECK(c.patch >= 1 && c.image_size % c.patch == 0, "model.patch = ", c.patch,
             ": must divide model.image_size = ", c.image_size);
  if (c.family == "vit") {
    MOEV_CHECK(c.width >= 1, "model.width = ", c.width, ": expected >= 1");
    MOEV_CHECK(c.heads >= 1, "model.heads = ", c.heads, ": expected >= 1");
    MOEV_CHECK(c.width % c.heads == 0, "model.width = ", c.width, ": must be a multiple of model.heads = ", c.heads);
  }
  if (c.family == "convnext") {
    MOEV_CHECK(!c.dims.empty() && c.dims.size() == c.depths.size(), "model.dims and model.depths: ",
               "expected lists of the same non-zero length, got ", c.dims.size(), " and ", c.depths.size());
    int64_t side = c.image_size / c.patch;
    for (size_t s = 0; s < c.dims.size(); ++s) {
      MOEV_CHECK(c.dims[s] >= 1 && c.depths[s] >= 1, "model.dims / model.depths: stage ", s,
                 " must have width and depth >= 1");
      if (s > 0) side = c.pad_odd ? (side + 1) / 2 : side / 2;
      MOEV_CHECK(side >= 1, "model: ", c.image_size, " px images are too small for ", c.dims.size(),
                 " stages after a stem of ", c.patch, " px (each later stage halves the side)");
    }
  }
  if (c.family == "resnest") validate_resnest(c);
  else
    MOEV_CHECK(c.stem_channels >= 0, "model.stem_channels = ", c.stem_channels,
               ": expected >= 0 (0: no early 3x3 convolution)");
  MOEV_CHECK(c.branches == 1 || c.family == "resnest", "model.branches = ", c.branches,
             ": expert branches are a ResNeSt feature (model.family = resnest)");
  MOEV_CHECK(c.drop_path >= 0 && c.drop_path < 1, "model.drop_path = ", c.drop_path, ": expected [0, 1)");
  // Trained as if unset, without a word: the ViT's blocks have no stochastic depth.
  MOEV_CHECK(c.drop_path == 0 || c.family != "vit", "model.drop_path = ", c.drop_path, ": stochastic depth is ",
             "in ConvNeXt and ResNeSt blocks; a ViT (model.family = vit) has none: set 0 (model.dropout regularises a ",
             "ViT)");
  MOEV_CHECK(c.depth >= 1, "model.depth = ", c.depth, ": expected >= 1 (blocks)");
  MOEV_CHECK(c.mlp_dim >= 1, "model.mlp_dim = ", c.mlp_dim, ": expected >= 1 (hidden width of an MLP)");
  MOEV_CHECK(c.layer_scale >= 0, "model.layer_scale = ", c.layer_scale,
             ": expected >= 0 (the initial scale of each block's residual branch)");
  MOEV_CHECK(c.dropout >= 0 && c.dropout < 1, "model.dropout = ", c.dropout, ": expected [0, 1)");
  try {
    nn::parse_precision(c.precision);
  } catch (const Error& e) {
    fail("model.", e.what());
  }
  moe_blocks(c.moe, num_blocks(c));
  if (c.moe.kind != "none") {
    moe::validate(c.router);
    // A negative weight rewards the imbalance the loss measures.
    for (const auto& [key, w] : {std::pair{"importance_weight", c.aux.importance}, std::pair{"load_weight", c.aux.load},
                                 std::pair{"switch_weight", c.aux.switch_lb}, std::pair{"z_weight", c.aux.z}})
      MOEV_CHECK(w >= 0, "moe.", key, " = ", w, ": expected >= 0 (0: off)");
  }
}

ClassifierPtr build_model(const ModelConfig& c) {
  validate(c);
  if (c.family == "vit") return std::make_shared<ViTImpl>(c);
  if (c.family == "resnest") return std::make_shared<ResNeStImpl>(c);
  return std::make_shared<ConvNeXtImpl>(c);
}

}  // namespace moev::models
