// The batch loader. Reproducibility rests on three choices: the permutation is
// our own Fisher-Yates over std::mt19937_64 (std::shuffle and the std
// distributions differ between standard libraries), every random stream is
// seeded from (seed, epoch[, batch]) alone, and each batch draws from its own
// stream, so batch k never depends on batches 0..k-1 having been made.
#include "moev/data/batch_loader.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "moev/core/error.h"
#include "moev/data/random.h"

namespace moev::data {

int64_t near_equal_batch_size(int64_t n, int64_t max_batch) {
  MOEV_CHECK(n >= 1 && max_batch >= 1, "near_equal_batch_size: ", n, " examples in batches of ", max_batch,
             ": expected both >= 1");
  const int64_t batches = (n + max_batch - 1) / max_batch;
  return (n + batches - 1) / batches;
}
namespace {

uint64_t epoch_key(uint64_t seed, int64_t epoch) {
  return splitmix64(splitmix64(seed) ^ static_cast<uint64_t>(epoch));
}

// Separate constants keep the order stream apart from every batch stream.
uint64_t order_seed(uint64_t key) { return splitmix64(key ^ 0x6f72646572ULL); }
uint64_t batch_seed(uint64_t key, int64_t batch) {
  return splitmix64(splitmix64(key ^ 0x6261746368ULL) + static_cast<uint64_t>(batch));
}

// Random erasing (Zhong et al. 2017, as timm applies it): with probability p,
// one rectangle of 2% to 1/3 of the image, aspect ratio log-uniform in
// [0.3, 3.3], at a uniform position, set to 0 in normalised units (the
// dataset's mean) in every channel. Up to 10 tries for a rectangle that fits.
// Always the same number of draws per image, so the stream stays aligned.
struct Erasure {
  int64_t top = 0, left = 0, h = 0, w = 0;  // h = 0: nothing erased
};
Erasure draw_erasure(std::mt19937_64& rng, double p, int64_t height, int64_t width) {
  const bool erase = uniform_unit(rng) < p;
  const double area = static_cast<double>(height * width);
  Erasure e;
  for (int attempt = 0; attempt < 10; ++attempt) {
    const double target = area * (0.02 + uniform_unit(rng) * (1.0 / 3.0 - 0.02));
    const double ratio = std::exp(std::log(0.3) + uniform_unit(rng) * (std::log(3.3) - std::log(0.3)));
    const double u = uniform_unit(rng), v = uniform_unit(rng);
    const int64_t h = static_cast<int64_t>(std::lround(std::sqrt(target * ratio)));
    const int64_t w = static_cast<int64_t>(std::lround(std::sqrt(target / ratio)));
    if (!erase || e.h > 0 || h < 1 || w < 1 || h >= height || w >= width) continue;
    e = {static_cast<int64_t>(u * static_cast<double>(height - h + 1)),
         static_cast<int64_t>(v * static_cast<double>(width - w + 1)), h, w};
  }
  return e;
}

void apply_erasure(const Erasure& e, float* img, int64_t channels, int64_t height, int64_t width) {
  for (int64_t c = 0; c < channels; ++c)
    for (int64_t y = e.top; y < e.top + e.h; ++y) std::fill_n(img + (c * height + y) * width + e.left, e.w, 0.0f);
}

// lut[c * 256 + v] = (v / 255 - mean[c]) / std[c]; training and eval both use it,
// so they agree to the bit.
std::vector<float> make_lut(int64_t channels, const std::vector<float>& mean,
                            const std::vector<float>& std) {
  const auto m = static_cast<int64_t>(mean.size());
  const auto s = static_cast<int64_t>(std.size());
  MOEV_CHECK(m == 1 || m == channels, "normalisation mean has ", m,
             " values, expected 1 or one per channel (", channels, ")");
  MOEV_CHECK(s == 1 || s == channels, "normalisation std has ", s,
             " values, expected 1 or one per channel (", channels, ")");
  std::vector<float> lut(static_cast<size_t>(channels * 256));
  for (int64_t c = 0; c < channels; ++c) {
    const float mu = mean[m == 1 ? 0 : c];
    const float sigma = std[s == 1 ? 0 : c];
    MOEV_CHECK(std::isfinite(mu) && std::isfinite(sigma) && sigma > 0.0f,
               "normalisation for channel ", c, ": mean ", mu, ", std ", sigma,
               "; expected finite values and std > 0");
    for (int v = 0; v < 256; ++v) lut[c * 256 + v] = (static_cast<float>(v) / 255.0f - mu) / sigma;
  }
  return lut;
}

}  // namespace

BatchLoader::BatchLoader(const ImageSet& set, LoaderOptions options, int64_t epoch,
                         int64_t start_batch)
    : options_(std::move(options)), epoch_(epoch), start_batch_(start_batch) {
  MOEV_CHECK(set.images.defined() && set.labels.defined(), "data set ", set.source, " is empty");
  MOEV_CHECK(set.images.dim() == 4 && set.images.scalar_type() == torch::kUInt8 &&
                 set.images.device().is_cpu(),
             "data set ", set.source, ": images must be uint8 [N, C, H, W] on the CPU, got ",
             set.images.sizes(), " ", set.images.scalar_type());
  MOEV_CHECK(set.labels.dim() == 1 && set.labels.scalar_type() == torch::kInt64 &&
                 set.labels.size(0) == set.images.size(0),
             "data set ", set.source, ": labels must be int64 [", set.images.size(0), "], got ",
             set.labels.sizes(), " ", set.labels.scalar_type());
  MOEV_CHECK(options_.batch_size >= 1, "batch_size ", options_.batch_size, ", expected >= 1");
  MOEV_CHECK(options_.prefetch >= 1, "prefetch ", options_.prefetch, ", expected >= 1");
  MOEV_CHECK(options_.crop_padding >= 0, "crop_padding ", options_.crop_padding, ", expected >= 0");
  MOEV_CHECK(options_.random_erase >= 0 && options_.random_erase <= 1, "random_erase ", options_.random_erase,
             ", expected a probability in [0, 1]");
  images_ = set.images.contiguous();
  labels_ = set.labels.to(torch::kCPU).contiguous();
  if (set.multilabel()) targets_ = set.targets.to(torch::kCPU).contiguous();
  // Checked here, once, because a bad label would otherwise surface far away,
  // inside the loss, with no file to blame.
  if (set.num_classes() > 0) {
    const int64_t* labels = labels_.data_ptr<int64_t>();
    for (int64_t i = 0; i < labels_.size(0); ++i) {
      MOEV_CHECK(labels[i] >= 0 && labels[i] < set.num_classes(), "data set ", set.source,
                 ": example ", i, " has label ", labels[i], ", expected 0..",
                 set.num_classes() - 1);
    }
  }
  lut_ = make_lut(images_.size(1), options_.mean, options_.std);

  const int64_t n = images_.size(0);
  const int64_t b = options_.batch_size;
  num_batches_ = options_.drop_last ? n / b : (n + b - 1) / b;
  MOEV_CHECK(num_batches_ >= 1, "data set ", set.source, " has ", n,
             " examples, fewer than batch_size ", b, " with drop_last; lower batch_size");
  MOEV_CHECK(start_batch_ >= 0 && start_batch_ <= num_batches_, "start_batch ", start_batch_,
             " outside 0..", num_batches_, " (batches per epoch)");

  order_.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order_[i] = i;
  if (options_.shuffle) {
    std::mt19937_64 rng(order_seed(epoch_key(options_.seed, epoch_)));
    for (int64_t i = n - 1; i > 0; --i) {
      std::swap(order_[i], order_[uniform_below(rng, static_cast<uint64_t>(i + 1))]);
    }
  }
  thread_ = std::thread([this] { produce(); });
}

BatchLoader::~BatchLoader() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  changed_.notify_all();
  thread_.join();
}

void BatchLoader::produce() {
  try {
    for (int64_t index = start_batch_; index < num_batches_; ++index) {
      // Built outside the lock so next() can hand out earlier batches meanwhile.
      Batch batch = make_batch(index);
      std::unique_lock<std::mutex> lock(mutex_);
      changed_.wait(lock, [this] {
        return stop_ || static_cast<int64_t>(queue_.size()) < options_.prefetch;
      });
      if (stop_) break;
      queue_.push_back(std::move(batch));
      changed_.notify_all();
    }
  } catch (...) {
    std::lock_guard<std::mutex> lock(mutex_);
    error_ = std::current_exception();
  }
  std::lock_guard<std::mutex> lock(mutex_);
  done_ = true;
  changed_.notify_all();
}

bool BatchLoader::next(Batch& batch) {
  std::unique_lock<std::mutex> lock(mutex_);
  changed_.wait(lock, [this] { return !queue_.empty() || done_; });
  if (!queue_.empty()) {
    batch = std::move(queue_.front());
    queue_.pop_front();
    changed_.notify_all();
    return true;
  }
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  return false;
}

Batch BatchLoader::make_batch(int64_t index) const {
  const int64_t n = images_.size(0);
  const int64_t channels = images_.size(1);
  const int64_t height = images_.size(2);
  const int64_t width = images_.size(3);
  const int64_t first = index * options_.batch_size;
  const int64_t count = std::min(options_.batch_size, n - first);
  const int64_t plane = height * width;
  // A rank's share of the batch. Every row's random draws are still taken, so an
  // example is augmented the same way whichever rank, and how many, see it.
  const int64_t lo = std::min(options_.rows_begin, count);
  const int64_t hi = options_.rows_end < 0 ? count : std::min(options_.rows_end, count);

  Batch batch;
  batch.x = torch::empty({std::max<int64_t>(0, hi - lo), channels, height, width}, torch::kFloat32);
  batch.y = torch::empty({std::max<int64_t>(0, hi - lo)}, torch::kInt64);
  batch.index = torch::empty({std::max<int64_t>(0, hi - lo)}, torch::kInt64);
  batch.aug = torch::zeros({std::max<int64_t>(0, hi - lo)}, torch::kInt64);
  int64_t* ex = batch.index.data_ptr<int64_t>();
  int64_t* aug = batch.aug.data_ptr<int64_t>();
  const uint8_t* images = images_.data_ptr<uint8_t>();
  const int64_t* labels = labels_.data_ptr<int64_t>();
  float* x = batch.x.data_ptr<float>();
  int64_t* y = batch.y.data_ptr<int64_t>();

  std::mt19937_64 rng(batch_seed(epoch_key(options_.seed, epoch_), index));
  // Erasing draws from a stream of its own: switching it on leaves every
  // image's crop and flip as they were.
  std::mt19937_64 erase_rng(splitmix64(batch_seed(epoch_key(options_.seed, epoch_), index) ^ 0x6572617365ULL));
  const uint64_t aa_key = splitmix64(batch_seed(epoch_key(options_.seed, epoch_), index) ^ 0x6175746f6161ULL);
  std::vector<uint8_t> crop(static_cast<size_t>(channels * plane)), scratch;
  const int64_t pad = options_.crop_padding;
  for (int64_t i = 0; i < count; ++i) {
    if (!options_.augment && (i < lo || i >= hi)) continue;
    const int64_t example = order_[first + i];
    const uint8_t* src = images + example * channels * plane;
    float* dst = x + (i - lo) * channels * plane;
    if (i >= lo && i < hi) {
      y[i - lo] = labels[example];
      ex[i - lo] = example;
    }
    if (!options_.augment) {
      for (int64_t c = 0; c < channels; ++c) {
        const float* lut = lut_.data() + c * 256;
        for (int64_t p = 0; p < plane; ++p) dst[c * plane + p] = lut[src[c * plane + p]];
      }
      continue;
    }
    // Always three draws per example, so the stream layout does not depend on options.
    const int64_t dy = static_cast<int64_t>(uniform_below(rng, 2 * pad + 1)) - pad;
    const int64_t dx = static_cast<int64_t>(uniform_below(rng, 2 * pad + 1)) - pad;
    const bool flip = (rng() >> 63) != 0 && options_.hflip;
    const Erasure erasure =
        options_.random_erase > 0 ? draw_erasure(erase_rng, options_.random_erase, height, width) : Erasure{};
    if (i < lo || i >= hi) continue;
    // out(y, x) = in(y + dy, x' + dx) with x' = W-1-x when flipped (crop, then
    // flip, as torchvision orders them); outside the image the pixel is a
    // padded 0. AutoAugment then works on these pixels, as on PIL images after
    // the crop in timm's pipeline, drawing from a stream of the row's own.
    uint8_t* px = crop.data();
    for (int64_t c = 0; c < channels; ++c) {
      const uint8_t* in = src + c * plane;
      for (int64_t oy = 0; oy < height; ++oy) {
        const int64_t sy = oy + dy;
        uint8_t* row = px + c * plane + oy * width;
        if (sy < 0 || sy >= height) {
          std::fill(row, row + width, uint8_t{0});
          continue;
        }
        const uint8_t* in_row = in + sy * width;
        for (int64_t ox = 0; ox < width; ++ox) {
          const int64_t sx = (flip ? width - 1 - ox : ox) + dx;
          row[ox] = (sx >= 0 && sx < width) ? in_row[sx] : uint8_t{0};
        }
      }
    }
    bool policy_applied = false;
    if (options_.auto_augment != AutoAugmentPolicy::kNone) {
      std::mt19937_64 aa_rng(splitmix64(aa_key + static_cast<uint64_t>(i)));
      policy_applied = auto_augment(aa_rng, px, channels, height, width, scratch);
    }
    // An image AutoAugment or erasing changed is not one of the finite crop/flip
    // variants: no augmentation id names it.
    aug[i - lo] = policy_applied || erasure.h > 0 ? -1 : ((dy + pad) * (2 * pad + 1) + (dx + pad)) * 2 + (flip ? 1 : 0);
    for (int64_t c = 0; c < channels; ++c) {
      const float* lut = lut_.data() + c * 256;
      for (int64_t p = 0; p < plane; ++p) dst[c * plane + p] = lut[px[c * plane + p]];
    }
    if (erasure.h > 0) apply_erasure(erasure, dst, channels, height, width);
  }
  if (targets_.defined()) batch.t = targets_.index_select(0, batch.index);
  return batch;
}

int64_t num_augmentations(const LoaderOptions& o) {
  return o.augment ? (2 * o.crop_padding + 1) * (2 * o.crop_padding + 1) * 2 : 1;
}

torch::Tensor normalize_images(const torch::Tensor& u8, const std::vector<float>& mean,
                               const std::vector<float>& std) {
  MOEV_CHECK(u8.scalar_type() == torch::kUInt8 && (u8.dim() == 3 || u8.dim() == 4),
             "normalize_images expects uint8 [B, C, H, W] or [C, H, W], got ", u8.sizes(), " ",
             u8.scalar_type());
  const torch::Tensor in = u8.to(torch::kCPU).contiguous();
  const int64_t channels = in.size(in.dim() - 3);
  const int64_t plane = in.size(in.dim() - 2) * in.size(in.dim() - 1);
  const int64_t images = in.dim() == 4 ? in.size(0) : 1;
  const std::vector<float> lut = make_lut(channels, mean, std);
  torch::Tensor out = torch::empty(in.sizes(), torch::kFloat32);
  const uint8_t* src = in.data_ptr<uint8_t>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < images; ++i) {
    for (int64_t c = 0; c < channels; ++c) {
      const float* l = lut.data() + c * 256;
      const int64_t base = (i * channels + c) * plane;
      for (int64_t p = 0; p < plane; ++p) dst[base + p] = l[src[base + p]];
    }
  }
  return out;
}

std::pair<std::vector<float>, std::vector<float>> channel_stats(const ImageSet& set) {
  MOEV_CHECK(set.images.defined() && set.images.dim() == 4 &&
                 set.images.scalar_type() == torch::kUInt8 && set.images.numel() > 0,
             "channel_stats: data set ", set.source, " needs uint8 [N, C, H, W] images");
  const torch::Tensor images = set.images.to(torch::kCPU).contiguous();
  const int64_t n = images.size(0);
  const int64_t channels = images.size(1);
  const int64_t plane = images.size(2) * images.size(3);
  // A histogram per channel makes the sums exact, whatever the set's size.
  std::vector<int64_t> histogram(static_cast<size_t>(channels * 256), 0);
  const uint8_t* src = images.data_ptr<uint8_t>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < channels; ++c) {
      int64_t* h = histogram.data() + c * 256;
      const uint8_t* p = src + (i * channels + c) * plane;
      for (int64_t k = 0; k < plane; ++k) ++h[p[k]];
    }
  }
  std::vector<float> mean(channels), stdev(channels);
  const double count = static_cast<double>(n * plane);
  for (int64_t c = 0; c < channels; ++c) {
    double sum = 0, sum_sq = 0;
    for (int v = 0; v < 256; ++v) {
      const double value = v / 255.0;
      const double k = static_cast<double>(histogram[c * 256 + v]);
      sum += k * value;
      sum_sq += k * value * value;
    }
    const double mu = sum / count;
    mean[c] = static_cast<float>(mu);
    stdev[c] = static_cast<float>(std::sqrt(std::max(0.0, sum_sq / count - mu * mu)));
  }
  return {mean, stdev};
}

}  // namespace moev::data
