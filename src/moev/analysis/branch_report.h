// How the branches of a multi-branch model (Sun et al.) relate on a test set:
// each branch's top-1, the model's, the oracle (some branch right), and per
// pair of branches how often they disagree and how often both are wrong
// (Kuncheva's double fault). A model can only gain over its branches where they
// disagree, so these say why N branches add what they add. Written as JSON,
// Markdown and a heatmap by `moev analyze`.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moev::analysis {

struct BranchAgreement {
  std::vector<double> top1;                       // [N] each branch alone
  double model_top1 = 0;                          // the model's output (mean of logits, or the fusion)
  double oracle = 0;                              // fraction of images some branch gets right
  std::vector<std::vector<double>> disagree;      // [N][N] fraction whose predicted classes differ
  std::vector<std::vector<double>> double_fault;  // [N][N] fraction both get wrong
  int64_t images = 0;
};

// branch: [N][I] predicted classes, model: [I] the model's, labels: [I].
// Throws moev::Error on N = 0 or lengths that differ.
BranchAgreement branch_agreement(const std::vector<std::vector<int64_t>>& branch, const std::vector<int64_t>& model,
                                 const std::vector<int64_t>& labels);

// Writes branches.json, branches.md and branches.png (the disagreement matrix,
// each branch's top-1 in its label) into dir; returns the paths.
std::vector<std::string> write_branch_report(const BranchAgreement& a, const std::string& title,
                                             const std::string& dir);

}  // namespace moev::analysis
