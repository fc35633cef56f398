// Learning rate: linear warmup from 0 to the peak, then cosine decay to min_lr at
// the last step. A pure function of the step, so a resumed run needs no state.
// A time budget (train.minutes) only moves the last step: steps_in_budget turns
// the seconds left and the measured step time into it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace moev::train {

inline double learning_rate(int64_t step, int64_t total_steps, int64_t warmup_steps, double peak,
                            double min_lr) {
  if (warmup_steps > 0 && step < warmup_steps)
    return peak * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  const double span = static_cast<double>(std::max<int64_t>(1, total_steps - warmup_steps));
  const double t = std::clamp(static_cast<double>(step - warmup_steps) / span, 0.0, 1.0);
  return min_lr + 0.5 * (peak - min_lr) * (1.0 + std::cos(M_PI * t));
}

// The last step of a time-budgeted run, planned at `step` after `elapsed_s` of
// training: as many more steps as the seconds left hold at `seconds_per_step`,
// at least one while time is left, none once it is spent, and never beyond
// `cap` (the epoch limit). Re-planned as the run goes, so a machine that slows
// down shortens the cosine tail instead of overrunning the budget.
inline int64_t steps_in_budget(int64_t step, double elapsed_s, double budget_s, double seconds_per_step,
                               int64_t cap) {
  if (elapsed_s >= budget_s) return std::min(step, cap);
  const double left = (budget_s - elapsed_s) / std::max(seconds_per_step, 1e-9);
  const double more = std::max(1.0, std::floor(std::min(left, 1e15)));
  return std::min<int64_t>(cap, step + static_cast<int64_t>(more));
}

}  // namespace moev::train
