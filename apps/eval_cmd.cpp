// `moev eval`: top-1/top-5 of a checkpoint on a test set, with what its MoE
// layers did; K, capacity, BPR and router kind can be changed without retraining.
#include <cstdio>
#include <iostream>
#include <optional>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "moev/core/device.h"
#include "moev/core/error.h"
#include "moev/train/datasets.h"
#include "moev/train/trained_model.h"
#include "moev/train/trainer.h"

namespace moev::app {

namespace {
struct EvalFlags {
  std::string checkpoint, data, format, device = "cpu", precision;
  std::optional<int64_t> k;
  std::optional<double> capacity;
  std::optional<std::string> bpr, router;
  int64_t batch_size = 256, limit = 0;
  int threads = 0;
  bool json = false;
};
}  // namespace

Runner add_eval(CLI::App& app) {
  auto* cmd = app.add_subcommand("eval", "evaluate a checkpoint on its test set");
  auto f = std::make_shared<EvalFlags>();
  cmd->add_option("checkpoint,--checkpoint", f->checkpoint, "checkpoint file")->required();
  cmd->add_option("--data", f->data, "test data directory (default: the training run's)");
  cmd->add_option("--format", f->format, "fashion-mnist, folder or cifar10");
  cmd->add_option("--k", f->k, "experts per token at inference");
  cmd->add_option("--capacity", f->capacity, "capacity ratio C at inference");
  cmd->add_option("--bpr", f->bpr, "Batch Priority Routing: on or off");
  cmd->add_option("--router", f->router, "router kind: topk or expert_choice");
  cmd->add_option("--batch-size", f->batch_size, "images per forward pass");
  cmd->add_option("--limit", f->limit, "evaluate the first N test images only");
  cmd->add_option("--threads", f->threads, "threads, 0 = all cores");
  cmd->add_option("--device", f->device, "cpu or cuda[:N]");
  cmd->add_option("--precision", f->precision, "GEMM precision fp32 or bf16 (default: as trained)");
  cmd->add_flag("--json", f->json, "print the result as JSON");
  return [f]() {
    train::set_threads(f->threads);
    const auto device = parse_device(f->device);
    MOEV_CHECK(f->batch_size >= 1, "--batch-size ", f->batch_size, ": expected >= 1");
    auto t = train::load_trained(f->checkpoint, device, f->precision);
    train::RouterOverrides o;
    o.k = f->k;
    o.capacity = f->capacity;
    o.kind = f->router;
    if (f->bpr) {
      MOEV_CHECK(*f->bpr == "on" || *f->bpr == "off", "--bpr ", *f->bpr, ": expected on or off");
      o.bpr = *f->bpr == "on";
    }
    train::apply_router_overrides(*t.model, o);
    auto data = t.cfg.data;
    if (!f->data.empty()) data.path = data.test_path = f->data;
    if (!f->format.empty()) data.format = f->format;
    if (f->limit > 0) data.test_limit = f->limit;
    auto ds = train::open_datasets(data, t.cfg.model, /*load_train=*/false);
    auto r = train::evaluate(*t.model, ds.test, ds.mean, ds.std, f->batch_size, device,
                             f->json ? nullptr : &std::cerr, stderr_is_terminal());
    if (f->json) {
      nlohmann::json j{{"checkpoint", f->checkpoint}, {"images", r.images}, {"top1", r.top1},
                       {"top5", r.top5}, {"loss", r.loss}, {"images_per_s", r.images_per_s},
                       {"expert_load", r.expert_load}, {"dropped", r.dropped}};
      std::cout << j.dump(2) << "\n";
      return 0;
    }
    std::printf("%s on %lld images of %s\n", f->checkpoint.c_str(), (long long)r.images,
                ds.test.source.c_str());
    std::printf("top-1 %.4f  top-5 %.4f  loss %.4f  %.0f img/s\n", r.top1, r.top5, r.loss,
                r.images_per_s);
    for (size_t l = 0; l < r.expert_load.size(); ++l) {
      std::printf("moe layer %zu: dropped %.4f  load", l, r.dropped[l]);
      for (double x : r.expert_load[l]) std::printf(" %.3f", x);
      std::printf("\n");
    }
    return 0;
  };
}

}  // namespace moev::app
