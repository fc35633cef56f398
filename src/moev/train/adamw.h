// AdamW (Loshchilov & Hutter 2019) over named parameters. Written here rather
// than taken from torch::optim so that its state is a plain name -> tensor map
// (checkpoints readable from Python, loadable on any layout) and so that weight
// decay skips biases, norms and embeddings by rule.
#pragma once

#include <cstdint>
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

  void zero_grad();
  // One update of every parameter with a gradient. With max_grad_norm > 0 the
  // gradients are first scaled so their global L2 norm is at most max_grad_norm
  // (folded into the update: no separate pass). Returns the norm before clipping.
  double step(double lr, double max_grad_norm = 0);

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
