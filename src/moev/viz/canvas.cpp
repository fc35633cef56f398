#include "moev/viz/canvas.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include <stb/stb_easy_font.h>

#include "moev/core/error.h"
#include "moev/io/table.h"

namespace moev::viz {

Rgb palette(int i) {
  static const Rgb kColours[] = {{31, 119, 180}, {214, 39, 40},  {44, 160, 44},  {255, 127, 14},
                                 {148, 103, 189}, {140, 86, 75}, {227, 119, 194}, {23, 190, 207}};
  return kColours[((i % 8) + 8) % 8];
}

Rgb colormap(double t) {
  // Piecewise-linear through a few stops of a viridis-like ramp.
  static const double kStops[][3] = {{68, 1, 84},     {59, 82, 139},  {33, 145, 140},
                                     {94, 201, 98},   {253, 231, 37}};
  t = std::clamp(std::isfinite(t) ? t : 0.0, 0.0, 1.0) * 4.0;
  const int i = std::min(3, static_cast<int>(t));
  const double f = t - i;
  auto mix = [&](int ch) {
    return static_cast<uint8_t>(std::lround(kStops[i][ch] * (1 - f) + kStops[i + 1][ch] * f));
  };
  return {mix(0), mix(1), mix(2)};
}

Canvas::Canvas(int width, int height, Rgb bg) : w_(width), h_(height) {
  MOEV_CHECK(width > 0 && height > 0 && width <= 16384 && height <= 16384, "canvas size ", width,
             "x", height, ": expected 1..16384 on each side");
  rgb_.resize(static_cast<size_t>(w_) * h_ * 3);
  for (size_t i = 0; i < rgb_.size(); i += 3) {
    rgb_[i] = bg.r;
    rgb_[i + 1] = bg.g;
    rgb_[i + 2] = bg.b;
  }
}

void Canvas::put(int x, int y, Rgb c) {
  if (x < 0 || y < 0 || x >= w_ || y >= h_) return;
  uint8_t* p = &rgb_[(static_cast<size_t>(y) * w_ + x) * 3];
  p[0] = c.r;
  p[1] = c.g;
  p[2] = c.b;
}

Rgb Canvas::at(int x, int y) const {
  MOEV_CHECK(x >= 0 && y >= 0 && x < w_ && y < h_, "pixel (", x, ", ", y, ") outside the canvas");
  const uint8_t* p = &rgb_[(static_cast<size_t>(y) * w_ + x) * 3];
  return {p[0], p[1], p[2]};
}

void Canvas::fill_rect(int x0, int y0, int x1, int y1, Rgb c) {
  x0 = std::max(x0, 0);
  y0 = std::max(y0, 0);
  x1 = std::min(x1, w_);
  y1 = std::min(y1, h_);
  for (int y = y0; y < y1; ++y)
    for (int x = x0; x < x1; ++x) put(x, y, c);
}

void Canvas::rect_outline(int x0, int y0, int x1, int y1, Rgb c) {
  fill_rect(x0, y0, x1, y0 + 1, c);
  fill_rect(x0, y1 - 1, x1, y1, c);
  fill_rect(x0, y0, x0 + 1, y1, c);
  fill_rect(x1 - 1, y0, x1, y1, c);
}

void Canvas::line(double x0, double y0, double x1, double y1, Rgb c, int thickness) {
  if (!std::isfinite(x0) || !std::isfinite(y0) || !std::isfinite(x1) || !std::isfinite(y1)) return;
  // Steps of at most half a pixel along the longer axis; a square brush gives the
  // thickness.
  const double len = std::max(std::abs(x1 - x0), std::abs(y1 - y0));
  const int steps = std::max(1, static_cast<int>(std::ceil(len * 2)));
  const int lo = -(thickness - 1) / 2, hi = thickness / 2;
  for (int s = 0; s <= steps; ++s) {
    const double t = static_cast<double>(s) / steps;
    const int x = static_cast<int>(std::lround(x0 + (x1 - x0) * t));
    const int y = static_cast<int>(std::lround(y0 + (y1 - y0) * t));
    for (int dy = lo; dy <= hi; ++dy)
      for (int dx = lo; dx <= hi; ++dx) put(x + dx, y + dy, c);
  }
}

void Canvas::marker(double x, double y, int radius, Rgb c) {
  if (!std::isfinite(x) || !std::isfinite(y)) return;
  const int cx = static_cast<int>(std::lround(x)), cy = static_cast<int>(std::lround(y));
  for (int dy = -radius; dy <= radius; ++dy)
    for (int dx = -radius; dx <= radius; ++dx)
      if (dx * dx + dy * dy <= radius * radius + radius) put(cx + dx, cy + dy, c);
}

namespace {
// stb_easy_font draws printable ASCII alone and indexes its glyph table by the
// byte: any other byte (a class folder named in UTF-8, "café") read outside the
// table. Each UTF-8 character, and each other byte outside 32..126, becomes one '?'.
std::string printable(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    const auto b = static_cast<unsigned char>(s[i]);
    if (b >= 32 && b <= 126) {
      out += static_cast<char>(b);
    } else if (b == '\n') {
      out += ' ';
    } else {
      out += '?';
      if (b >= 0xC0)  // a UTF-8 lead byte: its continuation bytes belong to the same '?'
        while (i + 1 < s.size() && (static_cast<unsigned char>(s[i + 1]) & 0xC0) == 0x80) ++i;
    }
  }
  return out;
}

// stb_easy_font emits quads of 4 vertices of 16 bytes and stops, without a word,
// when the buffer is full: 300 bytes a character cut glyphs of many strokes
// ("28" drew as "29", "80" as "8-"). No glyph has 32 strokes.
struct Quads {
  std::vector<char> vbuf;
  int count = 0;
};
Quads glyph_quads(const std::string& s) {
  std::string copy = printable(s);  // stb wants a mutable char*
  Quads q;
  q.vbuf.resize(32 * 64 * (copy.size() + 1));
  q.count = stb_easy_font_print(0, 0, copy.data(), nullptr, q.vbuf.data(),
                                static_cast<int>(q.vbuf.size()));
  return q;
}
}  // namespace

int Canvas::text_width(const std::string& s, int scale) {
  std::string copy = printable(s);
  return stb_easy_font_width(copy.data()) * scale;
}

int Canvas::text_height(int scale) { return 7 * scale; }

void Canvas::text(double x, double y, const std::string& s, Rgb c, int scale, bool vertical) {
  const Quads q = glyph_quads(s);
  for (int i = 0; i < q.count; ++i) {
    const float* v0 = reinterpret_cast<const float*>(q.vbuf.data() + i * 64);
    const float* v2 = reinterpret_cast<const float*>(q.vbuf.data() + i * 64 + 32);
    const double qx0 = std::min(v0[0], v2[0]) * scale, qx1 = std::max(v0[0], v2[0]) * scale;
    const double qy0 = std::min(v0[1], v2[1]) * scale, qy1 = std::max(v0[1], v2[1]) * scale;
    if (!vertical) {
      fill_rect(static_cast<int>(std::lround(x + qx0)), static_cast<int>(std::lround(y + qy0)),
                static_cast<int>(std::lround(x + qx1)), static_cast<int>(std::lround(y + qy1)), c);
    } else {
      // (dx, dy) -> (dy, -dx): text runs upwards from (x, y).
      fill_rect(static_cast<int>(std::lround(x + qy0)), static_cast<int>(std::lround(y - qx1)),
                static_cast<int>(std::lround(x + qy1)), static_cast<int>(std::lround(y - qx0)), c);
    }
  }
}

void Canvas::save_png(const std::string& path) const { io::write_png_atomic(path, rgb_.data(), w_, h_, 3); }

}  // namespace moev::viz
