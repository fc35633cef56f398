// The ablation's plan (which runs, in which order, with which teacher) and its
// summary, without training anything: the runs themselves are `moev train`,
// `moev fuse` and `moev ensemble`, tested on their own.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>

#include <nlohmann/json.hpp>

#include "support/expect_error.h"
#include "support/temp_dir.h"
#include "moev/train/ablation.h"

using namespace moev;
using nlohmann::json;

namespace {
const json kBase = {{"model", {{"preset", "resnest-tiny"}}}, {"data", {{"per_class", 50}}}};

std::map<std::string, const train::AblationTask*> by_name(const std::vector<train::AblationTask>& tasks) {
  std::map<std::string, const train::AblationTask*> m;
  for (const auto& t : tasks) m[t.name] = &t;
  return m;
}
}  // namespace

TEST(Ablation, TeacherEnsembleIsTrainedOnTheStudentsImagesFromOtherInits) {
  train::AblationGrid g;
  g.branches = {1, 3};
  g.no_diversity = {};
  g.seeds = 2;
  g.teachers = 3;
  const auto tasks = train::plan_ablation(g, kBase, "/abl", "test");
  // Per seed: N=1 without stochastic depth, plain, 2 members, the ensemble's
  // evaluation, distill (6); N=3 the same but the first and with fusion (6).
  ASSERT_EQ(tasks.size(), 24u);
  const auto m = by_name(tasks);
  ASSERT_EQ(m.size(), tasks.size()) << "task names must be unique (they are directories)";
  // Every dependency names a task listed before it.
  for (size_t i = 0; i < tasks.size(); ++i)
    for (const auto& a : tasks[i].after) {
      auto it = std::find_if(tasks.begin(), tasks.begin() + i, [&](const auto& t) { return t.name == a; });
      EXPECT_NE(it, tasks.begin() + i) << tasks[i].name << " waits for " << a << ", not planned before it";
    }
  const auto& d = *m.at("n3_distill_s1");
  EXPECT_EQ(d.cfg.train.teacher,
            (std::vector<std::string>{"/abl/n3_s1/checkpoint.pt", "/abl/n3_teacher1_s1/checkpoint.pt",
                                      "/abl/n3_teacher2_s1/checkpoint.pt"}));
  EXPECT_EQ(d.after, (std::vector<std::string>{"n3_s1", "n3_teacher1_s1", "n3_teacher2_s1"}));
  EXPECT_EQ(d.cfg.train.seed, 1u);
  for (int t = 1; t <= 2; ++t) {
    const auto& member = *m.at("n3_teacher" + std::to_string(t) + "_s1");
    EXPECT_EQ(member.kind, train::AblationTask::kTrain);
    EXPECT_TRUE(member.row.empty());
    EXPECT_TRUE(member.cfg.train.teacher.empty());
    EXPECT_EQ(member.cfg.model.branches, 3);
    EXPECT_EQ(member.cfg.data.subset_seed, 1u);             // the student's 500 images
    EXPECT_EQ(member.cfg.train.seed, 1u + 1000u * t);       // from another initialisation
    EXPECT_EQ(member.cfg.train.out_dir, "/abl/n3_teacher" + std::to_string(t) + "_s1");
  }
  const auto& e = *m.at("n3_teacher_s1");
  EXPECT_EQ(e.kind, train::AblationTask::kEnsemble);
  EXPECT_EQ(e.row, "N=3 teacher (ensemble of 3)");
  EXPECT_EQ(e.source_checkpoints, d.cfg.train.teacher);
  // Table 1's first row: the same N = 1 backbone without stochastic depth
  // (the base config's resnest-tiny has drop path 0.1), nothing else changed.
  const auto& nosd = *m.at("n1_nosd_s1");
  EXPECT_EQ(nosd.row, "N=1 w/o stochastic depth");
  EXPECT_EQ(nosd.cfg.model.drop_path, 0.0);
  EXPECT_EQ(m.at("n1_s1")->cfg.model.drop_path, 0.1);
  EXPECT_EQ(nosd.cfg.train.seed, 1u);
  EXPECT_EQ(nosd.cfg.data.subset_seed, 1u);
  EXPECT_EQ(nosd.cfg.model.branches, 1);
  EXPECT_TRUE(nosd.cfg.train.teacher.empty());
  EXPECT_EQ(m.count("n3_nosd_s1"), 0u);
  const auto& f = *m.at("n3_distill_fusion_s1");
  EXPECT_EQ(f.kind, train::AblationTask::kFuse);
  EXPECT_EQ(f.after, std::vector<std::string>{"n3_distill_s1"});
  EXPECT_EQ(f.source_checkpoints, std::vector<std::string>{"/abl/n3_distill_s1/checkpoint.pt"});

  // The summary leaves the members out and orders each N as Table 1 does.
  std::vector<double> top1(tasks.size()), seconds(tasks.size(), 10.0);
  for (size_t i = 0; i < tasks.size(); ++i) top1[i] = 0.8 + 0.01 * double(tasks[i].seed);
  const auto rows = train::summarise_ablation(tasks, top1, seconds);
  std::vector<std::string> names;
  for (const auto& r : rows) names.push_back(r.row);
  EXPECT_EQ(names, (std::vector<std::string>{"N=1 w/o stochastic depth", "N=1", "N=1 teacher (ensemble of 3)",
                                             "N=1 + distill", "N=3",
                                             "N=3 teacher (ensemble of 3)", "N=3 + distill",
                                             "N=3 + distill + fusion"}));
  for (const auto& r : rows) {
    ASSERT_EQ(r.top1.size(), 2u) << r.row;
    EXPECT_NEAR(r.mean, 0.805, 1e-12) << r.row;
    EXPECT_NEAR(r.spread, 0.01 / std::sqrt(2.0), 1e-12) << r.row;
  }
}

TEST(Ablation, OneTeacherIsThePlainModelOfTheSameSeed) {
  train::AblationGrid g;
  g.branches = {3};
  g.seeds = 1;
  const auto tasks = train::plan_ablation(g, kBase, "/abl", "test");
  std::vector<std::string> names;
  for (const auto& t : tasks) names.push_back(t.name);
  EXPECT_EQ(names, (std::vector<std::string>{"n3_s0", "n3_nodiv_s0", "n3_distill_s0", "n3_distill_fusion_s0"}));
  EXPECT_EQ(tasks[1].cfg.train.diversity_weight, 0.0);
  EXPECT_EQ(tasks[2].cfg.train.teacher, std::vector<std::string>{"/abl/n3_s0/checkpoint.pt"});
  EXPECT_EQ(tasks[2].after, std::vector<std::string>{"n3_s0"});
}

// Without stochastic depth in the base config, or with the row switched off,
// there is no separate row for it.
TEST(Ablation, NoStochasticDepthRowOnlyWhenTheBaseHasIt) {
  train::AblationGrid g;
  g.branches = {1};
  g.seeds = 1;
  g.distill = false;
  auto names = [](const std::vector<train::AblationTask>& tasks) {
    std::vector<std::string> n;
    for (const auto& t : tasks) n.push_back(t.name);
    return n;
  };
  EXPECT_EQ(names(train::plan_ablation(g, kBase, "/abl", "test")), (std::vector<std::string>{"n1_nosd_s0", "n1_s0"}));
  json no_sd = kBase;
  no_sd["model"]["drop_path"] = 0.0;
  EXPECT_EQ(names(train::plan_ablation(g, no_sd, "/abl", "test")), std::vector<std::string>{"n1_s0"});
  g = train::parse_ablation_grid(json{{"branches", {1}}, {"seeds", 1}, {"distill", false}, {"no_stochastic_depth", false}},
                                 "abl.toml");
  EXPECT_EQ(names(train::plan_ablation(g, kBase, "/abl", "test")), std::vector<std::string>{"n1_s0"});
}

TEST(Ablation, BadGridsAreErrorsNamingTheKey) {
  test::expect_error([] { train::parse_ablation_grid(json{{"teachers", 0}}, "abl.toml"); },
                     {"abl.toml", "ablation.teachers", ">= 1"});
  test::expect_error([] { train::parse_ablation_grid(json{{"branches", json::array()}}, "abl.toml"); },
                     {"abl.toml", "ablation.branches", "non-empty"});
  test::expect_error([] { train::parse_ablation_grid(json{{"teacher", 2}}, "abl.toml"); },
                     {"abl.toml", "ablation.teacher", "not a key", "teachers"});
  test::expect_error([] { train::parse_ablation_grid(json{{"no_stochastic_depth", 1}}, "abl.toml"); },
                     {"abl.toml", "ablation.no_stochastic_depth", "true or false"});
  test::expect_error([] { train::parse_ablation_grid(json{{"first_seed", -1}}, "abl.toml"); },
                     {"abl.toml", "ablation.first_seed", ">= 0"});
  // Keys the plan sets for each run were replaced without a word (--set model.branches=3 still ran 1, 3, 5).
  for (const auto& [section, key] : {std::pair{"model", "branches"}, {"train", "seed"}, {"train", "out_dir"}}) {
    json fixed = kBase;
    fixed[section][key] = key == std::string("out_dir") ? json("x") : json(3);
    test::expect_error([&] { train::plan_ablation(train::AblationGrid{}, fixed, "/abl", "abl.toml"); },
                       {"abl.toml", std::string(section) + "." + key + ": an ablation sets it for each run"});
  }
  json views = kBase;
  views["train"] = {{"branch_views", true}};
  test::expect_error([&] { train::plan_ablation(train::AblationGrid{}, views, "/abl", "abl.toml"); },
                     {"abl.toml", "train.branch_views", "train.diversity_weight = 0", "--no-diversity 0"});
  views["train"]["diversity_weight"] = 0.0;
  train::AblationGrid no_div_rows;
  no_div_rows.no_diversity = {};
  EXPECT_FALSE(train::plan_ablation(no_div_rows, views, "/abl", "abl.toml").empty());
  train::AblationGrid twice;
  twice.branches = {1, 3, 3};
  test::expect_error([&] { train::plan_ablation(twice, kBase, "/abl", "abl.toml"); },
                     {"abl.toml", "N = 3 twice", "each N once"});
  test::expect_error(
      [] { train::parse_ablation_grid(json{{"branches", {1, 3}}, {"no_diversity", {5}}}, "abl.toml"); },
      {"abl.toml", "no_diversity N = 5", "also in ablation branches"});
  // N = 1 has no diversity loss to leave out.
  test::expect_error(
      [] { train::parse_ablation_grid(json{{"branches", {1, 3}}, {"no_diversity", {1}}}, "abl.toml"); },
      {"no_diversity N = 1"});
  EXPECT_NO_THROW(train::parse_ablation_grid(json{{"branches", {1, 3}}, {"no_diversity", {0}}}, "abl.toml"));
  const json vit = {{"model", {{"preset", "vit-tiny"}}}};
  test::expect_error([&] { train::plan_ablation(train::AblationGrid{}, vit, "/abl", "abl.toml"); },
                     {"abl.toml", "ResNeSt", "model.family = vit"});
}

// A table grown by a seed plans only that seed's runs, under the names, seeds,
// subsets and teachers the whole table would give them, so the runs of both
// sit side by side in one directory.
TEST(Ablation, FirstSeedPlansTheRunsOfThoseSeedsAsTheWholeTableWould) {
  train::AblationGrid whole;
  whole.branches = {1, 3};
  whole.teachers = 3;
  const auto all = train::plan_ablation(whole, kBase, "/abl", "test");  // seeds 0-2
  auto grown = train::parse_ablation_grid(json{{"branches", {1, 3}}, {"teachers", 3}, {"seeds", 1}, {"first_seed", 2}},
                                          "abl.toml");
  const auto part = train::plan_ablation(grown, kBase, "/abl", "test");
  const auto m = by_name(all);
  size_t seed2 = 0;
  for (const auto& t : all) seed2 += t.seed == 2;
  ASSERT_EQ(part.size(), seed2);
  for (const auto& t : part) {
    EXPECT_EQ(t.seed, 2u) << t.name;
    ASSERT_EQ(m.count(t.name), 1u) << t.name;
    const auto& w = *m.at(t.name);
    EXPECT_EQ(t.cfg.train.seed, w.cfg.train.seed) << t.name;
    EXPECT_EQ(t.cfg.data.subset_seed, w.cfg.data.subset_seed) << t.name;
    EXPECT_EQ(t.cfg.train.teacher, w.cfg.train.teacher) << t.name;
    EXPECT_EQ(t.after, w.after) << t.name;
  }
  EXPECT_EQ(by_name(part).at("n3_teacher2_s2")->cfg.train.seed, 2002u);
}

// The CSV has a line per seed: its seconds are that seed's (they were the row's mean). The Markdown's mean keeps
// a decimal under 10 s (a fusion step of 0.4 s read 0).
TEST(Ablation, TablesHoldEachSeedsSecondsAndShortRowsKeepADecimal) {
  train::AblationGrid g;
  g.branches = {3};
  g.seeds = 2;
  const auto tasks = train::plan_ablation(g, kBase, "/abl", "test");
  std::vector<double> top1(tasks.size(), 0.8), seconds(tasks.size());
  for (size_t i = 0; i < tasks.size(); ++i)
    seconds[i] = tasks[i].kind == train::AblationTask::kFuse ? 0.2 + 0.2 * double(tasks[i].seed)
                                                             : 100.0 + 20.0 * double(tasks[i].seed);
  const auto rows = train::summarise_ablation(tasks, top1, seconds);
  test::TempDir dir;
  train::write_ablation(rows, dir.path().string());
  const auto csv = test::bytes_of(dir.file("ablation.csv")), md = test::bytes_of(dir.file("ablation.md"));
  EXPECT_NE(csv.find("\nN=3,3,1,0,0,0,0.8000,100.0\n"), std::string::npos) << csv;
  EXPECT_NE(csv.find("\nN=3,3,1,0,0,1,0.8000,120.0\n"), std::string::npos) << csv;
  EXPECT_NE(csv.find(",1,0.8000,0.4"), std::string::npos) << csv;
  EXPECT_NE(md.find("| 110 |"), std::string::npos) << md;
  EXPECT_NE(md.find("| 0.3 |"), std::string::npos) << md;
  // A table of seeds 5 and 6 (--first-seed 5) said seed 0 and 1: two machines' shares both claimed seed 0.
  g.first_seed = 5;
  const auto later = train::plan_ablation(g, kBase, "/abl", "test");
  train::write_ablation(train::summarise_ablation(later, top1, seconds), dir.path().string());
  const auto csv5 = test::bytes_of(dir.file("ablation.csv"));
  EXPECT_NE(csv5.find("\nN=3,3,1,0,0,5,0.8000,"), std::string::npos) << csv5;
  EXPECT_NE(csv5.find("\nN=3,3,1,0,0,6,0.8000,"), std::string::npos) << csv5;
  EXPECT_EQ(csv5.find("\nN=3,3,1,0,0,0,"), std::string::npos) << csv5;
}
