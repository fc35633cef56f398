// Multi-label data (the hard mixture of experts' hashtag task): a CSV manifest
// of `image path,tags` lines, tags separated by spaces, paths relative to the
// manifest's directory, quoted with "..." when they hold commas or quotes
// ("" inside quotes is one quote). A first line `path,tags` is a header. And
// the Fashion-MNIST mosaic task of DESIGN.md: 2x2 mosaics of real images whose
// tags are the set of their classes, written as PNG files plus a manifest.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/types.h>

#include "moev/data/image_folder.h"
#include "moev/data/image_set.h"

namespace moev::data {

struct ManifestEntry {
  std::string path;               // as written (relative to the manifest's directory unless absolute)
  std::vector<std::string> tags;  // in file order, duplicates removed
  int64_t line = 0;               // 1-based line in the manifest, for messages
};

// Parses the manifest; malformed lines (no comma, unterminated quote, empty
// path, no tag) are errors naming the file and line.
std::vector<ManifestEntry> parse_manifest(const std::string& path);

struct MultiLabelSet {
  torch::Tensor images;            // uint8 [N, C, H, W]
  torch::Tensor targets;           // float {0, 1} [N, T]
  std::vector<std::string> tags;   // column t of targets
  std::vector<std::string> paths;  // resolved image paths
  std::string source;
  int64_t colour_as_grey = 0;      // as ImageSet's

  int64_t size() const { return images.defined() ? images.size(0) : 0; }
};

// Reads and decodes every image of the manifest (resized to height x width,
// `channels` 1 or 3). vocabulary: the tag columns; empty: every tag seen,
// sorted. A missing or undecodable image, or a tag outside a given vocabulary,
// is an error naming the manifest line. `options`: as read_image_folder's.
MultiLabelSet read_manifest(const std::string& path, int64_t height, int64_t width, int64_t channels,
                            const std::vector<std::string>& vocabulary = {}, const ReadOptions& options = {});

// `count` 2x2 mosaics (2H x 2W) of images drawn from `src` by a seeded stream,
// written as <dir>/<split>/<i>.png, with <dir>/<split>.csv listing each with
// the names of the classes in it. Returns the manifest path.
std::string write_mosaics(const ImageSet& src, int64_t count, uint64_t seed, const std::string& dir,
                          const std::string& split);

}  // namespace moev::data
