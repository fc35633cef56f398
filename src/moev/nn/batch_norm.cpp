// BatchNorm2d (+ ReLU, or + a residual and ReLU at a block's end) on CPU
// floats: per channel, one pass for the batch statistics and one for the
// transform forward; one pass for the two gradient sums and one for dx backward. Each channel is reduced by one thread in a
// fixed order, so results do not depend on the thread count.
#include "moev/nn/batch_norm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/nn/kernels.h"

namespace moev::nn {

namespace {

// The transform both passes evaluate alike (this file is compiled without FMA
// contraction, which GCC applied to some loops' remainders and not others'),
// so the backward's ReLU mask is the forward's exactly.
[[gnu::always_inline]] inline float affine(float x, float scale, float shift) { return x * scale + shift; }

// Float partial sums over at most this many elements, then added in double:
// a 224-pixel plane is 50,176 values.
constexpr int64_t kChunk = 1024;

// Sums of d = x - pivot and d^2 over one plane of n floats. The pivot (a value
// of the channel) keeps E[d^2] - E[d]^2 from cancelling when |mean| >> std.
MOEV_CLONES void plane_sums(const float* __restrict x, int64_t n, float pivot, double& s1, double& s2) {
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    float a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = i0; i < i1; ++i) {
      const float d = x[i] - pivot;
      a += d;
      b += d * d;
    }
    s1 += a;
    s2 += b;
  }
}

MOEV_CLONES void plane_transform(const float* __restrict x, float* __restrict y, int64_t n, float scale, float shift,
                                 bool relu) {
  if (relu) {
    for (int64_t i = 0; i < n; ++i) y[i] = std::max(affine(x[i], scale, shift), 0.0f);
  } else {
    for (int64_t i = 0; i < n; ++i) y[i] = affine(x[i], scale, shift);
  }
}

// Sums of g and g (x - mean) over one plane, g = dy masked by the ReLU.
MOEV_CLONES void plane_grad_sums(const float* __restrict dy, const float* __restrict x, int64_t n, float scale,
                                 float shift, float mean, bool relu, double& s1, double& s2) {
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    float a = 0, b = 0;
    if (relu) {
#pragma omp simd reduction(+ : a, b)
      for (int64_t i = i0; i < i1; ++i) {
        const float g = affine(x[i], scale, shift) > 0.0f ? dy[i] : 0.0f;
        a += g;
        b += g * (x[i] - mean);
      }
    } else {
#pragma omp simd reduction(+ : a, b)
      for (int64_t i = i0; i < i1; ++i) {
        a += dy[i];
        b += dy[i] * (x[i] - mean);
      }
    }
    s1 += a;
    s2 += b;
  }
}

// dx = k g - c0 - c1 (x - mean): with batch statistics c0 = k mean(g) and
// c1 = k invstd^2 mean(g (x - mean)); with fixed (running) ones both are 0.
MOEV_CLONES void plane_dx(const float* __restrict dy, const float* __restrict x, float* __restrict dx, int64_t n,
                          float scale, float shift, float mean, float k, float c0, float c1, bool relu) {
  if (relu) {
    for (int64_t i = 0; i < n; ++i) {
      const float g = affine(x[i], scale, shift) > 0.0f ? dy[i] : 0.0f;
      dx[i] = k * g - c0 - c1 * (x[i] - mean);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) dx[i] = k * dy[i] - c0 - c1 * (x[i] - mean);
  }
}

// A block's end: y = max(r + x * scale + shift, 0), the sample's stochastic-depth
// scale folded into scale and shift.
MOEV_CLONES void plane_add_relu(const float* __restrict x, const float* __restrict r, float* __restrict y, int64_t n,
                                float scale, float shift) {
  for (int64_t i = 0; i < n; ++i) y[i] = std::max(r[i] + affine(x[i], scale, shift), 0.0f);
}

// Its backward's sums, g = dy where y > 0 (the saved output: no mask to
// recompute), u = k g (k the sample's scale): sums of u and u (x - mean); dr = g
// when wanted.
MOEV_CLONES void plane_add_relu_grad_sums(const float* __restrict dy, const float* __restrict y,
                                          const float* __restrict x, float* __restrict dr, int64_t n, float k,
                                          float mean, double& s1, double& s2) {
  for (int64_t i0 = 0; i0 < n; i0 += kChunk) {
    const int64_t i1 = std::min(n, i0 + kChunk);
    float a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = i0; i < i1; ++i) {
      const float g = y[i] > 0.0f ? dy[i] : 0.0f;
      a += g;
      b += g * (x[i] - mean);
    }
    s1 += double(k) * a;
    s2 += double(k) * b;
    if (dr)
      for (int64_t i = i0; i < i1; ++i) dr[i] = y[i] > 0.0f ? dy[i] : 0.0f;
  }
}

// dx = kk g - c0 - c1 (x - mean), kk = the channel's scale times the sample's.
MOEV_CLONES void plane_add_relu_dx(const float* __restrict dy, const float* __restrict y, const float* __restrict x,
                                   float* __restrict dx, int64_t n, float kk, float mean, float c0, float c1) {
  for (int64_t i = 0; i < n; ++i) dx[i] = kk * (y[i] > 0.0f ? dy[i] : 0.0f) - c0 - c1 * (x[i] - mean);
}

// y = transform(x) with per-channel mean and invstd; x: [B, C, H, W]
// contiguous; mean, invstd, weight, bias: [C] contiguous floats.
at::Tensor transform(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                     const at::Tensor& bias, bool relu) {
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3);
  auto y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *mp = mean.data_ptr<float>(), *sp = invstd.data_ptr<float>(),
              *w = weight.data_ptr<float>(), *b = bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Planes of a few hundred floats: enough of them per task to pay for it.
  at::parallel_for(0, x.size(0) * C, std::max<int64_t>(1, 4096 / std::max<int64_t>(HW, 1)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % C;
      const float scale = w[c] * sp[c];
      plane_transform(xp + p * HW, yp + p * HW, HW, scale, b[c] - mp[c] * scale, relu);
    }
  });
  return y;
}

struct BatchNormAct : public torch::autograd::Function<BatchNormAct> {
  // mean, invstd: [C] float, the statistics the forward normalised with;
  // batch_stats: whether they were the batch's (then they depend on x).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& mean, const at::Tensor& invstd, bool batch_stats,
                            bool relu) {
    ctx->save_for_backward({x, weight, bias, mean, invstd});
    ctx->saved_data["batch_stats"] = batch_stats;
    ctx->saved_data["relu"] = relu;
    return transform(x, mean, invstd, weight.contiguous(), bias.contiguous(), relu);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    MOEV_CHECK(!torch::autograd::GradMode::is_enabled(), "batch_norm2d: no double backward (create_graph)");
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto weight = saved[1].contiguous(), bias = saved[2].contiguous();
    const auto mean_t = saved[3].contiguous(), invstd_t = saved[4].contiguous();
    const bool batch_stats = ctx->saved_data["batch_stats"].toBool(), relu = ctx->saved_data["relu"].toBool();
    const auto dy = grads[0].contiguous();
    const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
    const double n = double(B * HW);
    const bool want_dx = ctx->needs_input_grad(0);
    auto dx = want_dx ? at::empty_like(x) : at::Tensor();
    auto dw = at::empty({C}, weight.options()), db = at::empty({C}, weight.options());
    const float *xp = x.data_ptr<float>(), *gp = dy.data_ptr<float>(), *w = weight.data_ptr<float>(),
                *b = bias.data_ptr<float>(), *mp = mean_t.data_ptr<float>(), *sp = invstd_t.data_ptr<float>();
    float *dxp = want_dx ? dx.data_ptr<float>() : nullptr, *dwp = dw.data_ptr<float>(), *dbp = db.data_ptr<float>();
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const float invstd = sp[c], mean = mp[c], scale = w[c] * invstd, shift = b[c] - mean * scale;
        double s1 = 0, s2 = 0;
        for (int64_t i = 0; i < B; ++i)
          plane_grad_sums(gp + (i * C + c) * HW, xp + (i * C + c) * HW, HW, scale, shift, mean, relu, s1, s2);
        dbp[c] = static_cast<float>(s1);
        dwp[c] = static_cast<float>(s2 * invstd);
        if (!want_dx) continue;
        const float k = scale;
        const float g0 = batch_stats ? static_cast<float>(k * s1 / n) : 0.0f;
        const float g1 = batch_stats ? static_cast<float>(k * double(invstd) * invstd * s2 / n) : 0.0f;
        for (int64_t i = 0; i < B; ++i) {
          const int64_t off = (i * C + c) * HW;
          plane_dx(gp + off, xp + off, dxp + off, HW, scale, shift, mean, k, g0, g1, relu);
        }
      }
    });
    return {dx, dw, db, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// y = relu(r + k_b transform(x)); k: [B] floats or null (all 1).
at::Tensor transform_add_relu(const at::Tensor& x, const at::Tensor& r, const float* k, const at::Tensor& mean,
                              const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3);
  auto y = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *rp = r.data_ptr<float>(), *mp = mean.data_ptr<float>(),
              *sp = invstd.data_ptr<float>(), *w = weight.data_ptr<float>(), *b = bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, x.size(0) * C, std::max<int64_t>(1, 4096 / std::max<int64_t>(HW, 1)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t c = p % C;
      const float ks = k ? k[p / C] : 1.0f, scale = w[c] * sp[c];
      plane_add_relu(xp + p * HW, rp + p * HW, yp + p * HW, HW, ks * scale, ks * (b[c] - mp[c] * scale));
    }
  });
  return y;
}

struct BatchNormAddRelu : public torch::autograd::Function<BatchNormAddRelu> {
  // k: [B] float sample scales (stochastic depth).
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const at::Tensor& bias, const at::Tensor& r, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& k, bool batch_stats) {
    auto y = transform_add_relu(x, r, k.data_ptr<float>(), mean, invstd, weight.contiguous(), bias.contiguous());
    ctx->save_for_backward({x, weight, mean, invstd, k, y});
    ctx->saved_data["batch_stats"] = batch_stats;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    MOEV_CHECK(!torch::autograd::GradMode::is_enabled(), "batch_norm2d_add_relu: no double backward (create_graph)");
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto weight = saved[1].contiguous(), mean_t = saved[2].contiguous(), invstd_t = saved[3].contiguous();
    const auto& k_t = saved[4];
    const auto& y = saved[5];
    const bool batch_stats = ctx->saved_data["batch_stats"].toBool();
    const auto dy = grads[0].contiguous();
    const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
    const double n = double(B * HW);
    const bool want_dx = ctx->needs_input_grad(0), want_dr = ctx->needs_input_grad(3);
    auto dx = want_dx ? at::empty_like(x) : at::Tensor(), dr = want_dr ? at::empty_like(x) : at::Tensor();
    auto dw = at::empty({C}, weight.options()), db = at::empty({C}, weight.options());
    const float *xp = x.data_ptr<float>(), *yp = y.data_ptr<float>(), *gp = dy.data_ptr<float>(),
                *w = weight.data_ptr<float>(), *mp = mean_t.data_ptr<float>(), *sp = invstd_t.data_ptr<float>(),
                *kp = k_t.data_ptr<float>();
    float *dxp = want_dx ? dx.data_ptr<float>() : nullptr, *drp = want_dr ? dr.data_ptr<float>() : nullptr,
          *dwp = dw.data_ptr<float>(), *dbp = db.data_ptr<float>();
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const float invstd = sp[c], mean = mp[c], scale = w[c] * invstd;
        double s1 = 0, s2 = 0;
        for (int64_t i = 0; i < B; ++i) {
          const int64_t off = (i * C + c) * HW;
          plane_add_relu_grad_sums(gp + off, yp + off, xp + off, drp ? drp + off : nullptr, HW, kp[i], mean, s1, s2);
        }
        dbp[c] = static_cast<float>(s1);
        dwp[c] = static_cast<float>(s2 * invstd);
        if (!want_dx) continue;
        const float g0 = batch_stats ? static_cast<float>(scale * s1 / n) : 0.0f;
        const float g1 = batch_stats ? static_cast<float>(scale * double(invstd) * invstd * s2 / n) : 0.0f;
        for (int64_t i = 0; i < B; ++i) {
          const int64_t off = (i * C + c) * HW;
          plane_add_relu_dx(gp + off, yp + off, xp + off, dxp + off, HW, scale * kp[i], mean, g0, g1);
        }
      }
    });
    return {dx, dw, db, dr, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Whether the fused kernels take x through bn: CPU float tensors, an affine
// BatchNorm with tracked statistics and a momentum.
bool fusable(const at::Tensor& x, const torch::nn::BatchNorm2dImpl& bn) {
  const auto& o = bn.options;
  bool ok = x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 4 && o.affine() &&
            o.track_running_stats() && o.momentum().has_value() && x.numel() > 0;
  for (const auto* t : {&bn.weight, &bn.bias, &bn.running_mean, &bn.running_var})
    ok = ok && t->scalar_type() == at::kFloat && t->device().is_cpu();
  return ok;
}

// The statistics x is normalised with: the batch's in training (the running
// ones updated as LibTorch's module updates them), else the running ones.
std::pair<at::Tensor, at::Tensor> statistics(const at::Tensor& x, torch::nn::BatchNorm2dImpl& bn) {
  const auto& o = bn.options;
  MOEV_CHECK(x.size(1) == o.num_features(), "batch_norm2d: ", x.size(1), " channels for a BatchNorm of ",
             o.num_features());
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  if (!bn.is_training())
    return {bn.running_mean.detach().to(torch::kFloat).contiguous(),
            (bn.running_var.detach().to(torch::kFloat) + o.eps()).rsqrt().contiguous()};
  MOEV_CHECK(B * HW > 1, "batch_norm2d: one value per channel in training ([", B, ", ", C, ", ", x.size(2), ", ",
             x.size(3), "]): the batch has no variance");
  auto mean = at::empty({C}, x.options()), invstd = at::empty({C}, x.options());
  std::vector<double> unbiased(C);
  const float* xp = x.data_ptr<float>();
  float *mp = mean.data_ptr<float>(), *sp = invstd.data_ptr<float>();
  const double n = double(B * HW), eps = o.eps();
  at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const float pivot = xp[c * HW];
      double s1 = 0, s2 = 0;
      for (int64_t i = 0; i < B; ++i) plane_sums(xp + (i * C + c) * HW, HW, pivot, s1, s2);
      const double d = s1 / n, var = std::max(s2 / n - d * d, 0.0);
      mp[c] = static_cast<float>(pivot + d);
      sp[c] = static_cast<float>(1.0 / std::sqrt(var + eps));
      unbiased[c] = var * n / (n - 1);
    }
  });
  torch::NoGradGuard ng;
  const double m = *o.momentum();
  bn.running_mean.mul_(1 - m).add_(mean, m);
  bn.running_var.mul_(1 - m).add_(torch::tensor(unbiased, torch::kDouble).to(torch::kFloat), m);
  bn.num_batches_tracked.add_(1);
  return {mean, invstd};
}

}  // namespace

at::Tensor batch_norm2d(const at::Tensor& x_in, torch::nn::BatchNorm2dImpl& bn, bool relu) {
  if (!fusable(x_in, bn)) {
    auto y = bn.forward(x_in);
    return relu ? torch::relu(y) : y;
  }
  const auto x = x_in.contiguous();
  const auto [mean, invstd] = statistics(x, bn);
  const bool grad = torch::autograd::GradMode::is_enabled() &&
                    (x.requires_grad() || bn.weight.requires_grad() || bn.bias.requires_grad());
  if (grad) return BatchNormAct::apply(x, bn.weight, bn.bias, mean, invstd, bn.is_training(), relu);
  return transform(x, mean, invstd, bn.weight.detach().contiguous(), bn.bias.detach().contiguous(), relu);
}

at::Tensor batch_norm2d_add_relu(const at::Tensor& x_in, torch::nn::BatchNorm2dImpl& bn, const at::Tensor& residual,
                                 const at::Tensor& sample_scale) {
  MOEV_CHECK(residual.sizes() == x_in.sizes(), "batch_norm2d_add_relu: a residual of ", residual.sizes(),
             " for an input of ", x_in.sizes());
  MOEV_CHECK(!sample_scale.defined() || (sample_scale.dim() == 1 && sample_scale.size(0) == x_in.size(0)),
             "batch_norm2d_add_relu: sample scales of ", sample_scale.sizes(), " for a batch of ", x_in.size(0));
  const bool fused = fusable(x_in, bn) && residual.device().is_cpu() && residual.scalar_type() == at::kFloat &&
                     (!sample_scale.defined() ||
                      (sample_scale.device().is_cpu() && sample_scale.scalar_type() == at::kFloat));
  if (!fused) {
    auto t = bn.forward(x_in);
    if (sample_scale.defined()) t = t * sample_scale.view({-1, 1, 1, 1});
    return torch::relu(residual + t);
  }
  const auto x = x_in.contiguous(), r = residual.contiguous();
  const auto k = sample_scale.defined() ? sample_scale.detach().contiguous() : at::Tensor();
  const auto [mean, invstd] = statistics(x, bn);
  const bool grad = torch::autograd::GradMode::is_enabled() &&
                    (x.requires_grad() || r.requires_grad() || bn.weight.requires_grad() || bn.bias.requires_grad());
  // (Autograd's apply takes no undefined tensors: all ones stand for no scale.)
  if (grad)
    return BatchNormAddRelu::apply(x, bn.weight, bn.bias, r, mean, invstd,
                                   k.defined() ? k : at::ones({x.size(0)}, x.options()), bn.is_training());
  return transform_add_relu(x, r, k.defined() ? k.data_ptr<float>() : nullptr, mean, invstd,
                            bn.weight.detach().contiguous(), bn.bias.detach().contiguous());
}

}  // namespace moev::nn
