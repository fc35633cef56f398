// Image-folder reading with stb_image (decode) and stb_image_resize (resize),
// both from libstb. Files are decoded on several threads because a large folder
// is decoded once up front; each thread writes its own slice of one tensor.
#include "moev/data/image_folder.h"

#include <stb/stb_image.h>
#include <stb/stb_image_resize.h>
#include <torch/torch.h>

#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <climits>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "moev/core/bytes.h"
#include "moev/core/error.h"

namespace moev::data {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kMaxSide = 1 << 15;
constexpr int64_t kMaxSourcePixels = int64_t{1} << 28;  // 16384 x 16384

bool is_hidden(const fs::path& path) { return path.filename().string().rfind('.', 0) == 0; }

// What stb_image decodes, so a folder takes what predict takes.
constexpr const char* kImageExtensions[] = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".pnm", ".tga"};

bool has_image_extension(const fs::path& path) {
  std::string ext = path.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  for (const char* e : kImageExtensions)
    if (ext == e) return true;
  return false;
}

std::string image_extensions() {
  std::string out;
  for (const char* e : kImageExtensions) out += (out.empty() ? "" : ", ") + std::string(e);
  return out;
}

void check_geometry(int64_t height, int64_t width, int64_t channels) {
  MOEV_CHECK(height >= 1 && height <= kMaxSide && width >= 1 && width <= kMaxSide, "image size ",
             height, "x", width, " outside 1..", kMaxSide);
  MOEV_CHECK(channels == 1 || channels == 3, "image channels ", channels, ", expected 1 or 3");
}

std::vector<fs::path> sorted_entries(const fs::path& dir) {
  std::vector<fs::path> entries;
  try {
    for (const auto& entry : fs::directory_iterator(dir)) entries.push_back(entry.path());
  } catch (const fs::filesystem_error& e) {
    fail("cannot list ", dir.string(), ": ", e.code().message());
  }
  std::sort(entries.begin(), entries.end());
  return entries;
}

// stb_image skips the CRC-32 every PNG chunk carries, so a flipped byte in the
// pixel data would decode to a wrong image at exit 0; check them first.
void check_png_crcs(const std::string& path, const std::vector<unsigned char>& bytes) {
  static constexpr unsigned char kSignature[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (bytes.size() < 8 || std::memcmp(bytes.data(), kSignature, 8) != 0) return;
  for (size_t at = 8; at < bytes.size();) {
    MOEV_CHECK(bytes.size() - at >= 12, "file ", path, ": PNG cut short at byte ", at,
               " (a chunk needs at least 12 bytes)");
    const uint32_t length = big_endian32(&bytes[at]);
    const std::string type(reinterpret_cast<const char*>(&bytes[at + 4]), 4);
    MOEV_CHECK(length <= bytes.size() - at - 12, "file ", path, ": PNG chunk '", type, "' at byte ", at,
               " claims ", length, " bytes, past the end of the file (cut short?)");
    // Critical chunks only (upper-case first letter: IHDR, PLTE, IDAT, IEND),
    // as libpng: damage to a text or colour-profile chunk leaves the pixels intact.
    const uLong crc = crc32(crc32(0L, Z_NULL, 0), &bytes[at + 4], static_cast<uInt>(length) + 4);
    MOEV_CHECK(!std::isupper(static_cast<unsigned char>(type[0])) || crc == big_endian32(&bytes[at + 8 + length]),
               "file ", path, ": PNG chunk '", type, "' at byte ", at, " fails its CRC-32: the file is damaged");
    if (type == "IEND") return;
    at += 12 + size_t{length};
  }
  fail("file ", path, ": PNG ends without an IEND chunk (cut short?)");
}

// The EXIF orientation (1..8) of a JPEG, 1 when it has none or it cannot be
// read. Cameras and phones store pixels as the sensor saw them and say in this
// tag how to turn them upright; stb_image does not read it.
int jpeg_orientation(const std::vector<unsigned char>& b) {
  if (b.size() < 4 || b[0] != 0xFF || b[1] != 0xD8) return 1;
  for (size_t at = 2; at + 4 <= b.size() && b[at] == 0xFF;) {
    const unsigned char marker = b[at + 1];
    if (marker == 0xFF) {  // fill byte
      ++at;
      continue;
    }
    if (marker == 0xDA || marker == 0xD9) return 1;  // image data: no tags past it
    const size_t length = size_t{b[at + 2]} << 8 | b[at + 3], seg = at + 4;
    if (length < 2 || at + 2 + length > b.size()) return 1;
    const size_t end = at + 2 + length;
    if (marker == 0xE1 && end - seg >= 14 && std::memcmp(&b[seg], "Exif\0\0", 6) == 0) {
      const size_t tiff = seg + 6;
      const bool le = b[tiff] == 'I' && b[tiff + 1] == 'I';
      if (!le && !(b[tiff] == 'M' && b[tiff + 1] == 'M')) return 1;
      auto u16 = [&](size_t p) { return le ? b[p] | b[p + 1] << 8 : b[p] << 8 | b[p + 1]; };
      auto u32 = [&](size_t p) { return le ? uint32_t(u16(p)) | uint32_t(u16(p + 2)) << 16
                                           : uint32_t(u16(p)) << 16 | uint32_t(u16(p + 2)); };
      const size_t ifd = tiff + u32(tiff + 4);
      if (ifd < tiff || ifd + 2 > end) return 1;
      const size_t entries = u16(ifd);
      for (size_t e = 0; e < entries && ifd + 2 + 12 * (e + 1) <= end; ++e) {
        const size_t entry = ifd + 2 + 12 * e;
        if (u16(entry) == 0x0112 && u16(entry + 2) == 3) {
          const int o = u16(entry + 8);
          return o >= 1 && o <= 8 ? o : 1;
        }
      }
      return 1;
    }
    at = end;
  }
  return 1;
}

// Turns stb's HWC pixels upright as the EXIF orientation says (5..8 swap the
// sides). Returns the new width and height.
std::pair<int, int> apply_orientation(int orientation, std::vector<unsigned char>& out, const unsigned char* in,
                                      int w, int h, int c) {
  const bool swap = orientation >= 5;
  const int ow = swap ? h : w, oh = swap ? w : h;
  out.resize(static_cast<size_t>(ow) * oh * c);
  for (int oy = 0; oy < oh; ++oy)
    for (int ox = 0; ox < ow; ++ox) {
      int sy = oy, sx = ox;
      switch (orientation) {
        case 2: sx = w - 1 - ox; break;                      // mirrored
        case 3: sy = h - 1 - oy, sx = w - 1 - ox; break;     // upside down
        case 4: sy = h - 1 - oy; break;                      // mirrored upside down
        case 5: sy = ox, sx = oy; break;                     // transposed
        case 6: sy = h - 1 - ox, sx = oy; break;             // turn 90 degrees clockwise
        case 7: sy = h - 1 - ox, sx = w - 1 - oy; break;     // transversed
        case 8: sy = ox, sx = w - 1 - oy; break;             // turn 90 degrees anticlockwise
        default: break;
      }
      std::memcpy(&out[(static_cast<size_t>(oy) * ow + ox) * c], in + (static_cast<size_t>(sy) * w + sx) * c,
                  static_cast<size_t>(c));
    }
  return {ow, oh};
}

// Decodes path into dst, uint8 [C, H, W] contiguous; returns the file's own (upright) size.
SourceSize decode_into(const std::string& path, int64_t height, int64_t width, int64_t channels,
                 uint8_t* dst) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  MOEV_CHECK(in, "cannot open image file ", path);
  const auto size = static_cast<int64_t>(in.tellg());
  MOEV_CHECK(size >= 0 && size <= INT_MAX, "file ", path, ": ", size, " bytes, outside stb_image's 0..2 GiB");
  std::vector<unsigned char> bytes(static_cast<size_t>(size));
  in.seekg(0);
  MOEV_CHECK(in.read(reinterpret_cast<char*>(bytes.data()), size), "cannot read image file ", path);
  check_png_crcs(path, bytes);
  int w = 0, h = 0, file_channels = 0;
  // From the header, before any pixel is allocated: a small file can claim a
  // huge image (stb alone allows 1 GiB of pixels).
  if (stbi_info_from_memory(bytes.data(), static_cast<int>(bytes.size()), &w, &h, &file_channels) == 1)
    MOEV_CHECK(int64_t{w} * h <= kMaxSourcePixels, "file ", path, ": a ", w, "x", h, " image, above ",
               kMaxSourcePixels, " pixels");
  std::unique_ptr<unsigned char, void (*)(void*)> pixels(
      stbi_load_from_memory(bytes.data(), static_cast<int>(bytes.size()), &w, &h, &file_channels,
                            static_cast<int>(channels)),
      stbi_image_free);
  MOEV_CHECK(pixels != nullptr, "file ", path,
             " is not a readable image (stb_image: ", stbi_failure_reason(), ")");

  const unsigned char* hwc = pixels.get();
  std::vector<unsigned char> upright, resized;
  if (const int o = jpeg_orientation(bytes); o != 1) {
    std::tie(w, h) = apply_orientation(o, upright, hwc, w, h, static_cast<int>(channels));
    hwc = upright.data();
  }
  const SourceSize source{h, w};
  if (h != height || w != width) {
    resized.resize(static_cast<size_t>(height * width * channels));
    const int ok = stbir_resize_uint8(hwc, w, h, /*input_stride=*/0, resized.data(),
                                      static_cast<int>(width), static_cast<int>(height),
                                      /*output_stride=*/0, static_cast<int>(channels));
    MOEV_CHECK(ok == 1, "cannot resize ", path, " from ", w, "x", h, " to ", width, "x", height);
    hwc = resized.data();
  }
  // stb gives interleaved HWC; torch convolutions want planar CHW.
  const int64_t plane = height * width;
  for (int64_t p = 0; p < plane; ++p) {
    for (int64_t c = 0; c < channels; ++c) dst[c * plane + p] = hwc[p * channels + c];
  }
  return source;
}

}  // namespace

torch::Tensor decode_image_file(const std::string& path, int64_t height, int64_t width,
                                int64_t channels, SourceSize* source) {
  check_geometry(height, width, channels);
  MOEV_CHECK(fs::exists(path), "image file ", path, " not found");
  MOEV_CHECK(fs::is_regular_file(path), "image file ", path, " is not a regular file (a directory, a pipe?)");
  torch::Tensor image = torch::empty({channels, height, width}, torch::kUInt8);
  const SourceSize size = decode_into(path, height, width, channels, image.data_ptr<uint8_t>());
  if (source) *source = size;
  return image;
}

ImageSet read_image_folder(const std::string& root, int64_t height, int64_t width,
                           int64_t channels) {
  check_geometry(height, width, channels);
  MOEV_CHECK(fs::is_directory(root), "image folder ", root, " not found");

  ImageSet set;
  std::vector<std::string> files;
  std::vector<int64_t> labels;
  // Plain files next to the class folders (READMEs, synset lists) are not classes.
  for (const fs::path& class_dir : sorted_entries(root)) {
    if (is_hidden(class_dir) || !fs::is_directory(class_dir)) continue;
    const auto label = static_cast<int64_t>(set.class_names.size());
    const size_t before = files.size();
    for (const fs::path& file : sorted_entries(class_dir)) {
      if (is_hidden(file)) continue;
      MOEV_CHECK(fs::exists(file), file.string(), " in image folder ", root,
                 " is a broken link: its target does not exist");
      MOEV_CHECK(!fs::is_directory(file), file.string(), " in image folder ", root,
                 " is a directory; expected image files directly in each class folder");
      MOEV_CHECK(fs::is_regular_file(file) && has_image_extension(file), "file ", file.string(),
                 " in image folder ", root, " is not an image file (", image_extensions(), ")");
      files.push_back(file.string());
      labels.push_back(label);
    }
    MOEV_CHECK(files.size() > before, "class folder ", class_dir.string(), " holds no images");
    set.class_names.push_back(class_dir.filename().string());
  }
  MOEV_CHECK(!files.empty(), "image folder ", root,
             " has no class subfolders; expected root/<class>/<image>.png");

  const auto n = static_cast<int64_t>(files.size());
  set.images = torch::empty({n, channels, height, width}, torch::kUInt8);
  set.labels = torch::tensor(labels, torch::kInt64);
  set.source = root;

  uint8_t* images = set.images.data_ptr<uint8_t>();
  const int64_t image_bytes = channels * height * width;
  std::atomic<int64_t> next{0};
  std::mutex error_mutex;
  int64_t error_index = n;  // the first failing file in order, so the message is stable
  std::exception_ptr error;
  auto work = [&] {
    for (int64_t i; (i = next.fetch_add(1)) < n;) {
      try {
        decode_into(files[i], height, width, channels, images + i * image_bytes);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (i < error_index) {
          error_index = i;
          error = std::current_exception();
        }
      }
    }
  };
  const auto hardware = static_cast<int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  const int64_t num_threads = std::min<int64_t>({hardware, 16, (n + 63) / 64});
  std::vector<std::thread> threads;
  for (int64_t t = 1; t < num_threads; ++t) threads.emplace_back(work);
  work();
  for (auto& thread : threads) thread.join();
  if (error) std::rethrow_exception(error);
  return set;
}

}  // namespace moev::data
