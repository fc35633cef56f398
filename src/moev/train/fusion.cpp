#include "moev/train/fusion.h"

#include <chrono>
#include <filesystem>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/data/batch_loader.h"
#include "moev/io/run_config.h"
#include "moev/models/resnest.h"
#include "moev/train/adamw.h"
#include "moev/train/checkpoint.h"
#include "moev/train/datasets.h"
#include "moev/train/pretrain.h"
#include "moev/train/schedule.h"
#include "moev/train/trained_model.h"
#include "moev/viz/progress_bar.h"

namespace moev::train {

FusionOutcome train_fusion(const std::string& path, const std::string& out_path, const FusionOptions& o) {
  MOEV_CHECK(o.epochs >= 1 && o.epochs <= (int64_t(1) << 30), "fusion: epochs = ", o.epochs,
             ": expected 1..2^30 (--epochs)");
  MOEV_CHECK(o.batch_size >= 1, "fusion: batch size = ", o.batch_size, ": expected >= 1 (--batch-size)");
  MOEV_CHECK(o.lr > 0, "fusion: lr = ", o.lr, ": expected > 0 (--lr)");
  auto ckpt = load_checkpoint(path, CheckpointLoad::kInference);
  refuse_pretraining_checkpoint(ckpt.state_json, path);
  auto cfg = io::from_json_string(ckpt.config_json, path);
  if (const auto note = unfinished_training(cfg, ckpt.state_json, path); !note.empty() && o.progress)
    *o.progress << "note: " << note << "\n";
  MOEV_CHECK(cfg.model.family == "resnest" && cfg.model.branches >= 2, path, ": a fusion layer needs a ",
             "multi-branch model (model.family = resnest, model.branches >= 2); this one is ", cfg.model.family,
             " with ", cfg.model.branches, " branch(es)");
  auto built = models::build_model(cfg.model);
  load_module_tensors(*built, inference_weights(ckpt), path);
  auto* model = dynamic_cast<models::ResNeStImpl*>(built.get());
  // Frozen: eval mode keeps BatchNorm's statistics and switches stochastic depth
  // off, and no branch parameter takes part in autograd.
  model->eval();
  for (auto& p : model->parameters()) p.set_requires_grad(false);
  const int64_t N = cfg.model.branches, F = cfg.model.dims.back(), L = cfg.model.num_classes;
  {
    torch::NoGradGuard ng;
    for (int64_t b = 0; b < N; ++b) {
      auto* head = model->heads[b]->as<torch::nn::LinearImpl>();
      model->fusion->weight.narrow(1, b * F, F).copy_(head->weight / double(N));
    }
    auto bias = torch::zeros({L});
    for (int64_t b = 0; b < N; ++b) bias += model->heads[b]->as<torch::nn::LinearImpl>()->bias;
    model->fusion->bias.copy_(bias / double(N));
  }
  model->fusion->weight.set_requires_grad(true);
  model->fusion->bias.set_requires_grad(true);
  AdamWOptions ao;
  ao.weight_decay = o.weight_decay;
  AdamW opt({{"fusion.weight", model->fusion->weight}, {"fusion.bias", model->fusion->bias}}, ao);

  Datasets ds = open_datasets(cfg.data, cfg.model, /*load_train=*/true, /*load_test=*/o.evaluate);
  FusionOutcome res;
  res.train_images = ds.train.size();
  const c10::Device cpu(c10::kCPU);
  if (o.evaluate) res.mean_of_logits = evaluate(*model, ds.test, ds.mean, ds.std, 256, cpu);

  // Every image every epoch: with 500 images and batches of 128, dropping the
  // last batch would leave 116 out of each pass. The batches are made near
  // equal instead (4 of 125, not 3 of 128 and one of 116), so that no AdamW step
  // rests on a handful of images: 129 images at 128 would otherwise give a
  // full step to the last one alone.
  data::LoaderOptions lo = training_loader_options(
      cfg.data, ds, data::near_equal_batch_size(ds.train.size(), o.batch_size), cfg.train.seed);
  lo.drop_last = false;
  const int64_t per_epoch = (ds.train.size() + lo.batch_size - 1) / lo.batch_size, total = per_epoch * o.epochs;
  viz::ProgressBar bar(o.progress, total, "fusion", "step", o.interactive);
  auto ce = torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(o.label_smoothing);
  const auto t0 = std::chrono::steady_clock::now();
  int64_t step = 0;
  for (int64_t epoch = 0; epoch < o.epochs; ++epoch) {
    data::BatchLoader loader(ds.train, lo, epoch);
    data::Batch batch;
    while (loader.next(batch)) {
      at::Tensor e;
      {
        torch::NoGradGuard ng;
        e = torch::cat(model->forward_branches(batch.x).embeddings, 1);  // [B, N*F]
      }
      auto loss = torch::nn::functional::cross_entropy(model->fusion->forward(e), batch.y, ce);
      opt.zero_grad();
      loss.backward();
      opt.step(learning_rate(step, total, std::min<int64_t>(total / 10, 100), o.lr, o.lr / 100));
      ++step;
      res.images_seen += batch.y.size(0);
      char status[48];
      std::snprintf(status, sizeof status, "loss %.4f", loss.item<double>());
      bar.update(step, status);
    }
  }
  bar.finish();
  res.steps = step;
  res.train_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  model->set_fused(true);
  if (o.evaluate) res.fused = evaluate(*model, ds.test, ds.mean, ds.std, 256, cpu);

  auto state = nlohmann::json::parse(ckpt.state_json);
  state["fusion"] = {{"from", path}, {"epochs", o.epochs}, {"lr", o.lr}, {"steps", res.steps},
                     {"train_images", res.train_images}, {"images_seen", res.images_seen}};
  ckpt.state_json = state.dump();
  ckpt.model = module_tensors(*model);  // the branches as loaded (averaged, if averaged), the fusion layer
  ckpt.ema.clear();
  ckpt.optimizer.clear();  // the branches' optimizer state would resume nothing here
  // Made only now: a fusion refused over its inputs left an empty directory behind.
  const auto parent = std::filesystem::path(out_path).parent_path();
  std::error_code ec;
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  MOEV_CHECK(parent.empty() || std::filesystem::is_directory(parent), out_path, ": cannot make its directory ",
             parent.string(), ec ? " (" + ec.message() + ")" : "");
  save_checkpoint(out_path, ckpt);
  return res;
}

BranchPredictions predict_branches(models::Classifier& model, const data::ImageSet& set,
                                   const std::vector<float>& mean, const std::vector<float>& std,
                                   int64_t batch_size, std::ostream* progress, bool interactive) {
  MOEV_CHECK(batch_size >= 1, "predict_branches: batch size ", batch_size, ": expected >= 1");
  // A multi-label image is right under any of its tags; these counts know one label per image.
  MOEV_CHECK(!set.multilabel(), "branch agreement: ", set.source,
             " is a multi-label set; it is measured on single-label sets only");
  auto* resnest = dynamic_cast<models::ResNeStImpl*>(&model);
  MOEV_CHECK(resnest != nullptr, "branch agreement: a multi-branch (ResNeSt) model expected");
  torch::NoGradGuard ng;
  const bool was_training = model.is_training();
  model.eval();
  BranchPredictions p;
  const int64_t n = set.size();
  auto as_vector = [](const at::Tensor& logits) {
    const auto c = logits.argmax(1).contiguous();
    return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  };
  auto append = [](std::vector<int64_t>& to, const std::vector<int64_t>& from) {
    to.insert(to.end(), from.begin(), from.end());
  };
  viz::ProgressBar bar(progress, n, "branches", "img", interactive);
  for (int64_t i = 0; i < n; i += batch_size) {
    const int64_t b = std::min(batch_size, n - i);
    const auto x = data::normalize_images(set.images.narrow(0, i, b), mean, std);
    const auto outs = model.forward_branches(x);
    p.branch.resize(outs.logits.size());
    for (size_t k = 0; k < outs.logits.size(); ++k) append(p.branch[k], as_vector(outs.logits[k]));
    append(p.model, as_vector(resnest->combine(outs)));  // the model's output, without a second pass
    bar.update(i + b);
  }
  bar.finish();
  const auto labels = set.labels.contiguous();
  p.labels.assign(labels.data_ptr<int64_t>(), labels.data_ptr<int64_t>() + n);
  model.train(was_training);
  return p;
}

}  // namespace moev::train
