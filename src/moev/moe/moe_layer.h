// The sparse MoE layer every moev model uses in place of an FFN (V-MoE, Riquelme
// et al. 2021; MoE in ConvNeXt/ViT, Videau et al. 2024): fp32 linear router ->
// route() -> gather tokens into expert slots -> batched expert FFNs -> weighted
// scatter back. Tokens dropped by capacity get zero here and keep their residual.
//
// Its router config can be changed after training (K, capacity, BPR, router kind)
// because the router weights do not depend on them. The logits are linear (V-MoE)
// or cosine (Chi et al. 2022, one of the routers Videau et al. compare): tokens are
// projected to a few dimensions and scored by cosine similarity with learned expert
// embeddings under a learned temperature, which bounds the logits and keeps one
// large-norm token from deciding the routing alone.
#pragma once

#include <cstdint>
#include <vector>

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "moev/moe/experts.h"
#include "moev/moe/router.h"

namespace moev::dist {
class Communicator;
}

namespace moev::moe {

// Weights of the auxiliary losses; the model's aux loss is their weighted sum over
// its MoE layers.
struct AuxWeights {
  double importance = 0.005;  // V-MoE importance loss
  double load = 0.005;        // V-MoE load loss (normal-CDF form)
  double switch_lb = 0.0;     // Switch/GShard load-balancing loss
  double z = 0.0;             // router z-loss (ST-MoE)
};

// What one forward call routed, for logs and analysis.
struct MoEStats {
  std::vector<int64_t> expert_count;  // slots filled per expert
  double dropped_fraction = 0;        // assignments past capacity (EC: tokens no expert took)
  double unrouted_fraction = 0;       // tokens that got no expert at all (residual only)
  int64_t tokens = 0;                 // T of the call (to merge calls' fractions)
  int64_t capacity = 0;               // slots per expert per group
  AuxLosses aux;                      // unweighted auxiliary losses
};

struct MoELayerOptions {
  MoELayerOptions(int64_t dim, int64_t hidden, RouterConfig router = {})
      : dim_(dim), hidden_(hidden), router_(router) {}
  TORCH_ARG(int64_t, dim);          // D
  TORCH_ARG(int64_t, hidden);       // H of each expert
  TORCH_ARG(RouterConfig, router);  // routing; changeable at inference
  TORCH_ARG(AuxWeights, aux);       // auxiliary loss weights
  TORCH_ARG(bool, keep_routing) = false;  // keep last RoutingResult (analysis)
  TORCH_ARG(at::ScalarType, matmul_dtype) = at::kFloat;  // expert GEMMs: kFloat or kBFloat16
};

class MoELayerImpl : public torch::nn::Module {
 public:
  explicit MoELayerImpl(const MoELayerOptions& options);
  void reset_parameters();

  // x: [B, N, D] -> [B, N, D]; aux losses and stats of the call in last_stats().
  at::Tensor forward(const at::Tensor& x);

  // Router logits of flattened tokens, fp32. x: [T, D] -> [T, E]
  at::Tensor router_logits(const at::Tensor& x) const;

  // Weighted sum of this layer's aux losses from its last forward (scalar).
  at::Tensor aux_loss() const;
  const MoEStats& last_stats() const { return stats_; }
  const RoutingResult& last_routing() const { return routing_; }

  void set_router(const RouterConfig& cfg);
  const RouterConfig& router_config() const { return options.router(); }

  // Expert parallelism over the ranks of comm: this layer keeps only experts
  // [rank * E/W, (rank + 1) * E/W) (E divisible by W; the others' weights are
  // dropped) and every forward sends each placed token to its expert's rank and
  // the result back, with all-to-all in forward and backward. Routing, capacity
  // and aux losses stay per rank, on the rank's own tokens. All ranks must run
  // the same number of forwards (collectives).
  void shard_experts(dist::Communicator* comm);
  int64_t first_expert() const { return first_expert_; }  // 0 unless sharded
  bool sharded() const { return comm_ != nullptr; }

  MoELayerOptions options;
  at::Tensor router_weight;  // linear: [E, D], no bias (V-MoE); cosine: expert embeddings [E, Dr]
  at::Tensor router_proj;    // cosine: projection P [Dr, D] (undefined for linear)
  at::Tensor router_scale;   // cosine: log(1 / temperature), scalar (undefined for linear)
  Experts experts{nullptr};

 private:
  MoEStats stats_;
  RoutingResult routing_;
  dist::Communicator* comm_ = nullptr;
  int64_t first_expert_ = 0;

  // Placed rows xd [A, D] (sorted by global expert) -> expert outputs [A, D],
  // computed on the experts' ranks.
  at::Tensor run_remote_experts(const at::Tensor& xd, const std::vector<int64_t>& offsets);
};
TORCH_MODULE(MoELayer);

// Every MoE layer inside a module tree, in registration order.
std::vector<MoELayer> find_moe_layers(torch::nn::Module& root);

}  // namespace moev::moe
