#include "moev/nn/kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

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

MOEV_CLONES void softmax_rows(float* x, int64_t rows, int64_t n, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * ld;
    float mx = row[0];
    for (int64_t j = 1; j < n; ++j) mx = row[j] > mx ? row[j] : mx;
    for (int64_t j = 0; j < n; ++j) row[j] = exp_approx(row[j] - mx);
    const float inv = 1.0f / sum16(row, n);
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  }
}

MOEV_CLONES void gelu_rows(float* x, int64_t rows, int64_t n, int64_t ld) {
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

MOEV_CLONES void softmax_backward_rows(const float* p, float* dp, int64_t rows, int64_t n, int64_t ld) {
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
    for (j = 0; j < n; ++j) dr[j] = pr[j] * (dr[j] - dot);
  }
}

}  // namespace moev::nn
