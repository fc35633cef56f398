#include "moev/viz/plot.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>

#include "moev/core/error.h"
#include "moev/viz/canvas.h"

namespace moev::viz {

std::vector<double> nice_ticks(double lo, double hi, int target_count) {
  if (!(hi > lo)) return {lo};
  const double raw = (hi - lo) / std::max(1, target_count);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (m * mag >= raw * (1 - 1e-9)) {
      step = m * mag;
      break;
    }
  std::vector<double> t;
  // Integer multiples of the step, so 0.6 is 6 * 0.1 and not 0.2 + 0.2 + 0.2.
  for (auto i = static_cast<int64_t>(std::ceil(lo / step - 1e-9)); i * step <= hi + step * 1e-9; ++i)
    t.push_back(static_cast<double>(i) * step);
  return t;
}

std::string tick_label(double v) {
  char buf[32];
  const double a = std::abs(v);
  if (a >= 1e9) std::snprintf(buf, sizeof buf, "%gG", v / 1e9);
  else if (a >= 1e6) std::snprintf(buf, sizeof buf, "%gM", v / 1e6);
  else if (a >= 1e4) std::snprintf(buf, sizeof buf, "%gk", v / 1e3);
  else std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

namespace {

struct Range {
  double lo = std::numeric_limits<double>::infinity(), hi = -lo;
  void add(double v) {
    if (!std::isfinite(v)) return;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  void finish() {
    if (!std::isfinite(lo)) lo = 0, hi = 1;
    if (hi - lo < 1e-12 * std::max(1.0, std::abs(hi))) {
      const double pad = std::max(1e-3, std::abs(hi) * 0.05);
      lo -= pad;
      hi += pad;
    }
  }
};

}  // namespace

void write_plot(const PlotSpec& spec, const std::string& path) {
  Range xr, yr;
  for (const auto& s : spec.series) {
    MOEV_CHECK(s.x.size() == s.y.size(), "plot ", path, ": series '", s.name, "' has ", s.x.size(),
               " x values but ", s.y.size(), " y values");
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i])) continue;
      if (spec.log_x) {
        MOEV_CHECK(s.x[i] > 0, "plot ", path, ": log x axis needs x > 0, got ", s.x[i]);
        xr.add(std::log2(s.x[i]));
      } else {
        xr.add(s.x[i]);
      }
      yr.add(s.y[i]);
    }
  }
  xr.finish();
  yr.finish();
  // 5% margins inside the frame so markers do not sit on it.
  const double xpad = (xr.hi - xr.lo) * 0.05, ypad = (yr.hi - yr.lo) * 0.08;
  xr.lo -= xpad, xr.hi += xpad, yr.lo -= ypad, yr.hi += ypad;

  Canvas c(spec.width, spec.height);
  // The legend sits right of the frame, so it never hides data.
  int legend_w = 0;
  for (const auto& s : spec.series)
    if (!s.name.empty()) legend_w = std::max(legend_w, Canvas::text_width(s.name) + 40);
  // Left of the frame: the y title (turned, one text height and descent wide), then the widest tick label (0.595
  // ran into the title at a fixed 90 pixels).
  const std::vector<double> yt = nice_ticks(yr.lo, yr.hi);
  int ytick_w = 0;
  for (double t : yt) ytick_w = std::max(ytick_w, Canvas::text_width(tick_label(t)));
  const int left = std::max(90, 14 + Canvas::text_height() + Canvas::text_descent() + 10 + ytick_w + 8);
  const int right = spec.width - 30 - legend_w, top = 50, bottom = spec.height - 70;
  auto px = [&](double x) {
    const double v = spec.log_x ? std::log2(x) : x;
    return left + (v - xr.lo) / (xr.hi - xr.lo) * (right - left);
  };
  auto py = [&](double y) { return bottom - (y - yr.lo) / (yr.hi - yr.lo) * (bottom - top); };

  // Grid and ticks.
  std::vector<double> xt = spec.x_ticks;
  if (xt.empty() && spec.log_x) {
    for (double e = std::ceil(xr.lo); e <= std::floor(xr.hi); e += 1) xt.push_back(std::exp2(e));
  } else if (xt.empty()) {
    xt = nice_ticks(xr.lo, xr.hi);
  }
  for (double t : xt) {
    const double x = px(t);
    if (x < left || x > right) continue;
    c.line(x, top, x, bottom, kLightGrey);
    const std::string l = tick_label(t);
    c.text(x - Canvas::text_width(l) / 2.0, bottom + 8, l, kBlack);
  }
  for (double t : yt) {
    const double y = py(t);
    if (y < top || y > bottom) continue;
    c.line(left, y, right, y, kLightGrey);
    const std::string l = tick_label(t);
    c.text(left - 8 - Canvas::text_width(l), y - Canvas::text_height() / 2.0, l, kBlack);
  }
  c.rect_outline(left, top, right + 1, bottom + 1, kBlack);

  // Series.
  for (size_t si = 0; si < spec.series.size(); ++si) {
    const auto& s = spec.series[si];
    const Rgb col = palette(static_cast<int>(si));
    bool have_prev = false;
    double prev_x = 0, prev_y = 0;
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.y[i]) || !std::isfinite(s.x[i])) {
        have_prev = false;
        continue;
      }
      const double x = px(s.x[i]), y = py(s.y[i]);
      if (s.lines && have_prev) c.line(prev_x, prev_y, x, y, col, 2);
      if (s.markers) c.marker(x, y, 4, col);
      if (i < s.point_labels.size() && !s.point_labels[i].empty()) {
        // Above right of its point, or left of it where it would cross the frame into the legend.
        const int w = Canvas::text_width(s.point_labels[i], 1);
        const double lx = x + 7 + w > right ? x - 7 - w : x + 7;
        const double ly = y - Canvas::text_height(1) - 3 < top ? y + 6 : y - Canvas::text_height(1) - 3;
        c.text(lx, ly, s.point_labels[i], col, 1);
      }
      prev_x = x, prev_y = y, have_prev = true;
    }
  }

  // Title, axis labels, legend.
  c.text((spec.width - Canvas::text_width(spec.title)) / 2.0, 16, spec.title, kBlack);
  c.text((left + right - Canvas::text_width(spec.xlabel)) / 2.0, spec.height - 32, spec.xlabel,
         kBlack);
  c.text(14, (top + bottom + Canvas::text_width(spec.ylabel)) / 2.0, spec.ylabel, kBlack, 2, true);
  int ly = top + 10;
  for (size_t si = 0; si < spec.series.size(); ++si) {
    if (spec.series[si].name.empty()) continue;
    const int lx = right + 14;
    c.line(lx, ly + 7, lx + 22, ly + 7, palette(static_cast<int>(si)), 3);
    c.text(lx + 28, ly, spec.series[si].name, kBlack);
    ly += Canvas::text_height() + 8;
  }
  c.save_png(path);
}

namespace {
// One format for a cell and for the colour bar's maximum, so that the bar's top
// reads as the largest cell does (99.5 printed "100" in its cell and "99.5" on the bar).
std::string cell_label(double v) {
  if (v == 0) return "0";
  char buf[16];
  // Two significant digits below 0.1: a routing weight's mean of 0.0046 read "0.00" at the top of the bar.
  std::snprintf(buf, sizeof buf, v >= 10 ? "%.0f" : std::abs(v) >= 0.1 ? "%.2f" : "%.2g", v);
  return buf;
}
}  // namespace

void write_heatmap(const HeatmapSpec& spec, const std::string& path) {
  const size_t rows = spec.values.size();
  MOEV_CHECK(rows > 0, "heatmap ", path, ": no rows");
  const size_t cols = spec.values[0].size();
  double vmax = 0;
  for (const auto& r : spec.values) {
    MOEV_CHECK(r.size() == cols, "heatmap ", path, ": rows differ in length");
    for (double v : r)
      if (std::isfinite(v)) vmax = std::max(vmax, v);
  }
  if (vmax <= 0) vmax = 1;
  int row_label_w = 0, col_label_w = 0;
  for (const auto& l : spec.row_labels) row_label_w = std::max(row_label_w, Canvas::text_width(l));
  for (const auto& l : spec.col_labels) col_label_w = std::max(col_label_w, Canvas::text_width(l));
  const int cell = spec.cell;
  // The y title is drawn turned at x = kYTitle; nothing else may start left of kLeftOfY.
  constexpr int kYTitle = 12, kLeftOfY = kYTitle + 14 + 8;
  const int left = kLeftOfY + row_label_w + 8, top = 50 + col_label_w + 10;
  const int grid_w = cell * static_cast<int>(cols), grid_h = cell * static_cast<int>(rows);
  const std::string vmax_label = cell_label(vmax);
  const int bar_w = 22 + 16 + Canvas::text_width(vmax_label) + 16;
  // The x title is centred under the grid, but never starts left of the y title's column (a title wider
  // than the grid ran off the left edge).
  const int xlabel_w = Canvas::text_width(spec.xlabel);
  const int xlabel_x = std::max(kLeftOfY, left + (grid_w - xlabel_w) / 2);
  const int width = std::max({left + grid_w + bar_w, Canvas::text_width(spec.title) + 30, xlabel_x + xlabel_w + 10});
  // The y title is centred on the grid; one longer than the grid starts below the picture's title and reaches
  // below the grid, the picture growing to hold it.
  const int ylabel_w = Canvas::text_width(spec.ylabel);
  const int ylabel_bottom = std::max(36, top + (grid_h - ylabel_w) / 2) + ylabel_w;
  const int height = std::max(top + grid_h + 50, ylabel_bottom + 12);
  Canvas c(width, height);

  for (size_t r = 0; r < rows; ++r)
    for (size_t k = 0; k < cols; ++k) {
      const double v = spec.values[r][k];
      const double t = v / vmax;
      const int x0 = left + static_cast<int>(k) * cell, y0 = top + static_cast<int>(r) * cell;
      c.fill_rect(x0, y0, x0 + cell, y0 + cell, colormap(t));
      if (spec.annotate && cell >= 30) {
        const std::string label = cell_label(v);
        const Rgb tc = t > 0.6 ? kBlack : kWhite;
        c.text(x0 + (cell - Canvas::text_width(label, 1)) / 2.0, y0 + (cell - 7) / 2.0, label, tc, 1);
      }
    }
  c.rect_outline(left, top, left + grid_w + 1, top + grid_h + 1, kBlack);
  for (size_t r = 0; r < rows && r < spec.row_labels.size(); ++r)
    c.text(left - 8 - Canvas::text_width(spec.row_labels[r]),
           top + static_cast<int>(r) * cell + (cell - Canvas::text_height()) / 2.0,
           spec.row_labels[r], kBlack);
  for (size_t k = 0; k < cols && k < spec.col_labels.size(); ++k)
    c.text(left + static_cast<int>(k) * cell + (cell - Canvas::text_height()) / 2.0, top - 8,
           spec.col_labels[k], kBlack, 2, true);

  // Colour bar.
  const int bx = left + grid_w + 20;
  for (int y = 0; y < grid_h; ++y)
    c.fill_rect(bx, top + y, bx + 16, top + y + 1, colormap(1.0 - static_cast<double>(y) / grid_h));
  c.rect_outline(bx, top, bx + 16, top + grid_h, kBlack);
  c.text(bx + 22, top - 4, vmax_label, kBlack);
  c.text(bx + 22, top + grid_h - 10, "0", kBlack);

  c.text((width - Canvas::text_width(spec.title)) / 2.0, 14, spec.title, kBlack);
  c.text(xlabel_x, top + grid_h + 16, spec.xlabel, kBlack);
  c.text(kYTitle, ylabel_bottom, spec.ylabel, kBlack, 2, true);
  c.save_png(path);
}

}  // namespace moev::viz
