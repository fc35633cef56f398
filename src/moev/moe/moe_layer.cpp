#include "moev/moe/moe_layer.h"

#include <cmath>

#include <torch/torch.h>

#include "moev/core/error.h"

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
  RoutingResult r = route(logits, cfg, N, is_training(), noise_);

  // Gather the placed assignments (rows sorted by expert), run the experts as a
  // grouped GEMM, weight each row by its gate and add it back to its token.
  auto gates = torch::cat({r.combine_gates.reshape(-1), r.combine_gates.new_zeros({1})});
  auto weight = gates.index_select(0, r.gate_index).to(x.scalar_type());  // padding rows: 0
  auto xd = xf.index_select(0, r.token_index);
  auto yd = experts->forward(xd, r.offsets) * weight.unsqueeze(1);
  auto y = torch::zeros({T, D}, x.options()).index_add_(0, r.token_index, yd);

  stats_.expert_count.resize(E);  // from the host-side offsets: no device reads
  for (int64_t e = 0; e < E; ++e) stats_.expert_count[e] = r.offsets[e + 1] - r.offsets[e];
  stats_.dropped_fraction = r.dropped_fraction;
  stats_.capacity = r.capacity;
  stats_.aux = r.aux;
  if (options.keep_routing()) routing_ = std::move(r);
  return y.view({B, N, D});
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
