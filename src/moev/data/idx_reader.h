// Reads MNIST-style IDX files (gzip-compressed or raw) into an ImageSet, and
// finds Fashion-MNIST where the Debian package dataset-fashion-mnist installs it.
#pragma once

#include <string>
#include <vector>

#include "moev/data/image_set.h"

namespace moev::data {

// Where the Debian package dataset-fashion-mnist puts the four .gz IDX files.
inline constexpr const char* kFashionMnistDir = "/usr/share/datasets/fashion-mnist";

// The ten Fashion-MNIST class names, index = label.
const std::vector<std::string>& fashion_mnist_class_names();

// Reads an IDX3 ubyte image file (magic 2051) and an IDX1 ubyte label file
// (magic 2049); either may be gzip-compressed. Images come out as [N, 1, H, W].
// Classes = max label + 1, named as Fashion-MNIST when there are ten, else "0".."L-1".
ImageSet read_idx(const std::string& images_gz_or_raw, const std::string& labels_gz_or_raw);

// Loads the train (60000) or t10k test (10000) split from dir, which holds
// {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]. Always ten classes.
ImageSet load_fashion_mnist(const std::string& dir, bool train);

}  // namespace moev::data
