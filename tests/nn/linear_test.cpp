// nn/linear: precision parsing, what choosing bf16 sets up, and the packed
// inference path of linear and mlp against the autograd path.
#include <dlfcn.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moev/nn/linear.h"
#include "support/expect_error.h"
#include "support/same_bits.h"

TEST(Precision, ParsesNamesAndRejectsOthers) {
  EXPECT_EQ(moev::nn::parse_precision("fp32"), at::kFloat);
  EXPECT_EQ(moev::nn::parse_precision("bf16"), moev::nn::native_bf16() ? at::kBFloat16 : at::kFloat);
  moev::test::expect_error([] { moev::nn::parse_precision("fp16"); }, {"'fp16'", "expected fp32 or bf16"});
}

TEST(Precision, Bf16WidensOneDnnsPrimitiveCache) {
  // The experts' bf16 GEMMs meet thousands of shapes; with the default cache of
  // 1024, eviction under two replica threads corrupted memory (linear.cpp).
  if (!moev::nn::native_bf16()) GTEST_SKIP() << "no native bf16 on this CPU: bf16 runs fp32 GEMMs";
  using get_fn = int (*)(int*);
  auto get = reinterpret_cast<get_fn>(::dlsym(RTLD_DEFAULT, "dnnl_get_primitive_cache_capacity"));
  ASSERT_NE(get, nullptr) << "libdnnl not loaded with LibTorch";
  ASSERT_EQ(moev::nn::parse_precision("bf16"), at::kBFloat16);
  int capacity = 0;
  ASSERT_EQ(get(&capacity), 0);
  EXPECT_GE(capacity, 16384);
}

// Without gradients, fp32 linear and mlp run on packed copies of the weights
// (AVX-512 CPUs): the same values as the autograd path, through every way a
// weight changes, on strided input and on more rows than one thread takes.
TEST(PackedLinear, InferenceMatchesAutogradAndFollowsWeightUpdates) {
  torch::manual_seed(21);
  auto fc1 = torch::nn::Linear(24, 40), fc2 = torch::nn::Linear(40, 24);
  const auto xbig = torch::randn({3, 70, 30});
  const auto x = xbig.narrow(2, 0, 24);  // rows at stride 30
  auto rel = [](const at::Tensor& a, const at::Tensor& b) { return ((a - b).norm() / b.norm()).item<double>(); };
  auto both = [&](double* lin_err, double* mlp_err) {
    at::Tensor lin, ml;
    {
      torch::NoGradGuard ng;
      lin = moev::nn::linear(x, fc1->weight, fc1->bias, at::kFloat);
      ml = moev::nn::mlp(x, fc1->weight, fc1->bias, fc2->weight, fc2->bias, at::kFloat);
    }
    const auto ref_lin = fc1->forward(x).detach();
    const auto ref_mlp = fc2->forward(torch::gelu(fc1->forward(x))).detach();
    EXPECT_EQ(lin.sizes(), ref_lin.sizes());
    EXPECT_EQ(ml.sizes(), x.sizes());
    *lin_err = rel(lin, ref_lin);
    *mlp_err = rel(ml, ref_mlp);
    return ml;
  };
  double le = 0, me = 0;
  const auto y0 = both(&le, &me);
  EXPECT_LT(le, 1e-6);
  EXPECT_LT(me, 1e-6);
  {
    torch::NoGradGuard ng;
    fc1->weight.mul_(-2.0);  // in place: a new version
  }
  const auto y1 = both(&le, &me);
  EXPECT_LT(le, 1e-6);
  EXPECT_LT(me, 1e-6);
  EXPECT_GT(rel(y1, y0), 1e-2);
  fc2->weight = torch::randn({24, 40}).requires_grad_();  // a new tensor (what forward() reads)
  const auto y2 = both(&le, &me);
  EXPECT_LT(le, 1e-6);
  EXPECT_LT(me, 1e-6);
  EXPECT_GT(rel(y2, y1), 1e-2);
  // With gradients wanted, the autograd path: gradients reach the weights.
  moev::nn::mlp(x, fc1->weight, fc1->bias, fc2->weight, fc2->bias, at::kFloat).sum().backward();
  ASSERT_TRUE(fc1->weight.grad().defined());
  EXPECT_GT(fc1->weight.grad().abs().sum().item<double>(), 0);
}

// fp32 training on the packed kernels: output and all three gradients equal
// addmm's through autograd, on strided input with row and column counts that
// are not multiples of the kernel's tiles, with the input or the weight frozen,
// and after an in-place weight update (the packed copy must follow).
TEST(PackedLinear, TrainingGradientsMatchAddmm) {
  torch::manual_seed(23);
  auto rel = [](const at::Tensor& a, const at::Tensor& b) { return ((a - b).norm() / b.norm()).item<double>(); };
  for (auto [M, I, O] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{3 * 47, 24, 40}, {200, 130, 33}, {13, 7, 1}}) {
    SCOPED_TRACE("M=" + std::to_string(M) + " I=" + std::to_string(I) + " O=" + std::to_string(O));
    const auto xbig = torch::randn({M, I + 5});
    for (int round = 0; round < 2; ++round) {
      auto w = torch::randn({O, I}).requires_grad_(), b = torch::randn({O}).requires_grad_();
      auto x = xbig.narrow(1, 0, I).clone().requires_grad_();
      auto xs = round == 0 ? xbig.narrow(1, 0, I) : x;  // strided rows, then contiguous
      const auto gy = torch::randn({M, O});
      if (round == 1) {
        torch::NoGradGuard ng;
        w.mul_(-0.5);  // a new weight version after a first use
      }
      auto y = moev::nn::linear(xs.reshape({M, I}), w, b, at::kFloat);
      const auto ref = torch::addmm(b, xs, w.t());
      EXPECT_LT(rel(y, ref), 1e-6);
      auto grads = torch::autograd::grad({y}, round == 1 ? std::vector<at::Tensor>{x, w, b} : std::vector<at::Tensor>{w, b},
                                         {gy});
      auto rgrads = torch::autograd::grad({ref}, round == 1 ? std::vector<at::Tensor>{x, w, b} : std::vector<at::Tensor>{w, b},
                                          {gy});
      ASSERT_EQ(grads.size(), rgrads.size());
      for (size_t i = 0; i < grads.size(); ++i) EXPECT_LT(rel(grads[i], rgrads[i]), 1e-5) << "gradient " << i;
    }
    // Frozen weight and bias, input wanting its gradient.
    auto w = torch::randn({O, I}), b = torch::randn({O});
    auto x = torch::randn({M, I}).requires_grad_();
    const auto gx = torch::autograd::grad({moev::nn::linear(x, w, b, at::kFloat)}, {x}, {torch::ones({M, O})})[0];
    EXPECT_LT(rel(gx, torch::ones({M, O}).mm(w)), 1e-5);
  }
}

// The weight and bias gradients of a long reduction, which the packed path
// cuts into slices of rows times column panels: against fp64, and bit for bit
// the same on one thread and on two (the slices' partial sums are added in a
// fixed order).
TEST(PackedLinear, SlicedWeightGradientMatchesFp64OnAnyThreadCount) {
  torch::manual_seed(25);
  const int64_t M = 3001, I = 40, O = 24;
  const auto x = torch::randn({M, I}), gy = torch::randn({M, O});
  auto w = torch::randn({O, I}).requires_grad_(), b = torch::randn({O}).requires_grad_();
  const int threads = at::get_num_threads();
  std::vector<at::Tensor> by_threads[2];
  for (int t = 1; t <= 2; ++t) {
    at::set_num_threads(t);
    by_threads[t - 1] = torch::autograd::grad({moev::nn::linear(x, w, b, at::kFloat)}, {w, b}, {gy});
  }
  at::set_num_threads(threads);
  const auto x64 = x.to(torch::kDouble), gy64 = gy.to(torch::kDouble);
  const auto dw64 = gy64.t().mm(x64), db64 = gy64.sum(0);
  for (int t = 0; t < 2; ++t) {
    EXPECT_LT(((by_threads[t][0].to(torch::kDouble) - dw64).norm() / dw64.norm()).item<double>(), 1e-6);
    EXPECT_LT(((by_threads[t][1].to(torch::kDouble) - db64).norm() / db64.norm()).item<double>(), 1e-6);
  }
  EXPECT_TRUE(moev::test::same_bits_or_rounding(by_threads[0][0], by_threads[1][0]));
  EXPECT_TRUE(moev::test::same_bits_or_rounding(by_threads[0][1], by_threads[1][1]));
}

// fp32 training of the dense FFN as one function (GELU and its derivative in
// fc1's tiles, the backward's multiply in the next GEMM's): output and all five
// gradients against fp64 autograd, on strided input with row counts off the
// tiles and a hidden width over the A-packing threshold (512) and under it;
// the backward fused over one block of rows, over several slices of several
// blocks (bit for bit the same on one thread and on two), and not fused
// (weights too large for its accumulators).
TEST(PackedMlp, TrainingGradientsMatchFp64Autograd) {
  torch::manual_seed(24);
  auto rel = [](const at::Tensor& a, const at::Tensor& b) {
    return ((a.to(torch::kDouble) - b).norm() / b.norm()).item<double>();
  };
  for (auto [M, D, H] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{
           {3 * 47, 24, 96}, {200, 128, 512}, {1500, 40, 96}, {64, 256, 1040}}) {
    SCOPED_TRACE("M=" + std::to_string(M) + " D=" + std::to_string(D) + " H=" + std::to_string(H));
    const auto xbig = torch::randn({M, D + 3});
    auto x = xbig.narrow(1, 0, D).requires_grad_(false);
    auto xl = x.clone().requires_grad_();
    auto w1 = (torch::randn({H, D}) / std::sqrt(double(D))).requires_grad_(), b1 = torch::randn({H}).requires_grad_();
    auto w2 = (torch::randn({D, H}) / std::sqrt(double(H))).requires_grad_(), b2 = torch::randn({D}).requires_grad_();
    const auto gy = torch::randn({M, D});
    std::vector<at::Tensor> params = {w1, b1, w2, b2};
    for (int strided = 0; strided < 2; ++strided) {
      const auto& in = strided ? x : xl;
      auto y = moev::nn::mlp(in, w1, b1, w2, b2, at::kFloat);
      std::vector<at::Tensor> wrt = params;
      if (!strided) wrt.insert(wrt.begin(), xl);
      const auto grads = torch::autograd::grad({y}, wrt, {gy});
      // The same in fp64 through LibTorch's autograd.
      std::vector<at::Tensor> p64;
      for (const auto& t : wrt) p64.push_back(t.detach().to(torch::kDouble).requires_grad_());
      const auto x64 = strided ? x.to(torch::kDouble) : p64[0];
      const size_t o = strided ? 0 : 1;
      const auto y64 = torch::addmm(p64[o + 3], torch::gelu(torch::addmm(p64[o + 1], x64, p64[o].t())), p64[o + 2].t());
      const auto g64 = torch::autograd::grad({y64}, p64, {gy.to(torch::kDouble)});
      EXPECT_LT(rel(y, y64.detach()), 1e-6);
      for (size_t i = 0; i < grads.size(); ++i) EXPECT_LT(rel(grads[i], g64[i]), 1e-5) << "gradient " << i;
      const int threads = at::get_num_threads();
      at::set_num_threads(threads == 1 ? 2 : 1);
      const auto other = torch::autograd::grad({moev::nn::mlp(in, w1, b1, w2, b2, at::kFloat)}, wrt, {gy});
      at::set_num_threads(threads);
      for (size_t i = 0; i < grads.size(); ++i)
        EXPECT_TRUE(moev::test::same_bits_or_rounding(grads[i], other[i])) << "gradient " << i;
    }
  }
}

// GELU in `dtype` on moev's kernels (bf16; fp32 with AVX-512): values and
// gradients within rel * |ref| + abs of the fp64 reference on the same
// inputs, through autograd and through the helpers of hand-written backwards,
// over the tails (|x| up to 9, where Phi saturates), an odd length (masked
// tails) and a non-contiguous input.
static void check_gelu(at::ScalarType dtype, double rel, double abs) {
  torch::manual_seed(22);
  const auto x64 = torch::cat({torch::linspace(-9, 9, 2001, torch::kDouble), torch::randn({3001}, torch::kDouble) * 2});
  const auto x = x64.to(dtype).requires_grad_();
  const auto y = moev::nn::gelu(x);
  ASSERT_EQ(y.scalar_type(), dtype);
  const auto xr = x.detach().to(torch::kDouble).requires_grad_();  // the same rounded inputs, in fp64
  const auto ref = torch::gelu(xr);
  const auto g = torch::randn({x.numel()}, torch::kDouble);
  ref.backward(g);
  y.backward(g.to(dtype));
  auto close = [&](const at::Tensor& a, const at::Tensor& b) {
    return ((a.to(torch::kDouble) - b).abs() <= rel * b.abs() + abs).all().item<bool>();
  };
  EXPECT_TRUE(close(y.detach(), ref.detach())) << (y.detach().to(torch::kDouble) - ref).abs().max();
  EXPECT_TRUE(close(x.grad(), xr.grad())) << (x.grad().to(torch::kDouble) - xr.grad()).abs().max();
  at::Tensor saved;
  EXPECT_TRUE(torch::equal(moev::nn::gelu_saving(x.detach(), &saved), y.detach()));
  EXPECT_TRUE(torch::equal(moev::nn::gelu_backward_saved(g.to(dtype), saved), x.grad()));
  const auto odd = torch::randn({37}).to(dtype);
  EXPECT_TRUE(close(moev::nn::gelu(odd), torch::gelu(odd.to(torch::kDouble))));
  const auto m = torch::randn({6, 10}).to(dtype).t();
  EXPECT_TRUE(moev::test::same_bits_or_rounding(moev::nn::gelu(m), moev::nn::gelu(m.contiguous())));
}

// bf16 keeps 8 bits: relative error 2^-8, plus a small absolute floor where
// values and gradients pass through zero.
TEST(Gelu, Bf16MatchesFp64GeluAndItsGradient) { check_gelu(torch::kBFloat16, 8e-3, 2e-3); }
// The erf approximation is good to 1.5e-7 absolute: a few float ulps.
TEST(Gelu, Fp32MatchesFp64GeluAndItsGradient) { check_gelu(torch::kFloat, 2e-6, 1e-6); }

// residual + gamma * mlp(x) in inference (gamma folded into fc2, the residual
// added in fc2's tiles) against the composition, on strided input and rows off
// the tiles; with gradients it is the composition itself.
TEST(PackedMlp, ResidualWithLayerScaleMatchesTheComposition) {
  torch::manual_seed(26);
  for (auto [M, D, H] : std::vector<std::tuple<int64_t, int64_t, int64_t>>{{3 * 47, 32, 128}, {200, 40, 160}}) {
    SCOPED_TRACE("M=" + std::to_string(M) + " D=" + std::to_string(D) + " H=" + std::to_string(H));
    const auto xbig = torch::randn({M, D + 3});
    const auto x = xbig.narrow(1, 0, D), res = torch::randn({M, D});
    auto w1 = (torch::randn({H, D}) / std::sqrt(double(D))).requires_grad_(), b1 = torch::randn({H}).requires_grad_();
    auto w2 = (torch::randn({D, H}) / std::sqrt(double(H))).requires_grad_(), b2 = torch::randn({D}).requires_grad_();
    auto gamma = torch::randn({D}).requires_grad_();
    at::Tensor y;
    {
      torch::NoGradGuard ng;
      y = moev::nn::mlp_residual(x, w1, b1, w2, b2, gamma, res, at::kFloat);
    }
    const auto x64 = x.to(torch::kDouble);
    const auto ref = res.to(torch::kDouble) +
                     gamma.detach().to(torch::kDouble) *
                         torch::addmm(b2.detach().to(torch::kDouble),
                                      torch::gelu(torch::addmm(b1.detach().to(torch::kDouble), x64,
                                                               w1.detach().to(torch::kDouble).t())),
                                      w2.detach().to(torch::kDouble).t());
    EXPECT_LT(((y.to(torch::kDouble) - ref).norm() / ref.norm()).item<double>(), 1e-6);
    // With gradients: differentiable in every parameter.
    const auto yg = moev::nn::mlp_residual(x, w1, b1, w2, b2, gamma, res, at::kFloat);
    EXPECT_LT(((yg.detach().to(torch::kDouble) - ref).norm() / ref.norm()).item<double>(), 1e-6);
    const auto grads = torch::autograd::grad({yg.sum()}, {w1, b1, w2, b2, gamma});
    for (const auto& g : grads) EXPECT_GT(g.abs().sum().item<double>(), 0.0);
  }
}
