// Where the random parts of a training forward draw from: dropout, stochastic
// depth and router noise. By default the global CPU generator. A thread running
// one replica of a data-parallel step installs its own generator, reseeded every
// step from (seed, step, replica): replicas drawing from the shared generator
// would take its numbers in whatever order their threads happen to run, so a
// run with replicas would not repeat, nor resume bit for bit after a kill.
#pragma once

#include <cstdint>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace moev::nn {

// The generator of this thread's scope (nullopt: the global one).
const c10::optional<at::Generator>& thread_generator();

// Installs `gen` as this thread's generator until the scope ends (nullopt: the
// global one); scopes nest.
class GeneratorScope {
 public:
  explicit GeneratorScope(c10::optional<at::Generator> gen);
  ~GeneratorScope();
  GeneratorScope(const GeneratorScope&) = delete;
  GeneratorScope& operator=(const GeneratorScope&) = delete;

 private:
  c10::optional<at::Generator> previous_;
};

// Inverted dropout from the thread's generator: x: any shape -> same shape, each
// element zeroed with probability p and the rest scaled by 1 / (1 - p); x itself
// when !training or p == 0.
at::Tensor dropout(const at::Tensor& x, double p, bool training);

// Stochastic depth's per-sample mask from the thread's generator: [rows], each
// 0 with probability p and 1 otherwise (outside a scope, the numbers LibTorch's
// `empty({rows}).bernoulli_(1 - p)` draws).
at::Tensor drop_path_keep(int64_t rows, double p, const at::TensorOptions& options);

// The mask scaled: [rows], 0 or 1 / (1 - p) (multiply a residual branch of `rows`
// samples by them, broadcast).
at::Tensor drop_path_scale(int64_t rows, double p, const at::TensorOptions& options);

}  // namespace moev::nn
