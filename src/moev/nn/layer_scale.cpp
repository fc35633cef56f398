#include "moev/nn/layer_scale.h"

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include "moev/nn/kernels.h"

namespace moev::nn {

namespace {

// Rows per partial sum of gamma's gradient: fixed, so the sums (and the
// result) do not depend on the number of threads.
constexpr int64_t kGradChunk = 256;

// The factor of a row: image_scale of its image (rows per image: per_image),
// 1 without one.
struct RowScale {
  const float* scale;
  int64_t per_image;
  float at(int64_t r) const { return scale ? scale[r / per_image] : 1.0f; }
  // scale: [B] over R rows, or empty (no factor).
  static RowScale of(const at::Tensor& scale, int64_t R) {
    return {scale.numel() ? scale.data_ptr<float>() : nullptr, scale.numel() ? R / scale.numel() : 1};
  }
};

MOEV_CLONES void forward_rows(const float* x, const float* t, const float* gamma, RowScale s, float* out,
                              int64_t r0, int64_t r1, int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const float f = s.at(r);
    const float *xr = x + r * D, *tr = t + r * D;
    float* o = out + r * D;
    for (int64_t d = 0; d < D; ++d) o[d] = xr[d] + f * (gamma[d] * tr[d]);
  }
}

// dt = g * gamma * factor; dgamma += g * t * factor, row by row.
MOEV_CLONES void backward_rows(const float* g, const float* t, const float* gamma, RowScale s, float* dt,
                               float* dgamma, int64_t r0, int64_t r1, int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const float f = s.at(r);
    const float *gr = g + r * D, *tr = t + r * D;
    float* o = dt + r * D;
    for (int64_t d = 0; d < D; ++d) {
      const float gf = gr[d] * f;
      o[d] = gf * gamma[d];
      dgamma[d] += gf * tr[d];
    }
  }
}

struct LayerScaleFn : public torch::autograd::Function<LayerScaleFn> {
  // x2, t2: [R, D] contiguous, gamma: [D], scale: [B] (R = B * rows per image) or [0] (none) -> [R, D]
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x2, const at::Tensor& t2,
                            const at::Tensor& gamma, const at::Tensor& scale) {
    const int64_t R = x2.size(0), D = x2.size(1);
    auto out = at::empty_like(x2);
    const auto s = RowScale::of(scale, R);
    const float *xp = x2.data_ptr<float>(), *tp = t2.data_ptr<float>(), *gp = gamma.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, R, kGradChunk, [&](int64_t r0, int64_t r1) { forward_rows(xp, tp, gp, s, op, r0, r1, D); });
    ctx->save_for_backward({t2, gamma, scale});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &t2 = saved[0], &gamma = saved[1], &scale = saved[2];
    const int64_t R = t2.size(0), D = t2.size(1);
    const auto g = grads[0].contiguous();
    const int64_t chunks = (R + kGradChunk - 1) / kGradChunk;
    auto dt = at::empty_like(t2);
    auto partial = at::zeros({chunks, D}, t2.options());
    const auto s = RowScale::of(scale, R);
    const float *gp = g.data_ptr<float>(), *tp = t2.data_ptr<float>(), *wp = gamma.data_ptr<float>();
    float *dp = dt.data_ptr<float>(), *pp = partial.data_ptr<float>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        backward_rows(gp, tp, wp, s, dp, pp + c * D, c * kGradChunk, std::min(R, (c + 1) * kGradChunk), D);
    });
    // Chunk by chunk, in order: the same sums whatever the threads did.
    for (int64_t c = 1; c < chunks; ++c) add_to(pp + c * D, pp, D);
    return {ctx->needs_input_grad(0) ? g : at::Tensor(), dt, partial[0].clone(), at::Tensor()};
  }
};

}  // namespace

at::Tensor layer_scale_residual(const at::Tensor& x, const at::Tensor& t, const at::Tensor& gamma,
                                const at::Tensor& image_scale) {
  const int64_t B = x.size(0), D = x.size(-1);
  const bool own = x.device().is_cpu() && x.scalar_type() == at::kFloat && t.scalar_type() == at::kFloat &&
                   gamma.scalar_type() == at::kFloat && gamma.device().is_cpu() && x.sizes() == t.sizes() &&
                   gamma.dim() == 1 && gamma.size(0) == D && x.numel() > 0 &&
                   (!image_scale.defined() || (image_scale.scalar_type() == at::kFloat && image_scale.numel() == B));
  if (!own) {
    if (!image_scale.defined()) return torch::addcmul(x, t, gamma);
    std::vector<int64_t> shape(x.dim(), 1);
    shape[0] = B;
    return torch::addcmul(x, t, gamma * image_scale.view(shape).to(gamma.scalar_type()));
  }
  const auto x2 = x.reshape({-1, D}).contiguous(), t2 = t.reshape({-1, D}).contiguous();
  // Undefined tensors cannot pass through a custom function: no factor is an empty one.
  const auto scale = image_scale.defined() ? image_scale.contiguous() : at::empty({0}, x.options());
  return LayerScaleFn::apply(x2, t2, gamma.contiguous(), scale).view(x.sizes());
}

}  // namespace moev::nn
