// Severity tables are scaled for small (28-32 px) images: at severity 5 a
// corruption is strong but the object stays recognisable to a person.
#include "moev/data/corruptions.h"

#include <cmath>
#include <random>

#include <torch/torch.h>

#include "moev/core/error.h"

namespace moev::data {

namespace {
// Per severity 1..5.
constexpr double kNoiseStd[] = {0.04, 0.08, 0.12, 0.18, 0.26};    // of the 0..1 pixel range
constexpr double kBlurSigma[] = {0.5, 0.75, 1.0, 1.4, 2.0};       // pixels
constexpr double kRotateDeg[] = {8, 15, 25, 35, 50};              // alternating sign
constexpr double kContrast[] = {0.6, 0.45, 0.3, 0.2, 0.12};       // kept fraction of contrast
constexpr double kOcclusion[] = {0.15, 0.25, 0.35, 0.45, 0.55};   // square side / image side

torch::Tensor to_uint8(const torch::Tensor& x) {
  return x.round().clamp(0, 255).to(torch::kUInt8).contiguous();
}

torch::Tensor gaussian_blur(const torch::Tensor& x, double sigma) {
  const int64_t radius = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(3 * sigma)));
  auto t = torch::arange(-radius, radius + 1, torch::kFloat);
  auto k1 = torch::exp(-t * t / (2 * sigma * sigma));
  k1 = k1 / k1.sum();
  const int64_t C = x.size(1);
  namespace F = torch::nn::functional;
  // Separable: rows then columns, each channel on its own; edges replicate so a
  // blurred border does not darken.
  auto y = F::pad(x, F::PadFuncOptions({radius, radius, radius, radius}).mode(torch::kReplicate));
  y = F::conv2d(y, k1.view({1, 1, 1, -1}).repeat({C, 1, 1, 1}), F::Conv2dFuncOptions().groups(C));
  y = F::conv2d(y, k1.view({1, 1, -1, 1}).repeat({C, 1, 1, 1}), F::Conv2dFuncOptions().groups(C));
  return y;
}

torch::Tensor rotate(const torch::Tensor& x, double degrees) {
  const int64_t n = x.size(0);
  // Even images turn one way, odd ones the other.
  auto sign = 1 - 2 * (torch::arange(n, torch::kFloat).remainder(2));
  auto a = sign * static_cast<float>(degrees * M_PI / 180.0);
  auto cos = a.cos(), sin = a.sin(), zero = torch::zeros({n});
  auto theta = torch::stack({torch::stack({cos, -sin, zero}, 1), torch::stack({sin, cos, zero}, 1)},
                            1);  // [n, 2, 3]
  namespace F = torch::nn::functional;
  auto grid = F::affine_grid(theta, x.sizes(), /*align_corners=*/false);
  return F::grid_sample(x, grid, F::GridSampleFuncOptions()
                                     .mode(torch::kBilinear)
                                     .padding_mode(torch::kZeros)
                                     .align_corners(false));
}

torch::Tensor occlude(const torch::Tensor& x, double fraction, uint64_t seed) {
  auto y = x.clone();
  const int64_t n = x.size(0), H = x.size(2), W = x.size(3);
  const int64_t side = std::max<int64_t>(1, std::lround(fraction * std::min(H, W)));
  std::mt19937_64 rng(seed ^ 0x6f63636c75646521ULL);
  auto acc = y.accessor<float, 4>();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t y0 = static_cast<int64_t>(rng() % static_cast<uint64_t>(H - side + 1));
    const int64_t x0 = static_cast<int64_t>(rng() % static_cast<uint64_t>(W - side + 1));
    for (int64_t c = 0; c < x.size(1); ++c)
      for (int64_t r = y0; r < y0 + side; ++r)
        for (int64_t q = x0; q < x0 + side; ++q) acc[i][c][r][q] = 0;
  }
  return y;
}
}  // namespace

const std::vector<std::string>& shift_names() {
  static const std::vector<std::string> kNames = {"gaussian_noise", "blur", "rotate", "contrast",
                                                  "occlusion"};
  return kNames;
}

std::string to_string(const Shift& s) { return s.name + ":" + std::to_string(s.severity); }

std::vector<Shift> parse_shifts(const std::string& spec) {
  std::string names;
  for (const auto& n : shift_names()) names += " " + n;
  std::vector<Shift> out;
  const auto colon = spec.find(':');
  const std::string name = spec.substr(0, colon);
  std::vector<std::string> selected;
  if (name == "all") {
    selected = shift_names();
  } else {
    MOEV_CHECK(std::find(shift_names().begin(), shift_names().end(), name) != shift_names().end(),
               "--shift ", spec, ": unknown corruption '", name, "'; expected all or one of:", names);
    selected = {name};
  }
  std::vector<int> severities = {1, 2, 3, 4, 5};
  if (colon != std::string::npos) {
    const std::string sev = spec.substr(colon + 1);
    MOEV_CHECK(sev.size() == 1 && sev[0] >= '1' && sev[0] <= '5', "--shift ", spec,
               ": severity '", sev, "' must be an integer 1..5");
    severities = {sev[0] - '0'};
  }
  for (const auto& n : selected)
    for (int s : severities) out.push_back({n, s});
  return out;
}

ImageSet corrupt(const ImageSet& set, const Shift& shift, uint64_t seed) {
  MOEV_CHECK(shift.severity >= 1 && shift.severity <= 5, "shift ", to_string(shift),
             ": severity must be 1..5");
  MOEV_CHECK(set.images.defined() && set.images.dim() == 4, "shift ", to_string(shift),
             ": expected images [N, C, H, W]");
  const int s = shift.severity - 1;
  torch::NoGradGuard no_grad;
  auto x = set.images.to(torch::kFloat);
  torch::Tensor y;
  if (shift.name == "gaussian_noise") {
    auto gen = at::detail::createCPUGenerator(seed + 0x9e3779b97f4a7c15ULL);
    y = x + torch::randn(x.sizes(), gen, torch::kFloat) * (kNoiseStd[s] * 255.0);
  } else if (shift.name == "blur") {
    y = gaussian_blur(x, kBlurSigma[s]);
  } else if (shift.name == "rotate") {
    y = rotate(x, kRotateDeg[s]);
  } else if (shift.name == "contrast") {
    auto mean = x.mean({1, 2, 3}, /*keepdim=*/true);
    y = (x - mean) * kContrast[s] + mean;
  } else if (shift.name == "occlusion") {
    y = occlude(x, kOcclusion[s], seed);
  } else {
    parse_shifts(shift.name);  // throws the message listing the names
  }
  ImageSet out;
  out.images = to_uint8(y);
  out.labels = set.labels;
  out.targets = set.targets;  // a multi-label set's tags: without them it was scored on its first tags alone
  out.class_names = set.class_names;
  out.source = set.source + "+" + to_string(shift);
  return out;
}

}  // namespace moev::data
