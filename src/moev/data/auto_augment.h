// AutoAugment (Cubuk et al. 2019, "AutoAugment: Learning Augmentation Policies
// from Data"): the searched ImageNet policy of 25 sub-policies, each two image
// operations with a probability and a magnitude, one sub-policy drawn per
// image. Sun et al. train every model with it ("Original AutoAugment ... from
// first to last", section 3.1). The operations work on uint8 [C, H, W] images
// and follow torchvision's tensor definitions (magnitude bins, affine geometry
// about the pixel centres, nearest sampling, zero fill, uint8 rounding), so a
// policy tuned with torchvision means the same here; tests compare every
// operation with torchvision on Fashion-MNIST images.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace moev::data {

enum class AugmentOp {
  kShearX, kShearY, kTranslateX, kTranslateY, kRotate,
  kBrightness, kColor, kContrast, kSharpness,
  kPosterize, kSolarize, kAutoContrast, kEqualize, kInvert,
};

// Bins of the magnitude scale: level 0 is the weakest, kAugmentLevels - 1 the strongest.
constexpr int kAugmentLevels = 10;

// torchvision's name of the operation ("ShearX", "AutoContrast", ...).
const char* augment_op_name(AugmentOp op);

// The signed magnitude of `op` at `level` for an image of height x width:
// shear as the tangent, translation in pixels, rotation in degrees, enhance
// factors minus one, posterize bits, solarize threshold; 0 for the operations
// without one. `negate` flips the sign of the signed ones.
double augment_magnitude(AugmentOp op, int level, bool negate, int64_t height, int64_t width);

// Applies `op` with `magnitude` (from augment_magnitude) to img uint8
// [channels, height, width] in place; scratch is resized as needed and reused.
void apply_augment_op(AugmentOp op, double magnitude, uint8_t* img, int64_t channels, int64_t height,
                      int64_t width, std::vector<uint8_t>& scratch);

struct AugmentStep {
  AugmentOp op;
  double prob;  // chance the operation is applied
  int level;    // magnitude bin, 0..kAugmentLevels-1 (ignored by operations without one)
};
struct SubPolicy {
  AugmentStep first, second;
};

// The AutoAugment paper's ImageNet policy (its appendix; torchvision's IMAGENET).
const std::vector<SubPolicy>& imagenet_policy();

// Names accepted for data.auto_augment: "none" and "imagenet".
enum class AutoAugmentPolicy { kNone, kImageNet };
// "none"/"" -> kNone, "imagenet" -> kImageNet; anything else is an error naming
// `field` and the value.
AutoAugmentPolicy parse_auto_augment(const std::string& name, const std::string& field);

// Draws one sub-policy and applies it to img uint8 [channels, height, width].
// Always five draws from rng (sub-policy, two chances, two signs), so the
// stream stays aligned whatever was applied. Returns whether any operation ran
// (the image is then not one of the finite crop/flip variants).
bool auto_augment(std::mt19937_64& rng, uint8_t* img, int64_t channels, int64_t height, int64_t width,
                  std::vector<uint8_t>& scratch);

}  // namespace moev::data
