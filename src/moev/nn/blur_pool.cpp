// Blur pool as one pass over each image plane, forward and backward. LibTorch
// would pad (reflection_pad2d, slow on CPU in both directions) and then run a
// depthwise conv: on the 28-pixel multi-branch ResNeSt the padding alone took a
// fifth of a training step. Here the reflected indices are looked up instead of
// materialised, and the separable filter runs as a vertical then a horizontal
// [1 2 1] / 4 pass.
#include "moev/nn/blur_pool.h"

#include <algorithm>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/nn/kernels.h"

namespace moev::nn {

namespace {

// Per output position i along one side of n pixels, the three input positions
// 2i-1, 2i, 2i+1 the filter reads, reflected (n >= 2) or clamped (replicate).
struct Taps {
  std::vector<int64_t> lo, mid, hi;
};
Taps taps(int64_t n, bool reflect) {
  const int64_t m = (n + 1) / 2;
  Taps t{std::vector<int64_t>(m), std::vector<int64_t>(m), std::vector<int64_t>(m)};
  auto at = [&](int64_t i) {
    if (i < 0) return reflect ? -i : int64_t{0};
    if (i >= n) return reflect ? 2 * n - 2 - i : n - 1;
    return i;
  };
  for (int64_t i = 0; i < m; ++i) {
    t.lo[i] = at(2 * i - 1);
    t.mid[i] = at(2 * i);
    t.hi[i] = at(2 * i + 1);
  }
  return t;
}

// Both passes are gathers (each output element reads its inputs; nothing is
// scattered), so the row loops vectorise. The taps only matter at the edges:
// inside, output i reads 2i-1, 2i, 2i+1, and input h is read by outputs h/2
// (h even) or (h-1)/2 and (h+1)/2 (h odd).

// One row: o [Wo] from v [W].
template <typename T>
[[gnu::always_inline]] inline void blur_row(const T* __restrict v, T* __restrict o, int64_t W, const Taps& c) {
  const int64_t Wo = static_cast<int64_t>(c.mid.size());
  const int64_t inner = W / 2;  // outputs whose taps all lie inside the row (j >= 1)
  o[0] = T(0.25) * (v[c.lo[0]] + v[c.hi[0]]) + T(0.5) * v[c.mid[0]];
  for (int64_t j = 1; j < inner; ++j) o[j] = T(0.25) * (v[2 * j - 1] + v[2 * j + 1]) + T(0.5) * v[2 * j];
  for (int64_t j = std::max<int64_t>(inner, 1); j < Wo; ++j)
    o[j] = T(0.25) * (v[c.lo[j]] + v[c.hi[j]]) + T(0.5) * v[c.mid[j]];
}

// The adjoint of blur_row: u [W] from g [Wo].
template <typename T>
[[gnu::always_inline]] inline void blur_row_adjoint(const T* __restrict g, T* __restrict u, int64_t W,
                                                    const Taps& c) {
  const int64_t Wo = static_cast<int64_t>(c.mid.size());
  for (int64_t j = 0; j + 1 < Wo; ++j) {
    u[2 * j] = T(0.5) * g[j];
    u[2 * j + 1] = T(0.25) * (g[j] + g[j + 1]);
  }
  u[2 * (Wo - 1)] = T(0.5) * g[Wo - 1];
  if (2 * Wo - 1 < W) u[2 * Wo - 1] = T(0.25) * g[Wo - 1];
  // The taps outside the row, reflected or clamped back into it.
  u[c.lo[0]] += T(0.25) * g[0];
  if (2 * Wo - 1 >= W) u[c.hi[Wo - 1]] += T(0.25) * g[Wo - 1];
}

// Planes [p0, p1) of x [P, H, W] -> out [P, Ho, Wo]: per output row, the
// vertical [1 2 1] / 4 of three input rows, then blur_row.
template <typename T>
[[gnu::always_inline]] inline void blur_forward(const T* x, T* out, int64_t H, int64_t W, const Taps& r,
                                                const Taps& c, int64_t p0, int64_t p1, T* v) {
  const int64_t Ho = static_cast<int64_t>(r.mid.size()), Wo = static_cast<int64_t>(c.mid.size());
  for (int64_t p = p0; p < p1; ++p) {
    const T* xp = x + p * H * W;
    for (int64_t i = 0; i < Ho; ++i) {
      const T* __restrict a = xp + r.lo[i] * W;
      const T* __restrict b = xp + r.mid[i] * W;
      const T* __restrict d = xp + r.hi[i] * W;
      for (int64_t w = 0; w < W; ++w) v[w] = T(0.25) * (a[w] + d[w]) + T(0.5) * b[w];
      blur_row(v, out + (p * Ho + i) * Wo, W, c);
    }
  }
}

// The adjoint: planes [p0, p1) of g [P, Ho, Wo] -> gx [P, H, W]. u holds the
// plane's rows after blur_row_adjoint, [Ho, W]; each input row then gathers
// from the (up to) two output rows that read it.
template <typename T>
[[gnu::always_inline]] inline void blur_backward(const T* g, T* gx, int64_t H, int64_t W, const Taps& r,
                                                 const Taps& c, int64_t p0, int64_t p1, T* u) {
  const int64_t Ho = static_cast<int64_t>(r.mid.size()), Wo = static_cast<int64_t>(c.mid.size());
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t i = 0; i < Ho; ++i) blur_row_adjoint(g + (p * Ho + i) * Wo, u + i * W, W, c);
    T* xp = gx + p * H * W;
    for (int64_t h = 0; h < H; ++h) {
      T* __restrict o = xp + h * W;
      const T* __restrict lo = u + (h / 2) * W;
      if (h % 2 == 0) {
        for (int64_t w = 0; w < W; ++w) o[w] = T(0.5) * lo[w];
      } else if ((h + 1) / 2 < Ho) {
        const T* __restrict hi = u + ((h + 1) / 2) * W;
        for (int64_t w = 0; w < W; ++w) o[w] = T(0.25) * (lo[w] + hi[w]);
      } else {
        for (int64_t w = 0; w < W; ++w) o[w] = T(0.25) * lo[w];
      }
    }
    auto add = [&](int64_t h, const T* row) {
      T* __restrict o = xp + h * W;
      for (int64_t w = 0; w < W; ++w) o[w] += T(0.25) * row[w];
    };
    add(r.lo[0], u);
    if (2 * Ho - 1 >= H) add(r.hi[Ho - 1], u + (Ho - 1) * W);
  }
}

// float, the model's type: compiled per ISA (kernels.h). double (tests) as is.
MOEV_CLONES void forward_planes(const float* x, float* out, int64_t H, int64_t W, const Taps& r, const Taps& c,
                                int64_t p0, int64_t p1, float* scratch) {
  blur_forward(x, out, H, W, r, c, p0, p1, scratch);
}
MOEV_CLONES void backward_planes(const float* g, float* gx, int64_t H, int64_t W, const Taps& r, const Taps& c,
                                 int64_t p0, int64_t p1, float* scratch) {
  blur_backward(g, gx, H, W, r, c, p0, p1, scratch);
}
void forward_planes(const double* x, double* out, int64_t H, int64_t W, const Taps& r, const Taps& c, int64_t p0,
                    int64_t p1, double* scratch) {
  blur_forward(x, out, H, W, r, c, p0, p1, scratch);
}
void backward_planes(const double* g, double* gx, int64_t H, int64_t W, const Taps& r, const Taps& c, int64_t p0,
                     int64_t p1, double* scratch) {
  blur_backward(g, gx, H, W, r, c, p0, p1, scratch);
}

// x: [B, C, H, W] contiguous -> [B, C, Ho, Wo] (forward) or its adjoint.
at::Tensor run(const at::Tensor& in, int64_t H, int64_t W, bool adjoint) {
  // 1-pixel sides cannot be reflect-padded; the old padded path replicated
  // both sides then, and so does this.
  const bool reflect = H >= 2 && W >= 2;
  const Taps r = taps(H, reflect), c = taps(W, reflect);
  const int64_t Ho = static_cast<int64_t>(r.mid.size()), Wo = static_cast<int64_t>(c.mid.size());
  const int64_t P = in.size(0) * in.size(1);
  auto out = adjoint ? at::empty({in.size(0), in.size(1), H, W}, in.options())
                     : at::empty({in.size(0), in.size(1), Ho, Wo}, in.options());
  AT_DISPATCH_FLOATING_TYPES(in.scalar_type(), "blur_pool2d", [&] {
    const scalar_t* src = in.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    // A plane is a few hundred pixels: enough of them per task to pay for it.
    at::parallel_for(0, P, 16, [&](int64_t p0, int64_t p1) {
      std::vector<scalar_t> scratch(adjoint ? Ho * W : W);
      if (adjoint) backward_planes(src, dst, H, W, r, c, p0, p1, scratch.data());
      else forward_planes(src, dst, H, W, r, c, p0, p1, scratch.data());
    });
  });
  return out;
}

struct BlurPool : public torch::autograd::Function<BlurPool> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x) {
    ctx->saved_data["H"] = x.size(2);
    ctx->saved_data["W"] = x.size(3);
    return run(x.contiguous(), x.size(2), x.size(3), /*adjoint=*/false);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    // The adjoint is computed outside autograd: a second derivative through it
    // would silently be zero.
    MOEV_CHECK(!torch::autograd::GradMode::is_enabled(), "blur_pool2d: no double backward (create_graph)");
    return {run(grads[0].contiguous(), ctx->saved_data["H"].toInt(), ctx->saved_data["W"].toInt(),
                /*adjoint=*/true)};
  }
};

}  // namespace

at::Tensor blur_pool2d(const at::Tensor& x) {
  MOEV_CHECK(x.dim() == 4 && x.size(2) >= 1 && x.size(3) >= 1, "blur_pool2d: expected [B, C, H, W], got ",
             x.sizes());
  MOEV_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "blur_pool2d: expected float or ",
             "double, got ", x.scalar_type());
  if (x.requires_grad() && torch::autograd::GradMode::is_enabled()) return BlurPool::apply(x);
  return run(x.contiguous(), x.size(2), x.size(3), /*adjoint=*/false);
}

}  // namespace moev::nn
