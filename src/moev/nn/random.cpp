// Thread-scoped generators for dropout, stochastic depth and router noise.
#include "moev/nn/random.h"

#include <utility>

#include <ATen/ATen.h>

#include "moev/core/error.h"

namespace moev::nn {

namespace {
c10::optional<at::Generator>& current() {
  thread_local c10::optional<at::Generator> gen;
  return gen;
}
}  // namespace

const c10::optional<at::Generator>& thread_generator() { return current(); }

GeneratorScope::GeneratorScope(c10::optional<at::Generator> gen) : previous_(std::move(current())) {
  current() = std::move(gen);
}

GeneratorScope::~GeneratorScope() { current() = std::move(previous_); }

at::Tensor dropout(const at::Tensor& x, double p, bool training) {
  MOEV_CHECK(p >= 0 && p < 1, "dropout probability ", p, ": expected in [0, 1)");
  if (!training || p == 0) return x;
  auto keep = at::empty_like(x).bernoulli_(1.0 - p, thread_generator());
  return x * keep.div_(1.0 - p);
}

at::Tensor drop_path_keep(int64_t rows, double p, const at::TensorOptions& options) {
  MOEV_CHECK(p >= 0 && p < 1, "drop path probability ", p, ": expected in [0, 1)");
  return at::empty({rows}, options).bernoulli_(1.0 - p, thread_generator());
}

at::Tensor drop_path_scale(int64_t rows, double p, const at::TensorOptions& options) {
  return drop_path_keep(rows, p, options).div_(1.0 - p);
}

}  // namespace moev::nn
