#include "moev/nn/depthwise_conv.h"

#include <algorithm>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/nn/kernels.h"
#include "moev/nn/layer_norm.h"
#include "moev/nn/simd_avx512.h"

namespace moev::nn {

namespace detail {

struct Shape {
  int64_t B, H, W, C, k;
};

// A LayerNorm over the channels applied to each output row while it is in
// cache (inference's depthwise_conv_layer_norm_nhwc).
struct RowNorm {
  const float* weight;
  const float* bias;
  float eps;
};

// Rows r = b * H + h in [r0, r1) of out = bias + depthwise(x, taps); taps is
// [k*k, C] (tap-major, so each tap's weights are contiguous over C). The
// backward reuses it for the input gradient with the taps flipped.
MOEV_CLONES void depthwise_rows_generic(const float* x, const float* taps, const float* bias, float* out,
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

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Copies rows [h0, h1) of image b of x [B, H, W, C] into pad [H, W + 2P, C]
// between its P zero columns on each side, which the caller has zeroed.
template <int P>
void pad_rows(const float* x, float* pad, const Shape& s, int64_t b, int64_t h0, int64_t h1) {
  const int64_t C = s.C, Wp = s.W + 2 * P;
  for (int64_t h = h0; h < h1; ++h)
    std::copy(x + (b * s.H + h) * s.W * C, x + (b * s.H + h + 1) * s.W * C, pad + (h * Wp + P) * C);
}

// thread_local scratch of rows with zero columns: [H, W + 2P, C].
template <int P>
float* padded_scratch(const Shape& s) {
  thread_local std::vector<float> buf;
  const int64_t C = s.C, Wp = s.W + 2 * P;
  if (static_cast<int64_t>(buf.size()) < s.H * Wp * C) buf.resize(s.H * Wp * C);
  float* pad = buf.data();
  for (int64_t h = 0; h < s.H; ++h) {
    std::fill(pad + h * Wp * C, pad + (h * Wp + P) * C, 0.0f);
    std::fill(pad + (h * Wp + P + s.W) * C, pad + (h + 1) * Wp * C, 0.0f);
  }
  return pad;
}

// BW output positions w0 .. w0 + BW - 1 of row h, 32 channels from c0 (masks
// m0, m1), summed over taps rows [i0, i1) in registers: per tap two loads of
// weights serve 2 BW multiply-adds (one output position at a time loaded a
// weight per FMA: 11% of a ConvNeXt's inference).
template <int K, int BW>
__attribute__((target("avx512f"))) inline void depthwise_block(const float* pad, const float* taps, const float* bias,
                                                               float* o, const Shape& s, int64_t h, int64_t i0,
                                                               int64_t i1, int64_t w0, int64_t c0, __mmask16 m0,
                                                               __mmask16 m1) {
  constexpr int P = K / 2;
  const int64_t C = s.C, Wp = s.W + 2 * P;
  __m512 a0[BW], a1[BW];
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias + c0) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + c0 + 16) : _mm512_setzero_ps();
  for (int u = 0; u < BW; ++u) {
    a0[u] = b0;
    a1[u] = b1;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const float* xr = pad + ((h + i - P) * Wp + w0) * C + c0;
    const float* tr = taps + i * K * C + c0;
    for (int j = 0; j < K; ++j) {
      const __m512 t0 = _mm512_maskz_loadu_ps(m0, tr + j * C), t1 = _mm512_maskz_loadu_ps(m1, tr + j * C + 16);
#pragma GCC unroll 8
      for (int u = 0; u < BW; ++u) {
        const float* xp = xr + (u + j) * C;
        a0[u] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m0, xp), t0, a0[u]);
        a1[u] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m1, xp + 16), t1, a1[u]);
      }
    }
  }
  for (int u = 0; u < BW; ++u) {
    _mm512_mask_storeu_ps(o + (w0 + u) * C + c0, m0, a0[u]);
    _mm512_mask_storeu_ps(o + (w0 + u) * C + c0 + 16, m1, a1[u]);
  }
}

// Rows r0 .. r1 as depthwise_rows_generic, image by image: the input rows
// they read are copied between zero columns, so every tap of a row is in
// bounds; tap rows outside the image are skipped.
template <int K>
__attribute__((target("avx512f"))) void depthwise_rows_avx512(const float* x, const float* taps, const float* bias,
                                                              float* out, Shape s, int64_t r0, int64_t r1,
                                                              const RowNorm* norm) {
  constexpr int P = K / 2, kMaxBW = 7;
  const int64_t C = s.C;
  float* pad = padded_scratch<P>(s);
  for (int64_t r = r0; r < r1;) {
    const int64_t b = r / s.H, hs = r % s.H, he = std::min(s.H, hs + (r1 - r));
    pad_rows<P>(x, pad, s, b, std::max<int64_t>(0, hs - P), std::min(s.H, he + P));
    for (int64_t h = hs; h < he; ++h) {
      const int64_t i0 = std::max<int64_t>(0, P - h), i1 = std::min<int64_t>(K, s.H + P - h);
      float* o = out + (b * s.H + h) * s.W * C;
      for (int64_t c0 = 0; c0 < C; c0 += 32) {
        const __mmask16 m0 = simd::tail_mask(C - c0), m1 = C - c0 > 16 ? simd::tail_mask(C - c0 - 16) : 0;
        for (int64_t w0 = 0; w0 < s.W; w0 += kMaxBW) {
          switch (std::min<int64_t>(kMaxBW, s.W - w0)) {
            case 7: depthwise_block<K, 7>(pad, taps, bias, o, s, h, i0, i1, w0, c0, m0, m1); break;
            case 6: depthwise_block<K, 6>(pad, taps, bias, o, s, h, i0, i1, w0, c0, m0, m1); break;
            case 5: depthwise_block<K, 5>(pad, taps, bias, o, s, h, i0, i1, w0, c0, m0, m1); break;
            case 4: depthwise_block<K, 4>(pad, taps, bias, o, s, h, i0, i1, w0, c0, m0, m1); break;
            case 3: depthwise_block<K, 3>(pad, taps, bias, o, s, h, i0, i1, w0, c0, m0, m1); break;
            case 2: depthwise_block<K, 2>(pad, taps, bias, o, s, h, i0, i1, w0, c0, m0, m1); break;
            default: depthwise_block<K, 1>(pad, taps, bias, o, s, h, i0, i1, w0, c0, m0, m1); break;
          }
        }
      }
      if (norm) layer_norm_rows(o, norm->weight, norm->bias, o, s.W, C, norm->eps);
    }
    r += he - hs;
  }
}
#pragma GCC diagnostic pop
#endif

// norm: applied to the output rows when given (needs layer_norm_rows_supported()).
void depthwise_rows(const float* x, const float* taps, const float* bias, float* out, Shape s, int64_t r0,
                    int64_t r1, const RowNorm* norm) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx512()) {
    if (s.k == 7) return depthwise_rows_avx512<7>(x, taps, bias, out, s, r0, r1, norm);
    if (s.k == 5) return depthwise_rows_avx512<5>(x, taps, bias, out, s, r0, r1, norm);
    if (s.k == 3) return depthwise_rows_avx512<3>(x, taps, bias, out, s, r0, r1, norm);
  }
#endif
  depthwise_rows_generic(x, taps, bias, out, s, r0, r1);
  if (norm) {
    float* o = out + r0 * s.W * s.C;
    layer_norm_rows(o, norm->weight, norm->bias, o, (r1 - r0) * s.W, s.C, norm->eps);
  }
}

// Images [b0, b1): gtaps [k*k, C] += sum over positions of gy * shifted x, and
// gbias [C] += sum of gy.
MOEV_CLONES void depthwise_weight_grad_generic(const float* x, const float* gy, float* gtaps, float* gbias,
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

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// depthwise_weight_grad with the K taps of one kernel row and 32 channels
// held in registers over all positions of an image: per position and tap the
// generic loop loads and stores its accumulator (two loads and a store per
// FMA, bound by the stores: 3.8% of the tiny ConvNeXt-MoE's training step).
// The image's rows are copied with K / 2 zero columns on each side, so every
// tap of a row reads in bounds; the output rows a tap row cannot reach are
// skipped.
template <int K>
__attribute__((target("avx512f"))) void depthwise_weight_grad_avx512(const float* x, const float* gy, float* gtaps,
                                                                     float* gbias, Shape s, int64_t b0, int64_t b1) {
  constexpr int P = K / 2;
  const int64_t C = s.C, H = s.H, W = s.W, Wp = W + 2 * P;
  float* xpad = padded_scratch<P>(s);
  for (int64_t b = b0; b < b1; ++b) {
    pad_rows<P>(x, xpad, s, b, 0, H);
    const float* gimg = gy + b * H * W * C;
    for (int64_t c0 = 0; c0 < C; c0 += 32) {
      const __mmask16 m0 = simd::tail_mask(C - c0), m1 = C - c0 > 16 ? simd::tail_mask(C - c0 - 16) : 0;
      for (int i = 0; i < K; ++i) {
        const int64_t h0 = std::max<int64_t>(0, P - i), h1 = std::min<int64_t>(H, H + P - i);
        if (h0 >= h1) continue;
        __m512 a0[K], a1[K], s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
        for (int j = 0; j < K; ++j) a0[j] = a1[j] = _mm512_setzero_ps();
        for (int64_t h = h0; h < h1; ++h) {
          const float* xr = xpad + (h + i - P) * Wp * C + c0;
          const float* gr = gimg + h * W * C + c0;
          for (int64_t w = 0; w < W; ++w) {
            const __m512 g0 = _mm512_maskz_loadu_ps(m0, gr + w * C), g1 = _mm512_maskz_loadu_ps(m1, gr + w * C + 16);
            if (i == P) {  // every output position once: the bias gradient
              s0 = _mm512_add_ps(s0, g0);
              s1 = _mm512_add_ps(s1, g1);
            }
#pragma GCC unroll 7
            for (int j = 0; j < K; ++j) {
              const float* xp = xr + (w + j) * C;
              a0[j] = _mm512_fmadd_ps(g0, _mm512_maskz_loadu_ps(m0, xp), a0[j]);
              a1[j] = _mm512_fmadd_ps(g1, _mm512_maskz_loadu_ps(m1, xp + 16), a1[j]);
            }
          }
        }
        for (int j = 0; j < K; ++j) {
          float* t = gtaps + (i * K + j) * C + c0;
          _mm512_mask_storeu_ps(t, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, t), a0[j]));
          _mm512_mask_storeu_ps(t + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, t + 16), a1[j]));
        }
        if (i == P) {
          _mm512_mask_storeu_ps(gbias + c0, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, gbias + c0), s0));
          _mm512_mask_storeu_ps(gbias + c0 + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, gbias + c0 + 16), s1));
        }
      }
    }
  }
}
#pragma GCC diagnostic pop
#endif

void depthwise_weight_grad(const float* x, const float* gy, float* gtaps, float* gbias, Shape s, int64_t b0,
                           int64_t b1) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (cpu_has_avx512()) {
    if (s.k == 7) return depthwise_weight_grad_avx512<7>(x, gy, gtaps, gbias, s, b0, b1);
    if (s.k == 5) return depthwise_weight_grad_avx512<5>(x, gy, gtaps, gbias, s, b0, b1);
    if (s.k == 3) return depthwise_weight_grad_avx512<3>(x, gy, gtaps, gbias, s, b0, b1);
  }
#endif
  depthwise_weight_grad_generic(x, gy, gtaps, gbias, s, b0, b1);
}

}  // namespace detail

namespace {

using detail::Shape;

// Partial sums of the weight gradient (image ranges), at most.
constexpr int64_t kGradParts = 16;

Shape shape_of(const at::Tensor& x, const at::Tensor& weight) {
  return {x.size(0), x.size(1), x.size(2), x.size(3), weight.size(2)};
}

// taps: [k*k, C] -> out [B, H, W, C], rows split over the intra-op threads.
at::Tensor run_rows(const at::Tensor& x, const at::Tensor& taps, const float* bias, Shape s,
                    const detail::RowNorm* norm = nullptr) {
  auto out = at::empty({s.B, s.H, s.W, s.C}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* tp = taps.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, s.B * s.H, 1, [&](int64_t r0, int64_t r1) {
    detail::depthwise_rows(xp, tp, bias, op, s, r0, r1, norm);
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
    // Image ranges fixed by the batch size, one partial sum each, added in
    // order: the same gradients whatever the thread count and timing.
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(s.B, kGradParts));
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
    for (int64_t q = 1; q < parts; ++q) add_to(partial.data() + q * per, partial.data(), per);
    auto sums = torch::from_blob(partial.data(), {per}, torch::kFloat).clone();
    auto gw = sums.narrow(0, 0, s.k * s.k * s.C).view({s.k * s.k, s.C}).t().reshape(weight.sizes());
    auto gb = sums.narrow(0, s.k * s.k * s.C, s.C);
    return {gx, gw.to(weight.dtype()), gb};
  }
};

void check_shapes(const char* fn, const at::Tensor& x, const at::Tensor& weight) {
  MOEV_CHECK(x.dim() == 4 && weight.dim() == 4 && weight.size(0) == x.size(3) && weight.size(1) == 1 &&
                 weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
             fn, ": expected x [B, H, W, C] and weight [C, 1, k, k] with odd k, got ", x.sizes(), " and ",
             weight.sizes());
}

}  // namespace

at::Tensor depthwise_conv_nhwc(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_shapes("depthwise_conv_nhwc", x, weight);
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

at::Tensor depthwise_conv_layer_norm_nhwc(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                          const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps) {
  const bool fused = !at::GradMode::is_enabled() && layer_norm_rows_supported() && x.device().is_cpu() &&
                     x.dim() == 4 && x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                     (!bias.defined() || bias.scalar_type() == at::kFloat) && ln_weight.scalar_type() == at::kFloat &&
                     ln_bias.scalar_type() == at::kFloat && ln_weight.numel() == x.size(3) &&
                     ln_bias.numel() == x.size(3);
  if (!fused) return layer_norm(depthwise_conv_nhwc(x, weight, bias), ln_weight, ln_bias, eps);
  check_shapes("depthwise_conv_layer_norm_nhwc", x, weight);
  const auto xc = x.contiguous(), lw = ln_weight.contiguous(), lb = ln_bias.contiguous();
  const auto b = bias.defined() ? bias.contiguous() : torch::zeros({x.size(3)}, x.options());
  const detail::RowNorm norm{lw.data_ptr<float>(), lb.data_ptr<float>(), static_cast<float>(eps)};
  return run_rows(xc, tap_major(weight, false), b.data_ptr<float>(), shape_of(xc, weight), &norm);
}

}  // namespace moev::nn
