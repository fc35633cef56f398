#include "moev/nn/attention.h"

#include <cmath>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/nn/blas.h"
#include "moev/nn/kernels.h"
#include "moev/nn/packed_gemm.h"

namespace moev::nn {

namespace {

// out = softmax(q k^T / sqrt(dh)) v for every (image, head) of a contiguous
// qkv [B, N, 3D]. probs [B, heads, N, N] keeps the probabilities for the
// backward; without it (inference) each thread reuses one N x N scratch. On
// AVX-512 CPUs both products run as nn::packed_gemm with k^T and v packed per
// head (N x dh floats, a copy within L1): OpenBLAS spent as long on these
// 49 x 49 x 32 products' set-up and packing as on their arithmetic.
void attend(const at::Tensor& qkv, int64_t heads, at::Tensor& out, float* probs) {
  const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / 3, dh = D / heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  const float* base = qkv.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int n = static_cast<int>(N), d = static_cast<int>(dh), ld3 = static_cast<int>(3 * D),
            ld = static_cast<int>(D);
  const bool packed = packed_gemm_supported();
  at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(probs ? 0 : N * N);
    std::vector<float> kp(packed ? packed_size(dh, N) : 0), vp(packed ? packed_size(N, dh) : 0);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const float* q = base + b * N * 3 * D + h * dh;
      const float* k = q + D;
      const float* v = q + 2 * D;
      float* P = probs ? probs + bh * N * N : scratch.data();
      float* O = o + b * N * D + h * dh;
      if (packed) {
        pack_weight(k, dh, N, 1, ld3, kp.data());  // W[i, j] = k[j, i]
        packed_gemm(N, dh, N, q, ld3, kp.data(), nullptr, P, N, Epilogue::kNone);  // S = q k^T
        softmax_rows(P, N, N, N, scale);
        pack_weight(v, N, dh, ld3, 1, vp.data());
        packed_gemm(N, N, dh, P, N, vp.data(), nullptr, O, ld, Epilogue::kNone);  // O = P v
      } else {
        gemm_nt(n, n, d, q, ld3, k, ld3, P, n, scale, 0.0f);  // S = q k^T / sqrt(dh)
        softmax_rows(P, N, N, N);
        gemm_nn(n, d, n, P, n, v, ld3, O, ld, 1.0f, 0.0f);  // O = P v
      }
    }
  });
}

struct FusedAttention : public torch::autograd::Function<FusedAttention> {
  // qkv: [B, N, 3D] -> out [B, N, D]; saves the probabilities P [B, heads, N, N].
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& qkv_in,
                            int64_t heads) {
    auto qkv = qkv_in.contiguous();
    const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / 3;
    auto out = at::empty({B, N, D}, qkv.options());
    auto probs = at::empty({B, heads, N, N}, qkv.options());
    attend(qkv, heads, out, probs.data_ptr<float>());
    ctx->save_for_backward({qkv, probs});
    ctx->saved_data["heads"] = heads;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const auto& qkv = saved[0];
    const auto& probs = saved[1];
    const int64_t heads = ctx->saved_data["heads"].toInt();
    const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / 3, dh = D / heads;
    auto go = grads[0].contiguous();
    auto gqkv = at::empty_like(qkv);
    const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
    const float* base = qkv.data_ptr<float>();
    const float* gob = go.data_ptr<float>();
    const float* pb = probs.data_ptr<float>();
    float* gb = gqkv.data_ptr<float>();
    const int n = static_cast<int>(N), d = static_cast<int>(dh), ld3 = static_cast<int>(3 * D),
              ld = static_cast<int>(D);
    const bool packed = packed_gemm_supported();
    at::parallel_for(0, B * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> dP(N * N);
      std::vector<float> vp(packed ? packed_size(dh, N) : 0), kp(packed ? packed_size(N, dh) : 0);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t b = bh / heads, h = bh % heads;
        const int64_t off = b * N * 3 * D + h * dh;
        const float *q = base + off, *k = q + D, *v = q + 2 * D;
        float *gq = gb + off, *gk = gq + D, *gv = gq + 2 * D;
        const float* dO = gob + b * N * D + h * dh;
        const float* P = pb + bh * N * N;
        if (packed) {  // the same four products on moev's kernels, dS scaled once for dQ and dK
          packed_gemm_tn(N, N, dh, P, N, dO, ld, gv, ld3, false);  // dV = P^T dO
          pack_weight(v, dh, N, 1, ld3, vp.data());                 // W[i, j] = v[j, i]
          packed_gemm(N, dh, N, dO, ld, vp.data(), nullptr, dP.data(), N, Epilogue::kNone);  // dP = dO v^T
          softmax_backward_rows(P, dP.data(), N, N, N, scale);  // dS / sqrt(dh)
          pack_weight(k, N, dh, ld3, 1, kp.data());
          packed_gemm(N, N, dh, dP.data(), N, kp.data(), nullptr, gq, ld3, Epilogue::kNone);  // dQ = dS k
          packed_gemm_tn(N, N, dh, dP.data(), N, q, ld3, gk, ld3, false);                     // dK = dS^T q
          continue;
        }
        gemm_tn(n, d, n, P, n, dO, ld, gv, ld3, 1.0f, 0.0f);          // dV = P^T dO
        gemm_nt(n, n, d, dO, ld, v, ld3, dP.data(), n, 1.0f, 0.0f);   // dP = dO v^T
        softmax_backward_rows(P, dP.data(), N, N, N);  // dS = P * (dP - rowsum(dP * P))
        gemm_nn(n, d, n, dP.data(), n, k, ld3, gq, ld3, scale, 0.0f);  // dQ = dS k / sqrt(dh)
        gemm_tn(n, d, n, dP.data(), n, q, ld3, gk, ld3, scale, 0.0f);  // dK = dS^T q / sqrt(dh)
      }
    });
    return {gqkv, at::Tensor()};
  }
};

}  // namespace

at::Tensor attention(const at::Tensor& qkv, int64_t heads, at::ScalarType matmul_dtype) {
  if (qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat) return fused_attention(qkv, heads);
  const bool bf16 = matmul_dtype == at::kBFloat16 && qkv.scalar_type() != at::kBFloat16;
  MOEV_CHECK(qkv.dim() == 3 && qkv.size(2) % (3 * heads) == 0,
             "attention: expected [B, N, 3 * heads * dh], got ", qkv.sizes());
  const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / 3, dh = D / heads;
  auto t = (bf16 ? qkv.to(at::kBFloat16) : qkv)
               .view({B, N, 3, heads, dh})
               .permute({2, 0, 3, 1, 4})
               .contiguous()
               .view({3, B * heads, N, dh});
  auto p = torch::softmax(torch::bmm(t[0] * (1.0 / std::sqrt(double(dh))), t[1].transpose(1, 2)), -1);
  auto out = torch::bmm(p, t[2]).view({B, heads, N, dh}).transpose(1, 2).reshape({B, N, D});
  return out.to(qkv.scalar_type());
}

at::Tensor fused_attention(const at::Tensor& qkv, int64_t heads) {
  MOEV_CHECK(qkv.dim() == 3 && qkv.size(2) % (3 * heads) == 0,
             "fused_attention: expected [B, N, 3 * heads * dh], got ", qkv.sizes());
  MOEV_CHECK(qkv.scalar_type() == at::kFloat && qkv.device().is_cpu(),
             "fused_attention: CPU float32 only");
  if (at::GradMode::is_enabled() && qkv.requires_grad()) return FusedAttention::apply(qkv, heads);
  auto x = qkv.contiguous();
  auto out = at::empty({x.size(0), x.size(1), x.size(2) / 3}, x.options());
  attend(x, heads, out, nullptr);
  return out;
}

}  // namespace moev::nn
