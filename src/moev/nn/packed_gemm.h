// moev's own GEMMs for CPUs with AVX-512: inference on weights packed once
// into column panels, and the fp32 training GEMMs (weights packed per step,
// weight gradients by packed_gemm_tn). Why not BLAS: OpenBLAS packs the
// weight matrix again at every call, and with many experts each GEMM has few
// rows (~100 at E = 64 in the bench), so that repacking, which streams the
// cold weights from memory before any arithmetic starts, was a sixth of the
// MoE layer's time (perf: 16.6% in sgemm_incopy at E = 64 against 2.3% at
// E = 4). Here the weights are packed when they change (the experts'
// inference copies), the kernel streams each panel once with the next one
// prefetched into L2, and the bias and GELU are applied while the output tile
// is in cache.
#pragma once

#include <cstdint>

namespace moev::nn {

// Whether packed_gemm runs on this CPU (AVX-512F). Elsewhere callers use BLAS.
bool packed_gemm_supported();

// Columns per packed panel: two AVX-512 vectors.
constexpr int64_t kPanelWidth = 32;

// Floats a packed [I, O] weight takes: ceil(O / 32) panels of I x 32 (the
// last panel's missing columns are zeros).
int64_t packed_size(int64_t I, int64_t O);

// Packs the weight W[I, O], element (i, o) at w[i * stride_i + o * stride_o],
// into dst (packed_size(I, O) floats): panel p holds columns 32p .. 32p + 31,
// row by row.
void pack_weight(const float* w, int64_t I, int64_t O, int64_t stride_i, int64_t stride_o, float* dst);

// What happens to Z = A W + bias while its tile is in registers (GELU: the
// exact, erf form, as at::gelu):
//   kNone      C = Z
//   kGelu      C = GELU(Z)
//   kGeluGrad  C = GELU(Z) and aux = GELU'(Z): a training forward, whose
//              backward then needs only aux
//   kMulAux    C = Z * aux, element-wise: that backward, dZ = (dY W2^T) * aux
//   kAddAux    C = Z + aux: a residual connection (aux read only)
// (a separate pass over the output cost 12% of a ConvNeXt's inference, and
// 11% of its training step for GELU and its derivative).
enum class Epilogue { kNone, kGelu, kGeluGrad, kMulAux, kAddAux };

// C[M, O] = epilogue(A[M, I] W + bias) on the calling thread, W packed by
// pack_weight; rows of A, C and aux at strides lda, ldc and ldc; bias [O] or
// null; aux [M, O] for kGeluGrad, kMulAux and kAddAux, else unused. A and C
// must not overlap.
void packed_gemm(int64_t M, int64_t I, int64_t O, const float* A, int64_t lda, const float* packed_w,
                 const float* bias, float* C, int64_t ldc, Epilogue epilogue, float* aux = nullptr);

// C[R, N] = A[M, R]^T B[M, N] (+ C when accumulate) on the calling thread: a
// weight gradient (dW = dY^T X), a long reduction over M rows. Neither operand
// is packed: both are read in place, 128 rows of the reduction at a time (a
// last panel narrower than 32 columns is copied, zero-padded). Rows of A, B and C at strides lda, ldb and ldc, unit column stride.
void packed_gemm_tn(int64_t M, int64_t R, int64_t N, const float* A, int64_t lda, const float* B, int64_t ldb,
                    float* C, int64_t ldc, bool accumulate);

// The two-layer FFN on the calling thread: out[M, D] = gelu(x W1 + b1) W2 + b2
// (+ residual[M, D], rows at stride ldo, when not null), W1 [D, H] and W2
// [H, D] packed; the hidden rows go through a per-thread scratch of at most
// 140 rows, so they never leave L2.
void packed_ffn(int64_t M, int64_t D, int64_t H, const float* x, int64_t ldx, const float* w1,
                const float* b1, const float* w2, const float* b2, float* out, int64_t ldo,
                const float* residual = nullptr);

// Where packed_ffn_backward adds its gradients; layout of dW1 and dW2:
// out_in as LibTorch's Linear weights ([H, D] and [D, H]), else in_out as the
// experts' ([D, H] and [H, D]).
struct FfnGrads {
  float* dw1;
  float* db1;  // [H]
  float* dw2;
  float* db2;  // [D]
  bool out_in;
};

// The backward of out = GELU(x W1 + b1) W2 + b2 over M rows on the calling
// thread, in blocks of rows that stay in cache: d act = (dy W2^T) * d (d =
// GELU'(x W1 + b1), as the kGeluGrad epilogue keeps it), dx = d act W1^T (dx
// null: not wanted), and added to g: dW1 += x^T d act, db1 += column sums of d
// act, dW2 += act^T dy, db2 += column sums of dy. w2t: W2^T [D, H] and w1t:
// W1^T [H, D], packed by pack_weight. Rows of dy, act, d and dx contiguous, of
// x at stride ldx. As separate passes over the [M, H] matrices, ConvNeXt's
// first stage (D = 32) was bound by memory.
void packed_ffn_backward(int64_t M, int64_t D, int64_t H, const float* dy, const float* x, int64_t ldx,
                         const float* act, const float* d, const float* w2t, const float* w1t, float* dx,
                         const FfnGrads& g);

}  // namespace moev::nn
