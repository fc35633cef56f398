// The PNG pictures: written files decode to the right size, series land where
// their coordinates say, heatmap cells take the colour of their value, and bad
// specs are clear errors.
#include <gtest/gtest.h>

#include <stb/stb_image.h>

#include <memory>

#include "moev/viz/canvas.h"
#include "moev/viz/plot.h"
#include "support/expect_error.h"
#include "support/temp_dir.h"

using namespace moev;

namespace {
struct Png {
  int w = 0, h = 0;
  std::vector<unsigned char> px;
  viz::Rgb at(int x, int y) const {
    const unsigned char* p = &px[(static_cast<size_t>(y) * w + x) * 3];
    return {p[0], p[1], p[2]};
  }
  int count(viz::Rgb c) const {
    int n = 0;
    for (size_t i = 0; i < px.size(); i += 3)
      n += px[i] == c.r && px[i + 1] == c.g && px[i + 2] == c.b;
    return n;
  }
};
Png load_png(const std::string& path) {
  Png p;
  int ch = 0;
  unsigned char* data = stbi_load(path.c_str(), &p.w, &p.h, &ch, 3);
  EXPECT_NE(data, nullptr) << path;
  if (data) p.px.assign(data, data + static_cast<size_t>(p.w) * p.h * 3);
  stbi_image_free(data);
  return p;
}
bool same(viz::Rgb a, viz::Rgb b) { return a.r == b.r && a.g == b.g && a.b == b.b; }
viz::PlotSpec labelled(const std::string& title, const std::string& xlabel, const std::string& ylabel) {
  viz::PlotSpec spec;
  spec.title = title;
  spec.xlabel = xlabel;
  spec.ylabel = ylabel;
  return spec;
}
viz::PlotSpec one_series(const std::string& title, const std::string& xlabel, const std::string& ylabel,
                         const std::string& name, std::vector<double> x, std::vector<double> y) {
  viz::PlotSpec spec = labelled(title, xlabel, ylabel);
  viz::Series s;
  s.name = name, s.x = std::move(x), s.y = std::move(y);
  spec.series = {s};
  return spec;
}
}  // namespace

TEST(Plot, NiceTicksAndLabels) {
  auto near = [](std::vector<double> got, std::vector<double> want) {
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-12);
  };
  near(viz::nice_ticks(0, 1, 5), {0, 0.2, 0.4, 0.6, 0.8, 1.0});
  near(viz::nice_ticks(0.83, 0.91, 4), {0.84, 0.86, 0.88, 0.9});
  near(viz::nice_ticks(-3, 7, 2), {0, 5});
  EXPECT_EQ(viz::tick_label(2e6), "2M");
  EXPECT_EQ(viz::tick_label(0.125), "0.125");
  EXPECT_EQ(viz::tick_label(25000), "25k");
}

TEST(Plot, SeriesAndTextAreDrawnWhereTheirCoordinatesSay) {
  test::TempDir dir;
  viz::PlotSpec spec = labelled("accuracy", "capacity", "top-1");
  spec.log_x = true;
  viz::Series a, b;
  a.name = "bpr", a.x = {0.125, 0.5, 2}, a.y = {0.2, 0.6, 0.9};
  b.name = "token order", b.x = a.x, b.y = {0.1, 0.3, 0.9};
  spec.series = {a, b};
  viz::write_plot(spec, dir.file("p.png"));
  const Png p = load_png(dir.file("p.png"));
  ASSERT_EQ(p.w, spec.width);
  ASSERT_EQ(p.h, spec.height);
  EXPECT_GT(p.count(viz::palette(0)), 100);
  EXPECT_GT(p.count(viz::palette(1)), 100);
  EXPECT_GT(p.count(viz::kBlack), 500);  // frame and text
  // The first series rises left to right: its pixels in the right third sit
  // higher (smaller y) on average than in the left third.
  double yl = 0, yr = 0;
  int nl = 0, nr = 0;
  for (int y = 0; y < p.h; ++y)
    for (int x = 0; x < p.w; ++x)
      if (same(p.at(x, y), viz::palette(0)) && x < p.w - 200) {  // the legend is right
        if (x < p.w / 4) yl += y, ++nl;
        if (x > p.w / 2) yr += y, ++nr;
      }
  ASSERT_GT(nl, 0);
  ASSERT_GT(nr, 0);
  EXPECT_LT(yr / nr, yl / nl - 50);

  spec.series[0].y.pop_back();
  test::expect_error([&] { viz::write_plot(spec, dir.file("bad.png")); },
                     {"bad.png", "bpr", "3 x values but 2 y values"});
  spec.series[0].y.push_back(1);
  spec.series[0].x[0] = 0;
  test::expect_error([&] { viz::write_plot(spec, dir.file("bad.png")); }, {"log x axis", "x > 0"});
  test::expect_error([&] { viz::write_plot(spec, "/proc/nonexistent/x.png"); }, {"x.png"});
}

// The ablation's x is a count of branches: ticks at 1.5 and 2.5 marked branch counts no run has. Given x_ticks,
// the vertical grid lines are those and no others.
TEST(Plot, GivenXTicksAreTheOnlyVerticalGridLines) {
  test::TempDir dir;
  viz::PlotSpec spec = one_series("ablation", "branches N", "top-1 (%)", "plain", {1, 3, 5}, {81.5, 81.4, 81.6});
  auto grid_columns = [&](const std::string& name) {
    viz::write_plot(spec, dir.file(name));
    const Png p = load_png(dir.file(name));
    int columns = 0;
    for (int x = 0; x < p.w; ++x) {
      int grey = 0;
      for (int y = 0; y < p.h; ++y) grey += same(p.at(x, y), viz::kLightGrey);
      columns += grey > p.h / 3;
    }
    return columns;
  };
  const int nice = grid_columns("nice.png");
  spec.x_ticks = {1, 3, 5};
  EXPECT_EQ(grid_columns("given.png"), 3);
  EXPECT_GT(nice, 3);  // 1, 2, 3, 4, 5 (or finer) without them
}

// Long y tick labels (0.595) ran into the turned y title at a fixed left margin: between the title's column
// and the labels there is now a clear gap.
TEST(Plot, YTickLabelsKeepClearOfTheYTitle) {
  test::TempDir dir;
  const viz::PlotSpec spec =
      one_series("top-1 against capacity", "capacity", "top-1 accuracy", "bpr", {1, 2, 3}, {0.584, 0.5955, 0.6});
  viz::write_plot(spec, dir.file("p.png"));
  const Png p = load_png(dir.file("p.png"));
  const int gap_from = 14 + viz::Canvas::text_height() + viz::Canvas::text_descent(), gap_to = gap_from + 10;
  int title_px = 0, gap_px = 0;
  for (int y = 0; y < p.h; ++y)
    for (int x = 0; x < gap_to; ++x)
      if (same(p.at(x, y), viz::kBlack)) (x < gap_from ? title_px : gap_px) += 1;
  EXPECT_GT(title_px, 50);  // the title is there
  EXPECT_EQ(gap_px, 0);
}

TEST(Plot, HeatmapCellsTakeTheColourOfTheirValue) {
  test::TempDir dir;
  viz::HeatmapSpec h;
  h.title = "layer 5";
  h.row_labels = {"e0", "e1"};
  h.col_labels = {"shirt", "bag", "boot"};
  h.values = {{0, 0.5, 1.0}, {0.25, 0.75, 0}};
  h.annotate = false;
  viz::write_heatmap(h, dir.file("h.png"));
  const Png p = load_png(dir.file("h.png"));
  // Count the pixels of each value's colour: about one cell each (0 appears twice;
  // the frame covers a cell's edge).
  const int cell = h.cell * h.cell * 9 / 10;
  EXPECT_GE(p.count(viz::colormap(1.0)), cell);
  EXPECT_GE(p.count(viz::colormap(0.5)), cell);
  EXPECT_GE(p.count(viz::colormap(0.75)), cell);
  EXPECT_GE(p.count(viz::colormap(0.25)), cell);
  EXPECT_GE(p.count(viz::colormap(0.0)), 2 * cell);
  EXPECT_FALSE(same(viz::colormap(0), viz::colormap(1)));
  h.values[1].pop_back();
  test::expect_error([&] { viz::write_heatmap(h, dir.file("bad.png")); }, {"rows differ"});
}

// Axis titles longer than a small grid ran off the picture (the x title off its left edge, the turned y title
// off its bottom) or into each other: with them, the picture gains exactly their own pixels.
TEST(Plot, HeatmapAxisTitlesAreDrawnWhole) {
  test::TempDir dir;
  viz::HeatmapSpec h;
  h.title = "b3";
  h.row_labels = {"0 (10.50)", "1 (13.50)"};
  h.col_labels = {"0", "1"};
  h.values = {{0, 99.5}, {99.5, 0}};
  h.annotate = false;
  viz::write_heatmap(h, dir.file("bare.png"));
  h.xlabel = "branch; cells: % predicted differently";
  h.ylabel = "branch (top-1) of a long name";
  viz::write_heatmap(h, dir.file("titled.png"));
  auto black = [](const Png& p) { return p.count(viz::kBlack); };
  auto alone = [](const std::string& s, bool vertical) {
    viz::Canvas c(1000, 1000);
    c.text(100, vertical ? 900 : 100, s, viz::kBlack, 2, vertical);
    int n = 0;
    for (int y = 0; y < c.height(); ++y)
      for (int x = 0; x < c.width(); ++x) n += same(c.at(x, y), viz::kBlack);
    return n;
  };
  EXPECT_EQ(black(load_png(dir.file("titled.png"))) - black(load_png(dir.file("bare.png"))),
            alone(h.xlabel, false) + alone(h.ylabel, true));
}

// The colour bar's top is the largest cell, printed as the cell prints it.
TEST(Plot, HeatmapColourBarMaximumReadsAsTheLargestCell) {
  test::TempDir dir;
  viz::HeatmapSpec h;
  h.values = {{0, 99.5}};
  h.col_labels = {"a", "b"};
  h.row_labels = {"r"};
  viz::write_heatmap(h, dir.file("a.png"));
  const Png a = load_png(dir.file("a.png"));
  h.values = {{0, 100.0}};
  viz::write_heatmap(h, dir.file("b.png"));
  const Png b = load_png(dir.file("b.png"));
  ASSERT_EQ(a.w, b.w);
  EXPECT_EQ(a.px, b.px);  // 99.5 reads "100" in its cell, and so on the bar
  // Small values keep two significant digits: 0.0046 and 0.0047 both read "0.00", at the top of the bar too.
  h.values = {{0, 0.0046}};
  viz::write_heatmap(h, dir.file("c.png"));
  h.values = {{0, 0.0047}};
  viz::write_heatmap(h, dir.file("d.png"));
  EXPECT_NE(load_png(dir.file("c.png")).px, load_png(dir.file("d.png")).px);
  EXPECT_EQ(viz::Canvas::text_width("0.0046"), viz::Canvas::text_width("0.0047"));  // so not by their widths
}

namespace {
int black_pixels(const std::string& s) {
  viz::Canvas c(viz::Canvas::text_width(s) + 20, 40);
  c.text(10, 10, s, viz::kBlack);
  int n = 0;
  for (int y = 0; y < c.height(); ++y)
    for (int x = 0; x < c.width(); ++x) n += same(c.at(x, y), viz::kBlack);
  return n;
}
}  // namespace

// Every glyph is drawn whole however many follow: the glyph buffer held 300 bytes a character and stb cut the
// strokes past it without a word, so the x tick "28" read "29" and "80" read "8-" in a sweep's plot.
TEST(Canvas, EveryGlyphIsDrawnWholeInAString) {
  for (char ch = 33; ch < 127; ++ch) {
    const std::string one(1, ch), many(12, ch);
    EXPECT_EQ(black_pixels(many), 12 * black_pixels(one)) << "'" << one << "'";
  }
  EXPECT_EQ(black_pixels("28"), black_pixels("2") + black_pixels("8"));
}

// Bytes outside printable ASCII were looked up in the font's table by their value, outside it: a UTF-8
// character is drawn as one '?', as wide.
TEST(Canvas, NonAsciiTextIsDrawnAsQuestionMarks) {
  EXPECT_EQ(black_pixels("caf\xc3\xa9"), black_pixels("caf?"));
  EXPECT_EQ(viz::Canvas::text_width("caf\xc3\xa9 \xe2\x80\x94 x"), viz::Canvas::text_width("caf? ? x"));
  EXPECT_EQ(black_pixels(std::string("a\xff" "b")), black_pixels("a?b"));
}

// A point's label near the right of the frame is drawn left of its point: it ran over the frame into the legend
// ("E4 last-2 K2" across the legend's line in a sweep's plot).
TEST(Plot, PointLabelsStayInsideTheFrame) {
  test::TempDir dir;
  viz::PlotSpec spec = labelled("t", "x", "y");
  viz::Series a;
  a.x = {1, 2, 3}, a.y = {1, 2, 3}, a.point_labels = {"dense", "E4 last-2 K1", "E4 last-2 K2"};
  a.lines = false;
  spec.series = {a};  // no name: no legend, the frame reaches 30 pixels from the right
  viz::write_plot(spec, dir.file("p.png"));
  const Png p = load_png(dir.file("p.png"));
  int outside = 0, inside = 0;
  for (int y = 0; y < p.h; ++y)
    for (int x = 0; x < p.w; ++x)
      if (same(p.at(x, y), viz::palette(0))) (x > p.w - 30 ? outside : inside) += 1;
  EXPECT_GT(inside, 100);
  EXPECT_EQ(outside, 0);
}
