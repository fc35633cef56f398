// One builder for the router configs of the MoE test tables.
#pragma once

#include "moev/moe/router.h"

namespace moev::test {

inline moe::RouterConfig router_config(moe::RouterKind kind, int64_t E, int64_t K, double capacity,
                                       bool bpr, bool dropless, int64_t group_size,
                                       bool renormalize = false) {
  moe::RouterConfig cfg;
  cfg.kind = kind;
  cfg.num_experts = E;
  cfg.k = K;
  cfg.capacity_factor = capacity;
  cfg.bpr = bpr;
  cfg.dropless = dropless;
  cfg.group_size = group_size;
  cfg.renormalize = renormalize;
  return cfg;
}

}  // namespace moev::test
