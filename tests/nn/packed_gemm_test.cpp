// The packed-weight inference GEMM and FFN against LibTorch's addmm and GELU,
// over shapes that hit every remainder: rows not a multiple of the 14-row
// tile or the 140-row block, columns not a multiple of the 32-wide panel,
// strided rows, an inner dimension of 1, and outputs on both sides of the
// width from which A is packed; the weight-gradient product A^T B likewise.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <tuple>
#include <vector>

#include "moev/nn/packed_gemm.h"

namespace {

at::Tensor packed(const at::Tensor& w_io) {
  const int64_t I = w_io.size(0), O = w_io.size(1);
  auto dst = torch::empty({moev::nn::packed_size(I, O)});
  moev::nn::pack_weight(w_io.data_ptr<float>(), I, O, w_io.stride(0), w_io.stride(1), dst.data_ptr<float>());
  return dst;
}

}  // namespace

TEST(PackedGemm, MatchesAddmmOverRemainderShapes) {
  if (!moev::nn::packed_gemm_supported()) GTEST_SKIP() << "no AVX-512 on this CPU";
  torch::manual_seed(3);
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> shapes = {
      {1, 1, 1}, {13, 33, 40}, {14, 64, 32}, {15, 7, 31}, {141, 128, 256}, {300, 96, 70}, {29, 512, 17},
      // wider than 384 columns: A is packed first
      {29, 64, 400}, {141, 33, 520}, {1, 8, 385}};
  for (auto [M, I, O] : shapes) {
    for (bool with_bias : {false, true})
      for (auto epi : {moev::nn::Epilogue::kNone, moev::nn::Epilogue::kGelu}) {
        // A with a row stride past its width; W given as the transpose of an
        // [O, I] Linear weight (strided packing); C into a wider buffer.
        auto abig = torch::randn({M, I + 5});
        auto a = abig.narrow(1, 0, I);
        auto w_oi = torch::randn({O, I}) / std::sqrt(double(I));
        auto b = torch::randn({O});
        auto cbig = torch::full({M, O + 3}, 7.0f);
        moev::nn::packed_gemm(M, I, O, a.data_ptr<float>(), a.stride(0), packed(w_oi.t()).data_ptr<float>(),
                              with_bias ? b.data_ptr<float>() : nullptr, cbig.data_ptr<float>(), cbig.stride(0),
                              epi);
        auto ref = with_bias ? torch::addmm(b, a, w_oi.t()) : torch::mm(a, w_oi.t());
        if (epi == moev::nn::Epilogue::kGelu) ref = torch::gelu(ref);
        const auto c = cbig.narrow(1, 0, O);
        EXPECT_TRUE(torch::allclose(c, ref, 1e-4, 1e-5))
            << "M=" << M << " I=" << I << " O=" << O << " bias=" << with_bias << " max err "
            << (c - ref).abs().max().item<float>();
        EXPECT_TRUE(torch::equal(cbig.narrow(1, O, 3), torch::full({M, 3}, 7.0f)))
            << "wrote past the last column, M=" << M << " O=" << O;
      }
  }
}

TEST(PackedGemm, FfnMatchesTwoLinearLayersWithGelu) {
  if (!moev::nn::packed_gemm_supported()) GTEST_SKIP() << "no AVX-512 on this CPU";
  torch::manual_seed(4);
  for (auto [M, D, H] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {1, 48, 80}, {139, 48, 80}, {140, 48, 80}, {141, 48, 80}, {333, 48, 80}, {141, 40, 400}}) {
    auto x = torch::randn({M, D});
    auto w1 = torch::randn({D, H}) / std::sqrt(double(D)), b1 = torch::randn({H});
    auto w2 = torch::randn({H, D}) / std::sqrt(double(H)), b2 = torch::randn({D});
    auto out = torch::empty({M, D});
    moev::nn::packed_ffn(M, D, H, x.data_ptr<float>(), D, packed(w1).data_ptr<float>(), b1.data_ptr<float>(),
                         packed(w2).data_ptr<float>(), b2.data_ptr<float>(), out.data_ptr<float>(), D);
    const auto ref = torch::addmm(b2, torch::gelu(torch::addmm(b1, x, w1)), w2);
    EXPECT_TRUE(torch::allclose(out, ref, 1e-4, 1e-5)) << "M=" << M << " H=" << H << " max err "
                                                       << (out - ref).abs().max().item<float>();
  }
}

// The weight-gradient GEMM C = A^T B in double against at::mm: reductions not
// a multiple of the 128-row chunk (and of M = 0), outputs not a multiple of
// the tile or panel, strided rows on every operand, and accumulation into C.
TEST(PackedGemm, TransposedProductMatchesMmOverRemainderShapes) {
  if (!moev::nn::packed_gemm_supported()) GTEST_SKIP() << "no AVX-512 on this CPU";
  torch::manual_seed(5);
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> shapes = {
      {1, 1, 1}, {0, 15, 40}, {127, 14, 32}, {128, 13, 33}, {129, 29, 64}, {300, 384, 128}, {1000, 7, 100}};
  for (auto [M, R, N] : shapes)
    for (bool accumulate : {false, true}) {
      auto abig = torch::randn({M, R + 3}), bbig = torch::randn({M, N + 2});
      auto a = abig.narrow(1, 0, R), b = bbig.narrow(1, 0, N);
      auto cbig = torch::full({R, N + 5}, 7.0f);
      auto c = cbig.narrow(1, 0, N);
      const auto before = torch::randn({R, N});
      c.copy_(before);
      moev::nn::packed_gemm_tn(M, R, N, a.data_ptr<float>(), a.stride(0), b.data_ptr<float>(), b.stride(0),
                               c.data_ptr<float>(), cbig.stride(0), accumulate);
      auto ref = torch::mm(a.to(torch::kDouble).t(), b.to(torch::kDouble));
      if (accumulate) ref += before.to(torch::kDouble);
      const double tol = 1e-5 * std::sqrt(double(M) + 1.0);
      EXPECT_TRUE(torch::allclose(c.to(torch::kDouble), ref, tol, tol))
          << "M=" << M << " R=" << R << " N=" << N << " accumulate=" << accumulate << " max err "
          << (c.to(torch::kDouble) - ref).abs().max().item<double>();
      EXPECT_TRUE(torch::equal(cbig.narrow(1, N, 5), torch::full({R, 5}, 7.0f)))
          << "wrote past the last column, R=" << R << " N=" << N;
    }
}
