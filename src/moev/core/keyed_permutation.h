// A keyed random permutation of [0, n), evaluated one element at a time, for
// shuffles too large or too many to store: analyze deals each position's tokens
// over all the test images with one per layer and position.
#pragma once

#include <cstdint>

namespace moev::core {

// A 4-round Feistel network over the next power of 4 at or above n, walked back
// into range: each step is a bijection of [0, 4^h), so the walk from any i < n
// returns to [0, n) (within 4 steps on average, 4^h < 4n), and the map is a
// bijection of [0, n). Not cryptographic: the keys need only differ.
class KeyedPermutation {
 public:
  KeyedPermutation(int64_t n, uint64_t key) : n_(n), key_(key) {
    while ((int64_t{1} << (2 * half_)) < n) ++half_;
    mask_ = (uint64_t{1} << half_) - 1;
  }
  // i in [0, n) -> its place in [0, n).
  int64_t operator()(int64_t i) const {
    uint64_t v = static_cast<uint64_t>(i);
    do v = step(v);
    while (v >= static_cast<uint64_t>(n_));
    return static_cast<int64_t>(v);
  }

 private:
  static uint64_t mix(uint64_t z) {  // SplitMix64's finaliser
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  uint64_t step(uint64_t v) const {
    uint64_t l = v >> half_, r = v & mask_;
    for (uint64_t round = 0; round < 4; ++round) {
      const uint64_t f = l ^ (mix(r ^ (key_ + round * 0x9e3779b97f4a7c15ULL)) & mask_);
      l = r;
      r = f;
    }
    return (l << half_) | r;
  }
  int64_t n_;
  uint64_t key_, mask_ = 0;
  int half_ = 0;
};

}  // namespace moev::core
