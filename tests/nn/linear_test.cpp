// nn/linear: precision parsing and what choosing bf16 sets up.
#include <dlfcn.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "moev/nn/linear.h"
#include "support/expect_error.h"

TEST(Precision, ParsesNamesAndRejectsOthers) {
  EXPECT_EQ(moev::nn::parse_precision("fp32"), at::kFloat);
  EXPECT_EQ(moev::nn::parse_precision("bf16"), moev::nn::native_bf16() ? at::kBFloat16 : at::kFloat);
  moev::test::expect_error([] { moev::nn::parse_precision("fp16"); }, {"'fp16'", "expected fp32 or bf16"});
}

TEST(Precision, Bf16WidensOneDnnsPrimitiveCache) {
  // The experts' bf16 GEMMs meet thousands of shapes; with the default cache of
  // 1024, eviction under two replica threads corrupted memory (linear.cpp).
  if (!moev::nn::native_bf16()) GTEST_SKIP() << "no native bf16 on this CPU: bf16 runs fp32 GEMMs";
  using get_fn = int (*)(int*);
  auto get = reinterpret_cast<get_fn>(::dlsym(RTLD_DEFAULT, "dnnl_get_primitive_cache_capacity"));
  ASSERT_NE(get, nullptr) << "libdnnl not loaded with LibTorch";
  ASSERT_EQ(moev::nn::parse_precision("bf16"), at::kBFloat16);
  int capacity = 0;
  ASSERT_EQ(get(&capacity), 0);
  EXPECT_GE(capacity, 16384);
}
