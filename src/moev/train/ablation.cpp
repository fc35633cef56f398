#include "moev/train/ablation.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>
#include <set>

#include "moev/core/error.h"
#include "moev/io/table.h"
#include "moev/viz/plot.h"

namespace moev::train {

using nlohmann::json;
namespace fs = std::filesystem;

AblationGrid parse_ablation_grid(const json& s, const std::string& source) {
  AblationGrid g;
  MOEV_CHECK(s.is_object(), source, ": [ablation] must be a table");
  auto ints = [&](const char* key, std::vector<int64_t>& out, bool allow_empty) {
    const auto& v = s[key];
    MOEV_CHECK(v.is_array() && (allow_empty || !v.empty()), source, ": ablation.", key,
               ": expected a", allow_empty ? "" : " non-empty", " list of integers");
    out.clear();
    for (const auto& x : v) {
      MOEV_CHECK(x.is_number_integer(), source, ": ablation.", key, ": expected integers, got ", x.dump());
      out.push_back(x.get<int64_t>());
    }
  };
  for (auto it = s.begin(); it != s.end(); ++it) {
    const auto& k = it.key();
    if (k == "branches") ints("branches", g.branches, false);
    else if (k == "no_diversity") ints("no_diversity", g.no_diversity, true);
    else if (k == "seeds") {
      MOEV_CHECK(it->is_number_integer() && it->get<int64_t>() >= 1, source, ": ablation.seeds: expected an integer >= 1");
      g.seeds = it->get<int64_t>();
    } else if (k == "first_seed") {
      MOEV_CHECK(it->is_number_integer() && it->get<int64_t>() >= 0, source,
                 ": ablation.first_seed: expected an integer >= 0");
      g.first_seed = it->get<int64_t>();
    } else if (k == "teachers") {
      MOEV_CHECK(it->is_number_integer() && it->get<int64_t>() >= 1, source,
                 ": ablation.teachers: expected an integer >= 1 (models in each distillation teacher)");
      g.teachers = it->get<int64_t>();
    } else if (k == "distill" || k == "fusion" || k == "no_stochastic_depth") {
      MOEV_CHECK(it->is_boolean(), source, ": ablation.", k, ": expected true or false");
      (k == "distill" ? g.distill : k == "fusion" ? g.fusion : g.no_stochastic_depth) = it->get<bool>();
    } else {
      fail(source, ": ablation.", k,
           " is not a key (branches, no_diversity, seeds, first_seed, distill, fusion, teachers, no_stochastic_depth)");
    }
  }
  for (auto n : g.branches) MOEV_CHECK(n >= 1, source, ": ablation.branches: ", n, ": expected >= 1 branch");
  if (s.contains("branches") && s.contains("no_diversity")) check_no_diversity(g, source);
  return g;
}

void check_no_diversity(const AblationGrid& g, const std::string& source) {
  for (auto n : g.no_diversity)
    MOEV_CHECK(n == 0 || (n >= 2 && std::count(g.branches.begin(), g.branches.end(), n)), source,
               ": ablation no_diversity N = ", n, ": expected 0 (none) or an N >= 2 that is also in ",
               "ablation branches");
}

std::vector<AblationTask> plan_ablation(const AblationGrid& g, const json& base, const std::string& out_dir,
                                        const std::string& source) {
  io::RunConfig common;
  io::apply_json(common, base, source);
  // Each run's own: the plan replaced them in every run without a word (--set model.branches=3 still ran 1, 3, 5).
  io::refuse_planned_keys(base, source, "an ablation",
                          {{"model", "branches", "ablation.branches (--branches)"},
                           {"train", "seed", "the run's seed (ablation.seeds, --first-seed)"},
                           {"data", "subset_seed", "the run's seed (ablation.seeds, --first-seed)"},
                           {"train", "teacher", "the plain runs of its seed (ablation.teachers)"},
                           {"train", "out_dir", "--out and the run's name"}});
  MOEV_CHECK(common.model.family == "resnest", source, ": the ablation needs a ResNeSt model ",
             "(model.preset = \"resnest-tiny\" or model.family = \"resnest\"), got model.family = ",
             common.model.family);
  // With branch views the diversity loss is refused (it compares branches on
  // one image), so the rows with and without it would be one row run twice.
  MOEV_CHECK(!common.train.branch_views || (common.train.diversity_weight == 0 && g.no_diversity.empty()), source,
             ": train.branch_views = true needs train.diversity_weight = 0 and no rows without the diversity ",
             "loss (ablation.no_diversity = [] or --no-diversity 0)");
  // A repeated N would run its directories twice and count one seed's result
  // as two.
  for (size_t i = 0; i < g.branches.size(); ++i)
    MOEV_CHECK(std::count(g.branches.begin(), g.branches.end(), g.branches[i]) == 1, source,
               ": ablation branches list N = ", g.branches[i], " twice: expected each N once");
  std::vector<AblationTask> tasks;
  MOEV_CHECK(g.seeds >= 1 && g.first_seed >= 0, source, ": ablation seeds = ", g.seeds, ", first_seed = ",
             g.first_seed, ": expected seeds >= 1 and first_seed >= 0");
  for (int64_t seed = g.first_seed; seed < g.first_seed + g.seeds; ++seed) {
    for (int64_t n : g.branches) {
      auto make = [&](const std::string& tag, const std::string& row, bool div, bool distill) {
        AblationTask t;
        t.name = "n" + std::to_string(n) + tag + "_s" + std::to_string(seed);
        t.row = "N=" + std::to_string(n) + row;
        t.branches = n;
        t.diversity = div && n > 1;
        t.distill = distill;
        t.seed = static_cast<uint64_t>(seed);
        t.cfg = common;
        t.cfg.model.branches = n;
        t.cfg.train.seed = t.seed;
        t.cfg.data.subset_seed = t.seed;
        if (!div) t.cfg.train.diversity_weight = 0;
        t.cfg.train.out_dir = (fs::path(out_dir) / t.name).string();
        return t;
      };
      auto plain = make("", "", true, false);
      models::validate(plain.cfg.model);
      if (n == 1 && g.no_stochastic_depth && plain.cfg.model.drop_path > 0) {
        auto nosd = make("_nosd", " w/o stochastic depth", true, false);
        nosd.stochastic_depth = false;
        nosd.cfg.model.drop_path = 0;
        tasks.push_back(nosd);
      }
      tasks.push_back(plain);
      if (n > 1 && std::count(g.no_diversity.begin(), g.no_diversity.end(), n))
        tasks.push_back(make("_nodiv", " w/o diversity", false, false));
      if (!g.distill) continue;
      auto d = make("_distill", " + distill", true, true);
      d.cfg.train.teacher = {(fs::path(plain.cfg.train.out_dir) / "checkpoint.pt").string()};
      d.after = {plain.name};
      std::vector<AblationTask> members;
      for (int64_t m = 1; m < g.teachers; ++m) {
        auto t = make("_teacher" + std::to_string(m), "", true, false);
        t.row.clear();
        t.cfg.train.seed = t.seed + 1000 * static_cast<uint64_t>(m);  // another init, the same images
        d.cfg.train.teacher.push_back((fs::path(t.cfg.train.out_dir) / "checkpoint.pt").string());
        d.after.push_back(t.name);
        members.push_back(t);
      }
      if (!members.empty()) {
        tasks.insert(tasks.end(), members.begin(), members.end());
        auto e = make("_teacher", " teacher (ensemble of " + std::to_string(g.teachers) + ")", true, false);
        e.kind = AblationTask::kEnsemble;
        e.teacher = true;
        e.after = d.after;
        e.source_checkpoints = d.cfg.train.teacher;
        tasks.push_back(e);
      }
      tasks.push_back(d);
      if (g.fusion && n > 1) {
        auto f = make("_distill_fusion", " + distill + fusion", true, true);
        f.kind = AblationTask::kFuse;
        f.fusion = true;
        f.after = {d.name};
        f.source_checkpoints = {(fs::path(d.cfg.train.out_dir) / "checkpoint.pt").string()};
        tasks.push_back(f);
      }
    }
  }
  return tasks;
}

namespace {
// Table 1's order within an N: w/o stochastic depth, plain, w/o diversity,
// the teacher, distill, distill + fusion.
int row_kind(const AblationRow& r) {
  if (!r.stochastic_depth) return -1;
  return r.fusion ? 4 : r.distill ? 3 : r.teacher ? 2 : (!r.diversity && r.branches > 1) ? 1 : 0;
}
}  // namespace

std::vector<AblationRow> summarise_ablation(const std::vector<AblationTask>& tasks, const std::vector<double>& top1,
                                            const std::vector<double>& seconds) {
  MOEV_CHECK(top1.size() == tasks.size() && seconds.size() == tasks.size(),
             "summarise_ablation: one result per task expected");
  std::vector<AblationRow> rows;
  std::map<std::string, size_t> at;
  for (size_t i = 0; i < tasks.size(); ++i) {
    const auto& t = tasks[i];
    if (t.row.empty()) continue;
    if (!at.count(t.row)) {
      at[t.row] = rows.size();
      AblationRow r;
      r.row = t.row;
      r.branches = t.branches;
      r.diversity = t.diversity;
      r.distill = t.distill;
      r.fusion = t.fusion;
      r.teacher = t.teacher;
      r.stochastic_depth = t.stochastic_depth;
      rows.push_back(r);
    }
    auto& r = rows[at[t.row]];
    r.top1.push_back(top1[i]);
    r.seed_seconds.push_back(seconds[i]);
    r.seeds.push_back(t.seed);
    r.seconds += seconds[i];
  }
  for (auto& r : rows) {
    const double n = double(r.top1.size());
    for (double v : r.top1) r.mean += v / n;
    double ss = 0;
    for (double v : r.top1) ss += (v - r.mean) * (v - r.mean);
    r.spread = r.top1.size() > 1 ? std::sqrt(ss / (n - 1)) : 0.0;
    r.seconds /= n;
  }
  std::stable_sort(rows.begin(), rows.end(), [&](const AblationRow& a, const AblationRow& b) {
    return a.branches != b.branches ? a.branches < b.branches : row_kind(a) < row_kind(b);
  });
  return rows;
}

void write_ablation(const std::vector<AblationRow>& rows, const std::string& out_dir) {
  io::Table csv, md;
  csv.header = {"row", "branches", "diversity", "distill", "fusion", "seed", "top1", "seconds"};
  md.header = {"method", "top-1 mean (%)", "spread (sd, %)", "seeds", "per seed (%)", "train s / seed"};
  for (const auto& r : rows) {
    std::string per;
    for (size_t s = 0; s < r.top1.size(); ++s) {
      csv.add({r.row, std::to_string(r.branches), r.diversity ? "1" : "0", r.distill ? "1" : "0",
               r.fusion ? "1" : "0", std::to_string(s < r.seeds.size() ? r.seeds[s] : s), io::fmt(r.top1[s]),
               io::fmt(r.seed_seconds[s], 1)});
      per += (s ? " / " : "") + io::fmt(100 * r.top1[s], 2);
    }
    // Whole seconds, but a row of seconds (a fusion step on a small set) keeps a decimal: it read 0.
    // One seed has no spread: "0.00" read as seeds that agreed.
    md.add({r.row, io::fmt(100 * r.mean, 2), r.top1.size() > 1 ? io::fmt(100 * r.spread, 2) : "-",
            std::to_string(r.top1.size()), per,
            r.seconds > 0 ? io::fmt(r.seconds, r.seconds < 10 ? 1 : 0) : "-"});  // a teacher row trains nothing
  }
  io::write_text_atomic((fs::path(out_dir) / "ablation.csv").string(), csv.csv());
  io::write_text_atomic((fs::path(out_dir) / "ablation.md").string(), md.markdown());
  viz::PlotSpec p;
  p.title = "Multi-branch MoE ablation: mean test top-1 over seeds";
  p.xlabel = "expert branches N";
  p.ylabel = "top-1 (%)";
  for (const auto& r : rows)  // the branch counts run, not 1.5 or 2.5 branches between them
    if (std::find(p.x_ticks.begin(), p.x_ticks.end(), double(r.branches)) == p.x_ticks.end())
      p.x_ticks.push_back(double(r.branches));
  const char* kinds[] = {"plain", "w/o diversity", "teacher ensemble", "+ distill", "+ distill + fusion"};
  for (int k = 0; k < 5; ++k) {
    viz::Series s;
    s.name = kinds[k];
    for (const auto& r : rows) {
      if (row_kind(r) != k) continue;
      s.x.push_back(double(r.branches));
      s.y.push_back(100 * r.mean);
    }
    if (!s.x.empty()) p.series.push_back(s);
  }
  viz::write_plot(p, (fs::path(out_dir) / "ablation.png").string());
}

}  // namespace moev::train
