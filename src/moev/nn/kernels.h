// Element-wise CPU float kernels the fused layers share, vectorised for the
// machine they run on (AVX-512, AVX2 or baseline clones chosen at load time;
// softmax and GELU also written out in AVX-512 intrinsics, which run them
// about 3x faster than GCC's vectorisation of the clones on attention's
// 49-wide rows).
// Why: a scalar std::exp made the attention softmax cost more than the
// attention's GEMMs; LibTorch's own vectorised kernels are not callable on raw
// rows inside our fused loops.
#pragma once

#include <cstdint>

// Marks a hot loop to be compiled three times, the best clone for this CPU
// picked when the library loads; the loops are written so GCC vectorises them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define MOEV_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOEV_CLONES
#endif

namespace moev::nn {

// Whether this CPU runs AVX-512F: the hand-written kernels of src/moev/nn
// (these, packed_gemm, the depthwise conv) take their AVX-512 paths.
bool cpu_has_avx512();

// In place, each of `rows` rows of length n (stride ld): row <- softmax(scale *
// row), scale > 0 (attention folds its 1 / sqrt(dh) in here).
void softmax_rows(float* x, int64_t rows, int64_t n, int64_t ld, float scale = 1.0f);

// out[i] = exp(x[i]) for i < n, relative error below 2e-7 over the float range
// (below -87.3 the result is the smallest normal float; above 88 it stays e^88).
void exp_array(const float* x, float* out, int64_t n);

// In place, each of `rows` rows of length n (stride ld): x <- GELU(x) =
// x Phi(x), the exact (erf) form as at::gelu; erf by Abramowitz-Stegun 7.1.26
// (absolute error below 1.5e-7, so GELU's below 1e-7 |x|).
void gelu_rows(float* x, int64_t rows, int64_t n, int64_t ld);

// bf16 GELU and its backward on n elements (raw bf16 bits), computed in fp32
// as gelu_rows: y = GELU(x); grad_x = grad * GELU'(x). In place allowed.
// LibTorch 1.13's CPU bf16 gelu converted one element at a time (~10% of a
// bf16 training step of the tiny V-MoE).
void gelu_bf16(const uint16_t* x, uint16_t* y, int64_t n);
void gelu_backward_bf16(const uint16_t* grad, const uint16_t* x, uint16_t* grad_x, int64_t n);
// GELU on fp32. LibTorch 1.13 sends fp32 gelu and its backward to oneDNN's
// eltwise primitive, 13% of a training step of the tiny ConvNeXt-MoE.
// gelu_and_grad_f32 also writes d = GELU'(x) from the same erf and exp, so a
// backward that kept d is one multiply instead of a second evaluation.
void gelu_f32(const float* x, float* y, int64_t n);
void gelu_and_grad_f32(const float* x, float* y, float* d, int64_t n);

// In place, each row of P (probabilities) and dP: dP <- scale * P * (dP -
// sum(P * dP)), the softmax backward (scale: of the logits, folded in).
void softmax_backward_rows(const float* p, float* dp, int64_t rows, int64_t n, int64_t ld, float scale = 1.0f);

// sums[c] += the sum over `rows` rows of x (stride n) of x[r, c], c < n: a
// bias gradient. The rows are added in order.
void column_sums(const float* x, int64_t rows, int64_t n, float* sums);

// y[i] += x[i] for i < n.
void add_to(const float* x, float* y, int64_t n);

}  // namespace moev::nn
