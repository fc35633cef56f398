// Charts moev writes as PNG: x-y plots (training curves, accuracy against FLOPs,
// accuracy against capacity) and matrix heatmaps (expert x class routing).
#pragma once

#include <string>
#include <vector>

namespace moev::viz {

struct Series {
  std::string name;            // legend entry ("" = none)
  std::vector<double> x, y;    // same length; non-finite points are skipped
  bool lines = true;           // join the points (false: markers only)
  bool markers = true;         // draw a marker at each point
  std::vector<std::string> point_labels;  // optional text beside each point
};

struct PlotSpec {
  std::string title, xlabel, ylabel;
  std::vector<Series> series;
  bool log_x = false;          // logarithmic x axis (all x must be > 0)
  std::vector<double> x_ticks;  // the x values to mark (empty: evenly spaced, or powers of 2 on a log axis)
  int width = 900, height = 560;
};

// Throws moev::Error when a series' x and y differ in length or the file cannot
// be written.
void write_plot(const PlotSpec& spec, const std::string& path);

struct HeatmapSpec {
  std::string title, xlabel, ylabel;
  std::vector<std::string> row_labels, col_labels;
  std::vector<std::vector<double>> values;  // [rows][cols]
  bool annotate = true;                     // print each cell's value
  int cell = 44;                            // cell side, pixels
};

// Colour runs from 0 to the largest value, with a colour bar.
void write_heatmap(const HeatmapSpec& spec, const std::string& path);

// "Nice" tick positions covering [lo, hi]: steps of 1, 2 or 5 times a power of 10.
std::vector<double> nice_ticks(double lo, double hi, int target_count = 6);
// A short label for a tick value: 0.125, 1.5, 2e+06 -> "2M".
std::string tick_label(double v);

}  // namespace moev::viz
