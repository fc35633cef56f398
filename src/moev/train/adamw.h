// AdamW (Loshchilov & Hutter 2019) over named parameters. Written here rather
// than taken from torch::optim so that its state is a plain name -> tensor map
// (checkpoints readable from Python, loadable on any layout) and so that weight
// decay skips biases, norms and embeddings by rule.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>

namespace moev::train {

struct AdamWOptions {
  double beta1 = 0.9;          // first-moment decay
  double beta2 = 0.999;        // second-moment decay
  double eps = 1e-8;           // denominator floor
  double weight_decay = 0.05;  // decoupled decay, applied to matrices only
};

class AdamW {
 public:
  AdamW(std::vector<std::pair<std::string, at::Tensor>> params, AdamWOptions options);

  // Drops the gradients (set to none): the next backward stores its gradient
  // tensors as they come, with no zeroing pass and no add pass.
  void zero_grad();

  // Runs fn(t) for t in [0, parts), possibly on several threads.
  using Parallel = std::function<void(int parts, const std::function<void(int)>& fn)>;

  // One update of every parameter with a gradient. With max_grad_norm > 0 the
  // gradients are first scaled so their global L2 norm is at most max_grad_norm
  // (folded into the update: no separate pass). Returns the norm before clipping.
  // extra[r][i]: replica r's gradient of parameter i (constructor order, undefined
  // = none), summed into the master's inside the two passes (norm, update), so
  // data-parallel replicas need no reduction pass of their own. parallel, parts:
  // how the passes split (default: at::parallel_for over the intra-op threads);
  // the elements are cut into `parts` equal runs, so the result depends on parts
  // only, not on timing.
  double step(double lr, double max_grad_norm = 0,
              const std::vector<std::vector<at::Tensor>>& extra = {},
              const Parallel& parallel = nullptr, int parts = 0);

  int64_t steps() const { return steps_; }
  // "<param>.exp_avg", "<param>.exp_avg_sq" and "step".
  std::map<std::string, at::Tensor> state() const;
  void load_state(const std::map<std::string, at::Tensor>& state, const std::string& source);

 private:
  struct Slot {
    std::string name;
    at::Tensor param, exp_avg, exp_avg_sq;
    bool decay;
  };
  std::vector<Slot> slots_;
  AdamWOptions options_;
  int64_t steps_ = 0;
};

}  // namespace moev::train
