// Routing decisions for the shared MoE core: top-K token choice with capacity,
// K-major priority (token order or BPR), dropless mode, Expert-Choice, and the
// auxiliary losses computed from the same logits.
//
// Placement is an O(T*K) loop on the CPU: it is sequential by nature (a position
// depends on every earlier assignment), tiny next to the expert GEMMs, and cheaper
// than any sort- or cumsum-based formulation here. It also yields the packed,
// expert-sorted row order directly, so dispatch needs no sort. On a CUDA device
// the few integer tensors it needs travel to the host and back.
#include "moev/moe/router.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

#include <torch/torch.h>

#include "moev/core/error.h"

namespace moev::moe {

RouterKind parse_router_kind(const std::string& name) {
  if (name == "topk" || name == "top_k") return RouterKind::kTopK;
  if (name == "expert_choice" || name == "ec") return RouterKind::kExpertChoice;
  fail("router kind '", name, "': expected topk or expert_choice");
}

std::string to_string(RouterKind kind) {
  return kind == RouterKind::kTopK ? "topk" : "expert_choice";
}

void validate(const RouterConfig& cfg) {
  // Past this a typing slip, not a model: named here rather than in the allocator's byte count.
  MOEV_CHECK(cfg.num_experts >= 1 && cfg.num_experts <= 16384, "moe.num_experts = ", cfg.num_experts,
             ": expected 1..16384");
  MOEV_CHECK(cfg.k >= 1, "moe.k = ", cfg.k, ": expected >= 1");
  MOEV_CHECK(cfg.k <= cfg.num_experts, "moe.k = ", cfg.k, " is larger than moe.num_experts = ",
             cfg.num_experts, ": a token cannot choose more experts than exist");
  MOEV_CHECK(cfg.capacity_factor > 0 && std::isfinite(cfg.capacity_factor),
             "moe.capacity = ", cfg.capacity_factor, ": expected a capacity ratio > 0");
  MOEV_CHECK(cfg.noise_std >= 0, "moe.noise_std = ", cfg.noise_std, ": expected >= 0");
  MOEV_CHECK(cfg.group_size >= 1, "moe.group_size = ", cfg.group_size, ": expected >= 1 image");
  MOEV_CHECK(cfg.logits == "linear" || cfg.logits == "cosine", "moe.router_logits = '", cfg.logits,
             "': expected linear or cosine");
  MOEV_CHECK(cfg.cosine_dim >= 1, "moe.cosine_dim = ", cfg.cosine_dim, ": expected >= 1");
}

void refuse_unused_topk_settings(const RouterConfig& cfg) {
  if (cfg.kind == RouterKind::kExpertChoice)
    for (const auto& [key, on, why] :
         {std::tuple{"moe.dropless", cfg.dropless, "each expert always takes its capacity of tokens"},
          {"moe.bpr", cfg.bpr, "there is no token priority to change (BPR orders top-K's tokens)"},
          {"moe.renormalize", cfg.renormalize, "a token's experts are not a top-K whose gates could sum to 1"}})
      MOEV_CHECK(!on, key, " = true with moe.router = expert_choice: ", why, "; set ", key,
                 " = false, or route with topk");
  // BPR orders tokens for the capacity a dropless router does not have (eval refused the pair; train took it).
  MOEV_CHECK(!(cfg.dropless && cfg.bpr), "moe.bpr = true with moe.dropless = true: every assignment is placed, ",
             "so there is no priority to give; set one of them false");
}

int64_t expert_capacity(const RouterConfig& cfg, int64_t tokens_per_group) {
  const double c = std::ceil(static_cast<double>(cfg.k) * static_cast<double>(tokens_per_group) *
                             cfg.capacity_factor / static_cast<double>(cfg.num_experts));
  // No expert can take a token twice, so S is the most it is ever offered; a
  // ratio of 1e17 made c overflow int64 and every token was dropped.
  return std::max<int64_t>(1, static_cast<int64_t>(std::min(c, static_cast<double>(tokens_per_group))));
}

namespace {

// Coefficient of variation squared along the last dim, averaged over the rest.
// Population std, as vmoe computes it.
torch::Tensor cv_squared(const torch::Tensor& x) {
  auto mean = x.mean(-1);
  auto var = (x - mean.unsqueeze(-1)).pow(2).mean(-1);
  return (var / (mean.pow(2) + 1e-10)).mean();
}

struct Groups {
  int64_t size;   // S: tokens per full group
  int64_t count;  // G
  torch::Tensor id;     // int64 [T]: group of each token
  torch::Tensor tokens; // float [G, 1]: tokens in each group
};

Groups make_groups(int64_t T, int64_t S, const torch::Device& dev) {
  Groups g;
  g.size = S;
  g.count = (T + S - 1) / S;
  g.id = torch::arange(T, torch::TensorOptions().dtype(torch::kLong).device(dev)).div(S, "floor");
  std::vector<float> n(g.count, static_cast<float>(S));
  if (T % S) n.back() = static_cast<float>(T % S);
  g.tokens = torch::tensor(n).to(dev).unsqueeze(1);
  return g;
}

// Sum over the tokens of each group: [T, E] -> [G, E].
torch::Tensor group_sum(const torch::Tensor& x, const Groups& g) {
  if (x.size(0) == g.count * g.size) return x.view({g.count, g.size, x.size(1)}).sum(1);
  return torch::zeros({g.count, x.size(1)}, x.options()).index_add(0, g.id, x);
}

void aux_losses(RoutingResult& r, const torch::Tensor& logits, const torch::Tensor& clean_probs,
                const torch::Tensor& noisy_logits, const torch::Tensor& gates,
                const torch::Tensor& top1, const RouterConfig& cfg, const Groups& g) {
  const int64_t E = cfg.num_experts;
  r.aux.importance = cv_squared(group_sum(clean_probs, g));

  // Load: probability that expert e stays in the noisy top-K if its own noise were
  // redrawn; smooth in the clean logits, unlike the hard counts.
  const double sigma = cfg.noise_std / static_cast<double>(E);
  if (sigma > 0) {
    auto threshold = std::get<0>(noisy_logits.topk(cfg.k, -1)).select(-1, cfg.k - 1).unsqueeze(-1);
    auto z = (threshold - logits) / sigma;
    auto p = 1.0 - 0.5 * (1.0 + torch::erf(z * M_SQRT1_2));
    r.aux.load = cv_squared(group_sum(p, g) / g.tokens);
  } else {
    r.aux.load = torch::zeros({}, logits.options());
  }

  auto frac = group_sum(torch::one_hot(top1, E).to(gates.scalar_type()), g) / g.tokens;
  auto mean_gate = group_sum(gates, g) / g.tokens;
  r.aux.switch_lb = (frac * mean_gate).sum(-1).mean() * static_cast<double>(E);
  r.aux.z = torch::logsumexp(logits, -1).pow(2).mean();
}

// Writes the packed layout from per-assignment (expert, position-in-expert)
// decisions: rows sorted by expert, each expert's rows in placement order.
// `rows` >= A is the padded length: rows past A read token 0 with the zero
// weight at index T * E, so every per-call buffer has the same size from call
// to call and the allocator reuses it instead of fragmenting the heap.
void pack(RoutingResult& r, const std::vector<int64_t>& count, const std::vector<int64_t>& tok,
          const std::vector<int64_t>& exp, const std::vector<int64_t>& pos, int64_t E, int64_t T,
          int64_t rows, const torch::Device& dev) {
  r.offsets.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) r.offsets[e + 1] = r.offsets[e] + count[e];
  const int64_t A = r.offsets[E];
  rows = std::max(rows, A);
  auto token_index = torch::zeros({rows}, torch::kLong);
  auto gate_index = torch::full({rows}, T * E, torch::kLong);
  int64_t* ti = token_index.data_ptr<int64_t>();
  int64_t* gi = gate_index.data_ptr<int64_t>();
  for (size_t i = 0; i < tok.size(); ++i) {
    const int64_t row = r.offsets[exp[i]] + pos[i];
    ti[row] = tok[i];
    gi[row] = tok[i] * E + exp[i];
  }
  r.token_index = token_index.to(dev);
  r.gate_index = gate_index.to(dev);
  r.expert_count = torch::tensor(count, torch::kLong).to(dev);
}

void place_topk(RoutingResult& r, const torch::Tensor& gates, const RouterConfig& cfg,
                const Groups& g) {
  const int64_t T = gates.size(0), E = cfg.num_experts, K = cfg.k;
  r.assign_expert = std::get<1>(gates.topk(K, -1));
  auto idx_cpu = r.assign_expert.to(torch::kCPU).contiguous();
  const int64_t* idx = idx_cpu.data_ptr<int64_t>();

  torch::Tensor prio_cpu;
  const float* prio = nullptr;
  if (cfg.bpr) {
    prio_cpu = std::get<0>(gates.max(-1)).to(torch::kCPU, torch::kFloat).contiguous();
    prio = prio_cpu.data_ptr<float>();
  }
  // Pass 1: decide every (token, choice) -> position in its expert, or dropped.
  auto assign_pos = torch::full({T, K}, -1, torch::kLong);  // position in expert, -1 dropped
  int64_t* ap = assign_pos.data_ptr<int64_t>();
  std::vector<int64_t> count(E, 0), fill(E), order, tok, exp, pos;
  tok.reserve(T * K);
  exp.reserve(T * K);
  pos.reserve(T * K);
  int64_t dropped = 0, cap_seen = 0;
  const int64_t cap_full = cfg.dropless ? T * K : expert_capacity(cfg, g.size);
  for (int64_t grp = 0; grp < g.count; ++grp) {
    const int64_t t0 = grp * g.size, t1 = std::min(T, t0 + g.size);
    const int64_t cap_g = cfg.dropless ? T * K : expert_capacity(cfg, t1 - t0);
    order.resize(t1 - t0);
    std::iota(order.begin(), order.end(), t0);
    if (prio)  // BPR: most confident tokens claim capacity first; ties keep token order
      std::stable_sort(order.begin(), order.end(),
                       [prio](int64_t a, int64_t b) { return prio[a] > prio[b]; });
    std::fill(fill.begin(), fill.end(), 0);
    for (int64_t k = 0; k < K; ++k) {  // K-major: all first choices before any second
      for (int64_t t : order) {
        const int64_t e = idx[t * K + k];
        if (fill[e] < cap_g) {
          ++fill[e];
          ap[t * K + k] = count[e];
          tok.push_back(t);
          exp.push_back(e);
          pos.push_back(count[e]++);
        } else {
          ++dropped;
        }
      }
    }
    for (int64_t e = 0; e < E; ++e) cap_seen = std::max(cap_seen, fill[e]);
  }
  // Pass 2: positions -> rows of the packed layout.
  const auto dev = gates.device();
  // Fixed per (batch, config): the most rows any call can place.
  const int64_t rows = cfg.dropless ? T * K : std::min(T * K, E * cap_full * g.count);
  pack(r, count, tok, exp, pos, E, T, rows, dev);
  auto offs = torch::tensor(std::vector<int64_t>(r.offsets.begin(), r.offsets.end() - 1), torch::kLong);
  r.assign_row = torch::where(assign_pos >= 0, assign_pos + offs.index_select(0, idx_cpu.view(-1)).view({T, K}),
                              assign_pos).to(dev);
  r.capacity = cfg.dropless ? std::max<int64_t>(cap_seen, 1) : cap_full;
  r.groups = g.count;
  r.dropped_fraction = T > 0 ? static_cast<double>(dropped) / static_cast<double>(T * K) : 0.0;
  // A token with one of its K choices dropped still passes an expert; one with all K dropped does not.
  int64_t unrouted = 0;
  if (dropped > 0)
    for (int64_t t = 0; t < T; ++t) {
      int64_t k = 0;
      while (k < K && ap[t * K + k] < 0) ++k;
      unrouted += k == K;
    }
  r.unrouted_fraction = T > 0 ? static_cast<double>(unrouted) / static_cast<double>(T) : 0.0;
}

// Expert-Choice (Zhou et al. 2022): each expert takes the `capacity` tokens of the
// group with the highest gate for it, so load is balanced by construction and a
// token may get any number of experts, including none.
void place_expert_choice(RoutingResult& r, const torch::Tensor& gates, const RouterConfig& cfg,
                         const Groups& g) {
  const int64_t T = gates.size(0), E = cfg.num_experts;
  auto gates_cpu = gates.detach().to(torch::kCPU, torch::kFloat);
  std::vector<int64_t> count(E, 0), tok, exp, pos;
  std::vector<char> picked(T, 0);
  for (int64_t grp = 0; grp < g.count; ++grp) {
    const int64_t t0 = grp * g.size, t1 = std::min(T, t0 + g.size);
    const int64_t take = std::min(expert_capacity(cfg, t1 - t0), t1 - t0);
    auto top = std::get<1>(gates_cpu.slice(0, t0, t1).t().topk(take, -1)).contiguous();  // [E, take]
    const int64_t* tp = top.data_ptr<int64_t>();
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t j = 0; j < take; ++j) {
        const int64_t t = t0 + tp[e * take + j];
        tok.push_back(t);
        exp.push_back(e);
        pos.push_back(count[e]++);
        picked[t] = 1;
      }
    }
  }
  pack(r, count, tok, exp, pos, E, T, /*rows=*/0, gates.device());
  r.capacity = std::min(expert_capacity(cfg, g.size), g.size);
  r.groups = g.count;
  int64_t none = 0;
  for (char p : picked) none += p ? 0 : 1;
  r.dropped_fraction = T > 0 ? static_cast<double>(none) / static_cast<double>(T) : 0.0;
  r.unrouted_fraction = r.dropped_fraction;
}

}  // namespace

RoutingResult route(const at::Tensor& logits_in, const RouterConfig& cfg,
                    int64_t tokens_per_image, bool training,
                    const c10::optional<at::Generator>& noise) {
  validate(cfg);
  MOEV_CHECK(logits_in.dim() == 2 && logits_in.size(1) == cfg.num_experts,
             "router logits: expected [T, ", cfg.num_experts, "], got ", logits_in.sizes());
  MOEV_CHECK(tokens_per_image >= 1, "router: tokens_per_image must be >= 1");
  auto logits = logits_in.to(torch::kFloat);  // routing always in fp32
  const int64_t T = logits.size(0), E = cfg.num_experts;
  const Groups g = make_groups(T, cfg.group_size * tokens_per_image, logits.device());

  auto clean_probs = torch::softmax(logits, -1);
  torch::Tensor noisy = logits, gates = clean_probs;
  if (training && cfg.noise_std > 0) {
    noisy = logits + at::randn(logits.sizes(), noise, logits.options()) * (cfg.noise_std / static_cast<double>(E));
    gates = torch::softmax(noisy, -1);
  }

  RoutingResult r;
  if (cfg.kind == RouterKind::kTopK) {
    place_topk(r, gates.detach(), cfg, g);
    r.combine_gates = gates;
    if (cfg.renormalize) {
      auto chosen = gates.gather(1, r.assign_expert).sum(-1, /*keepdim=*/true);
      r.combine_gates = gates / (chosen + 1e-9);
    }
  } else {
    place_expert_choice(r, gates.detach(), cfg, g);
    r.combine_gates = gates;
  }
  if (training) {
    auto top1 = std::get<1>(gates.detach().max(-1));
    aux_losses(r, logits, clean_probs, noisy, gates, top1, cfg, g);
  } else {  // nothing trains on them; at E = 64 they cost as much as the routing
    auto zero = torch::zeros({}, logits.options());
    r.aux = AuxLosses{zero, zero, zero, zero};
  }
  return r;
}

}  // namespace moev::moe
