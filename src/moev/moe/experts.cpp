#include "moev/moe/experts.h"

#include <algorithm>
#include <cmath>

#include <ATen/Parallel.h>

#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/nn/blas.h"

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

// Rows [r0, r0 + n) of a [rows, cols] buffer set to a bias row.
void fill_bias(float* dst, const float* bias, int64_t n, int64_t cols) {
  for (int64_t r = 0; r < n; ++r) std::copy(bias, bias + cols, dst + r * cols);
}

// Row sums of an [n, cols] block into out[cols].
void sum_rows(const float* src, int64_t n, int64_t cols, float* out) {
  std::fill(out, out + cols, 0.0f);
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < cols; ++c) out[c] += src[r * cols + c];
}

// out[rows of e] = in[rows of e] w[e] + b[e] for every expert e, experts side by
// side on the threads. in: [R, I], w: [E, I, O], b: [E, O], out: [R, O].
void expert_linear(const at::Tensor& in, const at::Tensor& w, const at::Tensor& b, at::Tensor& out,
                   const std::vector<int64_t>& offsets) {
  const int64_t E = w.size(0), I = w.size(1), O = w.size(2);
  const float *ip = in.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
      if (n == 0) continue;
      fill_bias(op + r0 * O, bp + e * O, n, O);
      nn::gemm_nn(int(n), int(O), int(I), ip + r0 * I, int(I), wp + e * I * O, int(O),
                  op + r0 * O, int(O), 1.0f, 1.0f);
    }
  });
}

// Grouped expert FFN with a hand-written backward. Experts run side by side on
// the threads (at::parallel_for over experts), each with single-threaded GEMMs
// on its own rows: with many experts the row blocks are small, and one
// multi-threaded GEMM per expert would spend its time forking and joining.
struct GroupedFFN : public torch::autograd::Function<GroupedFFN> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                            const at::Tensor& b2, const std::vector<int64_t>& offsets) {
    const int64_t R = x.size(0), D = x.size(1), H = w1.size(2), E = w1.size(0), A = offsets[E];
    auto hpre = at::empty({R, H}, x.options());
    auto out = at::empty({R, D}, x.options());
    hpre.narrow(0, A, R - A).zero_();
    out.narrow(0, A, R - A).zero_();
    expert_linear(x, w1, b1, hpre, offsets);
    auto act = at::gelu(hpre);
    expert_linear(act, w2, b2, out, offsets);
    ctx->save_for_backward({x, w1, w2, hpre, act});
    ctx->saved_data["offsets"] = c10::IValue(offsets);
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w1 = saved[1], &w2 = saved[2], &hpre = saved[3], &act = saved[4];
    const auto offsets = ctx->saved_data["offsets"].toIntVector();
    const int64_t E = w1.size(0), D = x.size(1), H = w1.size(2);
    const int64_t A = offsets[E], R = act.size(0);
    auto gy = grads[0].contiguous();
    auto gw1 = at::zeros_like(w1), gw2 = at::zeros_like(w2);
    auto gb1 = at::zeros({E, H}, x.options()), gb2 = at::zeros({E, D}, x.options());
    auto gact = at::empty_like(act);
    gact.narrow(0, A, R - A).zero_();
    const float *gyp = gy.data_ptr<float>(), *ap = act.data_ptr<float>(), *w2p = w2.data_ptr<float>();
    float *gap = gact.data_ptr<float>(), *gw2p = gw2.data_ptr<float>(), *gb2p = gb2.data_ptr<float>();
    at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        const float* gy_e = gyp + r0 * D;
        nn::gemm_nt(int(n), int(H), int(D), gy_e, int(D), w2p + e * H * D, int(D), gap + r0 * H,
                    int(H), 1.0f, 0.0f);  // d act = dy w2^T
        nn::gemm_tn(int(H), int(D), int(n), ap + r0 * H, int(H), gy_e, int(D), gw2p + e * H * D,
                    int(D), 1.0f, 0.0f);  // d w2 = act^T dy
        sum_rows(gy_e, n, D, gb2p + e * D);
      }
    });
    auto ghpre = at::gelu_backward(gact, hpre);
    const bool need_x = ctx->needs_input_grad(0);
    auto gx = need_x ? at::empty_like(x) : at::Tensor();
    if (need_x) gx.narrow(0, A, R - A).zero_();
    const float *ghp = ghpre.data_ptr<float>(), *xp = x.data_ptr<float>(), *w1p = w1.data_ptr<float>();
    float *gw1p = gw1.data_ptr<float>(), *gb1p = gb1.data_ptr<float>();
    float* gxp = need_x ? gx.data_ptr<float>() : nullptr;
    at::parallel_for(0, E, 1, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
        if (n == 0) continue;
        const float* gh = ghp + r0 * H;
        nn::gemm_tn(int(D), int(H), int(n), xp + r0 * D, int(D), gh, int(H), gw1p + e * D * H,
                    int(H), 1.0f, 0.0f);  // d w1 = x^T d hpre
        sum_rows(gh, n, H, gb1p + e * H);
        if (gxp)
          nn::gemm_nt(int(n), int(D), int(H), gh, int(H), w1p + e * D * H, int(H), gxp + r0 * D,
                      int(D), 1.0f, 0.0f);  // dx = d hpre w1^T
      }
    });
    return {gx, gw1, gb1, gw2, gb2, at::Tensor()};
  }
};

}  // namespace

at::Tensor ExpertsImpl::forward(const at::Tensor& x, const std::vector<int64_t>& offsets) {
  MOEV_CHECK(static_cast<int64_t>(offsets.size()) == options.num_experts() + 1 &&
                 offsets.back() <= x.size(0),
             "Experts: offsets must hold E + 1 row offsets");
  if (x.scalar_type() == at::kFloat && x.device().is_cpu() && w1.scalar_type() == at::kFloat)
    return GroupedFFN::apply(x.contiguous(), w1, b1, w2, b2, offsets);
  // Other devices and dtypes: the same computation from stock ops, one expert at a time.
  const int64_t E = options.num_experts(), A = offsets[E];
  std::vector<at::Tensor> parts;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = offsets[e], n = offsets[e + 1] - r0;
    if (n == 0) continue;
    auto h = torch::gelu(torch::addmm(b1[e], x.narrow(0, r0, n), w1[e]));
    parts.push_back(torch::addmm(b2[e], h, w2[e]));
  }
  parts.push_back(torch::zeros({x.size(0) - A, x.size(1)}, x.options()));
  return torch::cat(parts);
}

}  // namespace moev::moe
