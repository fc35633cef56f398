// Reads an ImageNet-style folder tree (root/<class>/<image>.{png,jpg,jpeg}) into
// an ImageSet, decoding and resizing every image once with stb_image. Also
// decodes a single file for `moev predict`.
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "moev/data/image_set.h"

namespace moev::data {

// How an image whose aspect ratio is not the model's is brought to its size:
// stretched whole (squashing a 3:2 photo's shapes), or its largest centred
// crop of the model's aspect ratio resized (the edges lost; torchvision's
// Resize + CenterCrop without the margin).
enum class Fit { kStretch, kCenterCrop };

// An error naming `source` unless n decoded images of channels x height x width,
// with `held` bytes of images already read (a training set beside its test
// set), take at most 80 % of physical memory: a folder of 200,000 photos at 224
// pixels (30 GB) reached the out-of-memory killer halfway through decoding.
void check_decoded_fit(const std::string& source, int64_t n, int64_t channels, int64_t height, int64_t width,
                       double held = 0);

// How a folder or manifest is read, beyond the size of its images.
struct ReadOptions {
  Fit fit = Fit::kStretch;                  // images of another aspect ratio
  const std::atomic<bool>* stop = nullptr;  // set (by a signal handler) to end the reading with moev::Stopped
  double held_bytes = 0;                    // images this process holds already, for check_decoded_fit
};

// "stretch" | "center_crop" -> Fit; anything else is an error naming `key`.
Fit parse_fit(const std::string& name, const std::string& key);

// Classes are the subdirectories of root sorted by name (label = rank); files in
// each are sorted by name. Every image is resized to height x width and turned
// into `channels` (1 = luminance, 3 = RGB). Hidden files (".*") are skipped; any
// other non-image or undecodable file is an error naming it.
// With options.stop set while it decodes, it ends within a file per thread and
// throws moev::Stopped saying how far it got.
ImageSet read_image_folder(const std::string& root, int64_t height, int64_t width, int64_t channels,
                           const ReadOptions& options = {});

// An image file's own size (upright, as EXIF orientation turns it), before resizing.
struct SourceSize {
  int64_t height = 0, width = 0;
  bool colour = false;  // the file stores colour (RGB or an RGB palette, as any GIF), whatever it was read with
  bool alpha = false;   // some pixel is not opaque, and its transparency was dropped (the colours as stored, as
                        // PIL's convert('RGB')); looked for only when decode_image_file is asked to

};

// One image file (PNG, JPEG, BMP, GIF, PBM/PGM/PPM, TGA) -> uint8 [C, H, W], resized and converted like
// read_image_folder; with `source`, the file's own size is written there.
torch::Tensor decode_image_file(const std::string& path, int64_t height, int64_t width,
                                int64_t channels, Fit fit = Fit::kStretch, SourceSize* source = nullptr,
                                bool look_for_alpha = false);

}  // namespace moev::data
