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
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "moev/core/bytes.h"
#include "moev/core/error.h"
#include "moev/core/memory.h"
#include "moev/core/utf8.h"

namespace moev::data {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kMaxSide = 1 << 15;
constexpr int64_t kMaxSourcePixels = int64_t{1} << 28;  // 16384 x 16384

bool is_hidden(const fs::path& path) { return path.filename().string().rfind('.', 0) == 0; }

// Files Windows writes into any folder of pictures it shows (thumbnail caches,
// folder settings), passed over as macOS's .DS_Store is.
bool is_system_file(const fs::path& path) {
  std::string name = path.filename().string();
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  return name == "thumbs.db" || name == "ehthumbs.db" || name == "desktop.ini";
}

// Little-endian fields of BMP, GIF and TGA headers; the caller checked the bytes are there.
size_t le16(const std::vector<unsigned char>& b, size_t at) { return size_t{b[at]} | size_t{b[at + 1]} << 8; }
uint32_t le32(const std::vector<unsigned char>& b, size_t at) {
  return uint32_t(le16(b, at)) | uint32_t(le16(b, at + 2)) << 16;
}

// What stb_image decodes, and the Netpbm kinds read here, so a folder takes what predict takes.
constexpr const char* kImageExtensions[] = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pbm",
                                            ".pgm", ".ppm", ".pnm", ".tga"};

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

// Where a JPEG's walk over its segments ended: scan, the first byte of the
// entropy-coded data after the first scan header; or needed > 0, the bytes
// the file would need for the segment it ends in.
struct JpegSegments {
  size_t scan = 0;
  size_t needed = 0;
};

// Steps over a JPEG's segments up to its first scan header, skipping fill and
// padding bytes between them as stb does, and calls visit(marker, payload
// begin, payload end) on each segment with a length; visit returns false to
// stop early (scan and needed then 0). Shared by the completeness check and
// the EXIF reader so the two cannot disagree on where a segment lies.
template <class Visit>
JpegSegments walk_jpeg(const std::vector<unsigned char>& b, Visit visit) {
  const size_t n = b.size();
  size_t at = 2;
  while (true) {
    if (at + 2 > n) return {0, at + 2};
    if (b[at] != 0xFF || b[at + 1] == 0xFF) {  // padding, or a fill byte before a marker
      ++at;
      continue;
    }
    const unsigned char marker = b[at + 1];
    if (marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7)) {  // markers without a length
      at += 2;
      continue;
    }
    if (at + 4 > n) return {0, at + 4};
    const size_t end = at + 2 + (size_t{b[at + 2]} << 8 | b[at + 3]);
    if (end > n) return {0, end};
    if (marker != 0xDA && !visit(marker, std::min(at + 4, end), end)) return {};
    at = end;
    if (marker == 0xDA) return {at, 0};
  }
}

// stb_image decodes a cut-short file without a word: a JPEG's or GIF's missing
// data as zeros, a PGM/PPM's or TGA's pixels from memory never written (other
// values on every run). So the file must hold what its header says it holds,
// as PIL's "image file is truncated" demands; a width or height of 0 (which
// stb passes on to the resizer's assertion) is refused here too. Returns where
// a PGM/PPM's samples are (maxval 0 for the other formats).
struct Netpbm {
  char kind = 0;       // '1'..'6' of its magic number P1..P6; 0 for the other formats
  int64_t maxval = 0;  // samples run 0..maxval; above 255 each takes two bytes, most significant first
  size_t offset = 0;   // the first sample's byte (binary), or where the plain raster's text starts
  int64_t width = 0, height = 0, channels = 0;
};

// Steps at past whitespace and # comments (which run to the end of their line),
// as Netpbm headers and plain rasters allow between numbers; false at the end.
bool skip_netpbm_space(const std::vector<unsigned char>& b, size_t& at) {
  while (at < b.size() && (std::isspace(b[at]) || b[at] == '#'))
    if (b[at] == '#')
      while (at < b.size() && b[at] != '\n' && b[at] != '\r') ++at;
    else
      ++at;
  return at < b.size();
}

// The next decimal number of a Netpbm header or plain raster from at.
int64_t netpbm_number(const std::string& path, const std::vector<unsigned char>& b, size_t& at) {
  const bool more = skip_netpbm_space(b, at);
  int64_t v = 0;
  const size_t start = at;
  // Every digit is read: an over-long number was split in two, read as two samples (or a wrong width).
  for (; at < b.size() && std::isdigit(b[at]); ++at) {
    MOEV_CHECK(v <= (int64_t{1} << 40), "file ", path, ": PBM/PGM/PPM damaged at byte ", start, ": a number of ",
               "more digits than any side or sample has");
    v = v * 10 + (b[at] - '0');
  }
  MOEV_CHECK(at > start, "file ", path, ": PBM/PGM/PPM ", more ? "damaged" : "cut short", " at byte ", start,
             ": expected a number");
  return v;
}

Netpbm check_complete(const std::string& path, const std::vector<unsigned char>& b) {
  const size_t n = b.size();
  auto cut = [&](const char* format, size_t needed) {
    fail("file ", path, ": ", format, " cut short: ", n, " bytes, its header asks for ", needed,
         " (an interrupted copy or download?)");
  };
  // Whether the sides are at least 1 (else an error) and small enough to count
  // bytes with (larger ones are refused later, from stb's reading of the header).
  auto sides = [&](const char* format, int64_t w, int64_t h) {
    MOEV_CHECK(w >= 1 && h >= 1, "file ", path, ": ", format, " of ", w, "x", h, " pixels; expected a width and ",
               "height of at least 1");
    return w <= kMaxSourcePixels && h <= kMaxSourcePixels && w * h <= kMaxSourcePixels;
  };
  if (n >= 2 && b[0] == 0xFF && b[1] == 0xD8) {  // JPEG: the segments up to the scan, then an end marker
    const JpegSegments walk = walk_jpeg(b, [](unsigned char, size_t, size_t) { return true; });
    if (walk.needed > 0) cut("JPEG", walk.needed);
    // Entropy-coded data stuffs every 0xFF it holds (0xFF 0x00), so 0xFF 0xD9 past the first scan is the end.
    for (size_t i = walk.scan; i + 1 < n; ++i)
      if (b[i] == 0xFF && b[i + 1] == 0xD9) return {};
    fail("file ", path, ": JPEG cut short: ", n, " bytes and no end-of-image marker (an interrupted copy or ",
         "download?)");
  }
  if (n >= 6 && (std::memcmp(b.data(), "GIF87a", 6) == 0 || std::memcmp(b.data(), "GIF89a", 6) == 0)) {
    // stb reads the first frame: the blocks up to it and its data sub-blocks must all be there.
    if (n < 13) cut("GIF", 13);
    sides("GIF", static_cast<int64_t>(le16(b, 6)), static_cast<int64_t>(le16(b, 8)));  // 16-bit: small enough
    size_t at = 13 + ((b[10] & 0x80) ? 3 * (size_t{2} << (b[10] & 7)) : 0);
    auto sub_blocks = [&] {
      while (true) {
        if (at >= n) cut("GIF", at + 1);
        const size_t len = b[at++];
        if (len == 0) return;
        if (at + len > n) cut("GIF", at + len);
        at += len;
      }
    };
    while (true) {
      if (at >= n) cut("GIF", at + 1);
      const unsigned char block = b[at];
      if (block == 0x21) {  // extension: a label, then data sub-blocks
        at += 2;
        sub_blocks();
      } else if (block == 0x2C) {  // the first frame: descriptor, colour table, LZW code size, data
        if (at + 11 > n) cut("GIF", at + 11);
        at += 10 + ((b[at + 9] & 0x80) ? 3 * (size_t{2} << (b[at + 9] & 7)) : 0) + 1;
        sub_blocks();
        return {};
      } else {
        return {};  // the trailer or something stb refuses itself
      }
    }
  }
  if (n >= 2 && b[0] == 'P' && b[1] >= '1' && b[1] <= '6') {  // PBM / PGM / PPM, plain (P1-P3) or binary (P4-P6)
    const char kind = static_cast<char>(b[1]);
    const bool bits = kind == '1' || kind == '4', plain = kind <= '3';
    size_t at = 2;
    const int64_t w = netpbm_number(path, b, at), h = netpbm_number(path, b, at);
    const int64_t maxval = bits ? 1 : netpbm_number(path, b, at);
    MOEV_CHECK(maxval >= 1 && maxval <= 65535, "file ", path, ": PGM/PPM with a maximum value of ", maxval,
               "; expected 1 to 65535");
    // A binary raster starts after the one whitespace byte that ends the header; a plain one after any.
    const Netpbm pnm{kind, maxval, plain ? at : at + 1, w, h, kind == '3' || kind == '6' ? 3 : 1};
    const char* format = bits ? "PBM" : "PGM/PPM";
    // Refused here, not left to stb: its sides are ints, and one past 2^31 wrapped to a small one.
    MOEV_CHECK(sides(format, w, h), "file ", path, ": a ", w, "x", h, " ", format, ", above ", kMaxSourcePixels,
               " pixels");
    const auto samples = static_cast<size_t>(w * h * pnm.channels);
    if (plain) {
      // Each sample takes at least a digit, and a PGM/PPM's a space between two: a 21-byte file claiming
      // 16384 x 16384 is cut short here, before a buffer for its samples is filled.
      const size_t least = pnm.offset + (bits ? samples : 2 * samples - 1);
      MOEV_CHECK(n >= least, "file ", path, ": ", format, " cut short: ", n, " bytes, where the ", samples,
                 " samples its header asks for take at least ", least, " (an interrupted copy or download?)");
      return pnm;  // the samples themselves are counted as they are read
    }
    const auto row = static_cast<size_t>(bits ? (w + 7) / 8 : w * pnm.channels * (maxval > 255 ? 2 : 1));
    const size_t needed = pnm.offset + row * static_cast<size_t>(h);
    if (n < needed) cut(format, needed);
    return pnm;
  }
  if (n >= 2 && b[0] == 'P' && (b[1] == '7' || b[1] == 'F' || b[1] == 'f'))
    fail("file ", path, ": a ", b[1] == '7' ? "PAM (P7)" : "PFM (floating-point)", " image; moev reads the ",
         "Netpbm formats PBM, PGM and PPM (P1-P6), plain or binary (convert it, e.g. with pamtopnm)");
  if (n >= 2 && b[0] == 'B' && b[1] == 'M') {  // BMP; stb decodes uncompressed ones only
    if (n < 26) cut("BMP", 26);
    const size_t header = le32(b, 14);
    const bool core = header == 12;  // OS/2's: 16-bit sides
    if (!core && n < 34) cut("BMP", 34);
    const int64_t w = core ? static_cast<int64_t>(le16(b, 18)) : static_cast<int32_t>(le32(b, 18));
    const int64_t h = core ? static_cast<int64_t>(le16(b, 20)) : static_cast<int32_t>(le32(b, 22));
    const size_t bpp = core ? le16(b, 24) : le16(b, 28), compression = core ? 0 : le32(b, 30);
    if (!sides("BMP", w, h == INT32_MIN ? 0 : std::abs(h))) return {};
    if (compression == 0 || compression == 3 || compression == 6) {
      const size_t row = static_cast<size_t>(w) * bpp, rows = static_cast<size_t>(std::abs(h));
      // stb reads the last row without its padding.
      const size_t needed = le32(b, 10) + (row + 31) / 32 * 4 * (rows - 1) + (row + 7) / 8;
      if (n < needed) cut("BMP", needed);
    }
    return {};
  }
  // TGA has no signature: judged by its header's fields, as stb does.
  if (n >= 18 && b[1] <= 1 && (b[2] == 1 || b[2] == 2 || b[2] == 3 || b[2] == 9 || b[2] == 10 || b[2] == 11) &&
      (b[16] == 8 || b[16] == 15 || b[16] == 16 || b[16] == 24 || b[16] == 32)) {
    const int64_t w = static_cast<int64_t>(le16(b, 12)), h = static_cast<int64_t>(le16(b, 14));
    if (!sides("TGA", w, h)) return {};
    const size_t pixel = (b[16] + 7) / 8;
    size_t at = 18 + b[0] + (b[1] ? le16(b, 5) * ((b[7] + 7) / 8) : 0);
    const size_t pixels = static_cast<size_t>(w * h);
    if (b[2] < 9) {
      if (at + pixels * pixel > n) cut("TGA", at + pixels * pixel);
      return {};
    }
    for (size_t done = 0; done < pixels;) {  // run-length packets: a count, then one pixel or count pixels
      if (at >= n) cut("TGA", at + 1);
      const size_t count = (b[at] & 0x7F) + 1, bytes = (b[at] & 0x80) ? pixel : count * pixel;
      if (at + 1 + bytes > n) cut("TGA", at + 1 + bytes);
      at += 1 + bytes;
      done += count;
    }
  }
  return {};
}

// The EXIF orientation (1..8) of a JPEG, 1 when it has none or it cannot be
// read. Cameras and phones store pixels as the sensor saw them and say in this
// tag how to turn them upright; stb_image does not read it.
int jpeg_orientation(const std::vector<unsigned char>& b) {
  if (b.size() < 4 || b[0] != 0xFF || b[1] != 0xD8) return 1;
  int orientation = 1;
  walk_jpeg(b, [&](unsigned char marker, size_t seg, size_t end) {
    if (marker != 0xE1 || end - seg < 14 || std::memcmp(&b[seg], "Exif\0\0", 6) != 0) return true;
    const size_t tiff = seg + 6;
    const bool le = b[tiff] == 'I' && b[tiff + 1] == 'I';
    if (!le && !(b[tiff] == 'M' && b[tiff + 1] == 'M')) return false;
    auto u16 = [&](size_t p) { return le ? b[p] | b[p + 1] << 8 : b[p] << 8 | b[p + 1]; };
    auto u32 = [&](size_t p) { return le ? uint32_t(u16(p)) | uint32_t(u16(p + 2)) << 16
                                         : uint32_t(u16(p)) << 16 | uint32_t(u16(p + 2)); };
    const size_t ifd = tiff + u32(tiff + 4);
    if (ifd < tiff || ifd + 2 > end) return false;
    const size_t entries = u16(ifd);
    for (size_t e = 0; e < entries && ifd + 2 + 12 * (e + 1) <= end; ++e) {
      const size_t entry = ifd + 2 + 12 * e;
      if (u16(entry) == 0x0112 && u16(entry + 2) == 3) {
        const int o = u16(entry + 8);
        orientation = o >= 1 && o <= 8 ? o : 1;
        break;
      }
    }
    return false;  // the first EXIF segment decides, as before
  });
  return orientation;
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

// A PBM/PGM/PPM's pixels as 8-bit HWC with the given channels. Read here, not
// by stb, which knows only the binary grey and colour kinds (P5, P6) and passes
// their samples on as written whatever the maximum value (a 10-bit camera's
// frame, maxval 1023, became a nearly black image; one with maxval 15 a dark
// one), reading 16-bit samples in the machine's byte order, not the file's
// (most significant first). A sample above the maximum is an error (it was
// read as the maximum, so a broken writer's file trained without a word).
std::vector<unsigned char> decode_netpbm(const std::string& path, const std::vector<unsigned char>& b,
                                         const Netpbm& pnm, int64_t channels) {
  const auto fc = static_cast<size_t>(pnm.channels);
  const size_t pixels_n = static_cast<size_t>(pnm.width * pnm.height), samples_n = pixels_n * fc;
  const bool bits = pnm.kind == '1' || pnm.kind == '4', wide = pnm.maxval > 255;
  auto scale = [&](int64_t v, size_t i) {
    MOEV_CHECK(v <= pnm.maxval, "file ", path, ": sample ", i, " is ", v, ", above the maximum value ", pnm.maxval,
               " its header gives (a damaged file, or a writer that breaks the format)");
    return static_cast<unsigned char>((v * 255 + pnm.maxval / 2) / pnm.maxval);
  };
  std::vector<unsigned char> samples(samples_n);  // scaled to 0..255, as the file lays them out
  if (pnm.kind <= '3') {  // plain: decimal text; a PBM's 0s and 1s need no space between them
    size_t at = pnm.offset;
    for (size_t i = 0; i < samples_n; ++i) {
      MOEV_CHECK(skip_netpbm_space(b, at), "file ", path, ": ", bits ? "PBM" : "PGM/PPM", " cut short: ", i,
                 " of the ", samples_n, " samples its header asks for (an interrupted copy or download?)");
      if (bits) {
        MOEV_CHECK(b[at] == '0' || b[at] == '1', "file ", path, ": PBM damaged at byte ", at, ": expected 0 or 1");
        samples[i] = b[at++] == '1' ? 0 : 255;  // 1 is black
      } else {
        samples[i] = scale(netpbm_number(path, b, at), i);
      }
    }
  } else {
    const size_t row = bits ? static_cast<size_t>((pnm.width + 7) / 8) : 0;
    for (size_t i = 0; i < samples_n; ++i) {
      if (bits) {  // each row packed 8 pixels to a byte, first pixel in the high bit; 1 is black
        const size_t y = i / static_cast<size_t>(pnm.width), x = i % static_cast<size_t>(pnm.width);
        samples[i] = (b[pnm.offset + y * row + x / 8] >> (7 - x % 8) & 1) ? 0 : 255;
      } else {
        const unsigned char* at = b.data() + pnm.offset + i * (wide ? 2 : 1);
        samples[i] = scale(wide ? (int64_t{at[0]} << 8 | at[1]) : at[0], i);
      }
    }
  }
  if (fc == static_cast<size_t>(channels)) return samples;
  std::vector<unsigned char> out(pixels_n * static_cast<size_t>(channels));
  for (size_t p = 0; p < pixels_n; ++p)
    for (size_t c = 0; c < static_cast<size_t>(channels); ++c)
      out[p * channels + c] = fc == 1 ? samples[p]  // grey to RGB: repeated
                                      // RGB to grey with stb's weights, as its other formats get it
                                      : static_cast<unsigned char>((samples[p * 3] * 77 + samples[p * 3 + 1] * 150 +
                                                                    samples[p * 3 + 2] * 29) >> 8);
  return out;
}

// A GIF's first frame: where its colour table is (a local one takes the
// global one's place; entries 0: none) and its transparent index (-1: none).
// The bytes were checked complete up to that frame (check_complete).
struct GifFrame {
  size_t table = 0, entries = 0;
  int transparent = -1;
  size_t left = 0, top = 0, width = 0, height = 0;  // the frame's rectangle on the screen
};

GifFrame gif_first_frame(const std::vector<unsigned char>& b) {
  GifFrame f;
  if (b[10] & 0x80) f = {13, size_t{2} << (b[10] & 7), -1};
  size_t at = 13 + 3 * f.entries;
  int transparent = -1;
  while (at < b.size()) {
    if (b[at] == 0x21) {  // an extension: its label, then data sub-blocks up to an empty one
      // The graphic control extension before a frame: flags, delay, transparent index.
      if (at + 7 <= b.size() && b[at + 1] == 0xF9 && b[at + 2] == 4) transparent = (b[at + 3] & 1) ? b[at + 6] : -1;
      at += 2;
      while (at < b.size() && b[at] != 0) at += size_t{b[at]} + 1;
      ++at;
    } else if (b[at] == 0x2C && at + 10 <= b.size()) {
      if (b[at + 9] & 0x80) f = {at + 10, size_t{2} << (b[at + 9] & 7), -1};
      f.transparent = transparent;
      f.left = le16(b, at + 1), f.top = le16(b, at + 3), f.width = le16(b, at + 5), f.height = le16(b, at + 7);
      return f;
    } else {
      break;
    }
  }
  return {};
}

// Whether a palette image is drawn from grey entries only (red = green =
// blue): stb says 3 or 4 channels for every GIF and for palette PNGs and BMPs,
// grey ones too, which are then no colour read as grey.
bool palette_is_grey(const std::vector<unsigned char>& b) {
  auto grey = [&](size_t at, size_t entries, size_t stride) {
    if (entries == 0 || at + stride * entries > b.size()) return false;
    for (size_t e = 0; e < entries; ++e) {
      const unsigned char* p = &b[at + stride * e];
      if (p[0] != p[1] || p[1] != p[2]) return false;
    }
    return true;
  };
  if (b.size() >= 13 && std::memcmp(b.data(), "GIF", 3) == 0) {
    const GifFrame f = gif_first_frame(b);
    return grey(f.table, f.entries, 3);
  }
  if (b.size() >= 33 && std::memcmp(b.data(), "\x89PNG", 4) == 0) {
    if (b[25] != 3) return false;  // IHDR's colour type: 3 is a palette
    for (size_t at = 8; at + 8 <= b.size();) {  // chunks: length, type, data, CRC
      const size_t length = size_t{b[at]} << 24 | size_t{b[at + 1]} << 16 | size_t{b[at + 2]} << 8 | b[at + 3];
      if (std::memcmp(&b[at + 4], "PLTE", 4) == 0) return length % 3 == 0 && grey(at + 8, length / 3, 3);
      if (std::memcmp(&b[at + 4], "IDAT", 4) == 0) return false;
      at += 12 + length;
    }
    return false;
  }
  if (b.size() >= 26 && b[0] == 'B' && b[1] == 'M') {
    const size_t header = le32(b, 14);
    if (header == 12) {  // OS/2's: 3-byte entries, as many as the bits allow
      const size_t bits = le16(b, 24);
      return bits <= 8 && grey(14 + header, size_t{1} << bits, 3);
    }
    if (b.size() < 54) return false;
    const size_t bits = le16(b, 28), used = le32(b, 46);
    return bits <= 8 && header < b.size() && grey(14 + header, used ? used : size_t{1} << bits, 4);
  }
  return false;
}

// A BMP whose pixels are run-length coded (RLE8 or RLE4: ImageMagick writes palette images so by default).
bool is_rle_bmp(const std::vector<unsigned char>& b) {
  if (b.size() < 54 || b[0] != 'B' || b[1] != 'M' || le32(b, 14) < 40) return false;
  const uint32_t compression = le32(b, 30);
  return compression == 1 || compression == 2;
}

// stb decodes uncompressed BMPs only: a run-length coded one is rewritten as the
// uncompressed 8-bit BMP it describes (its headers and palette kept) and read
// as any other. Pixels the codes skip (a delta, a line ended early) are palette
// index 0, as PIL and Windows read them.
std::vector<unsigned char> bmp_rle_expanded(const std::vector<unsigned char>& b, const std::string& path) {
  const size_t header = le32(b, 14), bpp = le16(b, 28), used = le32(b, 46), offset = le32(b, 10);
  const uint32_t compression = le32(b, 30);
  const int64_t w = static_cast<int32_t>(le32(b, 18)), h = static_cast<int32_t>(le32(b, 22));
  MOEV_CHECK((compression == 1 && bpp == 8) || (compression == 2 && bpp == 4), "file ", path, ": a BMP coded ",
             compression == 1 ? "RLE8" : "RLE4", " at ", bpp, " bits per pixel; expected ",
             compression == 1 ? "8" : "4");
  MOEV_CHECK(w >= 1 && h >= 1, "file ", path, ": a run-length coded BMP of ", w, "x", h, " pixels; expected a width ",
             "and height of at least 1 (the format does not store such an image top-down)");
  MOEV_CHECK(w * h <= kMaxSourcePixels, "file ", path, ": a ", w, "x", h, " image, above ", kMaxSourcePixels,
             " pixels");
  const size_t entries = used ? used : size_t{1} << bpp, palette = 14 + header;
  MOEV_CHECK(entries <= (size_t{1} << bpp), "file ", path, ": a BMP palette of ", entries, " colours at ", bpp,
             " bits per pixel");
  MOEV_CHECK(palette + 4 * entries <= b.size() && offset <= b.size(), "file ", path, ": BMP cut short: ", b.size(),
             " bytes, before the end of its palette (an interrupted copy or download?)");
  const size_t stride = (static_cast<size_t>(w) + 3) / 4 * 4;
  std::vector<unsigned char> px(stride * static_cast<size_t>(h), 0);  // rows bottom-up, as stored
  size_t at = offset, x = 0, y = 0;
  auto need = [&](size_t bytes) {
    MOEV_CHECK(at + bytes <= b.size(), "file ", path, ": BMP cut short: ", b.size(), " bytes, inside its ",
               "run-length coded pixels (an interrupted copy or download?)");
  };
  auto put = [&](unsigned index) {
    MOEV_CHECK(index < entries, "file ", path, ": a BMP pixel of palette index ", index, ", outside its palette of ",
               entries, " colours");
    if (x < static_cast<size_t>(w) && y < static_cast<size_t>(h)) px[y * stride + x] = static_cast<unsigned char>(index);
    ++x;
  };
  auto nibble = [](unsigned byte, size_t i) { return i % 2 == 0 ? byte >> 4 : byte & 15u; };
  for (bool end = false; !end;) {
    need(2);
    const unsigned count = b[at], value = b[at + 1];
    at += 2;
    if (count > 0) {  // a run of `count` pixels: one index, or (RLE4) two alternating
      for (unsigned i = 0; i < count; ++i) put(bpp == 8 ? value : nibble(value, i));
    } else if (value == 0) {  // end of line
      x = 0;
      ++y;
    } else if (value == 1) {  // end of bitmap
      end = true;
    } else if (value == 2) {  // move right and up
      need(2);
      x += b[at];
      y += b[at + 1];
      at += 2;
    } else {  // `value` pixels stored as they are, padded to an even byte count
      const size_t bytes = bpp == 8 ? value : (value + 1) / 2;
      need(bytes);
      for (unsigned i = 0; i < value; ++i) put(bpp == 8 ? b[at + i] : nibble(b[at + i / 2], i));
      at += (bytes + 1) / 2 * 2;
    }
    end = end || y >= static_cast<size_t>(h);  // past the top row nothing more is drawn
  }
  std::vector<unsigned char> out(b.begin(), b.begin() + static_cast<std::ptrdiff_t>(palette + 4 * entries));
  auto set32 = [&](size_t pos, size_t v) {
    for (int i = 0; i < 4; ++i) out[pos + i] = static_cast<unsigned char>(v >> (8 * i));
  };
  out.insert(out.end(), px.begin(), px.end());
  set32(2, out.size());
  set32(10, palette + 4 * entries);
  out[28] = 8, out[29] = 0;  // bits per pixel
  set32(30, 0);              // uncompressed
  set32(34, px.size());
  set32(46, entries);
  return out;
}

// stb leaves a GIF's transparent pixels black (0, 0, 0, 0). The colour stored
// under them is the table's entry at the transparent index, what PIL reads and
// what predict's note says: RGBA pixels, n of them, to `channels` channels with
// those pixels in that colour (grey with stb's weights, as its conversion).
// Outside the frame's rectangle a pixel is the screen's background, not a transparent one: left as stb reads it.
std::vector<unsigned char> gif_opaque(const std::vector<unsigned char>& b, const GifFrame& f, const unsigned char* rgba,
                                      size_t w, size_t h, int channels) {
  const unsigned char* under = &b[f.table + 3 * static_cast<size_t>(f.transparent)];
  const size_t n = w * h;
  std::vector<unsigned char> out(n * static_cast<size_t>(channels));
  for (size_t p = 0; p < n; ++p) {
    const size_t x = p % w, y = p / w;
    const bool in_frame = x >= f.left && x < f.left + f.width && y >= f.top && y < f.top + f.height;
    const unsigned char* c = rgba[p * 4 + 3] == 0 && in_frame ? under : rgba + p * 4;
    if (channels == 1)
      out[p] = static_cast<unsigned char>((c[0] * 77 + c[1] * 150 + c[2] * 29) >> 8);
    else
      for (int k = 0; k < 3; ++k) out[p * 3 + k] = c[k];
  }
  return out;
}

// stb decodes a JPEG of 4 components as YCbCr and drops the fourth, unless an
// Adobe segment says they are CMYK or YCCK (libjpeg and PIL read them as CMYK
// then): wrong colours without a word.
void check_jpeg_components(const std::string& path, const std::vector<unsigned char>& b) {
  if (b.size() < 4 || b[0] != 0xFF || b[1] != 0xD8) return;
  int components = 0;
  bool adobe = false;
  walk_jpeg(b, [&](unsigned char marker, size_t seg, size_t end) {
    // The transform byte: 0 CMYK, 2 YCCK, which stb reads; 1 (YCbCr) it reads as 3 components and a dropped one.
    if (marker == 0xEE && end - seg >= 12 && std::memcmp(&b[seg], "Adobe", 5) == 0) adobe = b[seg + 11] != 1;
    const bool frame = marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
    if (frame && end - seg >= 6) components = b[seg + 5];
    return true;
  });
  MOEV_CHECK(components != 4 || adobe, "file ", path, ": a JPEG of 4 colour components without an Adobe ",
             "segment that says they are CMYK or YCCK; expected an RGB or greyscale JPEG (save it as RGB)");
}

// Decodes path into dst, uint8 [C, H, W] contiguous; returns the file's own (upright) size.
SourceSize decode_into(const std::string& path, int64_t height, int64_t width, int64_t channels, Fit fit,
                       uint8_t* dst, bool look_for_alpha = false) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  MOEV_CHECK(in, "cannot open image file ", path);
  const auto size = static_cast<int64_t>(in.tellg());
  MOEV_CHECK(size >= 0 && size <= INT_MAX, "file ", path, ": ", size, " bytes, outside stb_image's 0..2 GiB");
  std::vector<unsigned char> bytes(static_cast<size_t>(size));
  in.seekg(0);
  MOEV_CHECK(in.read(reinterpret_cast<char*>(bytes.data()), size), "cannot read image file ", path);
  // stb would call it "unknown image type", which sends one looking at the format, not the copy.
  MOEV_CHECK(size > 0, "file ", path, " is empty (0 bytes); expected an image");
  check_png_crcs(path, bytes);
  const Netpbm pnm = check_complete(path, bytes);
  check_jpeg_components(path, bytes);
  if (is_rle_bmp(bytes)) bytes = bmp_rle_expanded(bytes, path);
  int w = 0, h = 0;
  bool colour = pnm.channels == 3, alpha = false;
  std::vector<unsigned char> netpbm, upright, resized, opaque;
  std::unique_ptr<unsigned char, void (*)(void*)> pixels(nullptr, stbi_image_free);
  const unsigned char* hwc = nullptr;
  if (pnm.kind != 0) {
    netpbm = decode_netpbm(path, bytes, pnm, channels);
    w = static_cast<int>(pnm.width), h = static_cast<int>(pnm.height);
    hwc = netpbm.data();
  } else {
    int file_channels = 0;
    // From the header, before any pixel is allocated: a small file can claim a
    // huge image (stb alone allows 1 GiB of pixels).
    if (stbi_info_from_memory(bytes.data(), static_cast<int>(bytes.size()), &w, &h, &file_channels) == 1)
      MOEV_CHECK(int64_t{w} * h <= kMaxSourcePixels, "file ", path, ": a ", w, "x", h, " image, above ",
                 kMaxSourcePixels, " pixels");
    const GifFrame gif = bytes.size() >= 13 && std::memcmp(bytes.data(), "GIF", 3) == 0 ? gif_first_frame(bytes)
                                                                                       : GifFrame{};
    const bool fill = gif.transparent >= 0 && static_cast<size_t>(gif.transparent) < gif.entries;
    pixels.reset(stbi_load_from_memory(bytes.data(), static_cast<int>(bytes.size()), &w, &h, &file_channels,
                                       fill ? 4 : static_cast<int>(channels)));
    // stb refuses some headers itself (a PNG whose rows would pass its 1 GiB), which stbi_info does not report:
    // the same limit, in moev's words.
    MOEV_CHECK(pixels != nullptr || std::string(stbi_failure_reason()) != "too large", "file ", path,
               ": its header claims an image too large to decode (stb_image: too large: a side above 2^24, or more ",
               "than 1 GiB of pixel rows; moev reads up to ", kMaxSourcePixels, " pixels)");
    MOEV_CHECK(pixels != nullptr, "file ", path, " is not a readable image (stb_image: ", stbi_failure_reason(), ")");
    MOEV_CHECK(w >= 1 && h >= 1, "file ", path, ": an image of ", w, "x", h, " pixels; expected at least 1x1");
    hwc = pixels.get();
    if (fill) {
      opaque = gif_opaque(bytes, gif, pixels.get(), static_cast<size_t>(w), static_cast<size_t>(h),
                          static_cast<int>(channels));
      hwc = opaque.data();
    }
    colour = file_channels >= 3 && !palette_is_grey(bytes);
    // stb says 2 or 4 channels for any GIF and some opaque BMPs too: the alpha values themselves decide, from a
    // second decoding that keeps them (the pixels above stay stb's own conversion).
    if (look_for_alpha && (file_channels == 2 || file_channels == 4)) {
      int aw = 0, ah = 0, ac = 0;
      std::unique_ptr<unsigned char, void (*)(void*)> native(
          stbi_load_from_memory(bytes.data(), static_cast<int>(bytes.size()), &aw, &ah, &ac, file_channels),
          stbi_image_free);
      const size_t px = native ? static_cast<size_t>(aw) * static_cast<size_t>(ah) : 0;
      for (size_t p = 0; p < px && !alpha; ++p) alpha = native.get()[p * file_channels + file_channels - 1] != 255;
    }
  }
  if (const int o = jpeg_orientation(bytes); o != 1) {
    std::tie(w, h) = apply_orientation(o, upright, hwc, w, h, static_cast<int>(channels));
    hwc = upright.data();
  }
  const SourceSize source{h, w, colour, alpha};
  const int row_bytes = w * static_cast<int>(channels);
  if (fit == Fit::kCenterCrop) {  // the largest centred window of height:width, rounded to whole pixels
    if (int64_t{w} * height > int64_t{h} * width) {
      const int cw = std::max(1, static_cast<int>((int64_t{h} * width * 2 + height) / (2 * height)));
      hwc += static_cast<size_t>((w - cw) / 2) * static_cast<size_t>(channels);
      w = cw;
    } else if (int64_t{w} * height < int64_t{h} * width) {
      const int ch = std::max(1, static_cast<int>((int64_t{w} * height * 2 + width) / (2 * width)));
      hwc += static_cast<size_t>((h - ch) / 2) * static_cast<size_t>(row_bytes);
      h = ch;
    }
  }
  int stride = row_bytes;  // bytes from one row of hwc to the next
  if (h != height || w != width) {
    resized.resize(static_cast<size_t>(height * width * channels));
    const int ok = stbir_resize_uint8(hwc, w, h, row_bytes, resized.data(), static_cast<int>(width),
                                      static_cast<int>(height), /*output_stride=*/0, static_cast<int>(channels));
    MOEV_CHECK(ok == 1, "cannot resize ", path, " from ", w, "x", h, " to ", width, "x", height);
    hwc = resized.data();
    stride = static_cast<int>(width * channels);
  }
  // stb gives interleaved HWC; torch convolutions want planar CHW.
  const int64_t plane = height * width;
  for (int64_t y = 0; y < height; ++y)
    for (int64_t x = 0; x < width; ++x)
      for (int64_t c = 0; c < channels; ++c) dst[c * plane + y * width + x] = hwc[y * stride + x * channels + c];
  return source;
}

}  // namespace

void check_decoded_fit(const std::string& source, int64_t n, int64_t channels, int64_t height, int64_t width,
                       double held) {
  const double have = physical_memory_bytes(), need = double(n) * double(channels * height * width);
  auto gb = [](double bytes) { return std::round(bytes / 1e8) / 10; };
  std::ostringstream beside;
  if (held > 0) beside << " beside the " << gb(held) << " GB of images read before";
  MOEV_CHECK(have <= 0 || held + need <= 0.8 * have, source, ": ", n, " images decoded at ", channels, "x", height,
             "x", width, " need ", gb(need), " GB", beside.str(), ", and moev holds its data sets in memory; this ",
             "machine has ", gb(have), " GB (a smaller model.image_size, or fewer images, fits)");
}

Fit parse_fit(const std::string& name, const std::string& key) {
  if (name == "stretch") return Fit::kStretch;
  if (name == "center_crop") return Fit::kCenterCrop;
  fail(key, " = '", name, "': expected stretch (the whole image, squashed to the model's aspect ratio) or ",
       "center_crop (its largest centred crop of that aspect ratio)");
}

torch::Tensor decode_image_file(const std::string& path, int64_t height, int64_t width,
                                int64_t channels, Fit fit, SourceSize* source, bool look_for_alpha) {
  check_geometry(height, width, channels);
  MOEV_CHECK(fs::exists(path), "image file ", path, " not found");
  MOEV_CHECK(fs::is_regular_file(path), "image file ", path, " is not a regular file (a directory, a pipe?)");
  torch::Tensor image = torch::empty({channels, height, width}, torch::kUInt8);
  const SourceSize size = decode_into(path, height, width, channels, fit, image.data_ptr<uint8_t>(), look_for_alpha);
  if (source) *source = size;
  return image;
}

ImageSet read_image_folder(const std::string& root, int64_t height, int64_t width, int64_t channels,
                           const ReadOptions& options) {
  const std::atomic<bool>* stop = options.stop;
  check_geometry(height, width, channels);
  MOEV_CHECK(fs::is_directory(root), "image folder ", root,
             fs::exists(root) ? " is a file; expected a directory of class folders (<root>/<class>/<image>)"
                              : " not found");

  ImageSet set;
  std::vector<std::string> files;
  std::vector<int64_t> labels;
  // Plain files next to the class folders (READMEs, synset lists) are not classes. An image
  // there has no class either, and skipping it would drop it from the set without a word.
  for (const fs::path& class_dir : sorted_entries(root)) {
    if (is_hidden(class_dir)) continue;
    MOEV_CHECK(fs::is_directory(class_dir) || !has_image_extension(class_dir), "image folder ", root, ": ",
               class_dir.filename().string(), " lies in its root, outside every class folder; expected ",
               "root/<class>/<image> (move it into its class's folder, or out of the data set)");
    if (!fs::is_directory(class_dir)) continue;
    check_utf8(class_dir.filename().string(), "image folder " + root + ": the class folder name");
    const auto label = static_cast<int64_t>(set.class_names.size());
    const size_t before = files.size();
    for (const fs::path& file : sorted_entries(class_dir)) {
      if (is_hidden(file) || is_system_file(file)) continue;
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
  check_decoded_fit("image folder " + root, n, channels, height, width, options.held_bytes);
  set.images = torch::empty({n, channels, height, width}, torch::kUInt8);
  set.labels = torch::tensor(labels, torch::kInt64);
  set.source = root;

  uint8_t* images = set.images.data_ptr<uint8_t>();
  const int64_t image_bytes = channels * height * width;
  std::atomic<int64_t> next{0}, decoded{0}, colour{0};
  std::mutex error_mutex;
  int64_t error_index = n;  // the first failing file in order, so the message is stable
  std::exception_ptr error;
  auto work = [&] {
    for (int64_t i; (!stop || !stop->load(std::memory_order_relaxed)) && (i = next.fetch_add(1)) < n;) {
      try {
        if (decode_into(files[i], height, width, channels, options.fit, images + i * image_bytes).colour)
          colour.fetch_add(1, std::memory_order_relaxed);
        decoded.fetch_add(1, std::memory_order_relaxed);
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
  if (decoded.load() < n)
    throw Stopped("stopped while reading image folder " + root + " (" + std::to_string(decoded.load()) + " of " +
                  std::to_string(n) + " images decoded)");
  if (channels == 1) set.colour_as_grey = colour.load();
  return set;
}

}  // namespace moev::data
