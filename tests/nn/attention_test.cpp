// The fused attention against the stock-op formulation: outputs and gradients.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moev/nn/attention.h"

namespace {
torch::Tensor reference(const torch::Tensor& qkv, int64_t heads) {
  const int64_t B = qkv.size(0), N = qkv.size(1), D = qkv.size(2) / 3, dh = D / heads;
  auto t = qkv.view({B, N, 3, heads, dh}).permute({2, 0, 3, 1, 4});
  auto attn = torch::softmax(torch::matmul(t[0], t[1].transpose(-2, -1)) / std::sqrt(double(dh)), -1);
  return torch::matmul(attn, t[2]).transpose(1, 2).reshape({B, N, D});
}
}  // namespace

TEST(FusedAttention, MatchesStockOpsForwardAndBackward) {
  for (auto [B, N, heads, dh] : std::vector<std::array<int64_t, 4>>{{3, 7, 2, 4}, {2, 49, 4, 32}, {1, 1, 1, 8}, {2, 65, 3, 48}}) {
    torch::manual_seed(B * 100 + N);
    auto qkv = (torch::randn({B, N, 3 * heads * dh}) * 2).requires_grad_();
    auto qkv2 = qkv.detach().clone().requires_grad_();
    auto y = moev::nn::fused_attention(qkv, heads);
    auto r = reference(qkv2, heads);
    ASSERT_TRUE(torch::allclose(y, r, 1e-4, 1e-5)) << (y - r).abs().max().item<double>();
    auto g = torch::randn_like(y);
    (y * g).sum().backward();
    (r * g).sum().backward();
    EXPECT_TRUE(torch::allclose(qkv.grad(), qkv2.grad(), 1e-3, 1e-5))
        << (qkv.grad() - qkv2.grad()).abs().max().item<double>();
  }
}

TEST(FusedAttention, KnownAnswerOneHotAttention) {
  // Keys far apart along one axis and queries aligned with them make attention
  // one-hot: each token reads exactly its own value.
  const int64_t N = 4, dh = 4;
  auto qkv = torch::zeros({1, N, 3 * dh});
  for (int64_t i = 0; i < N; ++i) {
    qkv[0][i][i] = 100.f;            // q_i = 100 e_i
    qkv[0][i][dh + i] = 100.f;       // k_i = 100 e_i
    qkv[0][i][2 * dh + 0] = float(i + 1);  // v_i = (i+1) e_0
  }
  auto y = moev::nn::fused_attention(qkv, 1);
  for (int64_t i = 0; i < N; ++i) EXPECT_NEAR(y[0][i][0].item<float>(), float(i + 1), 1e-4);
}

TEST(FusedAttention, InferencePathMatchesTrainingPath) {
  // Without autograd the kernel skips the saved probabilities; same numbers.
  torch::manual_seed(3);
  auto qkv = torch::randn({2, 49, 3 * 4 * 32}).requires_grad_();
  auto y_train = moev::nn::fused_attention(qkv, 4);
  c10::InferenceMode guard;
  auto y_eval = moev::nn::fused_attention(qkv.detach(), 4);
  EXPECT_TRUE(torch::equal(y_train.detach(), y_eval));
}

TEST(Attention, StockPathsMatchTheFusedKernel) {
  // float64 takes the stock-op path other devices use: equal to the fused
  // kernel up to float32 rounding. bf16 matmuls: within bf16 rounding.
  torch::manual_seed(4);
  auto qkv = torch::randn({3, 49, 3 * 4 * 32});
  auto fused = moev::nn::fused_attention(qkv, 4);
  auto f64 = moev::nn::attention(qkv.to(torch::kDouble), 4, torch::kFloat);
  ASSERT_EQ(f64.scalar_type(), torch::kDouble);
  EXPECT_TRUE(torch::allclose(f64.to(torch::kFloat), fused, 1e-4, 1e-5));
  // CPU float32 qkv takes the fused fp32 kernel even when the model's GEMMs
  // are bf16; a bf16 qkv takes the stock bf16 path.
  EXPECT_TRUE(torch::equal(moev::nn::attention(qkv, 4, torch::kBFloat16), fused));
  auto bf = moev::nn::attention(qkv.to(torch::kBFloat16), 4, torch::kBFloat16);
  ASSERT_EQ(bf.scalar_type(), torch::kBFloat16);
  EXPECT_LT(((bf.to(torch::kFloat) - fused).norm() / fused.norm()).item<double>(), 2e-2);
}
