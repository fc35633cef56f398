// What a model costs per image: parameters, parameters a token actually uses
// (K of E experts), and forward multiply-add FLOPs (2 per MAC) of the GEMMs,
// convolutions and attention. Norms, activations and routing are left out: they
// are a few percent here. Used by `moev sweep` to put MoE and dense models on
// one accuracy-against-cost plot.
#pragma once

#include <cstdint>

#include "moev/models/model_config.h"

namespace moev::models {

struct ModelCost {
  int64_t params = 0;         // all parameters
  int64_t active_params = 0;  // params minus the (E - K) unused experts of each MoE layer
  double flops = 0;           // forward FLOPs per image, K experts per token
};

// Computed from the config alone; params agree with the built model's numel sum.
ModelCost model_cost(const ModelConfig& cfg);

}  // namespace moev::models
