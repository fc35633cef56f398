// AutoAugment: every operation at several magnitudes and both signs against
// torchvision's own (python3-torchvision, on Fashion-MNIST test images, grey
// and stacked into RGB), the policy table against torchvision's IMAGENET
// policy, known answers for the pixel maps, and the policy's draws.
#include "moev/data/auto_augment.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <sstream>

#include "moev/data/idx_reader.h"
#include "support/expect_error.h"
#include "support/temp_dir.h"

namespace moev::data {
namespace {

constexpr AugmentOp kAllOps[] = {
    AugmentOp::kShearX,     AugmentOp::kShearY,    AugmentOp::kTranslateX, AugmentOp::kTranslateY,
    AugmentOp::kRotate,     AugmentOp::kBrightness, AugmentOp::kColor,     AugmentOp::kContrast,
    AugmentOp::kSharpness,  AugmentOp::kPosterize, AugmentOp::kSolarize,   AugmentOp::kAutoContrast,
    AugmentOp::kEqualize,   AugmentOp::kInvert,
};

bool geometric(AugmentOp op) {
  return op == AugmentOp::kShearX || op == AugmentOp::kShearY || op == AugmentOp::kTranslateX ||
         op == AugmentOp::kTranslateY || op == AugmentOp::kRotate;
}

bool torchvision_available() {
  return std::system("/usr/bin/python3 -c 'import torchvision' >/dev/null 2>&1") == 0;
}

const ImageSet& fmnist_test() {
  static const ImageSet s = load_fashion_mnist("/usr/share/datasets/fashion-mnist", false);
  return s;
}

// uint8 [M, C, 28, 28]: grey test images, or RGB ones from three of them each.
torch::Tensor images(int64_t m, int64_t channels) {
  auto x = fmnist_test().images.slice(0, 0, m * channels).contiguous();
  return x.view({m, channels, x.size(2), x.size(3)}).contiguous();
}

struct Case {
  AugmentOp op;
  int level;
  bool negate;
};

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  for (AugmentOp op : kAllOps)
    for (int level : {0, 3, 6, 9})
      for (bool negate : {false, true}) cases.push_back({op, level, negate});
  return cases;
}

void write_bytes(const std::string& path, const torch::Tensor& u8) {
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(u8.data_ptr<uint8_t>()), static_cast<std::streamsize>(u8.numel()));
}

torch::Tensor read_bytes(const std::string& path, at::IntArrayRef shape) {
  auto t = torch::empty(shape, torch::kUInt8);
  std::ifstream in(path, std::ios::binary);
  in.read(reinterpret_cast<char*>(t.data_ptr<uint8_t>()), static_cast<std::streamsize>(t.numel()));
  EXPECT_EQ(in.gcount(), t.numel()) << path;
  return t;
}

// torchvision's _apply_op with its own magnitude bins (the sign: multiplied by
// -1 as AutoAugment does for signed operations), nearest sampling, no fill.
const char* kReference = R"(
import sys, torch
from torchvision.transforms import autoaugment as aa, InterpolationMode
d, m, c, h, w = sys.argv[1], *map(int, sys.argv[2:6])
x = torch.frombuffer(bytearray(open(f'{d}/in_{c}.bin', 'rb').read()), dtype=torch.uint8).view(m, c, h, w)
A = aa.AutoAugment(aa.AutoAugmentPolicy.IMAGENET)
space = A._augmentation_space(10, (h, w))
outs = []
for line in open(f'{d}/cases.txt'):
    name, level, negate = line.split()
    mags, signed = space[name]
    mag = float(mags[int(level)].item()) if mags.ndim > 0 else 0.0
    if signed and negate == '1':
        mag *= -1.0
    outs.append(torch.stack([aa._apply_op(img, name, mag, InterpolationMode.NEAREST, None) for img in x]))
open(f'{d}/out_{c}.bin', 'wb').write(torch.stack(outs).contiguous().numpy().tobytes())
with open(f'{d}/policy.txt', 'w') as f:
    for sub in A.policies:
        for name, p, level in sub:
            f.write(f'{name} {p} {-1 if level is None else level}\n')
)";

// Every operation, levels 0/3/6/9, both signs, on 12 grey and 4 RGB images:
// the photometric ones agree with torchvision on every pixel; the geometric
// ones sample the same source pixel but where nearest rounding meets a tie
// (a shear of 0.2 puts many on exact halves) and torch's bmm rounds the grid
// otherwise: at most 0.5% of pixels.
TEST(AutoAugment, OperationsMatchTorchvision) {
  if (!torchvision_available()) GTEST_SKIP() << "python3-torchvision not installed";
  test::TempDir dir;
  const auto cases = all_cases();
  {
    std::ofstream f(dir.file("cases.txt"));
    for (const auto& c : cases) f << augment_op_name(c.op) << " " << c.level << " " << (c.negate ? 1 : 0) << "\n";
  }
  for (int64_t channels : {1, 3}) {
    const int64_t m = channels == 1 ? 12 : 4;
    const auto x = images(m, channels);
    const int64_t h = x.size(2), w = x.size(3);
    write_bytes(dir.file("in_" + std::to_string(channels) + ".bin"), x);
    const std::string script = dir.file("ref.py");
    std::ofstream(script) << kReference;
    std::ostringstream cmd;
    cmd << "/usr/bin/python3 " << script << " " << dir.path().string() << " " << m << " " << channels << " " << h
        << " " << w;
    ASSERT_EQ(std::system(cmd.str().c_str()), 0) << cmd.str();
    const auto ref = read_bytes(dir.file("out_" + std::to_string(channels) + ".bin"),
                                {static_cast<int64_t>(cases.size()), m, channels, h, w});
    std::vector<uint8_t> scratch;
    for (size_t k = 0; k < cases.size(); ++k) {
      const auto& c = cases[k];
      auto ours = x.clone();
      const double mag = augment_magnitude(c.op, c.level, c.negate, h, w);
      for (int64_t i = 0; i < m; ++i)
        apply_augment_op(c.op, mag, ours[i].data_ptr<uint8_t>(), channels, h, w, scratch);
      const auto diff = (ours.to(torch::kInt32) - ref[static_cast<int64_t>(k)].to(torch::kInt32)).abs();
      const double mismatched = diff.ne(0).to(torch::kFloat64).mean().item<double>();
      const std::string what = std::string(augment_op_name(c.op)) + " level " + std::to_string(c.level) +
                               (c.negate ? " negated" : "") + ", " + std::to_string(channels) + " channel(s)";
      EXPECT_LE(mismatched, geometric(c.op) ? 0.005 : 0.0) << what;
    }
  }
  // The policy table, sub-policy by sub-policy.
  std::ifstream in(dir.file("policy.txt"));
  for (const auto& sub : imagenet_policy()) {
    for (const AugmentStep* s : {&sub.first, &sub.second}) {
      std::string name;
      double p = 0;
      int level = 0;
      ASSERT_TRUE(in >> name >> p >> level);
      EXPECT_EQ(name, augment_op_name(s->op));
      EXPECT_DOUBLE_EQ(p, s->prob) << name;
      EXPECT_EQ(level < 0 ? 0 : level, s->level) << name;
    }
  }
  std::string extra;
  EXPECT_FALSE(in >> extra) << "torchvision's policy has more sub-policies than ours";
}

// Known answers on a 4x4 ramp, without Python.
TEST(AutoAugment, KnownAnswersOnASmallImage) {
  std::vector<uint8_t> scratch;
  auto ramp = [] {
    std::vector<uint8_t> v(16);
    for (int i = 0; i < 16; ++i) v[i] = static_cast<uint8_t>(i * 16);  // 0, 16, ..., 240
    return v;
  };
  auto img = ramp();
  apply_augment_op(AugmentOp::kInvert, 0, img.data(), 1, 4, 4, scratch);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(img[i], 255 - i * 16);
  img = ramp();
  apply_augment_op(AugmentOp::kPosterize, 4, img.data(), 1, 4, 4, scratch);  // keeps the top 4 bits
  for (int i = 0; i < 16; ++i) EXPECT_EQ(img[i], (i * 16) & 0xF0);
  img = ramp();
  apply_augment_op(AugmentOp::kSolarize, 128, img.data(), 1, 4, 4, scratch);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(img[i], i * 16 >= 128 ? 255 - i * 16 : i * 16);
  img = ramp();
  apply_augment_op(AugmentOp::kAutoContrast, 0, img.data(), 1, 4, 4, scratch);  // 0..240 -> 0..255
  EXPECT_EQ(img[0], 0);
  EXPECT_EQ(img[15], 255);
  img = ramp();
  // TranslateX by +1: the content moves right, a zero column enters on the left.
  apply_augment_op(AugmentOp::kTranslateX, 1.7, img.data(), 1, 4, 4, scratch);
  for (int y = 0; y < 4; ++y) {
    EXPECT_EQ(img[y * 4], 0);
    for (int x = 1; x < 4; ++x) EXPECT_EQ(img[y * 4 + x], (y * 4 + x - 1) * 16);
  }
  img = ramp();
  // A quarter turn counter-clockwise about the centre of a square image is exact.
  apply_augment_op(AugmentOp::kRotate, 90, img.data(), 1, 4, 4, scratch);
  for (int y = 0; y < 4; ++y)
    for (int x = 0; x < 4; ++x) EXPECT_EQ(img[y * 4 + x], (x * 4 + (3 - y)) * 16) << y << "," << x;
  // Level 0 of a signed enhance operation is the identity.
  img = ramp();
  apply_augment_op(AugmentOp::kContrast, augment_magnitude(AugmentOp::kContrast, 0, true, 4, 4), img.data(), 1, 4,
                   4, scratch);
  EXPECT_EQ(img, ramp());
}

// Five draws per image whatever happens, so two streams that apply different
// sub-policies stay in step; about the policy's share of images is changed;
// the same seed changes the same image the same way.
TEST(AutoAugment, PolicyDrawsAreFixedAndDeterministic) {
  const auto x = images(200, 1);
  std::vector<uint8_t> scratch;
  int applied = 0, changed = 0;
  for (int64_t i = 0; i < x.size(0); ++i) {
    auto a = x[i].clone(), b = x[i].clone();
    std::mt19937_64 r1(i), r2(i);
    const bool ap = auto_augment(r1, a.data_ptr<uint8_t>(), 1, 28, 28, scratch);
    EXPECT_EQ(auto_augment(r2, b.data_ptr<uint8_t>(), 1, 28, 28, scratch), ap);
    EXPECT_TRUE(torch::equal(a, b));
    std::mt19937_64 r3(i);
    for (int k = 0; k < 5; ++k) r3();
    EXPECT_EQ(r1(), r3()) << "image " << i << ": the policy took other than five draws";
    applied += ap;
    changed += !torch::equal(a, x[i]);
    if (!ap) {
      EXPECT_TRUE(torch::equal(a, x[i]));
    }
  }
  // The chance that at least one of a sub-policy's two steps runs, averaged
  // over the 25 sub-policies, is about 0.8.
  EXPECT_GT(applied, 130);
  EXPECT_LT(applied, 190);
  EXPECT_GT(changed, applied / 2);
}

TEST(AutoAugment, UnknownPolicyIsAnErrorNamingTheField) {
  EXPECT_EQ(parse_auto_augment("imagenet", "data.auto_augment"), AutoAugmentPolicy::kImageNet);
  EXPECT_EQ(parse_auto_augment("none", "data.auto_augment"), AutoAugmentPolicy::kNone);
  test::expect_error([] { parse_auto_augment("cifar", "data.auto_augment"); },
                     {"data.auto_augment", "cifar", "imagenet"});
}

}  // namespace
}  // namespace moev::data
