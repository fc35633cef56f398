// `moev eval`: top-1/top-5 of checkpoints on a test set, with what their MoE
// layers did; K, capacity, BPR and router kind can be changed without retraining.
// With --shift, also on deterministic corruptions of the test set, as one table
// (shift x checkpoint) so dense and MoE models are compared on the same images.
#include <algorithm>
#include <cstdio>
#include <iostream>
#include <optional>
#include <tuple>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "moev/core/device.h"
#include "moev/data/corruptions.h"
#include "moev/hardmoe/hard_moe.h"
#include "moev/io/table.h"
#include "moev/core/error.h"
#include "moev/train/datasets.h"
#include "moev/train/ensemble.h"
#include "moev/train/replicas.h"
#include "moev/train/teacher.h"
#include "moev/train/trained_model.h"
#include "moev/train/trainer.h"

namespace moev::app {

namespace {
struct EvalFlags {
  std::vector<std::string> checkpoints, shifts;
  std::string data, format, device = "cpu", precision, table;
  std::optional<int64_t> k;
  std::optional<double> capacity;
  std::optional<std::string> bpr, router, dropless;
  int64_t batch_size = 256;
  std::optional<int64_t> limit;
  int threads = 0;
  bool json = false;
  bool tta = false;
  bool raw_weights = false;
};
}  // namespace

Runner add_eval(CLI::App& app) {
  auto* cmd = app.add_subcommand("eval", "evaluate a checkpoint on its test set");
  auto f = std::make_shared<EvalFlags>();
  // Checked in the command, not by CLI11: its help listed the positional and the flag each as REQUIRED, and its
  // error named the flag alone.
  cmd->add_option("checkpoint,--checkpoint", f->checkpoints, "checkpoint file(s), positional or after --checkpoint");
  cmd->add_option("--shift", f->shifts,
                  "corrupted test set NAME:SEVERITY (1-5), NAME (all severities) or all; "
                  "names: gaussian_noise, blur, rotate, contrast, occlusion (repeatable)");
  auto* table_option = cmd->add_option("--table", f->table, "with --shift: write the table to PREFIX.csv and PREFIX.md");
  cmd->add_option("--data", f->data, "test data: a directory, or a manifest CSV (default: the training run's)");
  cmd->add_option("--format", f->format, "fashion-mnist, cifar10, folder or manifest");
  cmd->add_option("--k", f->k, "experts per token at inference");
  cmd->add_option("--capacity", f->capacity, "capacity ratio C at inference");
  cmd->add_option("--bpr", f->bpr, "Batch Priority Routing: on or off");
  cmd->add_option("--dropless", f->dropless, "no capacity limit: on or off (off: a dropless model with --capacity)");
  cmd->add_option("--router", f->router, "router kind: topk or expert_choice");
  cmd->add_option("--batch-size", f->batch_size, "images per forward pass");
  add_limit_option(cmd, f->limit);
  cmd->add_option("--threads", f->threads, "threads, 0 = all cores");
  cmd->add_option("--device", f->device, "cpu or cuda[:N]");
  cmd->add_option("--precision", f->precision, "GEMM precision fp32 or bf16 (default: as trained)");
  cmd->add_flag("--json", f->json, "print the result as JSON");
  cmd->add_flag("--raw-weights", f->raw_weights,
                "the last training weights, not the run's weight average (runs with train.ema_decay)");
  cmd->add_flag("--tta", f->tta,
                "also with test-time augmentation: up to ten crops (5 shifts x flip, as far as the run's training "
                "augmentation shifted and flipped) and a 1.15x view (not for ViTs)");
  cmd->footer(
      "\nExamples:\n"
      "  moev eval runs/vmoe/checkpoint.pt --capacity 0.5 --bpr on\n"
      "  moev eval runs/dense/checkpoint.pt runs/moe/checkpoint.pt --shift all --table shift");
  return [f, table_option]() {
    MOEV_CHECK(!f->checkpoints.empty(), "eval: no checkpoint given; expected moev eval CHECKPOINT [CHECKPOINT...]");
    const int threads = train::set_threads(f->threads);
    const auto device = parse_device(f->device);
    MOEV_CHECK(f->batch_size >= 1, "--batch-size ", f->batch_size, ": expected >= 1");
    check_limit(f->limit);
    std::vector<data::Shift> shifts;
    for (const auto& s : f->shifts) {
      auto more = data::parse_shifts(s);
      shifts.insert(shifts.end(), more.begin(), more.end());
    }
    for (size_t i = 0; i < shifts.size(); ++i)
      for (size_t k = 0; k < i; ++k)
        MOEV_CHECK(data::to_string(shifts[i]) != data::to_string(shifts[k]), "--shift: ", data::to_string(shifts[i]),
                   " is asked for twice; each corruption is one row of the table");
    MOEV_CHECK(!table_option->count() || !f->table.empty(), "--table is empty: expected a file prefix");
    MOEV_CHECK(f->table.empty() || !shifts.empty(), "--table needs --shift");
    // Before the evaluation: an unwritable place was found only when the table was written, after it.
    if (!f->table.empty()) check_parent_directory(f->table + ".csv", "--table");
    // The shift table scores one view per image: a --tta beside it changed the clean line only.
    MOEV_CHECK(!f->tta || shifts.empty(), "--tta with --shift: the shift table scores each corrupted test set in ",
               "one view; run the test-time augmentation as a command of its own");
    train::RouterOverrides o;
    o.k = f->k;
    o.capacity = f->capacity;
    o.kind = f->router;
    for (auto [flag, value, into] : {std::tuple{"--bpr", &f->bpr, &o.bpr}, {"--dropless", &f->dropless, &o.dropless}})
      if (*value) {
        MOEV_CHECK(**value == "on" || **value == "off", flag, " ", **value, ": expected on or off");
        *into = **value == "on";
      }
    // The TTA line scores the checkpoint as trained, read afresh: routing overrides, raw weights and a precision
    // changed the plain line only, and the TTA line silently kept the run's own. Refused before any evaluation.
    if (f->tta) {
      MOEV_CHECK(f->data.empty() && f->format.empty(), "--tta evaluates the run's own test set: drop --data/--format");
      MOEV_CHECK(!o.any() && !f->raw_weights && f->precision.empty(), "--tta scores each model as trained (its ",
                 "routing, weight average and precision); --k, --capacity, --bpr, --router, --dropless, --raw-weights ",
                 "and --precision would change the plain line only: give them without --tta");
    }
    // The data each checkpoint is scored on, as the loop below sets it.
    auto test_data_of = [&](const io::RunConfig& cfg) {
      auto data = cfg.data;
      if (!f->data.empty()) data.path = data.test_path = f->data;
      if (!f->format.empty()) data.format = f->format;
      if (f->limit) data.test_limit = *f->limit;
      return data;
    };
    auto refuse_other_test_set = [&](const std::string& ckpt, const std::string& differ) {
      MOEV_CHECK(differ.empty(), "--shift: ", ckpt, " is scored on other test images than ", f->checkpoints[0],
                 " (", differ, "); the table compares models on the same images: set them with --data/--limit");
    };
    // What can be known from the files alone is checked before any model is scored: the second checkpoint's
    // other test set, or a hard MoE under --tta, was refused only after the first had been evaluated.
    std::optional<std::pair<io::RunConfig, train::DataConfig>> first;
    std::optional<int64_t> first_whole;  // the first's test set without a limit, read only if limits differ
    for (const auto& ckpt : f->checkpoints) {
      MOEV_CHECK(!f->tta || !hardmoe::is_hard_moe_file(ckpt), "--tta: ", ckpt, " is a hard MoE; evaluate it ",
                 "without --tta");
      if (shifts.empty() || f->checkpoints.size() < 2) continue;
      const auto cfg = train::trained_config(ckpt);
      const auto data = test_data_of(cfg);
      if (!first) first.emplace(cfg, data);
      auto differ = train::test_data_difference(first->second, data);
      // Two limits are two test sets unless both reach past its end (20000 and 0 on 10000 images are the same).
      if (differ.empty() && first->second.test_limit != data.test_limit) {
        if (!first_whole) {
          auto whole = first->second;
          whole.test_limit = 0;
          first_whole = train::open_datasets(whole, first->first.model, /*load_train=*/false).test.size();
        }
        auto images = [&](int64_t limit) { return limit > 0 ? std::min(limit, *first_whole) : *first_whole; };
        if (images(first->second.test_limit) != images(data.test_limit))
          differ = "data.test_limit " + std::to_string(first->second.test_limit) + " vs " +
                   std::to_string(data.test_limit) + ", of " + std::to_string(*first_whole) + " test images";
      }
      refuse_other_test_set(ckpt, differ);
    }
    // Rows: clean, then each shift; one top-1 column per checkpoint.
    io::Table table;
    table.header = {"test set"};
    table.rows.assign(1 + shifts.size(), {});
    table.rows[0] = {"clean"};
    for (size_t i = 0; i < shifts.size(); ++i) table.rows[i + 1] = {data::to_string(shifts[i])};
    std::vector<double> shift_mean;
    std::string metric = "top-1";  // precision@1 for a multi-label test set (the checkpoints share one)
    nlohmann::json all = nlohmann::json::array();
    std::optional<std::pair<train::DataConfig, int64_t>> first_test;  // the table's test set and its size
    for (const auto& ckpt : f->checkpoints) {
      auto t = train::load_trained(ckpt, device, f->precision, f->raw_weights);
      note_trained(t);
      if (f->raw_weights && t.cfg.train.ema_decay <= 0)  // said, as a flag that changes nothing should be
        std::cerr << "note: " << ckpt << " was trained without a weight average (train.ema_decay = 0): "
                  << "--raw-weights evaluates the weights it would without the flag\n";
      MOEV_CHECK(train::apply_router_overrides(*t.model, o) > 0 || !o.any(), ckpt,
                 ": --k, --capacity, --bpr, --router and --dropless set how MoE layers route, and this model has ",
                 "none (model.moe = ",
                 models::to_string(t.cfg.model.moe), "); drop them");
      const auto data = test_data_of(t.cfg);
      auto ds = train::open_test_set(t, data, ckpt);
      MOEV_CHECK(!f->tta || !ds.test.multilabel(), "--tta: ", ckpt, " was trained on tagged images (a manifest); ",
                 "test-time augmentation scores single-label runs: evaluate it without --tta");
      // The shift table sets models side by side on the same images.
      if (!shifts.empty() && first_test) {
        auto differ = train::test_data_difference(first_test->first, data);
        if (first_test->second != ds.test.size())
          differ += (differ.empty() ? "" : ", ") + std::to_string(ds.test.size()) + " test images vs " +
                    std::to_string(first_test->second);
        refuse_other_test_set(ckpt, differ);
      }
      if (!first_test) first_test.emplace(data, ds.test.size());
      // After the overrides: the replicas copy the master's routing settings.
      // A hard MoE is not rebuilt from a model config: one replica, all threads inside it.
      train::Replicas reps(t.model, t.cfg.model,
                           t.replicable ? train::resolve_replicas(0, threads, f->batch_size) : 1, threads);
      auto* hard = dynamic_cast<hardmoe::HardMoEImpl*>(t.model.get());
      if (hard) hard->reset_served();
      const int64_t slices_of = train::slice_multiple(t.cfg.model);
      if (train::eval_batch_size(f->batch_size, slices_of) != f->batch_size)
        std::cerr << "note: " << ckpt << " routes groups of moe.group_size = " << slices_of << " images: evaluated "
                  << "in batches of " << train::eval_batch_size(f->batch_size, slices_of) << ", whole groups, not "
                  << "--batch-size " << f->batch_size << " (a last smaller group would route otherwise)\n";
      const bool sigmoid_tags = t.cfg.train.multilabel_loss == "sigmoid";
      auto r = train::evaluate(reps, ds.test, ds.mean, ds.std, f->batch_size, device,
                               f->json ? nullptr : &std::cerr, stderr_is_terminal(), false,
                               slices_of, sigmoid_tags);
      nlohmann::json j{{"checkpoint", ckpt}, {"weights", t.averaged ? "average" : "trained"},
                       {"images", r.images}, {"top1", r.top1},
                       {"top5", r.top5}, {"loss", r.loss}, {"images_per_s", r.images_per_s},
                       {"expert_load", r.expert_load}, {"dropped", r.dropped}, {"unrouted", r.unrouted},
                       {"step", t.step}, {"finished", t.unfinished.empty()}};  // a script reads no stderr note
      if (r.multilabel)
        j["multilabel"] = {{"precision_at_1", r.top1}, {"k", r.k}, {"precision_at_k", r.precision_at_k},
                           {"recall_at_k", r.recall_at_k}, {"mean_ap", r.mean_ap}};
      std::vector<int64_t> served;
      if (hard) served = hard->served();
      if (hard) j["hard_moe_images_per_expert"] = served;
      double tta_top5 = 0;
      if (f->tta) {  // the same test set (the run's own data), through the TTA views
        train::EnsembleConfig one;
        one.members = {{ckpt, 1.0}};
        one.tta = true;  // the views it trained on
        auto rt = train::evaluate_ensemble(one, f->limit, f->batch_size, nullptr, false).members[0];
        j["tta_top1"] = rt.top1;
        j["tta_top5"] = rt.top5;
        tta_top5 = rt.top5;
      }
      if (!f->json) {
        std::printf("%s%s on %lld images of %s\n", ckpt.c_str(), t.averaged ? " (weight average)" : "",
                    (long long)r.images, ds.test.source.c_str());
        if (r.multilabel) {
          std::printf("precision@1 %.4f  ", r.top1);
          if (r.k != 1) std::printf("precision@%lld %.4f  ", (long long)r.k, r.precision_at_k);  // else the same
          std::printf("recall@%lld %.4f  mAP %.4f  loss %.4f  %.0f img/s\n", (long long)r.k, r.recall_at_k,
                      r.mean_ap, r.loss, r.images_per_s);
        } else
          std::printf("top-1 %.4f%s  loss %.4f  %.0f img/s\n", r.top1, train::top5_text(r.top5, "  ").c_str(),
                      r.loss, r.images_per_s);
        if (f->tta)
          std::printf("with test-time augmentation: top-1 %.4f%s\n", j["tta_top1"].get<double>(),
                      train::top5_text(tta_top5, "  ").c_str());
        if (hard) {
          std::printf("hard MoE: images per expert");
          for (auto c : served) std::printf(" %lld", (long long)c);
          std::printf("\n");
        }
        for (size_t l = 0; l < r.expert_load.size(); ++l) {
          std::printf("moe layer %zu: dropped %.4f  tokens without an expert %.4f  load", l, r.dropped[l],
                      r.unrouted[l]);
          for (double x : r.expert_load[l]) std::printf(" %.3f", x);
          std::printf("\n");
        }
      }
      table.header.push_back(ckpt);
      table.rows[0].push_back(io::fmt(r.top1));
      if (r.multilabel) metric = "precision@1";
      double sum = 0;
      for (size_t i = 0; i < shifts.size(); ++i) {
        auto shifted = data::corrupt(ds.test, shifts[i]);
        auto rs = train::evaluate(reps, shifted, ds.mean, ds.std, f->batch_size, device, nullptr,
                                  false, false, slices_of, sigmoid_tags);
        table.rows[i + 1].push_back(io::fmt(rs.top1));
        j["shift"][data::to_string(shifts[i])] = rs.top1;
        sum += rs.top1;
        if (!f->json)
          std::fprintf(stderr, "%-18s %s %.4f\n", data::to_string(shifts[i]).c_str(),
                       r.multilabel ? "precision@1" : "top-1", rs.top1);
      }
      shift_mean.push_back(shifts.empty() ? 0 : sum / static_cast<double>(shifts.size()));
      all.push_back(j);
    }
    if (!shifts.empty()) {
      std::vector<std::string> mean_row = {"mean over shifts"};
      for (double m : shift_mean) mean_row.push_back(io::fmt(m));
      table.add(mean_row);
      if (!f->json) std::printf("\n%s under distribution shift\n%s", metric.c_str(), table.markdown().c_str());
    }
    if (!f->table.empty()) {  // with --json too (stdout then holds the JSON alone)
      io::write_text_atomic(f->table + ".csv", table.csv());
      io::write_text_atomic(f->table + ".md", "# " + metric + " under distribution shift\n\n" + table.markdown());
      std::fprintf(f->json ? stderr : stdout, "wrote %s.csv and %s.md\n", f->table.c_str(), f->table.c_str());
    }
    if (f->json) std::cout << io::output_json(all.size() == 1 ? all[0] : all) << "\n";
    return 0;
  };
}

}  // namespace moev::app
