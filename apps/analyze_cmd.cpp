// `moev analyze`: how a trained MoE model routes its test set. Per MoE layer an
// expert x class heatmap (PNG), load, dropped fraction and specialisation score;
// with --capacity-curve, top-1 against inference capacity with and without BPR.
// For a multi-branch model, how its branches agree (each one's top-1, pairwise
// disagreement and double fault, the oracle).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "commands.h"
#include "moev/analysis/branch_report.h"
#include "moev/analysis/routing_report.h"
#include "moev/core/device.h"
#include "moev/core/error.h"
#include "moev/hardmoe/hard_moe.h"
#include "moev/io/table.h"
#include "moev/moe/moe_layer.h"
#include "moev/train/datasets.h"
#include "moev/train/evaluate.h"
#include "moev/train/fusion.h"
#include "moev/train/trained_model.h"
#include "moev/train/trainer.h"

namespace moev::app {

namespace {
struct AnalyzeFlags {
  std::string checkpoint, out, data, format, precision;
  int64_t batch_size = 256;
  std::optional<int64_t> limit;
  int threads = 0;
  bool capacity_curve = false;
  std::vector<double> capacities = {0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0};
};
}  // namespace

Runner add_analyze(CLI::App& app) {
  auto* cmd = app.add_subcommand("analyze", "routing heatmaps, specialisation and capacity curve "
                                            "of a trained MoE model; branch agreement of a multi-branch one");
  auto f = std::make_shared<AnalyzeFlags>();
  // Checked in the command, not by CLI11 (as eval's).
  cmd->add_option("checkpoint,--checkpoint", f->checkpoint, "checkpoint file, positional or after --checkpoint");
  cmd->add_option("--out", f->out, "output directory (default: analysis/ beside checkpoint.pt, analysis-NAME/ beside NAME.pt)");
  cmd->add_option("--data", f->data, "test data: a directory, or a manifest CSV (default: the training run's)");
  cmd->add_option("--format", f->format, "fashion-mnist, cifar10, folder or manifest (default: the run's)");
  cmd->add_flag("--capacity-curve", f->capacity_curve,
                "also evaluate top-1 at each --capacities value, with and without BPR");
  auto* capacities = cmd->add_option("--capacities", f->capacities, "capacity ratios of the curve (with --capacity-curve)")
      ->expected(1, 64)
      ->capture_default_str();
  cmd->add_option("--batch-size", f->batch_size, "images per forward pass");
  add_limit_option(cmd, f->limit);
  cmd->add_option("--threads", f->threads, "threads, 0 = all cores");
  cmd->add_option("--precision", f->precision, "GEMM precision fp32 or bf16 (default: as trained)");
  cmd->footer("\nExample:\n  moev analyze runs/vmoe/checkpoint.pt --capacity-curve");
  return [f, capacities]() {
    namespace fs = std::filesystem;
    MOEV_CHECK(!f->checkpoint.empty(), "analyze: no checkpoint given; expected moev analyze CHECKPOINT");
    train::set_threads(f->threads);
    MOEV_CHECK(f->batch_size >= 1, "--batch-size ", f->batch_size, ": expected >= 1");
    check_limit(f->limit);
    for (size_t i = 0; i < f->capacities.size(); ++i) {
      const double c = f->capacities[i];
      MOEV_CHECK(c > 0 && std::isfinite(c), "--capacities: ", c, " is not a capacity ratio > 0");
      for (size_t j = 0; j < i; ++j)
        MOEV_CHECK(f->capacities[j] != c, "--capacities: ", c, " is given twice; expected each ratio once");
    }
    std::sort(f->capacities.begin(), f->capacities.end());  // measured and printed in the curve's order
    MOEV_CHECK(!capacities->count() || f->capacity_curve, "--capacities: the points of the capacity curve, which ",
               "needs --capacity-curve");
    MOEV_CHECK(!hardmoe::declares_hard_moe(f->checkpoint), f->checkpoint, ": a hard MoE, which routes whole images ",
               "to one expert each (moev eval reports how many each served); analyze reads checkpoints with MoE ",
               "layers or branches");
    const auto device = parse_device("cpu");
    auto t = train::load_trained(f->checkpoint, device, f->precision);
    note_trained(t);
    auto layers = moe::find_moe_layers(*t.model);
    const bool branches = t.cfg.model.branches >= 2;
    MOEV_CHECK(!layers.empty() || branches, f->checkpoint, ": the model has no MoE layers (model.moe = ",
               models::to_string(t.cfg.model.moe), ") and one branch (model.branches = ", t.cfg.model.branches,
               "): nothing to analyse; expected MoE layers or model.branches >= 2");
    MOEV_CHECK(!layers.empty() || !f->capacity_curve, f->checkpoint, ": --capacity-curve needs MoE layers, and this ",
               t.cfg.model.branches, "-branch model has none; drop --capacity-curve for its branch agreement");
    auto data = t.cfg.data;
    if (!f->data.empty()) data.path = data.test_path = f->data;
    if (!f->format.empty()) data.format = f->format;  // as eval: a Fashion-MNIST run on photos in folders
    if (f->limit) data.test_limit = *f->limit;
    auto ds = train::open_test_set(t, data, f->checkpoint);
    // Routing by class and branch agreement count each image under one class; a tagged image has several, and
    // its first tag alone (alphabetically) left the columns of late tags empty.
    MOEV_CHECK(!ds.test.multilabel(), f->checkpoint, ": analyze scores single-label test images, and ",
               ds.test.source, " is tagged (multi-label); moev eval reports a tagger's expert load, dropped ",
               "tokens, precision@k and mAP");
    // fused.pt sits beside checkpoint.pt: one analysis/ for both would let either replace the other's report.
    const fs::path ck(f->checkpoint);
    const std::string stem = ck.stem().string();
    const std::string out =
        f->out.empty() ? (ck.parent_path() / (stem == "checkpoint" ? "analysis" : "analysis-" + stem)).string()
                       : f->out;
    {  // before the analysis, not after it: a file in the way, or a directory that cannot be made
      std::error_code ec;
      fs::create_directories(out, ec);
      MOEV_CHECK(!ec && fs::is_directory(out), "--out ", out, ": cannot make a directory there (",
                 ec ? ec.message() : "a file is in the way", ")");
    }
    const std::string title = fs::path(f->checkpoint).parent_path().filename().string();
    if (branches) {
      const auto p = train::predict_branches(*t.model, ds.test, ds.mean, ds.std, f->batch_size, &std::cerr,
                                             stderr_is_terminal());
      const auto a = analysis::branch_agreement(p.branch, p.model, p.labels);
      std::printf("%s: top-1 %.4f on %lld images; branches", f->checkpoint.c_str(), a.model_top1,
                  static_cast<long long>(a.images));
      for (double v : a.top1) std::printf(" %.4f", v);
      std::printf("; some branch right %.4f\n", a.oracle);
      for (const auto& path : analysis::write_branch_report(a, title, out)) std::printf("wrote %s\n", path.c_str());
      if (layers.empty()) return 0;
    }

    auto r = train::evaluate(*t.model, ds.test, ds.mean, ds.std, f->batch_size, device, &std::cerr,
                             stderr_is_terminal(), /*routing_by_class=*/true);
    std::vector<analysis::LayerRouting> lr;
    for (size_t l = 0; l < r.class_counts.size(); ++l)
      lr.push_back({r.layer_names[l], r.class_counts[l], r.expert_load[l], r.dropped[l], r.unrouted[l],
                    r.image_bits[l], r.chance_image_bits[l], r.class_gate_sums[l], r.class_tokens[l]});
    auto files = analysis::write_routing_report(lr, t.class_names, title, out);
    std::printf("%s: top-1 %.4f on %lld images\n", f->checkpoint.c_str(), r.top1,
                (long long)r.images);
    for (size_t l = 0; l < lr.size(); ++l)
      std::printf("  %-22s specialisation %s (weighted %s)  MI %.3f bits  experts/image %.2f (chance %.2f)  dropped %.4f  "
                  "tokens without an expert %.4f\n",
                  lr[l].name.c_str(), analysis::score_text(analysis::specialisation(lr[l].counts)).c_str(),
                  analysis::score_text(analysis::weighted_specialisation(lr[l].gate_sums)).c_str(),
                  analysis::mutual_information_bits(lr[l].counts), std::exp2(lr[l].image_bits),
                  std::exp2(lr[l].chance_image_bits), lr[l].dropped, lr[l].unrouted);

    if (f->capacity_curve) {
      std::vector<analysis::CapacityPoint> points;
      // Expert choice has no token priority for BPR to change: one curve. A
      // dropless model is routed with each capacity, as the curve asks.
      const bool expert_choice = layers[0]->router_config().kind == moe::RouterKind::kExpertChoice;
      for (bool bpr : {false, true})
        for (double c : f->capacities) {
          if (bpr && expert_choice) continue;
          train::RouterOverrides o;
          o.capacity = c;
          o.bpr = bpr;
          if (!expert_choice) o.dropless = false;
          train::apply_router_overrides(*t.model, o);
          auto e = train::evaluate(*t.model, ds.test, ds.mean, ds.std, f->batch_size, device);
          double dropped = 0, unrouted = 0;
          for (size_t l = 0; l < e.dropped.size(); ++l) {
            dropped += e.dropped[l] / static_cast<double>(e.dropped.size());
            unrouted += e.unrouted[l] / static_cast<double>(e.unrouted.size());
          }
          points.push_back({c, bpr, e.top1, dropped, unrouted});
          std::fprintf(stderr, "capacity %.3f  bpr %-3s  top-1 %.4f  dropped %.4f  tokens without an expert %.4f\n",
                       c, expert_choice ? "-" : bpr ? "on" : "off", e.top1, dropped, unrouted);
        }
      // The image count in the title: an earlier --capacity-curve's files stay beside a later analysis's, and a
      // --limit of either made the two read as one analysis.
      auto more = analysis::write_capacity_curve(
          points, title + ": top-1 against capacity, " + std::to_string(ds.test.size()) + " test images", out,
          expert_choice);
      files.insert(files.end(), more.begin(), more.end());
    }
    for (const auto& p : files) std::printf("wrote %s\n", p.c_str());
    return 0;
  };
}

}  // namespace moev::app
