// Presets, validation and the model factory.
#include "moev/models/model_config.h"

#include <torch/torch.h>

#include "moev/core/error.h"
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
ModelConfig with_vmoe(ModelConfig c, int64_t experts) {
  c.moe.kind = "last";
  c.moe.n = 2;
  c.router.num_experts = experts;
  c.router.k = 2;
  return c;
}
}  // namespace

std::vector<std::string> preset_names() { return {"vit-tiny", "vmoe-tiny", "vit-s32", "vmoe-s32"}; }

ModelConfig preset(const std::string& name) {
  if (name == "vit-tiny") return vit_tiny();
  if (name == "vmoe-tiny") return with_vmoe(vit_tiny(), 8);
  if (name == "vit-s32") return vit_s32();
  if (name == "vmoe-s32") return with_vmoe(vit_s32(), 32);
  std::string names;
  for (auto& n : preset_names()) names += " " + n;
  fail("model preset '", name, "' is unknown; presets:", names);
}

void validate(const ModelConfig& c) {
  MOEV_CHECK(c.family == "vit", "model.family = '", c.family, "': expected vit");
  MOEV_CHECK(c.image_size >= 1 && c.channels >= 1 && c.num_classes >= 2, "model: image_size, ",
             "channels must be >= 1 and num_classes >= 2");
  MOEV_CHECK(c.patch >= 1 && c.image_size % c.patch == 0, "model.patch = ", c.patch,
             ": must divide model.image_size = ", c.image_size);
  MOEV_CHECK(c.width >= 1 && c.heads >= 1 && c.width % c.heads == 0, "model.width = ", c.width,
             ": must be a multiple of model.heads = ", c.heads);
  MOEV_CHECK(c.depth >= 1 && c.mlp_dim >= 1, "model.depth and model.mlp_dim must be >= 1");
  MOEV_CHECK(c.dropout >= 0 && c.dropout < 1, "model.dropout = ", c.dropout, ": expected [0, 1)");
  try {
    nn::parse_precision(c.precision);
  } catch (const Error& e) {
    fail("model.", e.what());
  }
  moe_blocks(c.moe, c.depth);
  if (c.moe.kind != "none") moe::validate(c.router);
}

ClassifierPtr build_model(const ModelConfig& c) {
  validate(c);
  return std::make_shared<ViTImpl>(c);
}

}  // namespace moev::models
