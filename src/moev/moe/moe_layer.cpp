#include "moev/moe/moe_layer.h"

#include <cmath>

#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/dist/communicator.h"
#include "moev/moe/dispatch.h"
#include "moev/nn/random.h"

namespace moev::moe {

MoELayerImpl::MoELayerImpl(const MoELayerOptions& o) : options(o) {
  validate(o.router());
  const auto& r = o.router();
  const bool cosine = r.logits == "cosine";
  router_weight =
      register_parameter("router", torch::empty({r.num_experts, cosine ? r.cosine_dim : o.dim()}));
  if (cosine) {
    router_proj = register_parameter("router_proj", torch::empty({r.cosine_dim, o.dim()}));
    router_scale = register_parameter("router_scale", torch::empty({}));
  }
  experts = register_module(
      "experts", Experts(ExpertsOptions(o.router().num_experts, o.dim(), o.hidden())
                             .matmul_dtype(o.matmul_dtype())));
  reset_parameters();
}

void MoELayerImpl::reset_parameters() {
  // vmoe initialises the router kernel to zeros is an option; small random values
  // break the symmetry between experts from the first step.
  torch::NoGradGuard no_grad;
  router_weight.normal_(0, 0.02);
  if (router_proj.defined()) {
    // Unit-scale entries: only directions matter after the normalisation.
    router_weight.normal_(0, 1.0);
    router_proj.normal_(0, 1.0 / std::sqrt(static_cast<double>(options.dim())));
    router_scale.fill_(std::log(1.0 / 0.07));  // temperature 0.07 at the start
  }
  experts->reset_parameters();
}

void MoELayerImpl::set_router(const RouterConfig& cfg) {
  validate(cfg);
  MOEV_CHECK(cfg.num_experts == options.router().num_experts, "moe.num_experts = ",
             cfg.num_experts, " but this layer was trained with ", options.router().num_experts);
  MOEV_CHECK(cfg.logits == options.router().logits && cfg.cosine_dim == options.router().cosine_dim,
             "moe.router_logits = '", cfg.logits, "' (cosine_dim ", cfg.cosine_dim,
             ") but this layer was trained with '", options.router().logits, "' (cosine_dim ",
             options.router().cosine_dim, "): the logits are part of the architecture");
  options.router(cfg);
}

at::Tensor MoELayerImpl::forward(const at::Tensor& x) {
  MOEV_CHECK(x.dim() == 3 && x.size(2) == options.dim(), "MoELayer: expected [B, N, ",
             options.dim(), "], got ", x.sizes());
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), T = B * N;
  const auto& cfg = options.router();
  const int64_t E = cfg.num_experts;
  auto xf = x.reshape({T, D});

  auto logits = router_logits(xf);
  RoutingResult r = route(logits, cfg, N, is_training(), nn::thread_generator());

  // Gather the placed assignments (rows sorted by expert), run the experts as a
  // grouped GEMM, weight each row by its gate and add it back to its token.
  at::Tensor y;
  if (comm_) {  // only the A placed rows travel
    const int64_t A = r.offsets[E];
    auto gates = torch::cat({r.combine_gates.reshape(-1), r.combine_gates.new_zeros({1})});
    auto tokens = r.token_index.narrow(0, 0, A);
    auto weight = gates.index_select(0, r.gate_index.narrow(0, 0, A)).to(x.scalar_type());
    auto yd = run_remote_experts(xf.index_select(0, tokens), r.offsets) * weight.unsqueeze(1);
    y = torch::zeros({T, D}, x.options()).index_add_(0, tokens, yd);
  } else {
    const TokenRows tr = token_rows(r, T);
    auto yd = experts->forward(dispatch(xf, r, tr), r.offsets);
    y = combine(yd, r.combine_gates, r, tr);
  }

  stats_.expert_count.resize(E);  // from the host-side offsets: no device reads
  for (int64_t e = 0; e < E; ++e) stats_.expert_count[e] = r.offsets[e + 1] - r.offsets[e];
  stats_.dropped_fraction = r.dropped_fraction;
  stats_.unrouted_fraction = r.unrouted_fraction;
  stats_.tokens = T;
  stats_.capacity = r.capacity;
  stats_.aux = r.aux;
  if (options.keep_routing()) routing_ = std::move(r);
  return y.view({B, N, D});
}

void MoELayerImpl::shard_experts(dist::Communicator* comm) {
  MOEV_CHECK(comm && !comm_, "MoELayer::shard_experts: needs a communicator, once");
  const int64_t E = options.router().num_experts, W = comm->size();
  MOEV_CHECK(E % W == 0, "moe.num_experts = ", E, " does not split evenly over the ", W,
             " ranks of expert parallelism");
  const int64_t local = E / W, first = comm->rank() * local;
  torch::NoGradGuard no_grad;
  for (auto* t : {&experts->w1, &experts->b1, &experts->w2, &experts->b2})
    t->set_data(t->narrow(0, first, local).clone());
  experts->options.num_experts(local);
  comm_ = comm;
  first_expert_ = first;
}

at::Tensor MoELayerImpl::run_remote_experts(const at::Tensor& xd, const std::vector<int64_t>& offsets) {
  const int64_t W = comm_->size(), L = experts->options.num_experts(), E = W * L;
  // Rows per global expert go out; back come, from each source rank, its rows
  // for each of this rank's L experts.
  std::vector<int64_t> per_expert(E), send(W, 0), recv(W, 0);
  for (int64_t e = 0; e < E; ++e) {
    per_expert[e] = offsets[e + 1] - offsets[e];
    send[e / L] += per_expert[e];
  }
  auto counts = comm_->all_to_all(torch::tensor(per_expert, torch::kLong), std::vector<int64_t>(W, L),
                                  std::vector<int64_t>(W, L));  // [W * L]: source s, local expert j
  const int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t s = 0; s < W; ++s)
    for (int64_t j = 0; j < L; ++j) recv[s] += c[s * L + j];
  auto xr = dist::all_to_all_rows(*comm_, xd, send, recv);  // [rows in, D], by source then expert
  // Regroup by local expert (the grouped GEMM wants each expert's rows together).
  std::vector<int64_t> block(W * L + 1, 0), perm, local_offsets(L + 1, 0);
  for (int64_t i = 0; i < W * L; ++i) block[i + 1] = block[i] + c[i];
  perm.reserve(block.back());
  for (int64_t j = 0; j < L; ++j) {
    for (int64_t s = 0; s < W; ++s)
      for (int64_t k = block[s * L + j]; k < block[s * L + j + 1]; ++k) perm.push_back(k);
    local_offsets[j + 1] = static_cast<int64_t>(perm.size());
  }
  std::vector<int64_t> inverse(perm.size());
  for (size_t i = 0; i < perm.size(); ++i) inverse[perm[i]] = static_cast<int64_t>(i);
  auto ye = experts->forward(xr.index_select(0, torch::tensor(perm, torch::kLong)), local_offsets);
  auto yr = ye.index_select(0, torch::tensor(inverse, torch::kLong));
  return dist::all_to_all_rows(*comm_, yr, recv, send);
}

at::Tensor MoELayerImpl::router_logits(const at::Tensor& x) const {
  auto xf = x.to(torch::kFloat);
  if (!router_proj.defined()) return torch::linear(xf, router_weight);
  namespace F = torch::nn::functional;
  const auto unit = F::NormalizeFuncOptions().dim(1).eps(1e-6);
  auto h = F::normalize(torch::linear(xf, router_proj), unit);  // [T, Dr]
  auto e = F::normalize(router_weight, unit);                    // [E, Dr]
  // The temperature stays >= 0.01, so the logits stay within +-100.
  return torch::linear(h, e) * router_scale.clamp_max(std::log(100.0)).exp();
}

at::Tensor MoELayerImpl::aux_loss() const {
  const auto& a = stats_.aux;
  MOEV_CHECK(a.importance.defined(), "MoELayer::aux_loss called before forward");
  const auto& w = options.aux();
  return a.importance * w.importance + a.load * w.load + a.switch_lb * w.switch_lb + a.z * w.z;
}

std::vector<MoELayer> find_moe_layers(torch::nn::Module& root) {
  std::vector<MoELayer> out;
  if (auto* self = dynamic_cast<MoELayerImpl*>(&root))
    out.emplace_back(std::static_pointer_cast<MoELayerImpl>(self->shared_from_this()));
  for (auto& m : root.modules(/*include_self=*/false))
    if (auto p = std::dynamic_pointer_cast<MoELayerImpl>(m)) out.emplace_back(p);
  return out;
}

}  // namespace moev::moe
