// Deterministic corruptions of a test set, for robustness evaluation in the
// manner of ImageNet-C (Hendrycks & Dietterich 2019): each corruption has five
// severities, and the same (set, name, severity, seed) always gives the same
// pixels, so dense and MoE models are compared on identical images.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moev/data/image_set.h"

namespace moev::data {

struct Shift {
  std::string name;  // one of shift_names()
  int severity = 1;  // 1 (mild) .. 5 (severe)
};

// gaussian_noise, blur, rotate, contrast, occlusion.
const std::vector<std::string>& shift_names();

// "NAME:SEVERITY" -> Shift; "NAME" alone means every severity 1..5, "all" every
// corruption at every severity. Throws moev::Error naming the bad part.
std::vector<Shift> parse_shifts(const std::string& spec);

// The corrupted copy of `set` (same labels and class names; source gets a
// "+name:severity" suffix).
ImageSet corrupt(const ImageSet& set, const Shift& shift, uint64_t seed = 0);

std::string to_string(const Shift& s);

}  // namespace moev::data
