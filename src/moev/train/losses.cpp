#include "moev/train/losses.h"

#include <cmath>
#include <random>

#include <torch/torch.h>

#include "moev/core/error.h"

namespace moev::train {

at::Tensor smoothed_one_hot(const at::Tensor& y, int64_t L, double eps) {
  auto t = torch::full({y.size(0), L}, eps / double(L), torch::TensorOptions().dtype(torch::kFloat).device(y.device()));
  t.scatter_(1, y.view({-1, 1}), 1.0 - eps + eps / double(L));
  return t;
}

at::Tensor soft_cross_entropy(const at::Tensor& logits, const at::Tensor& target) {
  return -(target * torch::log_softmax(logits, 1)).sum(1).mean();
}

at::Tensor cosine_loss(const at::Tensor& logits, const at::Tensor& target) {
  auto p = torch::softmax(logits, 1);
  auto cos = (p * target).sum(1) / (p.norm(2, 1) * target.norm(2, 1)).clamp_min(1e-12);
  return (1 - cos).mean();
}

at::Tensor diversity_loss(const std::vector<at::Tensor>& logits, const at::Tensor& exclude) {
  MOEV_CHECK(!logits.empty(), "diversity_loss: no branches");
  MOEV_CHECK(!exclude.defined() || exclude.sizes() == logits[0].sizes(), "diversity_loss: exclude of shape ",
             exclude.sizes(), ", logits of ", logits[0].sizes(), ": expected the same");
  std::vector<at::Tensor> logp;
  // An excluded class gets a logit far below the rest rather than -inf: its
  // probability is then exactly 0 in float, and 0 * log-ratio stays 0, not NaN.
  for (const auto& l : logits)
    logp.push_back(torch::log_softmax(exclude.defined() ? l.masked_fill(exclude, -1e4) : l, 1));
  auto lp = torch::stack(logp);                                     // [N, B, L]
  auto log_mean = torch::logsumexp(lp, 0) - std::log(double(logits.size()));  // log p_mean, [B, L]
  auto kl = (lp.exp() * (lp - log_mean)).sum(2);                    // [N, B]
  return -kl.sum(0).mean();
}

at::Tensor online_distill_loss(const std::vector<at::Tensor>& logits, double temperature) {
  MOEV_CHECK(!logits.empty(), "online_distill_loss: no branches");
  MOEV_CHECK(temperature > 0, "online_distill_loss: temperature ", temperature, ": expected > 0");
  auto z = torch::stack(logits) / temperature;                      // [N, B, L]
  auto log_q = torch::log_softmax(z.mean(0).detach(), 1);           // the teacher, [B, L]
  auto kl = (log_q.exp() * (log_q - torch::log_softmax(z, 2))).sum(2);  // [N, B]
  return kl.sum(0).mean() * (temperature * temperature);
}

at::Tensor supported_classes(const at::Tensor& target) { return target > 1.0 / double(target.size(1)); }

namespace {
// Beta(a, a) from two gammas: std has no beta distribution.
double beta(std::mt19937_64& rng, double a) {
  std::gamma_distribution<double> g(a, 1.0);
  const double x = g(rng), y = g(rng);
  return x + y > 0 ? x / (x + y) : 0.5;
}
}  // namespace

Mix draw_mix(const MixOptions& o, uint64_t seed, int64_t step, int64_t H, int64_t W) {
  Mix m;
  const bool mixup = o.mixup_alpha > 0, cutmix = o.cutmix_alpha > 0;
  if (!mixup && !cutmix) return m;
  // Its own stream, apart from the loader's and the model's: mixing on or off
  // changes no other random draw.
  std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull ^ (uint64_t(step) + 0x5EED0001ull));
  std::uniform_real_distribution<double> u(0.0, 1.0);
  if (u(rng) >= o.prob) return m;
  const bool use_cutmix = cutmix && (!mixup || u(rng) < o.switch_prob);
  if (!use_cutmix) {
    m.kind = Mix::kMixup;
    m.lam = beta(rng, o.mixup_alpha);
    return m;
  }
  // A box of area (1 - lam) H W centred uniformly, clipped to the image; lam is
  // then what the clipped box really leaves (Yun et al. 2019).
  m.kind = Mix::kCutmix;
  const double lam = beta(rng, o.cutmix_alpha);
  const double r = std::sqrt(1.0 - lam);
  const auto ch = static_cast<int64_t>(u(rng) * double(H)), cw = static_cast<int64_t>(u(rng) * double(W));
  const auto bh = static_cast<int64_t>(double(H) * r), bw = static_cast<int64_t>(double(W) * r);
  m.y0 = std::clamp<int64_t>(ch - bh / 2, 0, H);
  m.y1 = std::clamp<int64_t>(ch + bh / 2, 0, H);
  m.x0 = std::clamp<int64_t>(cw - bw / 2, 0, W);
  m.x1 = std::clamp<int64_t>(cw + bw / 2, 0, W);
  m.lam = 1.0 - double((m.y1 - m.y0) * (m.x1 - m.x0)) / double(H * W);
  return m;
}

void apply_mix(const Mix& m, at::Tensor& x, at::Tensor& target) {
  if (m.kind == Mix::kNone) return;
  torch::NoGradGuard ng;
  auto xf = x.flip(0);
  if (m.kind == Mix::kMixup) {
    x.mul_(m.lam).add_(xf, 1.0 - m.lam);
  } else if (m.y1 > m.y0 && m.x1 > m.x0) {
    using torch::indexing::Slice;
    x.index_put_({Slice(), Slice(), Slice(m.y0, m.y1), Slice(m.x0, m.x1)},
                 xf.index({Slice(), Slice(), Slice(m.y0, m.y1), Slice(m.x0, m.x1)}));
  }
  target = target * m.lam + target.flip(0) * (1.0 - m.lam);
}

}  // namespace moev::train
