// The training objectives beyond plain cross-entropy: soft targets (label
// smoothing, distillation, mixup/cutmix), the cosine loss of Barz & Denzler
// 2020, Sun et al.'s diversity loss between expert branches and its opposite,
// online distillation between them; and the batch
// mixing (mixup, cutmix) that makes soft targets in the first place.
#pragma once

#include <cstdint>
#include <vector>

#include <ATen/core/Tensor.h>

namespace moev::train {

// y: int64 [B] -> [B, L]: 1 - eps + eps/L at the label, eps/L elsewhere (the
// label smoothing of torch's cross_entropy, so soft and hard paths agree).
at::Tensor smoothed_one_hot(const at::Tensor& y, int64_t num_classes, double eps);

// logits [B, L], target [B, L] (rows sum to 1) -> mean over B of -sum target * log_softmax.
at::Tensor soft_cross_entropy(const at::Tensor& logits, const at::Tensor& target);

// logits [B, L], target [B, L] -> mean over B of 1 - cos(target, softmax(logits)).
at::Tensor cosine_loss(const at::Tensor& logits, const at::Tensor& target);

// Sun et al.'s diversity loss over N branches: -sum_i KL(p_i || p_mean), mean
// over the batch, p_i = softmax(logits_i), p_mean = their mean. This direction
// is N times the generalised Jensen-Shannon divergence of the branches, so it
// is bounded (>= -N log N): minimising it pushes the branches apart without the
// runaway the other direction allows (KL(p_mean || p_i) grows without bound as a
// branch sends a class's probability to 0, so a loss of minus that can fall
// forever by making one branch absurdly confident). Zero when all branches agree.
// With `exclude` (bool [B, L]), each branch's distribution leaves those classes
// out (softmax over the rest): the branches are pushed apart only on the
// classes a row's target does not support, in the spirit of Pang et al. 2019's
// non-maximal diversity, so the push need not cost accuracy on the label.
// logits: N x [B, L] -> scalar
at::Tensor diversity_loss(const std::vector<at::Tensor>& logits, const at::Tensor& exclude = {});

// Online distillation between branches (Lan et al. 2018's ONE, with the
// plain mean of the branches' logits as the on-the-fly teacher): sum over
// branches of T^2 KL(q || p_i), q = softmax(mean logits / T) held fixed (no
// gradient), p_i = softmax(logits_i / T), mean over the batch. The opposite
// pull to the diversity loss: each branch is drawn towards what the branches
// agree on, which ONE finds makes every branch better than training it alone.
// T^2 keeps the gradient's size independent of T (Hinton et al. 2015). Zero
// when all branches agree.
// logits: N x [B, L] -> scalar
at::Tensor online_distill_loss(const std::vector<at::Tensor>& logits, double temperature);

// The classes a target supports: target [B, L] (rows sum to 1) -> bool [B, L],
// true where the target gives a class more than the uniform share 1/L (the
// label under label smoothing, both labels of a mix but a faint one, the
// classes a teacher believes in). At most L - 1 per row.
at::Tensor supported_classes(const at::Tensor& target);

// How one batch is mixed: none, mixup (x = lam x + (1 - lam) x_flip) or cutmix
// (a box of x_flip pasted into x, lam = the area left of x). x_flip is the batch
// in reverse order, so pairs are (i, B-1-i).
struct Mix {
  enum Kind { kNone, kMixup, kCutmix } kind = kNone;
  double lam = 1;                     // weight of the image's own target
  int64_t y0 = 0, y1 = 0, x0 = 0, x1 = 0;  // cutmix box rows [y0, y1), columns [x0, x1)
};

struct MixOptions {
  double mixup_alpha = 0;   // Beta(alpha, alpha) of mixup's lam (0: no mixup)
  double cutmix_alpha = 0;  // Beta(alpha, alpha) of cutmix's box area (0: no cutmix)
  double prob = 1;          // probability that a batch is mixed at all
  double switch_prob = 0.5; // with both on, probability of cutmix rather than mixup
};

// The mix of one batch, a pure function of (seed, step): a resumed run mixes alike.
Mix draw_mix(const MixOptions& o, uint64_t seed, int64_t step, int64_t height, int64_t width);

// Mixes x [B, C, H, W] and target [B, L] in place (as described by mix).
void apply_mix(const Mix& mix, at::Tensor& x, at::Tensor& target);

}  // namespace moev::train
