// The keyed permutation analyze deals tokens with: a bijection of [0, n) for
// every n, other keys giving other orders, and no visible order kept.
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "moev/core/keyed_permutation.h"

using moev::core::KeyedPermutation;

TEST(KeyedPermutation, IsABijectionOfZeroToNForEveryN) {
  std::vector<int64_t> sizes;
  for (int64_t n = 1; n <= 300; ++n) sizes.push_back(n);
  for (int64_t n : {1023, 1024, 1025, 4097, 65537}) sizes.push_back(n);
  for (int64_t n : sizes)
    for (uint64_t key : {uint64_t{0}, uint64_t{7}, (uint64_t{3} << 32) + 5}) {
      const KeyedPermutation p(n, key);
      std::vector<int> hits(static_cast<size_t>(n), 0);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t j = p(i);
        ASSERT_GE(j, 0) << "n " << n;
        ASSERT_LT(j, n) << "n " << n;
        ++hits[static_cast<size_t>(j)];
      }
      for (int64_t j = 0; j < n; ++j) ASSERT_EQ(hits[static_cast<size_t>(j)], 1) << "n " << n << " key " << key;
    }
}

TEST(KeyedPermutation, OtherKeysShuffleOtherwiseAndKeepNoOrder) {
  const int64_t n = 10000;
  const KeyedPermutation a(n, 1), b(n, 2);
  int64_t same = 0, fixed = 0, ascending = 0;
  for (int64_t i = 0; i < n; ++i) {
    same += a(i) == b(i);
    fixed += a(i) == i;
    if (i > 0) ascending += a(i) > a(i - 1);
  }
  // A random permutation: ~1 agreement and ~1 fixed point expected; ascending neighbours about half the time.
  EXPECT_LT(same, 10);
  EXPECT_LT(fixed, 10);
  EXPECT_NEAR(double(ascending) / double(n - 1), 0.5, 0.03);
}
