// A labelled image data set held in memory: every reader in moev::data decodes
// its files once into one uint8 tensor, so epochs never touch the disk again and
// augmentation works on raw pixels. Not a streaming data set. A multi-label set
// (the hard MoE's tags) carries its targets next to the labels.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace moev::data {

struct ImageSet {
  torch::Tensor images;                  // uint8 [N, C, H, W], contiguous, CPU
  torch::Tensor labels;                  // int64 [N], each in [0, num_classes()) (multi-label: the first tag)
  torch::Tensor targets;                 // float {0, 1} [N, T]: a multi-label set's tags (undefined: single-label)
  std::vector<std::string> class_names;  // index = label (multi-label: the tags, column order)
  std::string source;                    // where it was read from, for messages
  int64_t colour_as_grey = 0;            // images stored in colour that were read with one channel (luminance)

  int64_t size() const { return labels.defined() ? labels.size(0) : 0; }
  bool multilabel() const { return targets.defined(); }
  int64_t num_classes() const { return static_cast<int64_t>(class_names.size()); }
};

}  // namespace moev::data
