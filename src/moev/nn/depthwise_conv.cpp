#include "moev/nn/depthwise_conv.h"

#include <algorithm>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/nn/kernels.h"

namespace moev::nn {

namespace detail {

struct Shape {
  int64_t B, H, W, C, k;
};

// Rows r = b * H + h in [r0, r1) of out = bias + depthwise(x, taps); taps is
// [k*k, C] (tap-major, so each tap's weights are contiguous over C). The
// backward reuses it for the input gradient with the taps flipped.
MOEV_CLONES void depthwise_rows(const float* x, const float* taps, const float* bias, float* out,
                                Shape s, int64_t r0, int64_t r1) {
  const int64_t p = s.k / 2, C = s.C;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t b = r / s.H, h = r % s.H;
    const int64_t i0 = std::max<int64_t>(0, p - h), i1 = std::min<int64_t>(s.k, s.H + p - h);
    for (int64_t w = 0; w < s.W; ++w) {
      float* __restrict o = out + (r * s.W + w) * C;
      for (int64_t c = 0; c < C; ++c) o[c] = bias ? bias[c] : 0.0f;
      const int64_t j0 = std::max<int64_t>(0, p - w), j1 = std::min<int64_t>(s.k, s.W + p - w);
      for (int64_t i = i0; i < i1; ++i) {
        const float* xrow = x + (b * s.H + h + i - p) * s.W * C;
        for (int64_t j = j0; j < j1; ++j) {
          const float* __restrict xp = xrow + (w + j - p) * C;
          const float* __restrict tp = taps + (i * s.k + j) * C;
          for (int64_t c = 0; c < C; ++c) o[c] += xp[c] * tp[c];
        }
      }
    }
  }
}

// Images [b0, b1): gtaps [k*k, C] += sum over positions of gy * shifted x, and
// gbias [C] += sum of gy.
MOEV_CLONES void depthwise_weight_grad(const float* x, const float* gy, float* gtaps, float* gbias,
                                       Shape s, int64_t b0, int64_t b1) {
  const int64_t p = s.k / 2, C = s.C;
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t h = 0; h < s.H; ++h) {
      const int64_t i0 = std::max<int64_t>(0, p - h), i1 = std::min<int64_t>(s.k, s.H + p - h);
      for (int64_t w = 0; w < s.W; ++w) {
        const float* __restrict g = gy + ((b * s.H + h) * s.W + w) * C;
        for (int64_t c = 0; c < C; ++c) gbias[c] += g[c];
        const int64_t j0 = std::max<int64_t>(0, p - w), j1 = std::min<int64_t>(s.k, s.W + p - w);
        for (int64_t i = i0; i < i1; ++i) {
          const float* xrow = x + (b * s.H + h + i - p) * s.W * C;
          for (int64_t j = j0; j < j1; ++j) {
            const float* __restrict xp = xrow + (w + j - p) * C;
            float* __restrict a = gtaps + (i * s.k + j) * C;
            for (int64_t c = 0; c < C; ++c) a[c] += g[c] * xp[c];
          }
        }
      }
    }
}

}  // namespace detail

namespace {

using detail::Shape;

Shape shape_of(const at::Tensor& x, const at::Tensor& weight) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), weight.size(2)};
}

// taps: [k*k, C] -> out [B, H, W, C], rows split over the intra-op threads.
at::Tensor run_rows(const at::Tensor& x, const at::Tensor& taps, const float* bias, Shape s) {
  auto out = at::empty({s.B, s.H, s.W, s.C}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* tp = taps.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t r0, int64_t r1) {
    detail::depthwise_rows(xp, tp, bias, op, s, r0, r1);
  });
  return out;
}

// [C, 1, k, k] -> [k*k, C]; flipped: tap (i, j) holds weight (k-1-i, k-1-j).
at::Tensor tap_major(const at::Tensor& weight, bool flipped) {
  auto w = flipped ? weight.flip({2, 3}) : weight;
  return w.reshape({weight.size(0), -1}).t().contiguous();
}

struct DepthwiseConv : public torch::autograd::Function<DepthwiseConv> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x_in,
                            const at::Tensor& weight, const at::Tensor& bias) {
    auto x = x_in.contiguous();
    const Shape s = shape_of(x, weight);
    auto b = bias.contiguous();
    auto out = run_rows(x, tap_major(weight, false), b.data_ptr<float>(), s);
    ctx->save_for_backward({x, weight});
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& weight = saved[1];
    const Shape s = shape_of(x, weight);
    auto gy = grads[0].contiguous();
    // With "same" padding and odd k, the input gradient is the convolution of
    // the output gradient with the flipped kernel.
    auto gx = run_rows(gy, tap_major(weight, true), nullptr, s);
    // Fixed image ranges, one partial sum each, added in order: the same
    // gradients for the same thread count, whatever the threads' timing.
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(s.B, at::get_num_threads()));
    const int64_t per = s.k * s.k * s.C + s.C;
    std::vector<float> partial(parts * per, 0.0f);
    const float* xp = x.data_ptr<float>();
    const float* gp = gy.data_ptr<float>();
    at::parallel_for(0, parts, 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        float* acc = partial.data() + q * per;
        detail::depthwise_weight_grad(xp, gp, acc, acc + s.k * s.k * s.C, s, s.B * q / parts,
                                      s.B * (q + 1) / parts);
      }
    });
    for (int64_t q = 1; q < parts; ++q)
      for (int64_t i = 0; i < per; ++i) partial[i] += partial[q * per + i];
    auto sums = torch::from_blob(partial.data(), {per}, torch::kFloat).clone();
    auto gw = sums.narrow(0, 0, s.k * s.k * s.C).view({s.k * s.k, s.C}).t().reshape(weight.sizes());
    auto gb = sums.narrow(0, s.k * s.k * s.C, s.C);
    return {gx, gw.to(weight.dtype()), gb};
  }
};

}  // namespace

at::Tensor depthwise_conv_nhwc(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  MOEV_CHECK(x.dim() == 4 && weight.dim() == 4 && weight.size(0) == x.size(3) && weight.size(1) == 1 &&
                 weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
             "depthwise_conv_nhwc: expected x [B, H, W, C] and weight [C, 1, k, k] with odd k, got ",
             x.sizes(), " and ", weight.sizes());
  const int64_t C = x.size(3), k = weight.size(2);
  auto b = bias.defined() ? bias : torch::zeros({C}, x.options());
  if (x.device().is_cpu() && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
      b.scalar_type() == at::kFloat) {
    if (at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() || b.requires_grad()))
      return DepthwiseConv::apply(x, weight, b);
    auto xc = x.contiguous();
    return run_rows(xc, tap_major(weight, false), b.contiguous().data_ptr<float>(), shape_of(xc, weight));
  }
  auto y = torch::conv2d(x.permute({0, 3, 1, 2}), weight, b, /*stride=*/1, /*padding=*/k / 2,
                         /*dilation=*/1, /*groups=*/C);
  return y.permute({0, 2, 3, 1}).contiguous();
}

}  // namespace moev::nn
