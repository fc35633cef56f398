#include "moev/moe/experts.h"

#include <cmath>

#include <torch/torch.h>

#include "moev/core/error.h"

namespace moev::moe {

ExpertsImpl::ExpertsImpl(const ExpertsOptions& o) : options(o) {
  const int64_t E = o.num_experts(), D = o.dim(), H = o.hidden();
  w1 = register_parameter("w1", torch::empty({E, D, H}));
  b1 = register_parameter("b1", torch::empty({E, H}));
  w2 = register_parameter("w2", torch::empty({E, H, D}));
  b2 = register_parameter("b2", torch::empty({E, D}));
  reset_parameters();
}

void ExpertsImpl::reset_parameters() {
  // Xavier-uniform per expert and near-zero biases, as ViT initialises its MLPs,
  // so an expert starts as the dense MLP it replaces would.
  torch::NoGradGuard no_grad;
  const double D = static_cast<double>(options.dim()), H = static_cast<double>(options.hidden());
  const double bound = std::sqrt(6.0 / (D + H));
  w1.uniform_(-bound, bound);
  w2.uniform_(-bound, bound);
  b1.normal_(0, 1e-6);
  b2.normal_(0, 1e-6);
}

namespace {

// Grouped expert FFN with a hand-written backward: per expert, three GEMMs in
// forward and six in backward, each writing into a slice of one preallocated
// buffer, plus one GELU pass over all rows.
struct GroupedFFN : public torch::autograd::Function<GroupedFFN> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                            const at::Tensor& b2, const std::vector<int64_t>& offsets) {
    const int64_t R = x.size(0), D = x.size(1), H = w1.size(2), E = w1.size(0), A = offsets[E];
    auto hpre = at::empty({R, H}, x.options());
    hpre.narrow(0, A, R - A).zero_();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
      if (n == 0) continue;
      auto dst = hpre.narrow(0, r0, n);
      at::addmm_out(dst, b1[e], x.narrow(0, r0, n), w1[e]);
    }
    auto act = at::gelu(hpre);
    auto out = at::empty({R, D}, x.options());
    out.narrow(0, A, R - A).zero_();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
      if (n == 0) continue;
      auto dst = out.narrow(0, r0, n);
      at::addmm_out(dst, b2[e], act.narrow(0, r0, n), w2[e]);
    }
    ctx->save_for_backward({x, w1, w2, hpre, act});
    ctx->saved_data["offsets"] = c10::IValue(offsets);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w1 = saved[1], &w2 = saved[2], &hpre = saved[3], &act = saved[4];
    const auto offsets = ctx->saved_data["offsets"].toIntVector();
    const int64_t E = w1.size(0);
    auto gy = grads[0].contiguous();
    auto gw1 = at::zeros_like(w1), gw2 = at::zeros_like(w2);
    auto gb1 = at::zeros({E, w1.size(2)}, x.options()), gb2 = at::zeros({E, w2.size(2)}, x.options());
    const int64_t A = offsets[E], R = act.size(0);
    auto gact = at::empty_like(act);
    gact.narrow(0, A, R - A).zero_();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
      if (n == 0) continue;
      auto gy_e = gy.narrow(0, r0, n);
      auto ga = gact.narrow(0, r0, n);
      at::mm_out(ga, gy_e, w2[e].t());
      auto gw2_e = gw2[e];
      at::mm_out(gw2_e, act.narrow(0, r0, n).t(), gy_e);
      auto gb2_e = gb2[e];
      at::sum_out(gb2_e, gy_e, {0});
    }
    auto ghpre = at::gelu_backward(gact, hpre);
    const bool need_x = ctx->needs_input_grad(0);
    auto gx = need_x ? at::empty_like(x) : at::Tensor();
    if (need_x) gx.narrow(0, A, R - A).zero_();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
      if (n == 0) continue;
      auto gh = ghpre.narrow(0, r0, n);
      auto gw1_e = gw1[e];
      at::mm_out(gw1_e, x.narrow(0, r0, n).t(), gh);
      auto gb1_e = gb1[e];
      at::sum_out(gb1_e, gh, {0});
      if (need_x) {
        auto gx_e = gx.narrow(0, r0, n);
        at::mm_out(gx_e, gh, w1[e].t());
      }
    }
    return {gx, gw1, gb1, gw2, gb2, at::Tensor()};
  }
};

}  // namespace

at::Tensor ExpertsImpl::forward(const at::Tensor& x, const std::vector<int64_t>& offsets) {
  MOEV_CHECK(static_cast<int64_t>(offsets.size()) == options.num_experts() + 1 &&
                 offsets.back() <= x.size(0),
             "Experts: offsets must hold E + 1 row offsets");
  return GroupedFFN::apply(x.contiguous(), w1, b1, w2, b2, offsets);
}

}  // namespace moev::moe
