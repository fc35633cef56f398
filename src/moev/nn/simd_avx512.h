// AVX-512 versions of the element-wise functions that kernels.cpp and
// packed_gemm.cpp both apply to vectors in registers (packed_gemm fuses GELU
// into its output tiles). Internal to src/moev/nn: include only from files
// that check for AVX-512 at run time before calling these.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

namespace moev::nn::simd {

#define MOEV_AVX512_INLINE __attribute__((target("avx512f"), always_inline)) inline

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

// GELU(v) = v Phi(v) on 16 lanes, erf by Abramowitz-Stegun 7.1.26 (see
// kernels.h); for v < 0, 1 + erf is computed as erfc(|v| / sqrt 2) directly,
// with no cancellation in the tail.
MOEV_AVX512_INLINE __m512 gelu16(__m512 v) {
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
  const __m512 q = _mm512_mul_ps(_mm512_mul_ps(p, t), exp16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), z), z)));
  const __mmask16 neg = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 f = _mm512_mask_blend_ps(neg, _mm512_sub_ps(two, q), q);
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), f);
}

}  // namespace moev::nn::simd
#endif
