// Routers of the shared MoE core. A router is a function: given router logits for
// the tokens of one call and the routing options, it decides which expert slot
// each token goes to and with which combine weight. It knows nothing of models,
// so it is tested on its own against dense references.
//
// Layout of the decision (never a dense one-hot [S, E, C] tensor): tokens are
// split into G routing groups of S tokens (group_size images each); each expert
// takes at most `capacity` assignments per group. The A placed assignments are
// listed sorted by expert: rows offsets[e] .. offsets[e+1] of token_index belong
// to expert e. The experts then run as one grouped GEMM over those rows, so no
// FLOP is spent on empty capacity slots.
//
// V-MoE (Riquelme et al. 2021, google-research/vmoe routing.py) conventions:
// noisy softmax gates in training, top-K choices, K-major priority with token
// order or Batch Priority Routing, capacity ceil(K * S * C / E) (at most S), selected gate
// probabilities as combine weights (not renormalised unless asked).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace moev::moe {

enum class RouterKind { kTopK, kExpertChoice };
RouterKind parse_router_kind(const std::string& name);  // "topk" | "expert_choice"
std::string to_string(RouterKind kind);

struct RouterConfig {
  RouterKind kind = RouterKind::kTopK;  // top-K token choice, or Expert-Choice
  int64_t num_experts = 8;              // E
  int64_t k = 2;                        // experts per token (top-K); EC: average per token
  double capacity_factor = 1.05;        // C in ceil(K*S*C/E); <= 0 rejected
  bool dropless = false;                // no capacity limit: every assignment placed
  bool bpr = false;                     // Batch Priority Routing (order by max gate)
  bool renormalize = false;             // divide the K selected gates by their sum
  double noise_std = 1.0;               // train noise: eps ~ N(0, (noise_std/E)^2)
  int64_t group_size = 8;               // images routed together (vmoe: 8)
  // How the layer computes the logits it routes on. Part of the architecture, so
  // fixed at training (unlike the fields above, which eval may change).
  std::string logits = "linear";        // linear W x (V-MoE), or cosine: cos(P x, e_i) / tau
  int64_t cosine_dim = 16;              // cosine: width of the projection P and embeddings e_i
};

// Throws moev::Error naming the field when the config cannot route (K > E, ...).
void validate(const RouterConfig& cfg);

// Top-K's dropless mode, BPR and renormalisation with Expert-Choice, which
// ignores them, and BPR with dropless top-K: an error for a new run (one that set them trained without them
// at exit 0). Not part of validate(), so models saved with them still load.
void refuse_unused_topk_settings(const RouterConfig& cfg);

// Slots each expert gets in one group of S tokens: ceil(K * S * C / E), at least 1, at most S.
int64_t expert_capacity(const RouterConfig& cfg, int64_t tokens_per_group);

// Auxiliary losses of one routing call (scalars, differentiable), averaged over
// routing groups.
struct AuxLosses {
  at::Tensor importance;  // CV(sum_tokens softmax(clean logits))^2
  at::Tensor load;        // CV(sum_tokens P(expert stays in the noisy top-K))^2
  at::Tensor switch_lb;   // E * sum_e frac_top1_e * mean_gate_e (Switch/GShard)
  at::Tensor z;           // mean_tokens logsumexp(logits)^2 (ST-MoE)
};

struct RoutingResult {
  at::Tensor combine_gates;  // float [T, E]: weights the rows point into (differentiable)
  at::Tensor token_index;    // int64 [R]: token of each placed assignment, sorted by expert
  at::Tensor gate_index;     // int64 [R]: index of its weight in combine_gates.view(-1)
  std::vector<int64_t> offsets;  // E + 1 row offsets of the experts; A = offsets[E] placed
  // Rows A..R-1 are padding (token 0, gate index T * E = a zero weight). For top-K
  // R = min(T * K, E * capacity * G), the most a call can place, so buffer sizes
  // do not vary from call to call and the allocator reuses them.
  at::Tensor assign_expert;  // int64 [T, K]: top-K experts per token (undefined for EC)
  at::Tensor assign_row;     // int64 [T, K]: row of that choice in token_index, -1 = dropped
  at::Tensor expert_count;   // int64 [E]: assignments placed per expert
  int64_t capacity = 0;      // assignments per expert per group (dropless: largest seen)
  int64_t groups = 0;        // G
  double dropped_fraction = 0;  // assignments (token, choice) that got no slot (EC: tokens no expert took)
  double unrouted_fraction = 0;  // tokens that got no expert at all: only their residual passes the layer
  AuxLosses aux;              // auxiliary losses of this routing (zeros when not training)
};

// logits: [T, E] fp32 router logits W_r x (clean), T = B * N.
// tokens_per_image = N, so a group is group_size * N consecutive tokens.
// training: add noise to the gates and compute the load loss from it.
// noise: RNG of the training noise (nullopt: the global CPU generator).
RoutingResult route(const at::Tensor& logits, const RouterConfig& cfg, int64_t tokens_per_image,
                    bool training, const c10::optional<at::Generator>& noise = c10::nullopt);

}  // namespace moev::moe
