#include "moev/analysis/branch_report.h"

#include <filesystem>
#include <numeric>

#include <nlohmann/json.hpp>

#include "moev/core/error.h"
#include "moev/io/table.h"
#include "moev/viz/plot.h"

namespace moev::analysis {

BranchAgreement branch_agreement(const std::vector<std::vector<int64_t>>& branch, const std::vector<int64_t>& model,
                                 const std::vector<int64_t>& labels) {
  const size_t N = branch.size(), I = labels.size();
  MOEV_CHECK(N >= 1, "branch_agreement: no branches");
  MOEV_CHECK(model.size() == I, "branch_agreement: ", model.size(), " model predictions for ", I, " labels");
  for (size_t n = 0; n < N; ++n)
    MOEV_CHECK(branch[n].size() == I, "branch_agreement: branch ", n, " has ", branch[n].size(),
               " predictions for ", I, " labels");
  BranchAgreement a;
  a.images = static_cast<int64_t>(I);
  a.top1.assign(N, 0);
  a.disagree.assign(N, std::vector<double>(N, 0));
  a.double_fault.assign(N, std::vector<double>(N, 0));
  std::vector<char> right(N);
  for (size_t i = 0; i < I; ++i) {
    bool any = false;
    for (size_t n = 0; n < N; ++n) {
      right[n] = branch[n][i] == labels[i];
      any = any || right[n];
      a.top1[n] += right[n];
    }
    a.oracle += any;
    a.model_top1 += model[i] == labels[i];
    for (size_t p = 0; p < N; ++p)
      for (size_t q = 0; q < N; ++q) {
        a.disagree[p][q] += branch[p][i] != branch[q][i];
        a.double_fault[p][q] += !right[p] && !right[q];
      }
  }
  const double scale = I == 0 ? 0.0 : 1.0 / static_cast<double>(I);
  for (size_t p = 0; p < N; ++p) {
    a.top1[p] *= scale;
    for (size_t q = 0; q < N; ++q) {
      a.disagree[p][q] *= scale;
      a.double_fault[p][q] *= scale;
    }
  }
  a.oracle *= scale;
  a.model_top1 *= scale;
  return a;
}

std::vector<std::string> write_branch_report(const BranchAgreement& a, const std::string& title,
                                             const std::string& dir) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  const size_t N = a.top1.size();
  const double mean_top1 = N == 0 ? 0 : std::accumulate(a.top1.begin(), a.top1.end(), 0.0) / double(N);
  double pair_disagree = 0, pair_fault = 0;
  for (size_t p = 0; p < N; ++p)
    for (size_t q = p + 1; q < N; ++q) {
      pair_disagree += a.disagree[p][q];
      pair_fault += a.double_fault[p][q];
    }
  const double pairs = N * (N - 1) / 2.0;
  if (pairs > 0) {
    pair_disagree /= pairs;
    pair_fault /= pairs;
  }

  viz::HeatmapSpec h;
  h.title = title + "  branches disagree on " + io::fmt(100 * pair_disagree, 1) + " % of images (pair mean)";
  h.xlabel = "branch; cells: % predicted differently";
  h.ylabel = "branch (top-1)";
  for (size_t n = 0; n < N; ++n) {
    h.col_labels.push_back(std::to_string(n));
    h.row_labels.push_back(std::to_string(n) + " (" + io::fmt(100 * a.top1[n], 2) + ")");
  }
  for (const auto& row : a.disagree) {
    h.values.emplace_back();
    for (double v : row) h.values.back().push_back(100 * v);
  }
  const std::string png = (fs::path(dir) / "branches.png").string();
  viz::write_heatmap(h, png);

  io::Table t;
  t.header = {"branch", "top-1", "disagrees with (mean of the others)", "both wrong (mean of the others)"};
  for (size_t n = 0; n < N; ++n) {
    double d = 0, f = 0;
    for (size_t q = 0; q < N; ++q)
      if (q != n) {
        d += a.disagree[n][q];
        f += a.double_fault[n][q];
      }
    const double others = N > 1 ? double(N - 1) : 1.0;
    t.add({std::to_string(n), io::fmt(a.top1[n], 4), io::fmt(d / others, 4), io::fmt(f / others, 4)});
  }
  const std::string md = "# " + title + "\n\n" + std::to_string(a.images) + " test images. The model (" +
                         io::fmt(a.model_top1, 4) + " top-1) against its mean branch (" + io::fmt(mean_top1, 4) +
                         "): " + (a.model_top1 >= mean_top1 ? "+" : "") +
                         io::fmt(100 * (a.model_top1 - mean_top1), 2) + " percentage points; some branch right (the oracle): " + io::fmt(a.oracle, 4) +
                         ". Pairs of branches disagree on " + io::fmt(pair_disagree, 4) +
                         " of the images and are both wrong on " + io::fmt(pair_fault, 4) +
                         " (means over pairs): a model gains over its branches only where they "
                         "disagree.\n\n" +
                         t.markdown();
  const std::string md_path = (fs::path(dir) / "branches.md").string();
  const std::string json_path = (fs::path(dir) / "branches.json").string();
  io::write_text_atomic(md_path, md);
  io::write_text_atomic(json_path, nlohmann::json{{"images", a.images},
                                                  {"top1", a.top1},
                                                  {"mean_branch_top1", mean_top1},
                                                  {"model_top1", a.model_top1},
                                                  {"oracle", a.oracle},
                                                  {"pair_disagree", pair_disagree},
                                                  {"pair_double_fault", pair_fault},
                                                  {"disagree", a.disagree},
                                                  {"double_fault", a.double_fault}}
                                           .dump(1) +
                                       "\n");
  return {png, md_path, json_path};
}

}  // namespace moev::analysis
