#include "moev/moe/experts.h"

#include <cmath>

#include <torch/torch.h>

namespace moev::moe {

ExpertsImpl::ExpertsImpl(const ExpertsOptions& o) : options(o) {
  const int64_t E = o.num_experts(), D = o.dim(), H = o.hidden();
  w1 = register_parameter("w1", torch::empty({E, D, H}));
  b1 = register_parameter("b1", torch::empty({E, H}));
  w2 = register_parameter("w2", torch::empty({E, H, D}));
  b2 = register_parameter("b2", torch::empty({E, D}));
  reset_parameters();
}

void ExpertsImpl::reset_parameters() {
  // Xavier-uniform per expert and near-zero biases, as ViT initialises its MLPs,
  // so an expert starts as the dense MLP it replaces would.
  torch::NoGradGuard no_grad;
  const double D = static_cast<double>(options.dim()), H = static_cast<double>(options.hidden());
  const double bound = std::sqrt(6.0 / (D + H));
  w1.uniform_(-bound, bound);
  w2.uniform_(-bound, bound);
  b1.normal_(0, 1e-6);
  b2.normal_(0, 1e-6);
}

at::Tensor ExpertsImpl::forward(const at::Tensor& x) {
  auto h = torch::gelu(torch::baddbmm(b1.unsqueeze(1), x, w1));
  return torch::baddbmm(b2.unsqueeze(1), h, w2);
}

}  // namespace moev::moe
