// The data pipeline's random draws, defined here rather than by <random>'s
// distributions, whose algorithms differ between standard libraries: an
// augmentation drawn from a given seed is the same on every machine.
#pragma once

#include <cstdint>
#include <random>

namespace moev::data {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// Uniform in [0, n) by multiply-high (Lemire); the bias, n / 2^64, is negligible.
inline uint64_t uniform_below(std::mt19937_64& rng, uint64_t n) {
  return static_cast<uint64_t>((static_cast<unsigned __int128>(rng()) * n) >> 64);
}

// Uniform in [0, 1).
inline double uniform_unit(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53; }

}  // namespace moev::data
