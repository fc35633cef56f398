// Reads the CIFAR-10 binary version (cifar-10-batches-bin) into an ImageSet.
// Not the Python pickle version.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moev/data/image_set.h"

namespace moev::data {

// One record: a label byte, then 32x32 red, green and blue planes.
inline constexpr int64_t kCifar10RecordBytes = 1 + 3 * 32 * 32;

// The standard ten class names, used when batches.meta.txt is absent.
const std::vector<std::string>& cifar10_class_names();

// train: data_batch_1.bin .. data_batch_5.bin; else test_batch.bin. dir may be
// the batches directory itself or its parent holding cifar-10-batches-bin/.
// Images come out as [N, 3, 32, 32]; class names from batches.meta.txt if present.
ImageSet read_cifar10(const std::string& dir, bool train);

}  // namespace moev::data
