// The AVX-512 packed-weight GEMM of packed_gemm.h. The output is computed in
// tiles of 14 rows x 32 columns held in 28 vector registers; per step of the
// inner dimension a tile loads two vectors of its weight panel and 14 scalars
// of A (packed 14 rows side by side, so each is a broadcast at a fixed offset)
// and issues 28 FMAs: the FMA ports, not the loads, bound it. A block of at
// most 140 rows of A is packed once and reused across all panels; each panel
// (I x 32 floats: 64 KB at I = 512) is read from memory once per row block and
// from L2 for the other tiles, while the first two tiles prefetch the next
// panel into L2.
#include "moev/nn/packed_gemm.h"

#include <algorithm>
#include <array>
#include <utility>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOEV_HAVE_X86 1
#define MOEV_AVX512 __attribute__((target("avx512f")))
#else
#define MOEV_HAVE_X86 0
#define MOEV_AVX512
#endif

#include "moev/core/error.h"
#include "moev/nn/kernels.h"
#include "moev/nn/simd_avx512.h"

namespace moev::nn {

namespace {

constexpr int64_t kTileRows = 14;               // rows of a register tile
constexpr int64_t kBlockRows = 10 * kTileRows;  // rows of A packed at a time
// Rows of the reduction packed at a time by packed_gemm_tn: one 16 KB panel
// chunk, which stays in L1 while every row block of the output passes over it.
constexpr int64_t kReduceChunk = 128;

}  // namespace

bool packed_gemm_supported() { return MOEV_HAVE_X86 && cpu_has_avx512(); }

int64_t packed_size(int64_t I, int64_t O) { return (O + kPanelWidth - 1) / kPanelWidth * I * kPanelWidth; }

#if MOEV_HAVE_X86
// GCC 12's AVX-512 headers start some intrinsics from _mm512_undefined_ps():
// false (maybe-)uninitialized warnings at every use.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace {

// Which of a panel's two vectors' lanes hold its nc (1..32) columns.
std::pair<__mmask16, __mmask16> column_masks(int64_t nc) {
  const auto lanes = [](int64_t n) {
    return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : static_cast<__mmask16>((1u << n) - 1);
  };
  return {lanes(nc), lanes(nc - 16)};
}

// r[0..15] <- its transpose: four rounds of in-lane and cross-lane shuffles.
MOEV_AVX512 inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// pack_weight of a transposed source (unit stride along I): a panel row is
// one column of the source. 16 x 16 blocks are loaded as rows and transposed
// in registers. Training packs W^T of every linear layer at each step, and
// attention packs k^T for every image and head (a scalar transpose was 5% of
// the V-MoE's inference, gathers 3.7%).
MOEV_AVX512 void pack_transposed(const float* w, int64_t I, int64_t O, int64_t stride_o, float* dst) {
  __m512 r[16];
  for (int64_t c0 = 0; c0 < O; c0 += kPanelWidth) {
    float* d = dst + c0 * I;
    for (int64_t h = 0; h < 2; ++h) {  // the panel's two 16-column halves
      const int64_t cols = std::min<int64_t>(16, O - c0 - 16 * h);
      const float* src = w + (c0 + 16 * h) * stride_o;
      for (int64_t i0 = 0; i0 < I; i0 += 16) {
        const int64_t ni = std::min<int64_t>(16, I - i0);
        const __mmask16 m = simd::tail_mask(ni);
        for (int j = 0; j < 16; ++j)
          r[j] = j < cols ? _mm512_maskz_loadu_ps(m, src + j * stride_o + i0) : _mm512_setzero_ps();
        transpose16(r);
        for (int64_t ii = 0; ii < ni; ++ii) _mm512_storeu_ps(d + (i0 + ii) * kPanelWidth + 16 * h, r[ii]);
      }
    }
  }
}

}  // namespace
#pragma GCC diagnostic pop
#endif

void pack_weight(const float* w, int64_t I, int64_t O, int64_t stride_i, int64_t stride_o, float* dst) {
#if MOEV_HAVE_X86
  if (stride_i == 1 && O > 1 && stride_o < (int64_t{1} << 31) / 32 && cpu_has_avx512())
    return pack_transposed(w, I, O, stride_o, dst);
#endif
  const int64_t panels = (O + kPanelWidth - 1) / kPanelWidth;
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t c0 = p * kPanelWidth, nc = std::min(kPanelWidth, O - c0);
    float* d = dst + p * I * kPanelWidth;
    for (int64_t i = 0; i < I; ++i, d += kPanelWidth) {
      const float* src = w + i * stride_i + c0 * stride_o;
      if (stride_o == 1) std::copy(src, src + nc, d);
      else
        for (int64_t c = 0; c < nc; ++c) d[c] = src[c * stride_o];
      for (int64_t c = nc; c < kPanelWidth; ++c) d[c] = 0.0f;
    }
  }
}

#if MOEV_HAVE_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace {

// One tile: C[MR, 32] = A_tile[MR, K] P[K, 32] + bias (+ C, accumulate), P one
// weight panel. A_tile k-major (kPackedA: element (i, k) at a[i + k * lda],
// lda = MR when packed by pack_rows, the row stride of a matrix whose
// transpose is A otherwise) or rows of A at stride lda (broadcasts straight
// from the rows: 3-9% slower per tile, measured, but no packing pass, which
// costs more when the output has few panels). pf: where to prefetch K cache
// lines into L2 (null: none). m0/m1: which of the 32 columns exist. kEpi: an
// Epilogue, applied in registers before the store; aux at stride ldc.
template <int MR, bool kPackedA, int kEpi>
MOEV_AVX512 inline void tile(int64_t K, const float* a, int64_t lda, const float* p, int64_t ldp, float* c,
                             int64_t ldc, const float* bias, __mmask16 m0, __mmask16 m1, const char* pf,
                             bool accumulate, float* aux) {
  constexpr auto kE = static_cast<Epilogue>(kEpi);
  if constexpr (kE == Epilogue::kMulAux || kE == Epilogue::kAddAux) {
    // The epilogue's aux rows, while the K loop runs: they come from L3 or
    // memory, and a miss per row at the end of the tile stalled it.
#pragma GCC unroll 14
    for (int i = 0; i < MR; ++i) {
      _mm_prefetch(reinterpret_cast<const char*>(aux + i * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(aux + i * ldc + 16), _MM_HINT_T0);
    }
  }
  __m512 acc0[MR], acc1[MR];
  const __m512 bias0 = bias ? _mm512_maskz_loadu_ps(m0, bias) : _mm512_setzero_ps();
  const __m512 bias1 = bias ? _mm512_maskz_loadu_ps(m1, bias + 16) : _mm512_setzero_ps();
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) {
    acc0[i] = accumulate ? _mm512_add_ps(bias0, _mm512_maskz_loadu_ps(m0, c + i * ldc)) : bias0;
    acc1[i] = accumulate ? _mm512_add_ps(bias1, _mm512_maskz_loadu_ps(m1, c + i * ldc + 16)) : bias1;
  }
  for (int64_t k = 0; k < K; ++k) {
    const __m512 w0 = _mm512_loadu_ps(p), w1 = _mm512_loadu_ps(p + 16);
    if (pf) _mm_prefetch(pf + k * 64, _MM_HINT_T1);
#pragma GCC unroll 14
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(kPackedA ? a[i] : a[i * lda]);
      acc0[i] = _mm512_fmadd_ps(ai, w0, acc0[i]);
      acc1[i] = _mm512_fmadd_ps(ai, w1, acc1[i]);
    }
    a += kPackedA ? lda : 1;
    p += ldp;
  }
#pragma GCC unroll 14
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if constexpr (kE == Epilogue::kGeluGrad) {
      __m512 d0, d1;
      _mm512_mask_storeu_ps(ci, m0, simd::gelu_and_grad16(acc0[i], &d0));
      _mm512_mask_storeu_ps(ci + 16, m1, simd::gelu_and_grad16(acc1[i], &d1));
      _mm512_mask_storeu_ps(aux + i * ldc, m0, d0);
      _mm512_mask_storeu_ps(aux + i * ldc + 16, m1, d1);
    } else if constexpr (kE == Epilogue::kMulAux) {
      _mm512_mask_storeu_ps(ci, m0, _mm512_mul_ps(acc0[i], _mm512_maskz_loadu_ps(m0, aux + i * ldc)));
      _mm512_mask_storeu_ps(ci + 16, m1, _mm512_mul_ps(acc1[i], _mm512_maskz_loadu_ps(m1, aux + i * ldc + 16)));
    } else if constexpr (kE == Epilogue::kAddAux) {
      _mm512_mask_storeu_ps(ci, m0, _mm512_add_ps(acc0[i], _mm512_maskz_loadu_ps(m0, aux + i * ldc)));
      _mm512_mask_storeu_ps(ci + 16, m1, _mm512_add_ps(acc1[i], _mm512_maskz_loadu_ps(m1, aux + i * ldc + 16)));
    } else {
      _mm512_mask_storeu_ps(ci, m0, kE == Epilogue::kGelu ? simd::gelu16(acc0[i]) : acc0[i]);
      _mm512_mask_storeu_ps(ci + 16, m1, kE == Epilogue::kGelu ? simd::gelu16(acc1[i]) : acc1[i]);
    }
  }
}

using TileFn = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, const float*,
                        __mmask16, __mmask16, const char*, bool, float*);
template <bool kPackedA, int kEpi, int... R>
constexpr std::array<TileFn, sizeof...(R)> tile_table(std::integer_sequence<int, R...>) {
  return {&tile<R + 1, kPackedA, kEpi>...};
}
template <bool kPackedA, int... E>
constexpr std::array<std::array<TileFn, kTileRows>, sizeof...(E)> epilogue_tables(std::integer_sequence<int, E...>) {
  return {tile_table<kPackedA, E>(std::make_integer_sequence<int, kTileRows>{})...};
}
constexpr int kEpilogues = 5;
// [packed A][epilogue][rows - 1]
const std::array<std::array<TileFn, kTileRows>, kEpilogues> kTiles[2] = {
    epilogue_tables<false>(std::make_integer_sequence<int, kEpilogues>{}),
    epilogue_tables<true>(std::make_integer_sequence<int, kEpilogues>{})};

// Outputs up to this wide read A in place; wider ones pack it (packing costs
// about 13 / O of the tile work: 10% at O = 128, 1.3% at O = 1024).
constexpr int64_t kPackAbove = 384;

// Packs rows [0, m) of A (stride lda, I columns) into tiles of kTileRows rows,
// k-major; the last tile holds m % kTileRows rows at its own width. One gather
// per k collects a column of the tile (a scalar transpose cost 9% of the
// expert FFN's time).
MOEV_AVX512 void pack_rows(const float* A, int64_t lda, int64_t m, int64_t I, float* dst) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int32_t>(lda)));
  for (int64_t r0 = 0; r0 < m; r0 += kTileRows) {
    const int64_t mr = std::min(kTileRows, m - r0);
    const __mmask16 mask = static_cast<__mmask16>((1u << mr) - 1);
    const float* src = A + r0 * lda;
    float* d = dst + r0 * I;
    for (int64_t k = 0; k < I; ++k)
      _mm512_mask_storeu_ps(d + k * mr, mask, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, rows, src + k, 4));
  }
}

// The per-thread buffers (0: packed A rows, 1: FFN hidden rows, 2:
// packed_gemm_tn's last panel, 3: the FFN backward's d act rows): grown once,
// never freed, so steady-state calls allocate nothing.
std::vector<float>& scratch(int which) {
  thread_local std::vector<float> buf[4];
  return buf[which];
}

// C[m, O] = A W + bias for m <= kBlockRows rows of A: packed by pack_rows
// (lda ignored) or in place at stride lda. next_a: the rows of A the next
// block will read in place (null: none), prefetched into L2 during the last
// panel, so that block does not start on activations still in L3 or memory.
MOEV_AVX512 void block_gemm(int64_t m, int64_t I, int64_t O, const float* a, int64_t lda, bool packed_a,
                            const float* w, const float* bias, float* C, int64_t ldc, Epilogue epilogue,
                            float* aux, const float* next_a) {
  const int64_t panels = (O + kPanelWidth - 1) / kPanelWidth, panel = I * kPanelWidth;
  const auto& tiles = kTiles[packed_a][static_cast<int>(epilogue)];
  for (int64_t p = 0; p < panels; ++p) {
    const int64_t c0 = p * kPanelWidth, nc = std::min(kPanelWidth, O - c0);
    const auto [m0, m1] = column_masks(nc);
    const float* wp = w + p * panel;
    // The next panel (or, after the last, whatever follows the weight: the
    // next expert's, when experts are stored side by side; prefetches never fault).
    const char* next = reinterpret_cast<const char*>(wp + panel);
    for (int64_t r0 = 0, t = 0; r0 < m; r0 += kTileRows, ++t) {
      const int64_t mr = std::min(kTileRows, m - r0);
      // Two tiles prefetch K lines each of the next panel; in the last panel
      // the others fetch the next block's A, as far as their lines reach.
      const char* pf = t < 2                              ? next + t * I * 64
                       : next_a && p == panels - 1 ? reinterpret_cast<const char*>(next_a) + (t - 2) * I * 64
                                                   : nullptr;
      tiles[mr - 1](I, packed_a ? a + r0 * I : a + r0 * lda, packed_a ? mr : lda, wp, kPanelWidth, C + r0 * ldc + c0,
                    ldc, bias ? bias + c0 : nullptr, m0, m1, pf, false, aux ? aux + r0 * ldc + c0 : nullptr);
    }
  }
}

}  // namespace
#pragma GCC diagnostic pop
#endif

namespace {

// packed_gemm; after: the rows of A a later call will read (null: none),
// prefetched by the last block in place of a next block's.
void gemm_blocks(int64_t M, int64_t I, int64_t O, const float* A, int64_t lda, const float* packed_w,
                 const float* bias, float* C, int64_t ldc, Epilogue epilogue, float* aux, const float* after) {
#if MOEV_HAVE_X86
  MOEV_CHECK(packed_gemm_supported(), "packed_gemm: this CPU has no AVX-512");
  MOEV_CHECK(lda < (int64_t{1} << 31) / 64, "packed_gemm: row stride ", lda, " too large for the gathers");
  MOEV_CHECK(aux || epilogue == Epilogue::kNone || epilogue == Epilogue::kGelu,
             "packed_gemm: this epilogue needs its aux matrix");
  const bool pack_a = O > kPackAbove;
  auto& abuf = scratch(0);
  if (pack_a && static_cast<int64_t>(abuf.size()) < kBlockRows * I) abuf.resize(kBlockRows * I);
  for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
    const int64_t m = std::min(kBlockRows, M - m0);
    if (pack_a) pack_rows(A + m0 * lda, lda, m, I, abuf.data());
    const float* next_a = pack_a ? nullptr : m0 + kBlockRows < M ? A + (m0 + kBlockRows) * lda : after;
    block_gemm(m, I, O, pack_a ? abuf.data() : A + m0 * lda, lda, pack_a, packed_w, bias, C + m0 * ldc, ldc,
               epilogue, aux ? aux + m0 * ldc : nullptr, next_a);
  }
#else
  MOEV_CHECK(false, "packed_gemm: built for a CPU without AVX-512");
#endif
}

}  // namespace

void packed_gemm(int64_t M, int64_t I, int64_t O, const float* A, int64_t lda, const float* packed_w,
                 const float* bias, float* C, int64_t ldc, Epilogue epilogue, float* aux) {
  gemm_blocks(M, I, O, A, lda, packed_w, bias, C, ldc, epilogue, aux, nullptr);
}

void packed_gemm_tn(int64_t M, int64_t R, int64_t N, const float* A, int64_t lda, const float* B, int64_t ldb,
                    float* C, int64_t ldc, bool accumulate) {
#if MOEV_HAVE_X86
  MOEV_CHECK(packed_gemm_supported(), "packed_gemm_tn: this CPU has no AVX-512");
  if (M == 0) {
    if (!accumulate)
      for (int64_t r = 0; r < R; ++r) std::fill(C + r * ldc, C + r * ldc + N, 0.0f);
    return;
  }
  // One chunk of B's rows at a time, all its panels: A's chunk is then read
  // from memory once and from L2 for the other panels, and C stays in L2. A
  // panel's row of 32 floats is contiguous in B itself, so full panels are
  // read in place (a copy cost 3% of a training step); only a last, partial
  // one is packed, zero-padded.
  const int64_t full = N / kPanelWidth, tail = N - full * kPanelWidth;
  auto& last = scratch(2);
  if (tail > 0 && static_cast<int64_t>(last.size()) < kReduceChunk * kPanelWidth)
    last.resize(kReduceChunk * kPanelWidth);
  const auto& tiles = kTiles[1][static_cast<int>(Epilogue::kNone)];
  // Chunks of equal length: a short last chunk would pay the tiles' loads
  // and stores of C for few rows (the fused backward calls this on blocks of
  // 280 rows).
  const int64_t chunks = (M + kReduceChunk - 1) / kReduceChunk;
  for (int64_t q = 0, k0 = 0; q < chunks; ++q) {
    const int64_t kc = M * (q + 1) / chunks - k0;
    if (tail > 0) pack_weight(B + k0 * ldb + full * kPanelWidth, kc, tail, ldb, 1, last.data());
    for (int64_t p = 0; p < full + (tail > 0); ++p) {
      const int64_t c0 = p * kPanelWidth;
      const auto [m0, m1] = column_masks(std::min(kPanelWidth, N - c0));
      const float* panel = p < full ? B + k0 * ldb + c0 : last.data();
      const int64_t ldp = p < full ? ldb : kPanelWidth;
      // A^T's rows are A's columns: a tile's 14 values of one k are adjacent
      // in A's row k, so A is read in place, k-major at stride lda.
      for (int64_t r0 = 0; r0 < R; r0 += kTileRows) {
        const int64_t mr = std::min(kTileRows, R - r0);
        tiles[mr - 1](kc, A + k0 * lda + r0, lda, panel, ldp, C + r0 * ldc + c0, ldc, nullptr, m0, m1, nullptr,
                      accumulate || k0 > 0, nullptr);
      }
    }
    k0 += kc;
  }
#else
  MOEV_CHECK(false, "packed_gemm_tn: built for a CPU without AVX-512");
#endif
}

void packed_ffn(int64_t M, int64_t D, int64_t H, const float* x, int64_t ldx, const float* w1,
                const float* b1, const float* w2, const float* b2, float* out, int64_t ldo,
                const float* residual) {
  auto& hidden = scratch(1);
  if (static_cast<int64_t>(hidden.size()) < kBlockRows * H) hidden.resize(kBlockRows * H);
  for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
    const int64_t m = std::min(kBlockRows, M - m0);
    const float* next_x = m0 + kBlockRows < M ? x + (m0 + kBlockRows) * ldx : nullptr;
    gemm_blocks(m, D, H, x + m0 * ldx, ldx, w1, b1, hidden.data(), H, Epilogue::kGelu, nullptr, next_x);
    // The epilogue only reads aux.
    float* res = residual ? const_cast<float*>(residual + m0 * ldo) : nullptr;
    packed_gemm(m, H, D, hidden.data(), H, w2, b2, out + m0 * ldo, ldo,
                residual ? Epilogue::kAddAux : Epilogue::kNone, res);
  }
}

void packed_ffn_backward(int64_t M, int64_t D, int64_t H, const float* dy, const float* x, int64_t ldx,
                         const float* act, const float* d, const float* w2t, const float* w1t, float* dx,
                         const FfnGrads& g) {
  // 20 register tiles per block: its d act rows (kFusedRows x H floats) stay
  // in L2 for the three GEMMs that read them.
  constexpr int64_t kFusedRows = 2 * kBlockRows;
  auto& dh = scratch(3);
  if (static_cast<int64_t>(dh.size()) < kFusedRows * H) dh.resize(kFusedRows * H);
  for (int64_t m0 = 0; m0 < M; m0 += kFusedRows) {
    const int64_t m = std::min(kFusedRows, M - m0);
    const float *gy = dy + m0 * D, *xb = x + m0 * ldx, *ab = act + m0 * H;
    // The epilogue only reads aux.
    packed_gemm(m, D, H, gy, D, w2t, nullptr, dh.data(), H, Epilogue::kMulAux, const_cast<float*>(d + m0 * H));
    if (dx) packed_gemm(m, H, D, dh.data(), H, w1t, nullptr, dx + m0 * D, D, Epilogue::kNone);
    if (g.out_in) {
      packed_gemm_tn(m, H, D, dh.data(), H, xb, ldx, g.dw1, D, true);
      packed_gemm_tn(m, D, H, gy, D, ab, H, g.dw2, H, true);
    } else {
      packed_gemm_tn(m, D, H, xb, ldx, dh.data(), H, g.dw1, H, true);
      packed_gemm_tn(m, H, D, ab, H, gy, D, g.dw2, D, true);
    }
    column_sums(dh.data(), m, H, g.db1);
    column_sums(gy, m, D, g.db2);
  }
}

}  // namespace moev::nn
