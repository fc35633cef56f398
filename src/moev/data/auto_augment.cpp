// AutoAugment's operations on uint8 images. Where torchvision computes in
// float32 (blends, the sampling grid) this does too, and it rounds where
// torchvision rounds (truncation after a blend, round-half-even for the blur
// and for nearest sampling), so results agree with torchvision's to the pixel
// but for rare ties.
#include "moev/data/auto_augment.h"

#include <algorithm>
#include <array>
#include <cmath>

#include "moev/core/error.h"
#include "moev/data/random.h"

namespace moev::data {
namespace {

constexpr double kPi = 3.14159265358979323846;

double radians(double degrees) { return degrees * kPi / 180.0; }

// The inverse of an affine map about `center` (relative to the image centre):
// output pixel -> input pixel, as a row-major 2x3 matrix, for rotation `angle`
// (degrees), translation (tx, ty), and shears (sx, sy) in degrees; the
// composition torchvision documents, C T R Sh C^-1, inverted in closed form.
std::array<double, 6> inverse_affine(double cx, double cy, double angle, double tx, double ty, double shear_x,
                                     double shear_y) {
  const double rot = radians(angle), sx = radians(shear_x), sy = radians(shear_y);
  const double a = std::cos(rot - sy) / std::cos(sy);
  const double b = -std::cos(rot - sy) * std::tan(sx) / std::cos(sy) - std::sin(rot);
  const double c = std::sin(rot - sy) / std::cos(sy);
  const double d = -std::sin(rot - sy) * std::tan(sx) / std::cos(sy) + std::cos(rot);
  // [a b; c d] has determinant 1: its inverse is [d -b; -c a].
  std::array<double, 6> m = {d, -b, 0.0, -c, a, 0.0};
  m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx;
  m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy;
  return m;
}

// Nearest-neighbour resampling through the inverse map m (coordinates relative
// to the image centre, pixel centres at half-integers), zero outside: the grid
// torchvision hands to grid_sample, evaluated in float32 as it is there.
void warp_nearest(const std::array<double, 6>& m, uint8_t* img, int64_t channels, int64_t height, int64_t width,
                  std::vector<uint8_t>& scratch) {
  const int64_t plane = height * width;
  scratch.assign(img, img + channels * plane);
  const float hw = 0.5f * static_cast<float>(width), hh = 0.5f * static_cast<float>(height);
  const float r00 = static_cast<float>(m[0]) / hw, r01 = static_cast<float>(m[1]) / hw,
              r02 = static_cast<float>(m[2]) / hw;
  const float r10 = static_cast<float>(m[3]) / hh, r11 = static_cast<float>(m[4]) / hh,
              r12 = static_cast<float>(m[5]) / hh;
  const float fw = static_cast<float>(width), fh = static_cast<float>(height);
  for (int64_t oy = 0; oy < height; ++oy) {
    const float y = static_cast<float>(oy) - hh + 0.5f;
    for (int64_t ox = 0; ox < width; ++ox) {
      const float x = static_cast<float>(ox) - hw + 0.5f;
      const float gx = x * r00 + y * r01 + r02, gy = x * r10 + y * r11 + r12;
      const auto ix = static_cast<int64_t>(std::nearbyint(((gx + 1.0f) * fw - 1.0f) / 2.0f));
      const auto iy = static_cast<int64_t>(std::nearbyint(((gy + 1.0f) * fh - 1.0f) / 2.0f));
      const bool inside = ix >= 0 && ix < width && iy >= 0 && iy < height;
      for (int64_t c = 0; c < channels; ++c)
        img[c * plane + oy * width + ox] = inside ? scratch[c * plane + iy * width + ix] : 0;
    }
  }
}

// ratio * a + (1 - ratio) * b in float32, clamped to [0, 255] and truncated;
// both weights rounded to float32 from double, as torch rounds Python scalars.
struct Blend {
  explicit Blend(double ratio) : r(static_cast<float>(ratio)), q(static_cast<float>(1.0 - ratio)) {}
  uint8_t operator()(float a, float b) const { return static_cast<uint8_t>(std::clamp(r * a + q * b, 0.0f, 255.0f)); }
  float r, q;
};

// Luma as torchvision's rgb_to_grayscale, truncated to uint8.
uint8_t gray(const uint8_t* img, int64_t plane, int64_t p) {
  return static_cast<uint8_t>(0.2989f * static_cast<float>(img[p]) + 0.587f * static_cast<float>(img[plane + p]) +
                              0.114f * static_cast<float>(img[2 * plane + p]));
}

void check_channels(AugmentOp op, int64_t channels) {
  MOEV_CHECK(channels == 1 || channels == 3, "AutoAugment ", augment_op_name(op), ": images with ", channels,
             " channels, expected 1 or 3");
}

// Equalize one channel: torchvision's histogram lookup (a channel whose values
// are all in one bin but the last, step 0, stays as it is).
void equalize_channel(uint8_t* ch, int64_t plane) {
  std::array<int64_t, 256> hist{};
  for (int64_t p = 0; p < plane; ++p) ++hist[ch[p]];
  int64_t last = 255;
  while (last > 0 && hist[last] == 0) --last;
  int64_t total = 0;
  for (int v = 0; v < last; ++v) total += hist[v];
  const int64_t step = total / 255;
  if (step == 0) return;
  std::array<uint8_t, 256> lut{};
  int64_t cum = 0;
  for (int v = 0; v < 256; ++v) {
    lut[v] = static_cast<uint8_t>(std::clamp<int64_t>((cum + step / 2) / step, 0, 255));
    cum += hist[v];
  }
  for (int64_t p = 0; p < plane; ++p) ch[p] = lut[ch[p]];
}

// The 3x3 smoothing torchvision blends with for sharpness (centre weight 5 of
// 13), rounded half to even; border pixels keep their value.
void smooth(const uint8_t* src, uint8_t* dst, int64_t height, int64_t width) {
  const float side = 1.0f / 13.0f, centre = 5.0f / 13.0f;
  std::copy(src, src + height * width, dst);
  for (int64_t y = 1; y + 1 < height; ++y)
    for (int64_t x = 1; x + 1 < width; ++x) {
      float s = 0.0f;
      for (int64_t dy = -1; dy <= 1; ++dy)
        for (int64_t dx = -1; dx <= 1; ++dx)
          s += static_cast<float>(src[(y + dy) * width + x + dx]) * (dy == 0 && dx == 0 ? centre : side);
      dst[y * width + x] = static_cast<uint8_t>(std::nearbyint(s));
    }
}

}  // namespace

const char* augment_op_name(AugmentOp op) {
  switch (op) {
    case AugmentOp::kShearX: return "ShearX";
    case AugmentOp::kShearY: return "ShearY";
    case AugmentOp::kTranslateX: return "TranslateX";
    case AugmentOp::kTranslateY: return "TranslateY";
    case AugmentOp::kRotate: return "Rotate";
    case AugmentOp::kBrightness: return "Brightness";
    case AugmentOp::kColor: return "Color";
    case AugmentOp::kContrast: return "Contrast";
    case AugmentOp::kSharpness: return "Sharpness";
    case AugmentOp::kPosterize: return "Posterize";
    case AugmentOp::kSolarize: return "Solarize";
    case AugmentOp::kAutoContrast: return "AutoContrast";
    case AugmentOp::kEqualize: return "Equalize";
    case AugmentOp::kInvert: return "Invert";
  }
  return "?";
}

double augment_magnitude(AugmentOp op, int level, bool negate, int64_t height, int64_t width) {
  MOEV_CHECK(level >= 0 && level < kAugmentLevels, "AutoAugment ", augment_op_name(op), ": level ", level,
             ", expected 0..", kAugmentLevels - 1);
  // torchvision's bins, torch.linspace(0, max, 10)[level] in float32 (its
  // halves computed from either end): a threshold or factor one float32 step
  // off would move pixels that sit on it.
  auto bin = [level](float start, float end) {
    const float step = (end - start) / static_cast<float>(kAugmentLevels - 1);
    return static_cast<double>(level < kAugmentLevels / 2
                                   ? start + step * static_cast<float>(level)
                                   : end - step * static_cast<float>(kAugmentLevels - 1 - level));
  };
  const double sign = negate ? -1.0 : 1.0;
  switch (op) {
    case AugmentOp::kShearX:
    case AugmentOp::kShearY: return sign * bin(0.0f, 0.3f);
    case AugmentOp::kTranslateX: return sign * bin(0.0f, static_cast<float>(150.0 / 331.0 * static_cast<double>(width)));
    case AugmentOp::kTranslateY:
      return sign * bin(0.0f, static_cast<float>(150.0 / 331.0 * static_cast<double>(height)));
    case AugmentOp::kRotate: return sign * bin(0.0f, 30.0f);
    case AugmentOp::kBrightness:
    case AugmentOp::kColor:
    case AugmentOp::kContrast:
    case AugmentOp::kSharpness: return sign * bin(0.0f, 0.9f);
    // 8 bits at level 0 down to 4 at level 9.
    case AugmentOp::kPosterize: return 8.0 - std::nearbyint(static_cast<double>(level) / ((kAugmentLevels - 1) / 4.0));
    case AugmentOp::kSolarize: return bin(255.0f, 0.0f);
    case AugmentOp::kAutoContrast:
    case AugmentOp::kEqualize:
    case AugmentOp::kInvert: return 0.0;
  }
  return 0.0;
}

void apply_augment_op(AugmentOp op, double magnitude, uint8_t* img, int64_t channels, int64_t height,
                      int64_t width, std::vector<uint8_t>& scratch) {
  const int64_t plane = height * width, n = channels * plane;
  const double hw = 0.5 * static_cast<double>(width), hh = 0.5 * static_cast<double>(height);
  switch (op) {
    // Shears about the top-left corner, as AutoAugment's PIL transforms.
    case AugmentOp::kShearX:
      warp_nearest(inverse_affine(-hw, -hh, 0, 0, 0, std::atan(magnitude) * 180.0 / kPi, 0), img, channels, height,
                   width, scratch);
      return;
    case AugmentOp::kShearY:
      warp_nearest(inverse_affine(-hw, -hh, 0, 0, 0, 0, std::atan(magnitude) * 180.0 / kPi), img, channels, height,
                   width, scratch);
      return;
    // Whole pixels, truncated towards zero (torchvision's int()).
    case AugmentOp::kTranslateX:
      warp_nearest(inverse_affine(0, 0, 0, std::trunc(magnitude), 0, 0, 0), img, channels, height, width, scratch);
      return;
    case AugmentOp::kTranslateY:
      warp_nearest(inverse_affine(0, 0, 0, 0, std::trunc(magnitude), 0, 0), img, channels, height, width, scratch);
      return;
    // Counter-clockwise by `magnitude` degrees about the centre.
    case AugmentOp::kRotate:
      warp_nearest(inverse_affine(0, 0, -magnitude, 0, 0, 0, 0), img, channels, height, width, scratch);
      return;
    case AugmentOp::kBrightness: {
      const Blend blend(1.0 + magnitude);
      for (int64_t i = 0; i < n; ++i) img[i] = blend(img[i], 0.0f);
      return;
    }
    case AugmentOp::kColor: {
      check_channels(op, channels);
      if (channels == 1) return;  // saturation of a grey image: nothing to scale
      const Blend blend(1.0 + magnitude);
      for (int64_t p = 0; p < plane; ++p) {
        const float g = gray(img, plane, p);
        for (int64_t c = 0; c < 3; ++c) img[c * plane + p] = blend(img[c * plane + p], g);
      }
      return;
    }
    case AugmentOp::kContrast: {
      check_channels(op, channels);
      double sum = 0;  // the mean luma, blended towards as a constant image
      for (int64_t p = 0; p < plane; ++p) sum += channels == 1 ? img[p] : gray(img, plane, p);
      const auto mean = static_cast<float>(sum / static_cast<double>(plane));
      const Blend blend(1.0 + magnitude);
      for (int64_t i = 0; i < n; ++i) img[i] = blend(img[i], mean);
      return;
    }
    case AugmentOp::kSharpness: {
      if (height <= 2 || width <= 2) return;
      const Blend blend(1.0 + magnitude);
      scratch.resize(static_cast<size_t>(plane));
      for (int64_t c = 0; c < channels; ++c) {
        uint8_t* ch = img + c * plane;
        smooth(ch, scratch.data(), height, width);
        for (int64_t p = 0; p < plane; ++p) ch[p] = blend(ch[p], scratch[p]);
      }
      return;
    }
    case AugmentOp::kPosterize: {
      const int bits = static_cast<int>(magnitude);
      MOEV_CHECK(bits >= 0 && bits <= 8, "AutoAugment Posterize: ", bits, " bits, expected 0..8");
      const auto mask = static_cast<uint8_t>(0xFF << (8 - bits));
      for (int64_t i = 0; i < n; ++i) img[i] &= mask;
      return;
    }
    case AugmentOp::kSolarize:
      for (int64_t i = 0; i < n; ++i)
        if (img[i] >= magnitude) img[i] = static_cast<uint8_t>(255 - img[i]);
      return;
    case AugmentOp::kAutoContrast:
      for (int64_t c = 0; c < channels; ++c) {
        uint8_t* ch = img + c * plane;
        const auto [lo, hi] = std::minmax_element(ch, ch + plane);
        float minimum = *lo, scale = 255.0f / static_cast<float>(*hi - *lo);
        if (*hi == *lo) minimum = 0.0f, scale = 1.0f;
        for (int64_t p = 0; p < plane; ++p)
          ch[p] = static_cast<uint8_t>(std::clamp((static_cast<float>(ch[p]) - minimum) * scale, 0.0f, 255.0f));
      }
      return;
    case AugmentOp::kEqualize:
      for (int64_t c = 0; c < channels; ++c) equalize_channel(img + c * plane, plane);
      return;
    case AugmentOp::kInvert:
      for (int64_t i = 0; i < n; ++i) img[i] = static_cast<uint8_t>(255 - img[i]);
      return;
  }
}

const std::vector<SubPolicy>& imagenet_policy() {
  using O = AugmentOp;
  // Levels of the operations without a magnitude are 0 (unused).
  static const std::vector<SubPolicy> policy = {
      {{O::kPosterize, 0.4, 8}, {O::kRotate, 0.6, 9}},
      {{O::kSolarize, 0.6, 5}, {O::kAutoContrast, 0.6, 0}},
      {{O::kEqualize, 0.8, 0}, {O::kEqualize, 0.6, 0}},
      {{O::kPosterize, 0.6, 7}, {O::kPosterize, 0.6, 6}},
      {{O::kEqualize, 0.4, 0}, {O::kSolarize, 0.2, 4}},
      {{O::kEqualize, 0.4, 0}, {O::kRotate, 0.8, 8}},
      {{O::kSolarize, 0.6, 3}, {O::kEqualize, 0.6, 0}},
      {{O::kPosterize, 0.8, 5}, {O::kEqualize, 1.0, 0}},
      {{O::kRotate, 0.2, 3}, {O::kSolarize, 0.6, 8}},
      {{O::kEqualize, 0.6, 0}, {O::kPosterize, 0.4, 6}},
      {{O::kRotate, 0.8, 8}, {O::kColor, 0.4, 0}},
      {{O::kRotate, 0.4, 9}, {O::kEqualize, 0.6, 0}},
      {{O::kEqualize, 0.0, 0}, {O::kEqualize, 0.8, 0}},
      {{O::kInvert, 0.6, 0}, {O::kEqualize, 1.0, 0}},
      {{O::kColor, 0.6, 4}, {O::kContrast, 1.0, 8}},
      {{O::kRotate, 0.8, 8}, {O::kColor, 1.0, 2}},
      {{O::kColor, 0.8, 8}, {O::kSolarize, 0.8, 7}},
      {{O::kSharpness, 0.4, 7}, {O::kInvert, 0.6, 0}},
      {{O::kShearX, 0.6, 5}, {O::kEqualize, 1.0, 0}},
      {{O::kColor, 0.4, 0}, {O::kEqualize, 0.6, 0}},
      {{O::kEqualize, 0.4, 0}, {O::kSolarize, 0.2, 4}},
      {{O::kSolarize, 0.6, 5}, {O::kAutoContrast, 0.6, 0}},
      {{O::kInvert, 0.6, 0}, {O::kEqualize, 1.0, 0}},
      {{O::kColor, 0.6, 4}, {O::kContrast, 1.0, 8}},
      {{O::kEqualize, 0.8, 0}, {O::kEqualize, 0.6, 0}},
  };
  return policy;
}

AutoAugmentPolicy parse_auto_augment(const std::string& name, const std::string& field) {
  if (name.empty() || name == "none") return AutoAugmentPolicy::kNone;
  if (name == "imagenet") return AutoAugmentPolicy::kImageNet;
  fail(field, " = \"", name, "\": unknown AutoAugment policy, expected \"none\" or \"imagenet\"");
}

bool auto_augment(std::mt19937_64& rng, uint8_t* img, int64_t channels, int64_t height, int64_t width,
                  std::vector<uint8_t>& scratch) {
  const auto& policy = imagenet_policy();
  const SubPolicy& sub = policy[uniform_below(rng, policy.size())];
  const double chance[2] = {uniform_unit(rng), uniform_unit(rng)};
  const bool negate[2] = {(rng() >> 63) != 0, (rng() >> 63) != 0};
  bool applied = false;
  const AugmentStep* steps[2] = {&sub.first, &sub.second};
  for (int i = 0; i < 2; ++i) {
    if (!(chance[i] < steps[i]->prob)) continue;  // a 0.0 step never runs
    const double m = augment_magnitude(steps[i]->op, steps[i]->level, negate[i], height, width);
    apply_augment_op(steps[i]->op, m, img, channels, height, width, scratch);
    applied = true;
  }
  return applied;
}

}  // namespace moev::data
