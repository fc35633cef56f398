// Image folders: PNG/JPEG files written here with stb_image_write, read back
// through read_image_folder and decode_image_file.
#include "moev/data/image_folder.h"

#include <gtest/gtest.h>
#include <stb/stb_image_write.h>
#include <torch/torch.h>

#include <filesystem>
#include <map>

#include <zlib.h>

#include "moev/core/memory.h"
#include "support/expect_error.h"
#include "support/temp_dir.h"

namespace moev::data {
namespace {

namespace fs = std::filesystem;
using moev::test::expect_error;
using moev::test::TempDir;
using moev::test::write_bytes;

// An HWC image whose every byte differs, so any misplaced pixel shows.
std::vector<unsigned char> pattern(int h, int w, int c, int salt) {
  std::vector<unsigned char> px(static_cast<size_t>(h * w * c));
  for (size_t i = 0; i < px.size(); ++i) px[i] = static_cast<unsigned char>((i * 37 + salt) % 256);
  return px;
}

torch::Tensor hwc_to_chw(const std::vector<unsigned char>& px, int h, int w, int c) {
  return torch::from_blob(const_cast<unsigned char*>(px.data()), {h, w, c}, torch::kUInt8)
      .permute({2, 0, 1})
      .contiguous();
}

void write_png(const std::string& path, const std::vector<unsigned char>& px, int h, int w, int c) {
  ASSERT_EQ(stbi_write_png(path.c_str(), w, h, c, px.data(), w * c), 1) << path;
}

TEST(ImageFolder, PngRoundTripIsExactAndClassesAreSorted) {
  TempDir root;
  fs::create_directories(root.path() / "zebra");
  fs::create_directories(root.path() / "apple");
  const auto a0 = pattern(4, 5, 3, 1), a1 = pattern(4, 5, 3, 2), z0 = pattern(4, 5, 3, 3);
  // "10" sorts before "2": plain name order, not numeric.
  write_png(root.file("apple/2.png"), a0, 4, 5, 3);
  write_png(root.file("apple/10.PNG"), a1, 4, 5, 3);
  write_png(root.file("zebra/x.png"), z0, 4, 5, 3);
  write_bytes(root.file("README.txt"), {'h', 'i'});      // not a class: ignored
  write_bytes(root.file("apple/.DS_Store"), {0, 1, 2});  // hidden: ignored

  const ImageSet set = read_image_folder(root.path().string(), /*height=*/4, /*width=*/5,
                                         /*channels=*/3);
  ASSERT_EQ(set.size(), 3);
  EXPECT_EQ(set.class_names, (std::vector<std::string>{"apple", "zebra"}));
  EXPECT_TRUE(torch::equal(set.labels, torch::tensor({0, 0, 1}, torch::kInt64)));
  EXPECT_EQ(set.images.sizes(), torch::IntArrayRef({3, 3, 4, 5}));
  EXPECT_TRUE(torch::equal(set.images[0], hwc_to_chw(a1, 4, 5, 3)));
  EXPECT_TRUE(torch::equal(set.images[1], hwc_to_chw(a0, 4, 5, 3)));
  EXPECT_TRUE(torch::equal(set.images[2], hwc_to_chw(z0, 4, 5, 3)));
  // An image beside the class folders has no class: it was left out without a word.
  write_png(root.file("stray.png"), z0, 4, 5, 3);
  expect_error([&] { read_image_folder(root.path().string(), 4, 5, 3); },
               {root.path().string(), "stray.png lies in its root, outside every class folder"});
}

// The lossless formats stb writes besides PNG read back exactly, as predict reads them.
TEST(ImageFolder, BmpAndTgaRoundTripExactly) {
  TempDir root;
  fs::create_directories(root.path() / "c");
  const auto b = pattern(4, 5, 3, 7), t = pattern(4, 5, 3, 8);
  ASSERT_EQ(stbi_write_bmp(root.file("c/a.bmp").c_str(), 5, 4, 3, b.data()), 1);
  ASSERT_EQ(stbi_write_tga(root.file("c/b.TGA").c_str(), 5, 4, 3, t.data()), 1);
  const ImageSet set = read_image_folder(root.path().string(), 4, 5, 3);
  ASSERT_EQ(set.size(), 2);
  EXPECT_TRUE(torch::equal(set.images[0], hwc_to_chw(b, 4, 5, 3)));
  EXPECT_TRUE(torch::equal(set.images[1], hwc_to_chw(t, 4, 5, 3)));
}

TEST(ImageFolder, GrayFromRgbAndRgbFromGray) {
  TempDir root;
  fs::create_directories(root.path() / "c");
  // Gray-valued RGB pixels keep their value under stb's luminance weights.
  std::vector<unsigned char> rgb, gray;
  for (int i = 0; i < 6; ++i) {
    const auto v = static_cast<unsigned char>(i * 50);
    rgb.insert(rgb.end(), {v, v, v});
    gray.push_back(v);
  }
  write_png(root.file("c/rgb.png"), rgb, 2, 3, 3);
  write_png(root.file("c/gray.png"), gray, 2, 3, 1);
  const ImageSet one = read_image_folder(root.path().string(), 2, 3, /*channels=*/1);
  const torch::Tensor expected = hwc_to_chw(gray, 2, 3, 1);
  EXPECT_TRUE(torch::equal(one.images[0], expected));
  EXPECT_TRUE(torch::equal(one.images[1], expected));
  const ImageSet three = read_image_folder(root.path().string(), 2, 3, /*channels=*/3);
  EXPECT_TRUE(torch::equal(three.images[0], expected.expand({3, 2, 3})));
}

TEST(ImageFolder, ResizesToTheRequestedSize) {
  TempDir root;
  fs::create_directories(root.path() / "c");
  // 8 high x 16 wide: left half 20, right half 220.
  std::vector<unsigned char> px(8 * 16);
  for (int y = 0; y < 8; ++y)
    for (int x = 0; x < 16; ++x) px[y * 16 + x] = x < 8 ? 20 : 220;
  write_png(root.file("c/wide.png"), px, 8, 16, 1);
  const ImageSet set = read_image_folder(root.path().string(), /*height=*/4, /*width=*/4, 1);
  ASSERT_EQ(set.images.sizes(), torch::IntArrayRef({1, 1, 4, 4}));
  const torch::Tensor img = set.images[0][0].to(torch::kInt32);
  for (int y = 0; y < 4; ++y) {
    EXPECT_NEAR(img[y][0].item<int>(), 20, 2);
    EXPECT_NEAR(img[y][3].item<int>(), 220, 2);
    EXPECT_LT(img[y][1].item<int>(), img[y][2].item<int>());
  }
  // Upsampling works too.
  const torch::Tensor big = decode_image_file(root.file("c/wide.png"), 16, 32, 3);
  EXPECT_EQ(big.sizes(), torch::IntArrayRef({3, 16, 32}));
  EXPECT_NEAR(big[0][5][0].item<uint8_t>(), 20, 2);
  EXPECT_NEAR(big[2][5][31].item<uint8_t>(), 220, 2);
}

// center_crop keeps the largest centred window of the model's aspect ratio: a window the model's size is
// copied exactly, a larger one resized as a file of just that window would be. Stretch keeps every column.
TEST(ImageFolder, CenterCropKeepsTheMiddleOfAnotherAspectRatio) {
  TempDir root;
  const auto wide = pattern(4, 8, 3, 1), tall = pattern(8, 4, 3, 2), big = pattern(4, 12, 3, 3);
  write_png(root.file("wide.png"), wide, 4, 8, 3);
  write_png(root.file("tall.png"), tall, 8, 4, 3);
  write_png(root.file("big.png"), big, 4, 12, 3);
  const auto crop = Fit::kCenterCrop;
  using torch::indexing::Slice;
  EXPECT_TRUE(decode_image_file(root.file("wide.png"), 4, 4, 3, crop)
                  .equal(hwc_to_chw(wide, 4, 8, 3).index({Slice(), Slice(), Slice(2, 6)})));
  EXPECT_TRUE(decode_image_file(root.file("tall.png"), 4, 4, 3, crop)
                  .equal(hwc_to_chw(tall, 8, 4, 3).index({Slice(), Slice(2, 6), Slice()})));
  // A square image is the same either way; stretched, the wide one keeps its edges.
  EXPECT_TRUE(decode_image_file(root.file("wide.png"), 2, 4, 3, crop).equal(decode_image_file(root.file("wide.png"),
                                                                                                2, 4, 3)));
  EXPECT_FALSE(decode_image_file(root.file("wide.png"), 4, 4, 3).equal(decode_image_file(root.file("wide.png"), 4, 4,
                                                                                          3, crop)));
  // 12x4 to 2x2: the middle 4x4 (columns 4..7), halved.
  std::vector<unsigned char> middle;
  for (int y = 0; y < 4; ++y)
    middle.insert(middle.end(), big.begin() + (y * 12 + 4) * 3, big.begin() + (y * 12 + 8) * 3);
  write_png(root.file("middle.png"), middle, 4, 4, 3);
  EXPECT_TRUE(decode_image_file(root.file("big.png"), 2, 2, 3, crop).equal(decode_image_file(root.file("middle.png"),
                                                                                              2, 2, 3)));
  // A folder reads with the fit it is given.
  fs::create_directories(root.path() / "f" / "c");
  fs::copy_file(root.file("wide.png"), root.path() / "f" / "c" / "wide.png");
  ReadOptions cropped;
  cropped.fit = crop;
  EXPECT_TRUE(read_image_folder(root.file("f"), 4, 4, 3, cropped).images[0].equal(
      decode_image_file(root.file("wide.png"), 4, 4, 3, crop)));
  EXPECT_EQ(parse_fit("center_crop", "data.resize"), crop);
  expect_error([] { parse_fit("crop", "data.resize"); }, {"data.resize = 'crop'", "expected stretch", "center_crop"});
}

TEST(ImageFolder, JpegDecodesCloseToWhatWasWritten) {
  TempDir root;
  fs::create_directories(root.path() / "c");
  // A smooth gradient: JPEG at quality 100 keeps it within a few levels.
  std::vector<unsigned char> px;
  for (int y = 0; y < 16; ++y)
    for (int x = 0; x < 16; ++x)
      px.insert(px.end(), {static_cast<unsigned char>(x * 16), static_cast<unsigned char>(y * 16),
                           static_cast<unsigned char>(128)});
  ASSERT_EQ(stbi_write_jpg(root.file("c/a.JPEG").c_str(), 16, 16, 3, px.data(), 100), 1);
  ASSERT_EQ(stbi_write_jpg(root.file("c/b.jpg").c_str(), 16, 16, 3, px.data(), 100), 1);
  const ImageSet set = read_image_folder(root.path().string(), 16, 16, 3);
  ASSERT_EQ(set.size(), 2);
  const torch::Tensor expected = hwc_to_chw(px, 16, 16, 3).to(torch::kFloat32);
  const float error = (set.images[0].to(torch::kFloat32) - expected).abs().mean().item<float>();
  EXPECT_LT(error, 3.0f);
  EXPECT_TRUE(torch::equal(set.images[0], set.images[1]));
}

TEST(ImageFolder, NonImageFileIsAnErrorNamingIt) {
  TempDir root;
  fs::create_directories(root.path() / "c");
  write_png(root.file("c/ok.png"), pattern(4, 4, 1, 0), 4, 4, 1);
  write_bytes(root.file("c/notes.txt"), {'h', 'i'});
  expect_error([&] { read_image_folder(root.path().string(), 4, 4, 1); },
               {root.file("c/notes.txt"), "not an image file", ".png", ".bmp"});
  // A link to a moved file and a nested folder: said as what they are.
  fs::remove(root.file("c/notes.txt"));
  fs::create_symlink(root.file("gone.png"), root.file("c/link.png"));
  expect_error([&] { read_image_folder(root.path().string(), 4, 4, 1); }, {root.file("c/link.png"), "broken link"});
  fs::remove(root.file("c/link.png"));
  fs::create_directories(root.file("c/more.png"));
  expect_error([&] { read_image_folder(root.path().string(), 4, 4, 1); }, {root.file("c/more.png"), "is a directory"});
}

TEST(ImageFolder, UndecodableImageIsAnErrorNamingIt) {
  TempDir root;
  fs::create_directories(root.path() / "c");
  write_png(root.file("c/a.png"), pattern(4, 4, 1, 0), 4, 4, 1);
  write_bytes(root.file("c/b.png"), {'n', 'o', 't', ' ', 'a', ' ', 'p', 'n', 'g'});
  expect_error([&] { read_image_folder(root.path().string(), 4, 4, 1); },
               {root.file("c/b.png"), "not a readable image"});
  expect_error([&] { decode_image_file(root.file("c/b.png"), 4, 4, 1); },
               {root.file("c/b.png"), "not a readable image"});
}

// A JPEG with an EXIF orientation tag (APP1 after SOI), little- or big-endian.
std::vector<unsigned char> with_orientation(const std::vector<unsigned char>& jpeg, int orientation, bool big) {
  auto u16 = [&](int v) {
    return big ? std::vector<unsigned char>{static_cast<unsigned char>(v >> 8), static_cast<unsigned char>(v & 255)}
               : std::vector<unsigned char>{static_cast<unsigned char>(v & 255), static_cast<unsigned char>(v >> 8)};
  };
  std::vector<unsigned char> tiff = big ? std::vector<unsigned char>{'M', 'M'} : std::vector<unsigned char>{'I', 'I'};
  for (const auto& part : {u16(42), big ? std::vector<unsigned char>{0, 0, 0, 8} : std::vector<unsigned char>{8, 0, 0, 0},
                           u16(1), u16(0x0112), u16(3), big ? std::vector<unsigned char>{0, 0, 0, 1}
                                                            : std::vector<unsigned char>{1, 0, 0, 0},
                           u16(orientation), u16(0), std::vector<unsigned char>(4, 0)})
    tiff.insert(tiff.end(), part.begin(), part.end());
  const int length = 2 + 6 + static_cast<int>(tiff.size());
  std::vector<unsigned char> out(jpeg.begin(), jpeg.begin() + 2);
  for (int b : {0xFF, 0xE1, length >> 8, length & 255, int{'E'}, int{'x'}, int{'i'}, int{'f'}, 0, 0})
    out.push_back(static_cast<unsigned char>(b));
  out.insert(out.end(), tiff.begin(), tiff.end());
  out.insert(out.end(), jpeg.begin() + 2, jpeg.end());
  return out;
}

// Phones store pixels as the sensor saw them and an EXIF tag saying how to turn
// them upright; stb ignores it, so a photo was classified lying on its side.
TEST(ImageFolder, JpegExifOrientationIsApplied) {
  TempDir root;
  fs::create_directories(root.path() / "c");
  const int h = 8, w = 16;
  ASSERT_EQ(stbi_write_jpg(root.file("c/plain.jpg").c_str(), w, h, 3, pattern(h, w, 3, 5).data(), 100), 1);
  const std::string plain_bytes = moev::test::bytes_of(root.file("c/plain.jpg"));
  const std::vector<unsigned char> plain(plain_bytes.begin(), plain_bytes.end());
  const auto ref = decode_image_file(root.file("c/plain.jpg"), h, w, 3);  // [3, 8, 16]
  // What a viewer shows for each orientation, by torch's own flips and rotations.
  const std::vector<torch::Tensor> want = {
      ref, ref.flip({2}), ref.flip({1, 2}), ref.flip({1}), ref.transpose(1, 2), torch::rot90(ref, -1, {1, 2}),
      ref.transpose(1, 2).flip({1, 2}), torch::rot90(ref, 1, {1, 2})};
  for (int o = 1; o <= 8; ++o)
    for (bool big : {false, true}) {
      write_bytes(root.file("c/o.jpg"), with_orientation(plain, o, big));
      const bool swap = o >= 5;
      const auto got = decode_image_file(root.file("c/o.jpg"), swap ? w : h, swap ? h : w, 3);
      EXPECT_TRUE(torch::equal(got, want[o - 1].contiguous())) << "orientation " << o << (big ? " MM" : " II");
    }
  // A tag after the first segment and a padding byte (which stb skips) is found as well.
  ASSERT_TRUE(plain[2] == 0xFF && plain[3] == 0xE0);  // stb writes its JFIF APP0 first
  const size_t app0_end = 4 + (size_t{plain[4]} << 8 | plain[5]);
  std::vector<unsigned char> later = with_orientation(plain, 8, true);
  const std::vector<unsigned char> exif(later.begin() + 2, later.end() - static_cast<long>(plain.size() - 2));
  later.assign(plain.begin(), plain.begin() + static_cast<long>(app0_end));
  later.push_back(0x00);
  later.insert(later.end(), exif.begin(), exif.end());
  later.insert(later.end(), plain.begin() + static_cast<long>(app0_end), plain.end());
  write_bytes(root.file("c/o.jpg"), later);
  EXPECT_TRUE(torch::equal(decode_image_file(root.file("c/o.jpg"), w, h, 3), want[7].contiguous()));
  // Folders decode through the same path.
  write_bytes(root.file("c/plain.jpg"), with_orientation(plain, 6, false));
  EXPECT_TRUE(torch::equal(read_image_folder(root.path().string(), w, h, 3).images[1], want[5].contiguous()));
}

// A small file whose header claims a huge image is refused before any pixel is allocated.
TEST(ImageFolder, HugeImageHeaderIsRefusedBeforeDecoding) {
  TempDir root;
  write_png(root.file("small.png"), pattern(4, 4, 1, 0), 4, 4, 1);
  const std::string png = moev::test::bytes_of(root.file("small.png"));
  // The PNG with IHDR's width and height (bytes 16..23) set to side x side, its CRC fixed up.
  auto claiming = [&](uint32_t side, const std::string& name) {
    std::string p = png;
    for (int i = 0; i < 2; ++i)
      for (int b = 0; b < 4; ++b) p[16 + 4 * i + b] = static_cast<char>((side >> (24 - 8 * b)) & 255);
    const uLong crc = crc32(crc32(0L, Z_NULL, 0), reinterpret_cast<const Bytef*>(p.data() + 12), 17);
    for (int i = 0; i < 4; ++i) p[29 + i] = static_cast<char>((crc >> (24 - 8 * i)) & 255);
    write_bytes(root.file(name), std::vector<unsigned char>(p.begin(), p.end()));
    return root.file(name);
  };
  const auto big = claiming(20000, "big.png");
  expect_error([&] { decode_image_file(big, 28, 28, 1); }, {big, "20000x20000", "pixels"});
  // 100000 x 100000: a header stb refuses itself ("too large"), named with moev's limit.
  const auto huge = claiming(100000, "huge.png");
  expect_error([&] { decode_image_file(huge, 28, 28, 1); },
               {huge, "its header claims an image too large to decode", "268435456 pixels"});
}

// stb_image skips PNG chunk CRCs; a flipped pixel byte must not decode at exit 0.
TEST(ImageFolder, DamagedOrCutPngIsAnErrorNamingIt) {
  TempDir root;
  fs::create_directories(root.path() / "c");
  write_png(root.file("c/a.png"), pattern(8, 8, 3, 1), 8, 8, 3);
  const std::string bytes = moev::test::bytes_of(root.file("c/a.png"));
  const std::vector<unsigned char> png(bytes.begin(), bytes.end());
  ASSERT_EQ(decode_image_file(root.file("c/a.png"), 8, 8, 3).numel(), 192);
  write_bytes(root.file("c/ok.png"), png);

  const size_t idat = bytes.find("IDAT");
  ASSERT_NE(idat, std::string::npos);
  auto flipped = png;
  flipped[idat + 6] ^= 0x10;
  write_bytes(root.file("c/a.png"), flipped);
  expect_error([&] { decode_image_file(root.file("c/a.png"), 8, 8, 3); },
               {root.file("c/a.png"), "'IDAT'", "CRC-32", "damaged"});
  expect_error([&] { read_image_folder(root.path().string(), 8, 8, 3); }, {root.file("c/a.png"), "CRC-32"});

  // A damaged ancillary chunk (here a tEXt with a wrong CRC) leaves the pixels intact, as for libpng.
  std::vector<unsigned char> text = png;
  const unsigned char chunk[] = {0, 0, 0, 1, 't', 'E', 'X', 't', 'x', 0xDE, 0xAD, 0xBE, 0xEF};
  text.insert(text.begin() + static_cast<long>(idat) - 4, std::begin(chunk), std::end(chunk));
  write_bytes(root.file("c/a.png"), text);
  EXPECT_EQ(decode_image_file(root.file("c/a.png"), 8, 8, 3).sum().item<int64_t>(),
            decode_image_file(root.file("c/ok.png"), 8, 8, 3).sum().item<int64_t>());
  write_bytes(root.file("c/a.png"), std::vector<unsigned char>(png.begin(), png.end() - 12));  // IEND gone
  expect_error([&] { decode_image_file(root.file("c/a.png"), 8, 8, 3); }, {root.file("c/a.png"), "without an IEND"});
  write_bytes(root.file("c/a.png"), std::vector<unsigned char>(png.begin(), png.begin() + idat + 10));
  expect_error([&] { decode_image_file(root.file("c/a.png"), 8, 8, 3); },
               {root.file("c/a.png"), "'IDAT'", "past the end"});
}

// stb decodes a cut-short JPEG, GIF, BMP, TGA or PGM/PPM at exit 0, the
// missing pixels zeros or memory never written (other values every run); a
// width of 0 reached the resizer's assertion (abort). Each complete file
// decodes; each cut, in its header or its pixels, is an error naming it.
TEST(ImageFolder, CutShortOrZeroWidthImagesAreErrorsNamingThem) {
  TempDir root;
  using Bytes = std::vector<unsigned char>;
  auto bytes_of = [&](const std::string& path) {
    const std::string s = moev::test::bytes_of(path);
    return Bytes(s.begin(), s.end());
  };
  const auto px = pattern(6, 7, 3, 2);
  std::map<std::string, Bytes> files;  // name -> a complete file
  const std::string dir = root.path().string();
  ASSERT_EQ(stbi_write_jpg(root.file("a.jpg").c_str(), 7, 6, 3, px.data(), 90), 1);
  ASSERT_EQ(stbi_write_bmp(root.file("a.bmp").c_str(), 7, 6, 3, px.data()), 1);
  stbi_write_tga_with_rle = 1;
  ASSERT_EQ(stbi_write_tga(root.file("rle.tga").c_str(), 7, 6, 3, px.data()), 1);
  stbi_write_tga_with_rle = 0;
  ASSERT_EQ(stbi_write_tga(root.file("raw.tga").c_str(), 7, 6, 3, px.data()), 1);
  stbi_write_tga_with_rle = 1;
  for (const char* name : {"a.jpg", "a.bmp", "rle.tga", "raw.tga"}) files[name] = bytes_of(root.file(name));
  auto pnm = [](const std::string& header, size_t pixel_bytes) {
    Bytes b(header.begin(), header.end());
    for (size_t i = 0; i < pixel_bytes; ++i) b.push_back(static_cast<unsigned char>(i * 7));
    return b;
  };
  files["a.pgm"] = pnm("P5\n# a comment\n7 6\n255\n", 42);
  files["a.ppm"] = pnm("P6 7 6 65535\n", 7 * 6 * 3 * 2);
  // 1x1, one colour table of two entries, a graphic control extension, one frame.
  files["a.gif"] = {'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0, 0x80, 0, 0, 255, 255, 255, 0, 0, 0,
                    0x21, 0xF9, 4, 1, 0, 0, 0, 0, 0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0, 2, 2, 0x44, 1, 0, 0x3B};
  for (const auto& [name, bytes] : files) {
    SCOPED_TRACE(name);
    const std::string path = root.file(name);
    write_bytes(path, bytes);
    const auto whole = decode_image_file(path, 6, 7, 3);
    EXPECT_EQ(decode_image_file(path, 6, 7, 3).equal(whole), true);  // the same pixels every time
    // Past what stb reads: the GIF's trailer, the BMP's last row's padding (7 x 3 bytes padded to 24).
    const size_t trailer = name == "a.gif" ? 1 : name == "a.bmp" ? 3 : 0;
    for (size_t keep : {bytes.size() - trailer - 1, bytes.size() / 2, size_t{20}}) {
      write_bytes(path, Bytes(bytes.begin(), bytes.begin() + static_cast<long>(keep)));
      expect_error([&] { decode_image_file(path, 6, 7, 3); }, {path, "cut short"});
    }
  }
  // What stb reads and the checks must too: a byte of padding after a JPEG segment, a BMP without its last
  // row's padding (7 x 3 bytes: 3 bytes short), a PGM comment ended by a carriage return.
  auto jpeg = files["a.jpg"];
  jpeg.insert(jpeg.begin() + 4 + (jpeg[4] << 8 | jpeg[5]), 0x00);
  write_bytes(root.file("pad.jpg"), jpeg);
  write_bytes(root.file("whole.jpg"), files["a.jpg"]);  // a.jpg is cut short by now
  EXPECT_TRUE(decode_image_file(root.file("pad.jpg"), 6, 7, 3)
                  .equal(decode_image_file(root.file("whole.jpg"), 6, 7, 3)));
  const auto& full_bmp = files["a.bmp"];
  write_bytes(root.file("short_pad.bmp"), Bytes(full_bmp.begin(), full_bmp.end() - 3));
  EXPECT_EQ(decode_image_file(root.file("short_pad.bmp"), 6, 7, 3).numel(), 126);
  write_bytes(root.file("cr.pgm"), pnm("P5\r# c\r7 6\r255\r", 42));
  EXPECT_EQ(decode_image_file(root.file("cr.pgm"), 6, 7, 3).numel(), 126);
  // A width of 0, and a header that is not a number.
  write_bytes(root.file("w0.pgm"), pnm("P5\n0 6\n255\n", 42));
  expect_error([&] { decode_image_file(root.file("w0.pgm"), 6, 7, 3); }, {root.file("w0.pgm"), "0x6", "at least 1"});
  write_bytes(root.file("m0.pgm"), pnm("P5\n7 6\n0\n", 42));
  expect_error([&] { decode_image_file(root.file("m0.pgm"), 6, 7, 3); }, {root.file("m0.pgm"), "maximum value of 0"});
  write_bytes(root.file("ab.pgm"), pnm("P5\nab cd\n255\n", 42));
  expect_error([&] { decode_image_file(root.file("ab.pgm"), 6, 7, 3); }, {root.file("ab.pgm"), "expected a number"});
  auto bmp = files["a.bmp"];
  std::fill(bmp.begin() + 18, bmp.begin() + 22, 0);  // biWidth
  write_bytes(root.file("w0.bmp"), bmp);
  expect_error([&] { decode_image_file(root.file("w0.bmp"), 6, 7, 3); }, {root.file("w0.bmp"), "0x6", "at least 1"});
  // In a folder, the whole read fails naming the file (it aborted the process).
  fs::create_directories(root.path() / "f" / "c");
  write_bytes(root.file("f/c/ok.ppm"), files["a.ppm"]);
  write_bytes(root.file("f/c/w0.pgm"), pnm("P5\n0 6\n255\n", 42));
  expect_error([&] { read_image_folder(root.file("f"), 6, 7, 3); }, {root.file("f/c/w0.pgm"), "at least 1"});
}

// A PGM/PPM's samples run from 0 to its maximum value: stb passed them on as written, so a 4-bit image read as
// a dark one and a 10-bit camera's frame as a nearly black one. 255 and 65535 were right and stay so.
TEST(ImageFolder, PgmSamplesAreScaledByTheirMaximumValue) {
  TempDir root;
  auto pgm = [&](const std::string& name, int64_t maxval, const std::vector<int>& samples) {
    std::string head = "P5\n" + std::to_string(samples.size()) + " 1\n" + std::to_string(maxval) + "\n";
    std::vector<unsigned char> b(head.begin(), head.end());
    for (int v : samples) {
      if (maxval > 255) b.push_back(static_cast<unsigned char>(v >> 8));  // big-endian, as Netpbm writes
      b.push_back(static_cast<unsigned char>(v & 0xFF));
    }
    write_bytes(root.file(name), b);
    return decode_image_file(root.file(name), 1, static_cast<int64_t>(samples.size()), 1).flatten();
  };
  auto bytes = [](std::vector<int64_t> v) { return torch::tensor(v, torch::kInt64).to(torch::kUInt8); };
  EXPECT_TRUE(torch::equal(pgm("m15.pgm", 15, {0, 1, 7, 15}), bytes({0, 17, 119, 255})));
  EXPECT_TRUE(torch::equal(pgm("m1023.pgm", 1023, {0, 512, 1023, 4}), bytes({0, 128, 255, 1})));
  EXPECT_TRUE(torch::equal(pgm("m255.pgm", 255, {0, 3, 200, 255}), bytes({0, 3, 200, 255})));
  // 16-bit samples are big-endian: stb read them in the machine's order, 0x00FF as 255 and 0x0100 as 0.
  EXPECT_TRUE(torch::equal(pgm("m65535.pgm", 65535, {0, 257 * 3, 65535, 0x00FF, 0x0100}), bytes({0, 3, 255, 1, 1})));
  // A PPM's colours, as RGB and as grey (stb's weights 77, 150, 29 out of 256, as for 8-bit files).
  write_bytes(root.file("rgb.ppm"), {'P', '6', '\n', '1', ' ', '1', '\n', '1', '5', '\n', 15, 0, 5});
  EXPECT_TRUE(torch::equal(decode_image_file(root.file("rgb.ppm"), 1, 1, 3).flatten(), bytes({255, 0, 85})));
  EXPECT_TRUE(torch::equal(decode_image_file(root.file("rgb.ppm"), 1, 1, 1).flatten(),
                           bytes({(255 * 77 + 85 * 29) >> 8})));
  // A side past 2^32 wrapped to a small one in stb's ints, which the scaling then read past the file with.
  write_bytes(root.file("wrap.pgm"), {'P', '5', '\n', '4', '2', '9', '4', '9', '8', '3', '6', '8', '0', ' ', '1', '6',
                                      '3', '8', '4', '\n', '1', '0', '2', '3', '\n'});
  expect_error([&] { decode_image_file(root.file("wrap.pgm"), 1, 1, 1); }, {"wrap.pgm", "4294983680x16384", "above"});
  // A sample above the maximum (a broken writer's) is refused, naming it: it was read as the maximum.
  expect_error([&] { pgm("over.pgm", 15, {15, 200}); }, {"over.pgm", "sample 1 is 200", "above the maximum value 15"});
}

// stb reads only the binary grey and colour kinds (P5, P6); plain text (P1-P3) and bitmaps (P1, P4) were
// "unknown image type". Each decodes as its binary twin does.
TEST(ImageFolder, PlainAndBitmapNetpbmDecodeAsTheirBinaryTwins) {
  TempDir root;
  auto text = [&](const std::string& name, const std::string& body) {
    write_bytes(root.file(name), std::vector<unsigned char>(body.begin(), body.end()));
    return root.file(name);
  };
  auto bytes = [](std::vector<int64_t> v) { return torch::tensor(v, torch::kInt64).to(torch::kUInt8); };
  auto grey = [](const std::string& path, int64_t h, int64_t w) { return decode_image_file(path, h, w, 1).flatten(); };
  EXPECT_TRUE(torch::equal(grey(text("a.pgm", "P2\n# a comment\n4 1\n15\n0 1\n7 # another\n 15\n"), 1, 4),
                           bytes({0, 17, 119, 255})));
  write_bytes(root.file("b.pgm"), {'P', '5', '\n', '4', ' ', '1', '\n', '1', '5', '\n', 0, 1, 7, 15});
  EXPECT_TRUE(torch::equal(grey(root.file("b.pgm"), 1, 4), bytes({0, 17, 119, 255})));
  // 16-bit plain samples are plain numbers; a colour's grey has stb's weights, as the binary kind's.
  EXPECT_TRUE(torch::equal(grey(text("w.pgm", "P2 2 1 65535 65535 771"), 1, 2), bytes({255, 3})));
  const std::string ppm = text("c.ppm", "P3 1 1 15\n15 0 5\n");
  EXPECT_TRUE(torch::equal(decode_image_file(ppm, 1, 1, 3).flatten(), bytes({255, 0, 85})));
  EXPECT_TRUE(torch::equal(grey(ppm, 1, 1), bytes({(255 * 77 + 85 * 29) >> 8})));
  // Bitmaps: 1 is black. A plain one's digits need no space between them; a binary one packs each row of 10
  // pixels into 2 bytes, first pixel in the high bit, the rest of the second byte padding.
  const auto bits = bytes({0, 255, 0, 0, 255, 255, 255, 255, 255, 255, 255, 0, 255, 255, 255, 255, 255, 255, 255, 0});
  EXPECT_TRUE(torch::equal(grey(text("a.pbm", "P1\n10 2\n1011000000\n0 1 0 0 0 0 0 0 0 1\n"), 2, 10), bits));
  write_bytes(root.file("b.pbm"), {'P', '4', '\n', '1', '0', ' ', '2', '\n', 0xB0, 0x3F, 0x40, 0x40});
  EXPECT_TRUE(torch::equal(grey(root.file("b.pbm"), 2, 10), bits));
  EXPECT_TRUE(torch::equal(decode_image_file(root.file("b.pbm"), 2, 10, 3), grey(root.file("b.pbm"), 2, 10)
                                                                                .reshape({1, 2, 10})
                                                                                .expand({3, 2, 10})));
  // Short, damaged and unread kinds are errors naming the file.
  const std::string short_pgm = text("s.pgm", "P2 2 2 255 1 2 3\n");
  expect_error([&] { grey(short_pgm, 2, 2); }, {short_pgm, "cut short", "3 of the 4 samples"});
  const std::string short_pbm = text("s.pbm", "P1 4 1 101");
  expect_error([&] { grey(short_pbm, 1, 4); }, {short_pbm, "cut short"});
  write_bytes(root.file("s4.pbm"), {'P', '4', ' ', '1', '0', ' ', '2', '\n', 0xB0, 0x3F, 0x40});
  expect_error([&] { grey(root.file("s4.pbm"), 2, 10); }, {root.file("s4.pbm"), "PBM cut short"});
  // Far too short for its header: refused before its samples are read (it filled a 0.8 GB buffer first).
  const std::string claims = text("claims.ppm", "P3 16384 16384 255 1");
  expect_error([&] { grey(claims, 1, 1); }, {claims, "PGM/PPM cut short: 20 bytes"});
  // An over-long number is refused (it was read as two samples), and a sample above the maximum is named.
  const std::string digits = text("long.pgm", "P2 2 1 255 99999999999999999999 0");
  expect_error([&] { grey(digits, 1, 2); }, {digits, "damaged at byte 11", "more digits"});
  const std::string over = text("over.pgm", "P2 2 1 255 0 256");
  expect_error([&] { grey(over, 1, 2); }, {over, "sample 1 is 256", "above the maximum value 255"});
  const std::string two = text("two.pbm", "P1 2 1 12");
  expect_error([&] { grey(two, 1, 2); }, {two, "byte 8", "expected 0 or 1"});
  const std::string letter = text("x.pgm", "P2 2 1 255 4 x");
  expect_error([&] { grey(letter, 1, 2); }, {letter, "damaged at byte 13", "expected a number"});
  const std::string pam = text("a.pam", "P7\nWIDTH 1\nHEIGHT 1\nDEPTH 1\nMAXVAL 255\nENDHDR\n\x01");
  expect_error([&] { grey(pam, 1, 1); }, {pam, "PAM (P7)", "P1-P6"});
  // A folder takes .pbm files.
  fs::create_directories(root.path() / "f" / "c");
  fs::copy_file(root.file("b.pbm"), root.path() / "f" / "c" / "b.pbm");
  EXPECT_TRUE(torch::equal(read_image_folder(root.file("f"), 2, 10, 1).images.flatten(), bits));
}

// A stop asked while a folder decodes (minutes for a large one) ends the reading, saying how far it got.
TEST(ImageFolder, AStopEndsTheDecodingWithStopped) {
  TempDir root;
  fs::create_directories(root.path() / "c");
  for (int i = 0; i < 3; ++i) write_png(root.file("c/" + std::to_string(i) + ".png"), pattern(4, 4, 1, i), 4, 4, 1);
  std::atomic<bool> stop{false};
  ReadOptions ro;
  ro.stop = &stop;
  EXPECT_EQ(read_image_folder(root.file(""), 4, 4, 1, ro).size(), 3);
  stop = true;
  try {
    read_image_folder(root.file(""), 4, 4, 1, ro);
    ADD_FAILURE() << "no moev::Stopped";
  } catch (const moev::Stopped& e) {
    EXPECT_NE(std::string(e.what()).find("stopped while reading image folder " + root.file("") + " (0 of 3 images"),
              std::string::npos) << e.what();
  }
}

// Transparency is reported where some pixel has it, whatever the format: stb's channel count said 4 for every
// GIF, and an opaque RGBA PNG has nothing to drop. Colour is what the file stores, for a grey model's note.
TEST(ImageFolder, SourceSizeSaysWhetherTransparencyOrColourWasDropped) {
  TempDir root;
  auto rgba = pattern(3, 5, 4, 1);
  const auto rgb = pattern(3, 5, 3, 2), grey = pattern(3, 5, 1, 3);
  write_png(root.file("rgba.png"), rgba, 3, 5, 4);
  ASSERT_EQ(stbi_write_tga(root.file("rgba.tga").c_str(), 5, 3, 4, rgba.data()), 1);
  for (size_t i = 3; i < rgba.size(); i += 4) rgba[i] = 255;
  write_png(root.file("opaque.png"), rgba, 3, 5, 4);
  write_png(root.file("rgb.png"), rgb, 3, 5, 3);
  write_png(root.file("grey.png"), grey, 3, 5, 1);
  // 1x1, a colour table of two entries, a graphic control extension (transparent index 0, or none), one frame
  // of index 0.
  auto gif = [&](const std::string& name, unsigned char flags, unsigned char red = 255) {
    write_bytes(root.file(name), {'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0, 0x80, 0, 0, red, 255, 255, 0, 0, 0, 0x21,
                                  0xF9, 4, flags, 0, 0, 0, 0, 0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0, 2, 2, 0x44, 1, 0, 0x3B});
  };
  gif("opaque.gif", 0);
  gif("clear.gif", 1);
  gif("cyan.gif", 0, 0);  // a colour table of cyan and black
  auto look = [&](const std::string& name) {
    SourceSize size;
    decode_image_file(root.file(name), 4, 4, 3, Fit::kStretch, &size, /*look_for_alpha=*/true);
    EXPECT_EQ(size.width, name.find(".gif") != std::string::npos ? 1 : 5) << name;
    return size;
  };
  EXPECT_TRUE(look("rgba.png").alpha);
  EXPECT_TRUE(look("rgba.tga").alpha);
  EXPECT_TRUE(look("clear.gif").alpha);
  for (const char* name : {"opaque.png", "rgb.png", "grey.png", "opaque.gif"}) EXPECT_FALSE(look(name).alpha) << name;
  EXPECT_TRUE(look("rgb.png").colour);
  EXPECT_FALSE(look("grey.png").colour);
  // A GIF is grey or colour by its colour table (stb says 4 channels for each).
  EXPECT_FALSE(look("opaque.gif").colour);
  EXPECT_TRUE(look("cyan.gif").colour);
  // A folder read with one channel counts its colour images; with three there is nothing to say.
  fs::create_directories(root.path() / "f" / "c");
  for (const char* name : {"rgb.png", "grey.png", "opaque.png", "opaque.gif"})
    fs::copy_file(root.file(name), root.path() / "f" / "c" / name);
  EXPECT_EQ(read_image_folder(root.file("f"), 4, 4, 1).colour_as_grey, 2);
  EXPECT_EQ(read_image_folder(root.file("f"), 4, 4, 3).colour_as_grey, 0);
}

// A 2x1 palette PNG (pixels: entries 0, 1) with the given two RGB entries, chunks and CRCs as a real one.
void write_palette_png(const std::string& path, std::vector<unsigned char> entries) {
  std::vector<unsigned char> out = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  auto chunk = [&](const char* type, const std::vector<unsigned char>& data) {
    const uint32_t n = static_cast<uint32_t>(data.size());
    for (int k = 3; k >= 0; --k) out.push_back(static_cast<unsigned char>(n >> (8 * k)));
    std::vector<unsigned char> body(type, type + 4);
    body.insert(body.end(), data.begin(), data.end());
    out.insert(out.end(), body.begin(), body.end());
    const uint32_t crc = static_cast<uint32_t>(crc32(0, body.data(), static_cast<uInt>(body.size())));
    for (int k = 3; k >= 0; --k) out.push_back(static_cast<unsigned char>(crc >> (8 * k)));
  };
  chunk("IHDR", {0, 0, 0, 2, 0, 0, 0, 1, 8, 3, 0, 0, 0});  // 2x1, 8 bits, colour type 3
  chunk("PLTE", entries);
  const unsigned char row[] = {0, 0, 1};  // filter none, then the indices
  std::vector<unsigned char> z(64);
  uLongf zn = z.size();
  ASSERT_EQ(compress(z.data(), &zn, row, sizeof row), Z_OK);
  z.resize(zn);
  chunk("IDAT", z);
  chunk("IEND", {});
  write_bytes(path, out);
}

// A 2x1 1-bit BMP (pixels: entries 0, 1) with the given two entries (blue, green, red each).
void write_palette_bmp(const std::string& path, const std::vector<unsigned char>& bgr) {
  std::vector<unsigned char> b = {'B', 'M', 66, 0, 0, 0, 0, 0, 0, 0, 62, 0, 0, 0,  // file size 66, pixels at 62
                                  40, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 1, 0, 1, 0,  // 2x1, 1 plane, 1 bit
                                  0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0};
  for (int e = 0; e < 2; ++e) {
    b.insert(b.end(), bgr.begin() + 3 * e, bgr.begin() + 3 * e + 3);
    b.push_back(0);
  }
  for (unsigned char v : {0x40, 0, 0, 0}) b.push_back(v);  // the row: 0 then 1, padded to 4 bytes
  write_bytes(path, b);
}

// A palette of grey entries is no colour, in PNG and BMP as in GIF: a grey model's note counted such files as
// colour read as grey. A GIF's transparent pixels are its table's colour at the transparent index, as PIL reads
// them (stb left them black).
TEST(ImageFolder, GreyPalettesAreGreyAndTransparentGifPixelsKeepTheirColour) {
  TempDir root;
  write_palette_png(root.file("grey.png"), {0, 0, 0, 200, 200, 200});
  write_palette_png(root.file("red.png"), {0, 0, 0, 200, 0, 0});
  write_palette_bmp(root.file("grey.bmp"), {0, 0, 0, 255, 255, 255});
  write_palette_bmp(root.file("red.bmp"), {0, 0, 0, 0, 0, 255});
  auto look = [&](const std::string& name, int channels) {
    SourceSize size;
    auto image = decode_image_file(root.file(name), 1, 2, channels, Fit::kStretch, &size);
    return std::make_pair(size, image);
  };
  EXPECT_FALSE(look("grey.png", 1).first.colour);
  EXPECT_FALSE(look("grey.bmp", 1).first.colour);
  EXPECT_TRUE(look("red.png", 1).first.colour);
  EXPECT_TRUE(look("red.bmp", 1).first.colour);
  // The pixels themselves: entry 0 then entry 1.
  EXPECT_TRUE(torch::equal(look("grey.png", 1).second.view(-1), torch::tensor({0, 200}, torch::kUInt8)));
  EXPECT_TRUE(torch::equal(look("red.bmp", 3).second.view(-1), torch::tensor({0, 255, 0, 0, 0, 0}, torch::kUInt8)));
  // 1x1 GIFs of index 0 with a table of (r, 255, 255) and black; index 0 transparent or not.
  auto gif = [&](const std::string& name, unsigned char flags, unsigned char red) {
    write_bytes(root.file(name), {'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0, 0x80, 0, 0, red, 255, 255, 0, 0, 0, 0x21,
                                  0xF9, 4, flags, 0, 0, 0, 0, 0x2C, 0, 0, 0, 0, 1, 0, 1, 0, 0, 2, 2, 0x44, 1, 0, 0x3B});
  };
  gif("cyan_clear.gif", 1, 0);
  gif("cyan.gif", 0, 0);
  for (const char* name : {"cyan_clear.gif", "cyan.gif"}) {
    EXPECT_TRUE(torch::equal(look(name, 3).second.view(-1), torch::tensor({0, 0, 255, 255, 255, 255}, torch::kUInt8)))
        << name << " " << look(name, 3).second;
    // Grey with stb's weights: (0 * 77 + 255 * 150 + 255 * 29) >> 8.
    EXPECT_TRUE(torch::equal(look(name, 1).second.view(-1), torch::tensor({178, 178}, torch::kUInt8)))
        << name << " " << look(name, 1).second;
  }
}

// A run-length coded BMP (RLE8 at 8 bits, RLE4 at 4): headers, a grey palette of `entries` colours (entry i is
// grey `step` * i), then `codes` as they are.
std::vector<unsigned char> rle_bmp(int bpp, int w, int h, int entries, int step, const std::vector<unsigned char>& codes) {
  auto le32 = [](std::vector<unsigned char>& b, uint32_t v) {
    for (int i = 0; i < 4; ++i) b.push_back(static_cast<unsigned char>(v >> (8 * i)));
  };
  const uint32_t offset = 14 + 40 + 4 * entries;
  std::vector<unsigned char> b = {'B', 'M'};
  le32(b, offset + codes.size());
  le32(b, 0);
  le32(b, offset);
  le32(b, 40);
  le32(b, w);
  le32(b, h);
  b.insert(b.end(), {1, 0, static_cast<unsigned char>(bpp), 0});
  le32(b, bpp == 8 ? 1 : 2);  // BI_RLE8, BI_RLE4
  le32(b, codes.size());
  le32(b, 2835);
  le32(b, 2835);
  le32(b, entries);
  le32(b, 0);
  for (int e = 0; e < entries; ++e) b.insert(b.end(), {static_cast<unsigned char>(step * e),
                                                       static_cast<unsigned char>(step * e),
                                                       static_cast<unsigned char>(step * e), 0});
  b.insert(b.end(), codes.begin(), codes.end());
  return b;
}

// ImageMagick writes palette BMPs run-length coded by default, which stb refuses ("BMP RLE"). Known answers for
// each kind of code: runs, pixels stored as they are (padded to an even byte count), a move, ends of line and of
// the bitmap, and the pixels they skip (index 0).
TEST(ImageFolder, RunLengthCodedBmpsAreRead) {
  TempDir root;
  // 6x3, rows bottom-up: [run 3 of 2][as stored 4 5 6, padded][EOL] / [run 2 of 7][move 3 right][run 1 of 1][EOL] /
  // [end]: the top row never drawn.
  write_bytes(root.file("rle8.bmp"), rle_bmp(8, 6, 3, 8, 30, {3, 2, 0, 3, 4, 5, 6, 0, 0, 0, 2, 7, 0, 2, 3, 0, 1, 1,
                                                             0, 0, 0, 1}));
  auto rle8 = decode_image_file(root.file("rle8.bmp"), 3, 6, 1, Fit::kStretch);
  const std::vector<int> top_down8 = {0, 0, 0, 0, 0, 0, 7, 7, 0, 0, 0, 1, 2, 2, 2, 4, 5, 6};
  std::vector<uint8_t> want8;
  for (int i : top_down8) want8.push_back(static_cast<uint8_t>(30 * i));
  EXPECT_TRUE(torch::equal(rle8.view(-1), torch::tensor(want8, torch::kUInt8))) << rle8;
  // 5x2 at 4 bits: [run 5 alternating 1, 2][EOL] / [3 as stored: 3 4 5][run 2 of 15, 0][end].
  write_bytes(root.file("rle4.bmp"), rle_bmp(4, 5, 2, 16, 16, {5, 0x12, 0, 0, 0, 3, 0x34, 0x50, 2, 0xF0, 0, 1}));
  auto rle4 = decode_image_file(root.file("rle4.bmp"), 2, 5, 1, Fit::kStretch);
  const std::vector<int> top_down4 = {3, 4, 5, 15, 0, 1, 2, 1, 2, 1};
  std::vector<uint8_t> want4;
  for (int i : top_down4) want4.push_back(static_cast<uint8_t>(16 * i));
  EXPECT_TRUE(torch::equal(rle4.view(-1), torch::tensor(want4, torch::kUInt8))) << rle4;
  // In colour too, and grey palettes are no colour.
  SourceSize size;
  auto rgb = decode_image_file(root.file("rle8.bmp"), 3, 6, 3, Fit::kStretch, &size);
  EXPECT_FALSE(size.colour);
  EXPECT_TRUE(torch::equal(rgb[0], rle8[0]) && torch::equal(rgb[2], rle8[0]));
  // Cut short before the end-of-bitmap code, or an index outside the palette: named, not read as black.
  write_bytes(root.file("cut.bmp"), rle_bmp(8, 6, 3, 8, 30, {3, 2, 0, 3, 4, 5}));
  expect_error([&] { decode_image_file(root.file("cut.bmp"), 3, 6, 1, Fit::kStretch); },
               {"cut.bmp", "cut short", "run-length coded pixels"});
  write_bytes(root.file("index.bmp"), rle_bmp(8, 6, 3, 8, 30, {3, 9, 0, 1}));
  expect_error([&] { decode_image_file(root.file("index.bmp"), 3, 6, 1, Fit::kStretch); },
               {"index.bmp", "palette index 9", "palette of 8 colours"});
}

// stb read a 4-component JPEG without Adobe's segment as YCbCr, dropping the fourth: wrong colours at exit 0.
TEST(ImageFolder, AFourComponentJpegWithoutAdobesSegmentIsRefused) {
  TempDir root;
  // SOI, a baseline frame header of 4 components (1x1), SOS, EOI: refused before stb decodes anything.
  write_bytes(root.file("cmyk.jpg"), {0xFF, 0xD8, 0xFF, 0xC0, 0, 20, 8, 0, 1, 0, 1, 4, 1, 0x11, 0, 2, 0x11, 0, 3,
                                      0x11, 0, 4, 0x11, 0, 0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 63, 0, 0, 0xFF, 0xD9});
  expect_error([&] { decode_image_file(root.file("cmyk.jpg"), 1, 1, 3, Fit::kStretch); },
               {root.file("cmyk.jpg"), "JPEG of 4 colour components without an Adobe segment"});
}

// Windows's thumbnail caches and folder settings in a class folder are passed over, as .DS_Store is.
TEST(ImageFolder, WindowsFolderFilesArePassedOver) {
  TempDir root;
  fs::create_directories(root.path() / "c");
  write_png(root.file("c/a.png"), pattern(4, 5, 3, 1), 4, 5, 3);
  for (const char* name : {"c/Thumbs.db", "c/desktop.ini", "c/ehthumbs.db"}) write_bytes(root.file(name), {1, 2});
  EXPECT_EQ(read_image_folder(root.path().string(), 4, 4, 3).size(), 1);
  write_bytes(root.file("c/notes.txt"), {1});
  expect_error([&] { read_image_folder(root.path().string(), 4, 4, 3); }, {"notes.txt", "is not an image file"});
}

// A folder too large to hold decoded is refused before its images are allocated, naming what would fit.
TEST(ImageFolder, ADataSetLargerThanMemoryIsRefusedUpFront) {
  check_decoded_fit("image folder f", 1000, 3, 224, 224);  // 0.15 GB
  expect_error([] { check_decoded_fit("image folder f", 2000000, 3, 224, 224); },
               {"image folder f", "2000000 images decoded at 3x224x224 need 301.1 GB", "smaller model.image_size"});
  // A test set that fits alone, but not beside the training set read before it.
  const double ram = moev::physical_memory_bytes();
  check_decoded_fit("image folder t", 1000, 1, 100, 100, 0.5 * ram);
  expect_error([&] { check_decoded_fit("image folder t", int64_t(0.4 * ram / 1e4), 1, 100, 100, 0.5 * ram); },
               {"image folder t", "GB beside the", "GB of images read before"});
}

TEST(ImageFolder, BadArgumentsAndEmptyFolders) {
  TempDir root;
  expect_error([&] { read_image_folder(root.path().string(), 4, 4, 1); },
               {root.path().string(), "no class"});
  fs::create_directories(root.path() / "empty");
  expect_error([&] { read_image_folder(root.path().string(), 4, 4, 1); },
               {root.file("empty"), "no images"});
  expect_error([&] { read_image_folder(root.file("missing"), 4, 4, 1); }, {root.file("missing")});
  expect_error([&] { read_image_folder(root.path().string(), 4, 4, 2); }, {"channels 2"});
  expect_error([&] { decode_image_file(root.file("none.png"), 4, 4, 3); }, {root.file("none.png")});
}

TEST(ImageFolder, ManyFilesDecodeInOrderAcrossThreads) {
  TempDir root;
  fs::create_directories(root.path() / "c");
  // Enough files for several decoding threads; each image is filled with its index.
  for (int i = 0; i < 300; ++i) {
    char name[32];
    std::snprintf(name, sizeof name, "c/%04d.png", i);
    write_png(root.file(name), std::vector<unsigned char>(9, static_cast<unsigned char>(i % 256)),
              3, 3, 1);
  }
  const ImageSet set = read_image_folder(root.path().string(), 3, 3, 1);
  ASSERT_EQ(set.size(), 300);
  for (int i = 0; i < 300; ++i) {
    ASSERT_EQ(set.images[i][0][1][1].item<uint8_t>(), i % 256) << i;
  }
}

}  // namespace
}  // namespace moev::data
