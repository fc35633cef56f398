// The routing scores of `moev analyze` as pure functions, on counts whose
// answers are known by hand: mutual information and specialisation at their
// ends (independent, determined) and in between, the per-image spread, and the
// report files with the new columns.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>
#include <stb/stb_image.h>

#include "moev/analysis/routing_report.h"
#include "moev/core/error.h"
#include "support/expect_error.h"
#include "support/temp_dir.h"

using namespace moev::analysis;

TEST(RoutingReport, MutualInformationAtItsEnds) {
  // Each class spread evenly over two experts: routing says nothing of the class.
  EXPECT_NEAR(mutual_information_bits({{5, 5}, {5, 5}}), 0.0, 1e-12);
  EXPECT_NEAR(specialisation({{5, 5}, {5, 5}}), 0.0, 1e-12);
  // Expert e takes exactly class e: one bit with two equal classes, determined.
  EXPECT_NEAR(mutual_information_bits({{7, 0}, {0, 7}}), 1.0, 1e-12);
  EXPECT_NEAR(specialisation({{7, 0}, {0, 7}}), 1.0, 1e-12);
  // Four classes onto two experts, each class kept whole: I = H(expert) = 1 bit,
  // normalised by the smaller entropy (1 of 2 bits) to 1.
  EXPECT_NEAR(specialisation({{3, 3, 0, 0}, {0, 0, 3, 3}}), 1.0, 1e-12);
  // In between: p(e, c) = {{3, 1}, {1, 3}} / 8 gives 1 - H(1/4) bits.
  const double h = -(0.25 * std::log2(0.25) + 0.75 * std::log2(0.75));
  EXPECT_NEAR(mutual_information_bits({{3, 1}, {1, 3}}), 1.0 - h, 1e-12);
  EXPECT_NEAR(specialisation({}), 0.0, 1e-12);
  // Images of one class (a test folder of one class): 0 / 0, which was reported as 0 ("routing ignores the
  // class"), is undefined.
  EXPECT_TRUE(std::isnan(specialisation({{4, 0}, {2, 0}})));
  EXPECT_TRUE(std::isnan(weighted_specialisation({{0.0, 0.4}, {0.0, 0.2}})));
  EXPECT_EQ(score_text(specialisation({{4, 0}, {2, 0}})), "n/a");
  EXPECT_EQ(score_text(0.25), "0.250");
  // One expert takes every assignment of two classes: routing does ignore the class.
  EXPECT_NEAR(specialisation({{4, 4}, {0, 0}}), 0.0, 1e-12);
}

TEST(RoutingReport, ExpertGivenClassColumnsSumToOne) {
  auto p = expert_given_class({{1, 0, 4}, {3, 2, 4}});
  EXPECT_NEAR(p[0][0], 0.25, 1e-12);
  EXPECT_NEAR(p[1][0], 0.75, 1e-12);
  EXPECT_NEAR(p[1][1], 1.0, 1e-12);
  EXPECT_NEAR(p[0][2] + p[1][2], 1.0, 1e-12);
}

TEST(RoutingReport, WeightedSpecialisationCountsAssignmentsByTheirGates) {
  // The same assignments, {{3, 1}, {1, 3}}, but the off-diagonal ones carry
  // gates of 0 and the diagonal ones 0.5 each: weighted, routing determines the class.
  EXPECT_NEAR(weighted_specialisation({{1.5, 0.0}, {0.0, 1.5}}), 1.0, 1e-12);
  // Gates proportional to the counts give the unweighted score.
  EXPECT_NEAR(weighted_specialisation({{0.3, 0.1}, {0.1, 0.3}}), specialisation({{3, 1}, {1, 3}}), 1e-12);
  EXPECT_NEAR(weighted_specialisation({{0.2, 0.2}, {0.2, 0.2}}), 0.0, 1e-12);
  EXPECT_THROW(weighted_specialisation({{0.2, -0.1}, {0.2, 0.2}}), moev::Error);
  // Mean routing weight: each class's gate sums over its tokens.
  auto w = mean_routing_weight({{1.5, 0.5}, {0.5, 2.0}}, {4.0, 5.0});
  EXPECT_NEAR(w[0][0], 0.375, 1e-12);
  EXPECT_NEAR(w[1][1], 0.4, 1e-12);
  EXPECT_EQ(mean_routing_weight({{1.0}}, {0.0})[0][0], 0.0);  // a class with no tokens
  EXPECT_THROW(mean_routing_weight({{1.0, 2.0}}, {1.0}), moev::Error);
}

TEST(RoutingReport, ImageSpreadWeighsEachImageByItsAssignments) {
  ImageSpread s;
  EXPECT_EQ(s.mean_bits(), 0.0);
  // [expert][image]: image 0 splits 4 assignments over 4 experts (2 bits), image 1
  // puts its 4 on one expert (0 bits), image 2 splits 8 evenly over 2 (1 bit).
  s.add({{1, 4, 4}, {1, 0, 4}, {1, 0, 0}, {1, 0, 0}});
  EXPECT_DOUBLE_EQ(s.assignments, 16.0);
  EXPECT_NEAR(s.mean_bits(), (4 * 2.0 + 4 * 0.0 + 8 * 1.0) / 16.0, 1e-12);
  ImageSpread t;
  t.add({{2}, {2}});  // one image, two experts evenly: 1 bit over 4 assignments
  s.merge(t);
  EXPECT_NEAR(s.mean_bits(), (16.0 + 4.0) / 20.0, 1e-12);

  LayerRouting layer;
  layer.image_bits = 0.5;
  layer.chance_image_bits = 2.0;
  EXPECT_NEAR(image_concentration(layer), 0.75, 1e-12);
  layer.chance_image_bits = 0;  // no chance level measured: no claim
  EXPECT_EQ(image_concentration(layer), 0.0);
}

TEST(RoutingReport, WritesHeatmapsTableAndJson) {
  moev::test::TempDir dir;
  LayerRouting a{"blocks.1.moe", {{6, 0}, {0, 6}}, {0.5, 0.5}, 0.1, 0.025, 1.0, 1.5, {{3.0, 0.0}, {0.0, 3.0}}, {6, 6}};
  LayerRouting b{"blocks.3.moe", {{3, 3}, {3, 3}}, {0.5, 0.5}, 0.0, 0.0, 0.9, 1.0, {}, {}};  // no routing weights
  auto files = write_routing_report({a, b}, {"shirt", "bag"}, "t", dir.path().string());
  ASSERT_EQ(files.size(), 5u);
  EXPECT_TRUE(std::filesystem::exists(dir.file("routing_weight_0.png")));
  EXPECT_FALSE(std::filesystem::exists(dir.file("routing_weight_1.png")));
  for (const auto& f : files) EXPECT_TRUE(std::filesystem::exists(f)) << f;
  std::ifstream md(dir.file("routing.md"));
  std::stringstream ss;
  ss << md.rdbuf();
  const std::string text = ss.str();
  // Layer 0: specialisation 1, experts/image 2^1 = 2, chance 2^1.5 = 2.828, concentration 1/3.
  EXPECT_NE(text.find("| 0 | blocks.1.moe | 1.0000 | 1.0000 | 1.0000 | 2.000 | 2.828 | 0.3333 | 0.1000 | 0.0250 |"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("| 1 | blocks.3.moe | 0.0000 | 0.0000 | - |"), std::string::npos) << text;

  // Test images of one class of three: the score is n/a, the absent classes are null in the JSON and left out
  // of the heatmaps (their P(expert | class) is undefined, not a column of zeros).
  LayerRouting one{"blocks.1.moe", {{0, 5, 0}, {0, 1, 0}}, {0.8, 0.2}, 0, 0, 0.5, 0.9, {{0, 2.0, 0}, {0, 0.5, 0}},
                   {0, 6, 0}};
  moev::test::TempDir dir1;
  write_routing_report({one}, {"shirt", "bag", "boot"}, "t", dir1.path().string());
  std::ifstream md1(dir1.file("routing.md"));
  std::stringstream ss1;
  ss1 << md1.rdbuf();
  EXPECT_NE(ss1.str().find("| 0 | blocks.1.moe | n/a | 0.0000 | n/a |"), std::string::npos) << ss1.str();
  const auto j = nlohmann::json::parse(std::ifstream(dir1.file("routing.json")));
  const auto& p = j.at("layers")[0].at("p_expert_given_class");
  EXPECT_TRUE(p[0][0].is_null());
  EXPECT_NEAR(p[0][1].get<double>(), 5.0 / 6.0, 1e-12);
  EXPECT_TRUE(j.at("layers")[0].at("mean_routing_weight")[1][2].is_null());
  EXPECT_TRUE(j.at("layers")[0].at("specialisation").is_null());
  // Of 30 classes, one present: one column, not 30 (cells of 40 pixels; the titles take ~500).
  std::vector<std::string> thirty;
  for (int c = 0; c < 30; ++c) thirty.push_back("c" + std::to_string(c));
  auto of_thirty = [&](int64_t absent) {
    LayerRouting r = one;
    r.counts = {std::vector<int64_t>(30, absent), std::vector<int64_t>(30, absent)};
    r.counts[0][1] = 5, r.counts[1][1] = 1;
    r.gate_sums = {std::vector<double>(30, 0.1 * double(absent)), std::vector<double>(30, 0.0)};
    r.gate_sums[0][1] = 2.0;
    r.class_tokens.assign(30, double(absent));
    r.class_tokens[1] = 6;
    return r;
  };
  moev::test::TempDir d1, d12;
  write_routing_report({of_thirty(0)}, thirty, "t", d1.path().string());
  write_routing_report({of_thirty(1)}, thirty, "t", d12.path().string());
  for (const char* png : {"routing_0.png", "routing_weight_0.png"}) {
    int w1 = 0, w12 = 0, h = 0, ch = 0;
    ASSERT_TRUE(stbi_info((d1.path() / png).c_str(), &w1, &h, &ch)) << png;
    ASSERT_TRUE(stbi_info((d12.path() / png).c_str(), &w12, &h, &ch)) << png;
    EXPECT_LT(w1, w12 - 600) << png;  // 29 columns of 40 fewer, less what the titles take
  }
}

// Points measured in any order come out in capacity order, per curve: given as 2, 0.5, 1 the curve zig-zagged.
TEST(RoutingReport, CapacityCurveIsInCapacityOrder) {
  moev::test::TempDir dir;
  std::vector<CapacityPoint> points{{2.0, false, 0.9, 0.0, 0.0}, {2.0, true, 0.91, 0.0, 0.0},
                                    {0.5, false, 0.6, 0.3, 0.1}, {0.5, true, 0.7, 0.3, 0.1},
                                    {1.0, false, 0.8, 0.1, 0.0}, {1.0, true, 0.85, 0.1, 0.0}};
  write_capacity_curve(points, "t", dir.path().string());
  std::ifstream csv(dir.file("capacity_curve.csv"));
  std::string line;
  std::vector<std::string> rows;
  while (std::getline(csv, line)) rows.push_back(line.substr(0, line.find(',', line.find(',') + 1)));
  const std::vector<std::string> want{"capacity,bpr",  "0.500,off", "0.500,on", "1.000,off",
                                      "1.000,on",      "2.000,off", "2.000,on"};
  EXPECT_EQ(rows, want);
  // An Expert-Choice model's one curve has no token priority to be "off".
  write_capacity_curve({{1.0, false, 0.8, 0.1, 0.0}, {0.5, false, 0.6, 0.3, 0.1}}, "t", dir.path().string(), true);
  std::ifstream ec(dir.file("capacity_curve.csv"));
  rows.clear();
  while (std::getline(ec, line)) rows.push_back(line.substr(0, line.find(',', line.find(',') + 1)));
  EXPECT_EQ(rows, (std::vector<std::string>{"capacity,bpr", "0.500,-", "1.000,-"}));
  moev::test::expect_error(
      [&] { write_capacity_curve({{1.0, true, 0.8, 0.1, 0.0}}, "t", dir.path().string(), true); }, {"BPR point"});
}
