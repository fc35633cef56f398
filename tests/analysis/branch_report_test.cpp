// The branch agreement of `moev analyze` on predictions whose answers are
// counted by hand: per-branch top-1, the oracle, pairwise disagreement and
// double fault, and the report files.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "moev/analysis/branch_report.h"
#include "support/expect_error.h"
#include "support/temp_dir.h"

using namespace moev::analysis;

namespace {
// Four images of classes 0..3; branch 0 misses image 3, branch 1 images 2 and
// 3, branch 2 image 0; the model gets them all.
const std::vector<int64_t> kLabels = {0, 1, 2, 3};
const std::vector<std::vector<int64_t>> kBranches = {{0, 1, 2, 0}, {0, 1, 0, 0}, {1, 1, 2, 3}};
const std::vector<int64_t> kModel = {0, 1, 2, 3};
}  // namespace

TEST(BranchReport, KnownAnswer) {
  const auto a = branch_agreement(kBranches, kModel, kLabels);
  EXPECT_EQ(a.images, 4);
  EXPECT_EQ(a.top1, (std::vector<double>{0.75, 0.5, 0.75}));
  EXPECT_DOUBLE_EQ(a.model_top1, 1.0);
  EXPECT_DOUBLE_EQ(a.oracle, 1.0);  // every image has a branch that gets it
  // 0 vs 1 differ on image 2; 0 vs 2 on images 0 and 3; 1 vs 2 on 0, 2 and 3.
  const std::vector<std::vector<double>> disagree = {{0, 0.25, 0.5}, {0.25, 0, 0.75}, {0.5, 0.75, 0}};
  EXPECT_EQ(a.disagree, disagree);
  // Both wrong: 0 and 1 on image 3 only; branch 2 errs where no other does. The
  // diagonal is each branch's error rate.
  const std::vector<std::vector<double>> fault = {{0.25, 0.25, 0}, {0.25, 0.5, 0}, {0, 0, 0.25}};
  EXPECT_EQ(a.double_fault, fault);
  // Identical branches never disagree, and the oracle is their top-1.
  const auto same = branch_agreement({kBranches[1], kBranches[1]}, kBranches[1], kLabels);
  EXPECT_DOUBLE_EQ(same.disagree[0][1], 0.0);
  EXPECT_DOUBLE_EQ(same.oracle, 0.5);
  EXPECT_DOUBLE_EQ(same.double_fault[0][1], 0.5);
}

TEST(BranchReport, MismatchedLengthsAreErrors) {
  moev::test::expect_error([] { branch_agreement({}, kModel, kLabels); }, {"no branches"});
  moev::test::expect_error([] { branch_agreement({{0, 1, 2}, kModel}, kModel, kLabels); },
                           {"branch 0", "3 predictions", "4 labels"});
  moev::test::expect_error([] { branch_agreement(kBranches, {0, 1}, kLabels); }, {"2 model predictions"});
}

TEST(BranchReport, WritesJsonMarkdownAndHeatmap) {
  moev::test::TempDir dir;
  const auto files = write_branch_report(branch_agreement(kBranches, kModel, kLabels), "toy", dir.file("out"));
  ASSERT_EQ(files.size(), 3u);
  for (const auto& f : files) EXPECT_GT(std::filesystem::file_size(f), 0u) << f;
  const auto j = nlohmann::json::parse(std::ifstream(dir.file("out") + "/branches.json"));
  EXPECT_NEAR(j.at("mean_branch_top1").get<double>(), 2.0 / 3.0, 1e-12);
  EXPECT_NEAR(j.at("pair_disagree").get<double>(), 0.5, 1e-12);        // (0.25 + 0.5 + 0.75) / 3
  EXPECT_NEAR(j.at("pair_double_fault").get<double>(), 0.25 / 3, 1e-12);
  std::ifstream md(dir.file("out") + "/branches.md");
  const std::string text((std::istreambuf_iterator<char>(md)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("+33.33 percentage points"), std::string::npos) << text;  // 1 - 2/3
}
