// The data-efficient regime (Sun et al.; VIPriors): K labelled images per class
// drawn from a larger set, the same K images for a given seed on every machine.
#pragma once

#include <cstdint>
#include <vector>

#include "moev/data/image_set.h"

namespace moev::data {

// K examples of every class of `set`, chosen by a seeded shuffle within each
// class and returned in the set's own order (class-balanced, deterministic per
// seed). A class with fewer than K examples is an error naming it.
ImageSet class_subset(const ImageSet& set, int64_t per_class, uint64_t seed);

// The rows of `set` in a pseudo-random order fixed by `seed` (a Fisher-Yates
// shuffle on mt19937_64, the same on every machine): a folder tree, read class
// by class, comes mixed as IDX and CIFAR files do.
ImageSet mixed_order(ImageSet set, uint64_t seed);

// The given rows of `set`, in the given order (a hard MoE expert's partition);
// a row outside the set is an error.
ImageSet select_rows(const ImageSet& set, const std::vector<int64_t>& rows);

}  // namespace moev::data
