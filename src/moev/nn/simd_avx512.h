// AVX-512 versions of the element-wise functions that kernels.cpp and
// packed_gemm.cpp both apply to vectors in registers (packed_gemm fuses GELU
// into its output tiles). Internal to src/moev/nn: include only from files
// that check for AVX-512 at run time before calling these.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#include <cstdint>

namespace moev::nn::simd {

#define MOEV_AVX512_INLINE __attribute__((target("avx512f"), always_inline)) inline

// Lanes of a row's last chunk: all 16, or the `left` that remain.
inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// exp_approx on 16 lanes: the same clamps, split of ln2 and polynomial; 2^n by
// vscalefps.
MOEV_AVX512_INLINE __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)), _mm512_set1_ps(88.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// erfc(|v| / sqrt 2) by Abramowitz-Stegun 7.1.26 (see kernels.h), and
// exp(-v^2 / 2) on the way: what GELU and its derivative share.
MOEV_AVX512_INLINE __m512 erfc_abs(__m512 v, __m512* gauss) {
  const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
  const __m512 z = _mm512_mul_ps(_mm512_abs_ps(v), _mm512_set1_ps(0.70710678118654752f));
  const __m512 den = _mm512_fmadd_ps(_mm512_set1_ps(0.3275911f), z, one);
  __m512 t = _mm512_rcp14_ps(den);
  t = _mm512_mul_ps(t, _mm512_fnmadd_ps(den, t, two));  // one Newton step: 2^-28
  __m512 p = _mm512_set1_ps(1.061405429f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-1.453152027f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(1.421413741f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-0.284496736f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(0.254829592f));
  *gauss = exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z));
  return _mm512_mul_ps(_mm512_mul_ps(p, t), *gauss);
}

// Phi(v) = 1 - erfc / 2 for v >= 0, erfc / 2 for v < 0: computed from erfc
// directly, with no cancellation in the negative tail.
MOEV_AVX512_INLINE __m512 normal_cdf(__m512 v, __m512 q) {
  const __m512 half = _mm512_set1_ps(0.5f);
  const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(neg, _mm512_fnmadd_ps(half, q, _mm512_set1_ps(1.0f)), _mm512_mul_ps(half, q));
}

// GELU(v) = v Phi(v) on 16 lanes.
MOEV_AVX512_INLINE __m512 gelu16(__m512 v) {
  __m512 gauss;
  return _mm512_mul_ps(v, normal_cdf(v, erfc_abs(v, &gauss)));
}

// GELU'(v) = Phi(v) + v phi(v) on 16 lanes.
MOEV_AVX512_INLINE __m512 gelu_grad16(__m512 v) {
  __m512 gauss;
  const __m512 cdf = normal_cdf(v, erfc_abs(v, &gauss));
  return _mm512_fmadd_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.39894228040143268f)), gauss, cdf);
}

// GELU(v) and, from the same erfc and exp, *grad = GELU'(v), on 16 lanes.
MOEV_AVX512_INLINE __m512 gelu_and_grad16(__m512 v, __m512* grad) {
  __m512 gauss;
  const __m512 cdf = normal_cdf(v, erfc_abs(v, &gauss));
  *grad = _mm512_fmadd_ps(_mm512_mul_ps(v, _mm512_set1_ps(0.39894228040143268f)), gauss, cdf);
  return _mm512_mul_ps(v, cdf);
}

// bf16 <-> fp32 on 16 lanes with AVX-512F alone: bf16 is the top half of a
// float; rounding to nearest even, as LibTorch rounds (NaN stays NaN).
#define MOEV_AVX512BW_INLINE __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline
MOEV_AVX512BW_INLINE __m512 load_bf16(__mmask16 m, const void* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
MOEV_AVX512BW_INLINE void store_bf16(__mmask16 m, void* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

}  // namespace moev::nn::simd
#endif
