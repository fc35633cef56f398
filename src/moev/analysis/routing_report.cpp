#include "moev/analysis/routing_report.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>

#include <nlohmann/json.hpp>

#include "moev/core/error.h"
#include "moev/io/table.h"
#include "moev/viz/plot.h"

namespace moev::analysis {

namespace {
struct Marginals {
  std::vector<double> expert, cls;
  double total = 0;
};
template <class T>
Marginals marginals(const std::vector<std::vector<T>>& counts) {
  Marginals m;
  m.expert.assign(counts.size(), 0);
  m.cls.assign(counts.empty() ? 0 : counts[0].size(), 0);
  for (size_t e = 0; e < counts.size(); ++e) {
    MOEV_CHECK(counts[e].size() == m.cls.size(), "routing counts: rows differ in length");
    for (size_t c = 0; c < counts[e].size(); ++c) {
      const double v = static_cast<double>(counts[e][c]);
      m.expert[e] += v;
      m.cls[c] += v;
      m.total += v;
    }
  }
  return m;
}
double entropy_bits(const std::vector<double>& p, double total) {
  double h = 0;
  for (double v : p)
    if (v > 0) h -= v / total * std::log2(v / total);
  return h;
}

template <class T>
double mutual_information(const std::vector<std::vector<T>>& counts) {
  const Marginals m = marginals(counts);
  if (m.total <= 0) return 0;
  double mi = 0;
  for (size_t e = 0; e < counts.size(); ++e)
    for (size_t c = 0; c < counts[e].size(); ++c) {
      const double p = static_cast<double>(counts[e][c]) / m.total;
      if (p > 0) mi += p * std::log2(p * m.total * m.total / (m.expert[e] * m.cls[c]));
    }
  return std::max(0.0, mi);
}

template <class T>
double normalised_mutual_information(const std::vector<std::vector<T>>& counts) {
  const Marginals m = marginals(counts);
  if (m.total <= 0) return 0;
  // One class (a test folder of one class): 0 / 0, which read as "routing ignores the class".
  if (std::count_if(m.cls.begin(), m.cls.end(), [](double v) { return v > 0; }) < 2)
    return std::numeric_limits<double>::quiet_NaN();
  const double h = std::min(entropy_bits(m.expert, m.total), entropy_bits(m.cls, m.total));
  return h > 0 ? std::min(1.0, mutual_information(counts) / h) : 0;
}
}  // namespace

double mutual_information_bits(const Counts& counts) { return mutual_information(counts); }

double specialisation(const Counts& counts) { return normalised_mutual_information(counts); }

double weighted_specialisation(const Weights& gate_sums) {
  for (const auto& row : gate_sums)
    for (double v : row) MOEV_CHECK(v >= 0, "routing weights: expected >= 0, got ", v);
  return normalised_mutual_information(gate_sums);
}

Weights mean_routing_weight(const Weights& gate_sums, const std::vector<double>& class_tokens) {
  Weights w(gate_sums.size(), std::vector<double>(class_tokens.size(), 0));
  for (size_t e = 0; e < gate_sums.size(); ++e) {
    MOEV_CHECK(gate_sums[e].size() == class_tokens.size(), "routing weights: ", gate_sums[e].size(),
               " classes in a row, ", class_tokens.size(), " class token counts");
    for (size_t c = 0; c < class_tokens.size(); ++c)
      if (class_tokens[c] > 0) w[e][c] = gate_sums[e][c] / class_tokens[c];
  }
  return w;
}

void ImageSpread::add(const Counts& by_image) {
  const size_t images = by_image.empty() ? 0 : by_image[0].size();
  for (size_t i = 0; i < images; ++i) {
    double n = 0, h = 0;
    for (const auto& row : by_image) n += static_cast<double>(row.at(i));
    for (const auto& row : by_image)
      if (row[i] > 0) h -= static_cast<double>(row[i]) * std::log2(static_cast<double>(row[i]) / n);
    weighted_bits += h;  // n_i * H_i = -sum_e c_e log2(c_e / n_i)
    assignments += n;
  }
}

void ImageSpread::merge(const ImageSpread& other) {
  weighted_bits += other.weighted_bits;
  assignments += other.assignments;
}

double ImageSpread::mean_bits() const { return assignments > 0 ? weighted_bits / assignments : 0; }

double image_concentration(const LayerRouting& layer) {
  return layer.chance_image_bits > 0 ? 1.0 - layer.image_bits / layer.chance_image_bits : 0;
}

std::vector<std::vector<double>> expert_given_class(const Counts& counts) {
  const Marginals m = marginals(counts);
  std::vector<std::vector<double>> p(counts.size(), std::vector<double>(m.cls.size(), 0));
  for (size_t e = 0; e < counts.size(); ++e)
    for (size_t c = 0; c < m.cls.size(); ++c)
      if (m.cls[c] > 0) p[e][c] = static_cast<double>(counts[e][c]) / m.cls[c];
  return p;
}

std::string score_text(double v, int decimals) { return std::isnan(v) ? "n/a" : io::fmt(v, decimals); }

std::vector<std::string> write_routing_report(const std::vector<LayerRouting>& layers,
                                              const std::vector<std::string>& class_names,
                                              const std::string& title, const std::string& dir) {
  namespace fs = std::filesystem;
  std::vector<std::string> written;
  io::Table table;
  table.header = {"layer", "module", "specialisation", "MI (bits)", "weighted specialisation", "experts / image",
                  "by chance", "image concentration", "dropped", "tokens without an expert", "max load / mean",
                  "heatmaps"};
  nlohmann::json j = nlohmann::json::array();
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& L = layers[l];
    const double spec = specialisation(L.counts), mi = mutual_information_bits(L.counts);
    double max_load = 0;
    for (double v : L.load) max_load = std::max(max_load, v);
    const double imbalance = L.load.empty() ? 0 : max_load * static_cast<double>(L.load.size());
    const std::string png = "routing_" + std::to_string(l) + ".png";

    viz::HeatmapSpec h;
    h.title = title + "  " + L.name + "  specialisation " + score_text(spec, 3);
    h.xlabel = "class (cells: P(expert | class))";
    h.ylabel = "expert";
    for (size_t e = 0; e < L.counts.size(); ++e) h.row_labels.push_back(std::to_string(e));
    // Classes the test images do not have: P(expert | class) is undefined there, not a column of zeros.
    const Marginals m = marginals(L.counts);
    std::vector<size_t> present;
    for (size_t c = 0; c < m.cls.size(); ++c)
      if (m.cls[c] > 0 || m.total <= 0) present.push_back(c);
    auto keep_present = [&](const std::vector<std::vector<double>>& v) {
      std::vector<std::vector<double>> out(v.size());
      for (size_t e = 0; e < v.size(); ++e)
        for (size_t c : present) out[e].push_back(v[e][c]);
      return out;
    };
    auto with_nulls = [&](const std::vector<std::vector<double>>& v) {  // JSON: every class, null where absent
      nlohmann::json out = nlohmann::json::array();
      for (const auto& row : v) {
        auto& r = out.emplace_back(nlohmann::json::array());
        for (size_t c = 0; c < row.size(); ++c)
          r.push_back(m.total <= 0 || m.cls[c] > 0 ? nlohmann::json(row[c]) : nlohmann::json(nullptr));
      }
      return out;
    };
    for (size_t c : present) h.col_labels.push_back(c < class_names.size() ? class_names[c] : std::to_string(c));
    h.values = keep_present(expert_given_class(L.counts));
    h.cell = L.counts.size() > 16 ? 18 : 40;
    h.annotate = h.cell >= 30;
    viz::write_heatmap(h, (fs::path(dir) / png).string());
    written.push_back((fs::path(dir) / png).string());

    const double conc = image_concentration(L);
    nlohmann::json entry = {{"layer", l}, {"module", L.name}, {"specialisation", spec},
                            {"mutual_information_bits", mi}, {"image_entropy_bits", L.image_bits},
                            {"chance_image_entropy_bits", L.chance_image_bits},
                            {"image_concentration", conc},
                            {"dropped", L.dropped}, {"unrouted", L.unrouted}, {"load", L.load},
                            {"counts", L.counts}, {"p_expert_given_class", with_nulls(expert_given_class(L.counts))}};
    std::string weighted = "-", pngs = png;
    if (!L.gate_sums.empty()) {
      const double wspec = weighted_specialisation(L.gate_sums);
      const std::string wpng = "routing_weight_" + std::to_string(l) + ".png";
      viz::HeatmapSpec hw = h;
      hw.title = title + "  " + L.name + "  weighted specialisation " + score_text(wspec, 3);
      hw.xlabel = "class (cells: mean routing weight)";
      const auto weights = mean_routing_weight(L.gate_sums, L.class_tokens);
      hw.values = keep_present(weights);
      viz::write_heatmap(hw, (fs::path(dir) / wpng).string());
      written.push_back((fs::path(dir) / wpng).string());
      weighted = score_text(wspec, 4);
      pngs += ", " + wpng;
      entry["weighted_specialisation"] = wspec;
      entry["mean_routing_weight"] = with_nulls(weights);
      entry["class_tokens"] = L.class_tokens;
    }
    table.add({std::to_string(l), L.name, score_text(spec, 4), io::fmt(mi, 4), weighted,
               io::fmt(std::exp2(L.image_bits), 3), io::fmt(std::exp2(L.chance_image_bits), 3),
               io::fmt(conc, 4), io::fmt(L.dropped, 4), io::fmt(L.unrouted, 4), io::fmt(imbalance, 3), pngs});
    j.push_back(entry);
  }
  const std::string md = "# " + title +
                         "\n\nSpecialisation = I(expert; class) / min(H(expert), H(class)) over "
                         "placed assignments: 0 = routing ignores the class, 1 = it "
                         "determines it; weighted = the same with each assignment counted by its "
                         "routing weight, whose mean per expert and class is the second heatmap "
                         "(the V-MoE paper's figure). Experts / image = 2^H(expert | image), the "
                         "effective number of experts an image's assignments use; by chance = "
                         "the same with each position's tokens shuffled over all the test "
                         "images; image concentration = 1 - H(expert | image) / that chance "
                         "entropy. Dropped = assignments (token, choice) past capacity (Expert-Choice: "
                         "tokens no expert took); tokens without an expert lost all K choices and pass "
                         "the layer by their residual alone.\n\n" +
                         table.markdown();
  io::write_text_atomic((fs::path(dir) / "routing.md").string(), md);
  io::write_text_atomic((fs::path(dir) / "routing.json").string(),
                        io::output_json(nlohmann::json{{"classes", class_names}, {"layers", j}}, 1) + "\n");
  written.push_back((fs::path(dir) / "routing.md").string());
  written.push_back((fs::path(dir) / "routing.json").string());
  return written;
}

std::vector<std::string> write_capacity_curve(const std::vector<CapacityPoint>& given,
                                              const std::string& title, const std::string& dir,
                                              bool expert_choice) {
  namespace fs = std::filesystem;
  // In capacity order whatever order they were measured in: the curve joined them as given (2, 0.5, 1 zig-zagged).
  auto points = given;
  std::stable_sort(points.begin(), points.end(),
                   [](const CapacityPoint& a, const CapacityPoint& b) { return a.capacity < b.capacity; });
  io::Table t;
  t.header = {"capacity", "bpr", "top1", "dropped", "tokens without an expert"};
  viz::PlotSpec plot;
  plot.title = title;
  plot.xlabel = "inference capacity ratio C";
  plot.ylabel = "top-1 accuracy";
  plot.log_x = true;
  plot.series.resize(2);
  plot.series[0].name = expert_choice ? "expert choice" : "token order";
  plot.series[1].name = "BPR";
  for (const auto& p : points) {
    MOEV_CHECK(!expert_choice || !p.bpr, "capacity curve: a BPR point of an Expert-Choice model");
    t.add({io::fmt(p.capacity, 3), expert_choice ? "-" : p.bpr ? "on" : "off", io::fmt(p.top1, 4),
           io::fmt(p.dropped, 4), io::fmt(p.unrouted, 4)});
    auto& s = plot.series[p.bpr ? 1 : 0];
    s.x.push_back(p.capacity);
    s.y.push_back(p.top1);
  }
  if (plot.series[1].x.empty()) plot.series.pop_back();  // expert choice: no BPR curve
  const auto base = fs::path(dir) / "capacity_curve";
  io::write_text_atomic(base.string() + ".csv", t.csv());
  io::write_text_atomic(base.string() + ".md", "# " + title + "\n\n" + t.markdown());
  viz::write_plot(plot, base.string() + ".png");
  return {base.string() + ".csv", base.string() + ".md", base.string() + ".png"};
}

}  // namespace moev::analysis
