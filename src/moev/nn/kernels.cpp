#include "moev/nn/kernels.h"

#include "moev/nn/simd_avx512.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define MOEV_X86_INTRINSICS 1
#else
#define MOEV_X86_INTRINSICS 0
#endif

namespace moev::nn {

namespace {

// exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2]; exp(r) by the
// Cephes minimax polynomial. Branch-free and call-free (n is rounded by the
// 1.5 * 2^23 trick, 2^n built in the exponent bits), so loops of it vectorise.
inline float exp_approx(float x) {
  x = x < -87.33654f ? -87.33654f : x;
  x = x > 88.0f ? 88.0f : x;  // keeps n <= 127: 2^n stays a normal float
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  float r = x - n * 0.693359375f;  // ln2 split in two for an exact product
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t tb;
  std::memcpy(&tb, &t, sizeof tb);
  const int32_t bits = (tb - 0x4B400000 + 127) << 23;  // low bits of t hold n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Sixteen partial sums: one float accumulator would serialise the loop (float
// addition is not associative, so GCC keeps the order we write).
inline float sum16(const float* x, int64_t n) {
  float part[16] = {};
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) part[l] += x[j + l];
  for (; j < n; ++j) part[j & 15] += x[j];
  float s = 0;
  for (float v : part) s += v;
  return s;
}

}  // namespace

MOEV_CLONES void exp_array(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = exp_approx(x[i]);
}

namespace {

MOEV_CLONES void softmax_rows_generic(float* x, int64_t rows, int64_t n, int64_t ld, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * ld;
    float mx = row[0];
    for (int64_t j = 1; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
    for (int64_t j = 0; j < n; ++j) row[j] = exp_approx(scale * (row[j] - mx));
    const float inv = 1.0f / sum16(row, n);
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  }
}

MOEV_CLONES void gelu_rows_generic(float* x, int64_t rows, int64_t n, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * ld;
    for (int64_t j = 0; j < n; ++j) {
      const float v = row[j];
      const float z = (v < 0 ? -v : v) * 0.70710678118654752f;
      const float t = 1.0f / (1.0f + 0.3275911f * z);
      float p = 1.061405429f;
      p = p * t - 1.453152027f;
      p = p * t + 1.421413741f;
      p = p * t - 0.284496736f;
      p = p * t + 0.254829592f;
      // q = 1 - erf(z) = erfc(z): for v < 0, 1 + erf(v / sqrt 2) is q itself,
      // with no cancellation in the far negative tail.
      const float q = p * t * exp_approx(-z * z);
      row[j] = 0.5f * v * (v < 0 ? q : 2.0f - q);
    }
  }
}

#if MOEV_X86_INTRINSICS
#define MOEV_AVX512 __attribute__((target("avx512f")))
// GCC 12's _mm512_reduce_* start from _mm512_undefined_ps(): a false
// -W(maybe-)uninitialized in its own header.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

using simd::tail_mask;

// R consecutive rows of softmax_short_rows, their NV vectors each in registers.
template <int NV, int R>
MOEV_AVX512 inline void softmax_short_group(float* x, int64_t ld, const __mmask16* m, __m512 vscale) {
  const __m512 ninf = _mm512_set1_ps(-INFINITY);
  __m512 e[R][NV], mx[R], sum[R];
  for (int r = 0; r < R; ++r) {
    mx[r] = ninf;
    for (int v = 0; v < NV; ++v) {
      e[r][v] = _mm512_mask_loadu_ps(ninf, m[v], x + r * ld + 16 * v);
      mx[r] = _mm512_max_ps(mx[r], e[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx[r]));
    sum[r] = _mm512_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      e[r][v] = _mm512_maskz_mov_ps(m[v], simd::exp16(_mm512_mul_ps(vscale, _mm512_sub_ps(e[r][v], vmax))));
      sum[r] = _mm512_add_ps(sum[r], e[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum[r]));
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(x + r * ld + 16 * v, m[v], _mm512_mul_ps(e[r][v], inv));
  }
}

// Rows of at most 16 * NV values (attention over 49 tokens: NV = 4) held in
// registers, two rows at a time so that one row's reductions overlap the
// other's arithmetic: one load and one store per element, where the general
// loop below passes over the row three times.
template <int NV>
MOEV_AVX512 void softmax_short_rows(float* x, int64_t rows, int64_t n, int64_t ld, float scale) {
  const __m512 vscale = _mm512_set1_ps(scale);
  __mmask16 m[NV];
  for (int v = 0; v < NV; ++v) m[v] = n > 16 * v ? tail_mask(n - 16 * v) : 0;
  int64_t r = 0;
  for (; r + 2 <= rows; r += 2) softmax_short_group<NV, 2>(x + r * ld, ld, m, vscale);
  if (r < rows) softmax_short_group<NV, 1>(x + r * ld, ld, m, vscale);
}

MOEV_AVX512 void softmax_rows_avx512(float* x, int64_t rows, int64_t n, int64_t ld, float scale) {
  if (n <= 16) return softmax_short_rows<1>(x, rows, n, ld, scale);
  if (n <= 32) return softmax_short_rows<2>(x, rows, n, ld, scale);
  if (n <= 64) return softmax_short_rows<4>(x, rows, n, ld, scale);
  const __m512 vscale = _mm512_set1_ps(scale), ninf = _mm512_set1_ps(-INFINITY);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * ld;
    __m512 mx = ninf;
    for (int64_t j = 0; j < n; j += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(ninf, tail_mask(n - j), row + j));
    const __m512 vmax = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = tail_mask(n - j);
      const __m512 e = simd::exp16(_mm512_mul_ps(vscale, _mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), vmax)));
      sum = _mm512_mask_add_ps(sum, m, sum, e);
      _mm512_mask_storeu_ps(row + j, m, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
    for (int64_t j = 0; j < n; j += 16) {
      const __mmask16 m = tail_mask(n - j);
      _mm512_mask_storeu_ps(row + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), inv));
    }
  }
}

#define MOEV_AVX512BW __attribute__((target("avx512f,avx512bw,avx512vl")))
MOEV_AVX512BW void gelu_bf16_avx512(const uint16_t* x, uint16_t* y, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    simd::store_bf16(m, y + j, simd::gelu16(simd::load_bf16(m, x + j)));
  }
}
MOEV_AVX512BW void gelu_backward_bf16_avx512(const uint16_t* g, const uint16_t* x, uint16_t* gx, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    const __m512 d = simd::gelu_grad16(simd::load_bf16(m, x + j));
    simd::store_bf16(m, gx + j, _mm512_mul_ps(simd::load_bf16(m, g + j), d));
  }
}
// In place allowed (y == x): each lane is read before it is written.
MOEV_AVX512 void gelu_f32_avx512(const float* x, float* y, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    _mm512_mask_storeu_ps(y + j, m, simd::gelu16(_mm512_maskz_loadu_ps(m, x + j)));
  }
}
MOEV_AVX512 void gelu_and_grad_f32_avx512(const float* x, float* y, float* d, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = tail_mask(n - j);
    __m512 grad;
    _mm512_mask_storeu_ps(y + j, m, simd::gelu_and_grad16(_mm512_maskz_loadu_ps(m, x + j), &grad));
    _mm512_mask_storeu_ps(d + j, m, grad);
  }
}
#pragma GCC diagnostic pop
#endif

bool has_avx512bw() {
#if MOEV_X86_INTRINSICS
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl");
  return has;
#else
  return false;
#endif
}

float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
uint16_t float_to_bf16(float f) {  // round to nearest even, as LibTorch
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if (f != f) return 0x7FC0;
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}
float gelu_scalar(float v) {
  gelu_rows_generic(&v, 1, 1, 1);
  return v;
}
float gelu_grad_scalar(float v) {
  const float cdf = 0.5f * (1.0f + std::erf(v * 0.70710678118654752f));
  return cdf + v * 0.39894228040143268f * std::exp(-0.5f * v * v);
}

}  // namespace

bool cpu_has_avx512() {
#if MOEV_X86_INTRINSICS
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

void softmax_rows(float* x, int64_t rows, int64_t n, int64_t ld, float scale) {
#if MOEV_X86_INTRINSICS
  if (cpu_has_avx512()) return softmax_rows_avx512(x, rows, n, ld, scale);
#endif
  softmax_rows_generic(x, rows, n, ld, scale);
}

void gelu_bf16(const uint16_t* x, uint16_t* y, int64_t n) {
#if MOEV_X86_INTRINSICS
  if (has_avx512bw()) return gelu_bf16_avx512(x, y, n);
#endif
  for (int64_t j = 0; j < n; ++j) y[j] = float_to_bf16(gelu_scalar(bf16_to_float(x[j])));
}

void gelu_backward_bf16(const uint16_t* grad, const uint16_t* x, uint16_t* grad_x, int64_t n) {
#if MOEV_X86_INTRINSICS
  if (has_avx512bw()) return gelu_backward_bf16_avx512(grad, x, grad_x, n);
#endif
  for (int64_t j = 0; j < n; ++j)
    grad_x[j] = float_to_bf16(bf16_to_float(grad[j]) * gelu_grad_scalar(bf16_to_float(x[j])));
}

void gelu_f32(const float* x, float* y, int64_t n) {
#if MOEV_X86_INTRINSICS
  if (cpu_has_avx512()) return gelu_f32_avx512(x, y, n);
#endif
  for (int64_t j = 0; j < n; ++j) y[j] = gelu_scalar(x[j]);
}

void gelu_and_grad_f32(const float* x, float* y, float* d, int64_t n) {
#if MOEV_X86_INTRINSICS
  if (cpu_has_avx512()) return gelu_and_grad_f32_avx512(x, y, d, n);
#endif
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];  // before y[j] is written: in place allowed
    d[j] = gelu_grad_scalar(v);
    y[j] = gelu_scalar(v);
  }
}

void gelu_rows(float* x, int64_t rows, int64_t n, int64_t ld) {
#if MOEV_X86_INTRINSICS
  if (cpu_has_avx512()) {
    for (int64_t r = 0; r < rows; ++r) gelu_f32_avx512(x + r * ld, x + r * ld, n);
    return;
  }
#endif
  gelu_rows_generic(x, rows, n, ld);
}

MOEV_CLONES void softmax_backward_rows(const float* p, float* dp, int64_t rows, int64_t n, int64_t ld, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* pr = p + r * ld;
    float* dr = dp + r * ld;
    float part[16] = {};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
      for (int l = 0; l < 16; ++l) part[l] += pr[j + l] * dr[j + l];
    for (; j < n; ++j) part[j & 15] += pr[j] * dr[j];
    float dot = 0;
    for (float v : part) dot += v;
    for (j = 0; j < n; ++j) dr[j] = scale * pr[j] * (dr[j] - dot);
  }
}

MOEV_CLONES void column_sums(const float* x, int64_t rows, int64_t n, float* sums) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; ++c) sums[c] += x[r * n + c];
}

MOEV_CLONES void add_to(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

}  // namespace moev::nn
