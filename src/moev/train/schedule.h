// Learning rate: linear warmup from 0 to the peak, then cosine decay to min_lr at
// the last step. A pure function of the step, so a resumed run needs no state.
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

}  // namespace moev::train
