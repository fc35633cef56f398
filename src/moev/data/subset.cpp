#include "moev/data/subset.h"

#include <algorithm>
#include <random>
#include <vector>

#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/data/random.h"

namespace moev::data {

ImageSet class_subset(const ImageSet& set, int64_t k, uint64_t seed) {
  MOEV_CHECK(k >= 1, "data.per_class = ", k, ": expected >= 1 image per class");
  const int64_t n = set.size(), L = set.num_classes();
  MOEV_CHECK(n > 0 && L > 0, "data set ", set.source, " is empty or has no class names");
  const auto labels = set.labels.contiguous();
  const int64_t* lab = labels.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> by_class(static_cast<size_t>(L));
  for (int64_t i = 0; i < n; ++i) {
    MOEV_CHECK(lab[i] >= 0 && lab[i] < L, "data set ", set.source, ": example ", i, " has label ", lab[i],
               ", expected 0..", L - 1);
    by_class[lab[i]].push_back(i);
  }
  std::vector<int64_t> keep;
  for (int64_t c = 0; c < L; ++c) {
    auto& idx = by_class[c];
    MOEV_CHECK(static_cast<int64_t>(idx.size()) >= k, "data.per_class = ", k, ": class ", c, " '",
               set.class_names[c], "' of ", set.source, " has only ", idx.size(), " images");
    // One stream per class, so a class's pick does not depend on the others' sizes.
    std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(c) + 1);
    for (int64_t i = 0; i < k; ++i) {  // partial Fisher-Yates: the first k of a shuffle
      std::uniform_int_distribution<int64_t> pick(i, static_cast<int64_t>(idx.size()) - 1);
      std::swap(idx[i], idx[pick(rng)]);
    }
    keep.insert(keep.end(), idx.begin(), idx.begin() + k);
  }
  std::sort(keep.begin(), keep.end());
  ImageSet out = select_rows(set, keep);
  out.source = set.source + " (" + std::to_string(k) + " per class, seed " + std::to_string(seed) + ")";
  return out;
}

ImageSet mixed_order(ImageSet set, uint64_t seed) {
  // In place, row by row: a copy through index_select held a large folder set twice while it loaded.
  auto images = set.images.contiguous();
  auto labels = set.labels.contiguous();
  auto targets = set.multilabel() ? set.targets.contiguous() : at::Tensor();
  auto swap_rows = [](at::Tensor& t, int64_t a, int64_t b) {
    const auto bytes = static_cast<size_t>(t.numel() / t.size(0)) * t.element_size();
    auto* base = static_cast<unsigned char*>(t.data_ptr());
    std::swap_ranges(base + a * bytes, base + (a + 1) * bytes, base + b * bytes);
  };
  std::mt19937_64 rng(seed);
  for (int64_t i = set.size(); i > 1; --i) {
    const auto j = static_cast<int64_t>(uniform_below(rng, static_cast<uint64_t>(i)));
    if (j == i - 1) continue;
    swap_rows(images, i - 1, j);
    swap_rows(labels, i - 1, j);
    if (targets.defined()) swap_rows(targets, i - 1, j);
  }
  set.images = images;
  set.labels = labels;
  if (targets.defined()) set.targets = targets;
  return set;
}

ImageSet select_rows(const ImageSet& set, const std::vector<int64_t>& rows) {
  const int64_t n = set.size();
  for (auto r : rows)
    MOEV_CHECK(r >= 0 && r < n, "data set ", set.source, ": row ", r, " asked for, it has ", n, " (0..", n - 1, ")");
  auto idx = torch::tensor(rows, torch::kInt64);
  ImageSet out = set;
  out.images = set.images.index_select(0, idx).contiguous();
  out.labels = set.labels.index_select(0, idx).contiguous();
  if (set.multilabel()) out.targets = set.targets.index_select(0, idx).contiguous();
  out.source = set.source + " (" + std::to_string(rows.size()) + " selected rows)";
  return out;
}

}  // namespace moev::data
