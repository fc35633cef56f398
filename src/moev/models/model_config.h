// The config of every moev model: one plain struct, filled from presets, config
// files and CLI flags (moev/io/config.h), stored beside each checkpoint.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moev/models/classifier.h"
#include "moev/models/placement.h"
#include "moev/moe/moe_layer.h"
#include "moev/moe/router.h"

namespace moev::models {

struct ModelConfig {
  std::string family = "vit";  // model family: vit, convnext (hierarchical), convnext-iso, resnest
  int64_t image_size = 28;     // input height = width, pixels
  int64_t channels = 1;        // input channels
  int64_t num_classes = 10;    // L
  int64_t patch = 4;           // ViT patch / ConvNeXt stem side, pixels
  int64_t stem_channels = 0;   // ViT, ConvNeXt: 3x3 conv + GELU to this many channels before the patch embedding / stem (0: none); ResNeSt: stem width
  int64_t width = 128;         // D (ViT, isotropic ConvNeXt)
  int64_t depth = 6;           // blocks (ViT, isotropic ConvNeXt)
  std::vector<int64_t> dims = {32, 64, 128};  // hierarchical ConvNeXt / ResNeSt: width per stage
  std::vector<int64_t> depths = {2, 2, 4};    // hierarchical ConvNeXt / ResNeSt: blocks per stage
  double drop_path = 0.0;      // ConvNeXt / ResNeSt stochastic depth at the last block
  bool pad_odd = false;        // ConvNeXt: zero-pad an odd-sided map before each 2x2 downsampling (7x7 -> 4x4, not 3x3)
  int64_t branches = 1;        // ResNeSt: expert branches N, each the unshared stages and a head
  int64_t shared_stages = 2;   // ResNeSt: stages (after the stem) shared by all branches
  int64_t radix = 2;           // ResNeSt: split-attention radix R
  int64_t cardinality = 1;     // ResNeSt: cardinal groups G
  bool blur_pool = true;       // ResNeSt: blur-pool downsampling (anti-aliased) instead of avg/max pool
  double layer_scale = 1e-6;   // ConvNeXt layer scale initial value
  int64_t heads = 4;           // attention heads
  int64_t mlp_dim = 256;       // H of the MLP and of each expert
  double dropout = 0.0;        // dropout after attention and MLP (ViT), before each head (ResNeSt)
  std::string precision = "fp32";  // GEMM precision: fp32, or bf16 (mixed, fp32 weights)
  Placement moe;               // which blocks are MoE
  moe::RouterConfig router;    // routing of every MoE layer
  moe::AuxWeights aux;         // auxiliary loss weights
};

// Blocks of the model, numbered 0.. across stages: the range placements index.
int64_t num_blocks(const ModelConfig& cfg);

// Named presets: vit-tiny, vmoe-tiny (E=8, K=2, Last-2), vit-s32, vmoe-s32,
// convnext-tiny / convnext-moe-tiny (E=8, K=2 in the last two blocks),
// convnext-iso-tiny / convnext-iso-moe-tiny, resnest-tiny / resnest-mb-tiny
// (28 px; mb: N = 3 branches), resnest-cifar / resnest-mb-cifar (32 px RGB),
// resnest-50 / resnest-mb-50 (224 px).
ModelConfig preset(const std::string& name);
std::vector<std::string> preset_names();

void validate(const ModelConfig& cfg);
ClassifierPtr build_model(const ModelConfig& cfg);

}  // namespace moev::models
