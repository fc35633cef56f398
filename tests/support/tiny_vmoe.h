// The smallest V-MoE the tests train and route with: width 32, 2 heads, expert
// width 64, E = 4 in groups of 4 images, on 28 px Fashion-MNIST. Shared by the
// trainer, replica and evaluation tests; each sets what it checks on top.
#pragma once

#include <string>

#include "moev/models/model_config.h"

namespace moev::test {

inline models::ModelConfig tiny_vmoe(int64_t depth = 2, const std::string& placement = "last-1") {
  auto c = models::preset("vmoe-tiny");
  c.width = 32;
  c.depth = depth;
  c.heads = 2;
  c.mlp_dim = 64;
  c.moe = models::parse_placement(placement);
  c.router.num_experts = 4;
  c.router.group_size = 4;
  return c;
}

}  // namespace moev::test
