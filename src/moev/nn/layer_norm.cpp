#include "moev/nn/layer_norm.h"

#include <cmath>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include "moev/nn/kernels.h"
#include "moev/nn/simd_avx512.h"

namespace moev::nn {

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#define MOEV_LN_KERNELS 1
#define MOEV_AVX512_LN __attribute__((target("avx512f")))
// GCC 12's _mm512_reduce_* start from _mm512_undefined_ps(): a false
// -Wmaybe-uninitialized in its own header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

using simd::tail_mask;

// Rows r0 .. r1 of x [rows, D] normalised into y; each row's mean and 1/std
// kept when mean is given (for the backward). Two passes over the row (mean,
// then the centred squares), as at::layer_norm, so no cancellation.
MOEV_AVX512_LN void forward_rows(const float* x, const float* w, const float* b, float* y, int64_t r0, int64_t r1,
                                 int64_t D, float eps, float* mean, float* rstd) {
  const float inv_d = 1.0f / static_cast<float>(D);
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    __m512 s = _mm512_setzero_ps();
    for (int64_t j = 0; j < D; j += 16) s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(tail_mask(D - j), xr + j));
    const float mu = _mm512_reduce_add_ps(s) * inv_d;
    const __m512 vmu = _mm512_set1_ps(mu);
    __m512 q = _mm512_setzero_ps();
    for (int64_t j = 0; j < D; j += 16) {
      const __mmask16 m = tail_mask(D - j);
      const __m512 d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, xr + j), vmu);
      q = _mm512_fmadd_ps(d, d, q);
    }
    const float rs = 1.0f / std::sqrt(_mm512_reduce_add_ps(q) * inv_d + eps);
    const __m512 vrs = _mm512_set1_ps(rs);
    for (int64_t j = 0; j < D; j += 16) {
      const __mmask16 m = tail_mask(D - j);
      const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, xr + j), vmu), vrs);
      _mm512_mask_storeu_ps(yr + j, m,
                            _mm512_fmadd_ps(xh, _mm512_maskz_loadu_ps(m, w + j), _mm512_maskz_loadu_ps(m, b + j)));
    }
    if (mean) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

// The backward of rows r0 .. r1: with xh = (x - mean) rstd and g = dy w,
// dx = rstd (g - mean(g) - xh mean(g xh)) (when dx is given), and dy xh and dy
// added into the partial sums dw and db (when given).
MOEV_AVX512_LN void backward_rows(const float* x, const float* w, const float* dy, const float* mean,
                                  const float* rstd, float* dx, float* dw, float* db, int64_t r0, int64_t r1,
                                  int64_t D) {
  const float inv_d = 1.0f / static_cast<float>(D);
  for (int64_t r = r0; r < r1; ++r) {
    const float *xr = x + r * D, *dyr = dy + r * D;
    const __m512 vmu = _mm512_set1_ps(mean[r]), vrs = _mm512_set1_ps(rstd[r]);
    __m512 sg = _mm512_setzero_ps(), sgx = _mm512_setzero_ps();
    for (int64_t j = 0; j < D; j += 16) {
      const __mmask16 m = tail_mask(D - j);
      const __m512 xh = _mm512_mul_ps(_mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, xr + j), vmu), vrs);
      const __m512 d = _mm512_maskz_loadu_ps(m, dyr + j);
      const __m512 g = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(m, w + j));
      sg = _mm512_add_ps(sg, g);
      sgx = _mm512_fmadd_ps(g, xh, sgx);
      if (dw) {
        _mm512_mask_storeu_ps(dw + j, m, _mm512_fmadd_ps(d, xh, _mm512_maskz_loadu_ps(m, dw + j)));
        _mm512_mask_storeu_ps(db + j, m, _mm512_add_ps(d, _mm512_maskz_loadu_ps(m, db + j)));
      }
    }
    if (!dx) continue;
    const __m512 a = _mm512_set1_ps(_mm512_reduce_add_ps(sg) * inv_d);
    const __m512 c = _mm512_set1_ps(_mm512_reduce_add_ps(sgx) * inv_d);
    float* dxr = dx + r * D;
    for (int64_t j = 0; j < D; j += 16) {
      const __mmask16 m = tail_mask(D - j);
      const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, xr + j), vmu), vrs);
      const __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dyr + j), _mm512_maskz_loadu_ps(m, w + j));
      _mm512_mask_storeu_ps(dxr + j, m, _mm512_mul_ps(vrs, _mm512_sub_ps(_mm512_sub_ps(g, a), _mm512_mul_ps(xh, c))));
    }
  }
}
#pragma GCC diagnostic pop
#else
#define MOEV_LN_KERNELS 0
#endif

// Rows per task of the forward.
constexpr int64_t kRowGrain = 64;
// Rows per partial sum of the weight gradients: fixed, so the sums (and the
// results) do not depend on the number of threads.
constexpr int64_t kGradChunk = 256;

// y [R, D] = the normalised rows of x2 [R, D]; mean and rstd [R] filled when defined.
at::Tensor normalise(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& bias, double eps,
                     at::Tensor mean, at::Tensor rstd) {
  auto y = at::empty_like(x2);
#if MOEV_LN_KERNELS
  const float *xp = x2.data_ptr<float>(), *wp = weight.data_ptr<float>(), *bp = bias.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* mp = mean.defined() ? mean.data_ptr<float>() : nullptr;
  float* sp = rstd.defined() ? rstd.data_ptr<float>() : nullptr;
  at::parallel_for(0, x2.size(0), kRowGrain, [&](int64_t r0, int64_t r1) {
    forward_rows(xp, wp, bp, yp, r0, r1, x2.size(1), static_cast<float>(eps), mp, sp);
  });
#endif
  return y;
}

struct LayerNormFn : public torch::autograd::Function<LayerNormFn> {
  // x2: [R, D] contiguous, weight, bias: [D] -> [R, D]
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x2, const at::Tensor& weight,
                            const at::Tensor& bias, double eps) {
    auto mean = at::empty({x2.size(0)}, x2.options()), rstd = at::empty({x2.size(0)}, x2.options());
    auto y = normalise(x2, weight, bias, eps, mean, rstd);
    ctx->save_for_backward({x2, weight, mean, rstd});
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x2 = saved[0], &weight = saved[1], &mean = saved[2], &rstd = saved[3];
    const int64_t R = x2.size(0), D = x2.size(1);
    const auto dy = grads[0].contiguous();
    const bool want_dx = ctx->needs_input_grad(0), want_w = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    at::Tensor dx = want_dx ? at::empty_like(x2) : at::Tensor();
    const int64_t chunks = (R + kGradChunk - 1) / kGradChunk;
    at::Tensor partial = want_w ? at::zeros({chunks, 2, D}, x2.options()) : at::Tensor();
#if MOEV_LN_KERNELS
    const float *xp = x2.data_ptr<float>(), *wp = weight.data_ptr<float>(), *dyp = dy.data_ptr<float>();
    const float *mp = mean.data_ptr<float>(), *sp = rstd.data_ptr<float>();
    float* dxp = want_dx ? dx.data_ptr<float>() : nullptr;
    float* pp = want_w ? partial.data_ptr<float>() : nullptr;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        float* dw = pp ? pp + c * 2 * D : nullptr;
        backward_rows(xp, wp, dyp, mp, sp, dxp, dw, dw ? dw + D : nullptr, c * kGradChunk,
                      std::min(R, (c + 1) * kGradChunk), D);
      }
    });
#endif
    at::Tensor dw, db;
    if (want_w) {
      // Chunk by chunk, in order: the same sums whatever the threads did.
      auto sum = at::zeros({2, D}, x2.options());
      float* s = sum.data_ptr<float>();
      const float* p = partial.data_ptr<float>();
      for (int64_t c = 0; c < chunks; ++c) add_to(p + c * 2 * D, s, 2 * D);
      dw = sum[0];
      db = sum[1];
    }
    return {dx, ctx->needs_input_grad(1) ? dw : at::Tensor(), ctx->needs_input_grad(2) ? db : at::Tensor(),
            at::Tensor()};
  }
};

bool own_kernel(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  if (!MOEV_LN_KERNELS || !cpu_has_avx512() || !x.device().is_cpu() || x.scalar_type() != at::kFloat ||
      x.dim() < 1 || x.numel() == 0)
    return false;
  for (const auto* p : {&weight, &bias})
    if (!p->defined() || p->scalar_type() != at::kFloat || !p->device().is_cpu() || p->dim() != 1 ||
        p->size(0) != x.size(-1))
      return false;
  return true;
}

}  // namespace

bool layer_norm_rows_supported() { return MOEV_LN_KERNELS && cpu_has_avx512(); }

void layer_norm_rows(const float* x, const float* weight, const float* bias, float* y, int64_t rows, int64_t D,
                     float eps) {
#if MOEV_LN_KERNELS
  forward_rows(x, weight, bias, y, 0, rows, D, eps, nullptr, nullptr);
#else
  (void)x, (void)weight, (void)bias, (void)y, (void)rows, (void)D, (void)eps;
#endif
}

at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps) {
  if (!own_kernel(x, weight, bias)) return at::layer_norm(x, {x.size(-1)}, weight, bias, eps);
  const int64_t D = x.size(-1);
  const auto x2 = x.reshape({-1, D}).contiguous();
  const auto w = weight.contiguous(), b = bias.contiguous();
  if (at::GradMode::is_enabled() && (x.requires_grad() || weight.requires_grad() || bias.requires_grad()))
    return LayerNormFn::apply(x2, w, b, eps).view(x.sizes());
  return normalise(x2, w, b, eps, {}, {}).view(x.sizes());
}

}  // namespace moev::nn
