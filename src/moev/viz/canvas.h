// A small RGB raster for the pictures moev writes (training curves, sweep and
// capacity plots, routing heatmaps): rectangles, lines, markers and text, saved
// as PNG with stb_image_write. Text uses stb_easy_font's segment glyphs, so no
// font file is needed on the machine. Pixel coordinates: x right, y down.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moev::viz {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
};
constexpr Rgb kWhite{255, 255, 255};
constexpr Rgb kBlack{0, 0, 0};
constexpr Rgb kGrey{150, 150, 150};
constexpr Rgb kLightGrey{225, 225, 225};

// The i-th of a set of distinct series colours (cycles after 8).
Rgb palette(int i);
// A perceptually ordered colour ramp (dark blue -> green -> yellow) for t in [0, 1].
Rgb colormap(double t);

class Canvas {
 public:
  Canvas(int width, int height, Rgb background = kWhite);
  int width() const { return w_; }
  int height() const { return h_; }

  // Pixels x0 <= x < x1, y0 <= y < y1, clipped to the canvas.
  void fill_rect(int x0, int y0, int x1, int y1, Rgb c);
  void rect_outline(int x0, int y0, int x1, int y1, Rgb c);
  void line(double x0, double y0, double x1, double y1, Rgb c, int thickness = 1);
  void marker(double x, double y, int radius, Rgb c);  // filled disc
  // Text with its top-left corner at (x, y); scale multiplies the ~6 px glyphs.
  // vertical: rotated 90 degrees counter-clockwise, reading bottom to top, with
  // (x, y) its bottom-left corner.
  void text(double x, double y, const std::string& s, Rgb c, int scale = 2, bool vertical = false);
  static int text_width(const std::string& s, int scale = 2);
  static int text_height(int scale = 2);  // above the baseline
  static int text_descent(int scale = 2) { return 2 * scale; }  // below it: the tails of g, p, q, y

  // Writes the PNG through a temporary file and a rename; throws moev::Error
  // naming the path when it cannot be written.
  void save_png(const std::string& path) const;
  Rgb at(int x, int y) const;

 private:
  void put(int x, int y, Rgb c);
  int w_, h_;
  std::vector<uint8_t> rgb_;
};

}  // namespace moev::viz
