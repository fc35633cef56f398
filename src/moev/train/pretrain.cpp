#include "moev/train/pretrain.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/data/batch_loader.h"
#include "moev/data/random.h"
#include "moev/io/file_lock.h"
#include "moev/io/table.h"
#include "moev/moe/moe_layer.h"
#include "moev/models/model_config.h"
#include "moev/train/adamw.h"
#include "moev/train/checkpoint.h"
#include "moev/train/datasets.h"
#include "moev/train/schedule.h"
#include "moev/train/trainer.h"
#include "moev/viz/plot.h"
#include "moev/viz/progress_bar.h"

namespace moev::train {

namespace fs = std::filesystem;
using nlohmann::json;
namespace F = torch::nn::functional;

at::Tensor random_view(const at::Tensor& x, uint64_t seed, double min_scale, bool flip, double jitter) {
  MOEV_CHECK(x.dim() == 4, "random_view: images [B, C, H, W] expected, got ", x.sizes());
  const int64_t B = x.size(0);
  std::mt19937_64 rng(data::splitmix64(seed));
  auto u = [&] { return data::uniform_unit(rng); };
  auto theta = torch::zeros({B, 2, 3});
  auto contrast = torch::empty({B, 1, 1, 1}), brightness = torch::empty({B, 1, 1, 1});
  float* th = theta.data_ptr<float>();
  float* c = contrast.data_ptr<float>();
  float* br = brightness.data_ptr<float>();
  const double log_lo = std::log(3.0 / 4.0), log_hi = std::log(4.0 / 3.0);
  for (int64_t b = 0; b < B; ++b) {
    // The sampling grid covers a sx by sy part of the image ([-1, 1] units),
    // centred at (tx, ty) and kept inside it; its outermost points may fall
    // between the last pixel centre and the edge, where the border is repeated
    // (zero padding would darken the rims of every crop).
    const double area = min_scale + (1.0 - min_scale) * u();
    const double ratio = std::exp(log_lo + (log_hi - log_lo) * u());
    const double sx = std::min(1.0, std::sqrt(area * ratio)), sy = std::min(1.0, std::sqrt(area / ratio));
    const double tx = (2 * u() - 1) * (1 - sx), ty = (2 * u() - 1) * (1 - sy);
    const double mirror = flip && u() < 0.5 ? -1.0 : 1.0;
    th[b * 6 + 0] = static_cast<float>(sx * mirror);
    th[b * 6 + 2] = static_cast<float>(tx);
    th[b * 6 + 4] = static_cast<float>(sy);
    th[b * 6 + 5] = static_cast<float>(ty);
    c[b] = static_cast<float>(1 + jitter * (2 * u() - 1));
    br[b] = static_cast<float>(jitter * (2 * u() - 1));
  }
  const auto grid = F::affine_grid(theta.to(x.device()), x.sizes(), /*align_corners=*/false);
  auto v = F::grid_sample(
      x, grid, F::GridSampleFuncOptions().mode(torch::kBilinear).padding_mode(torch::kBorder).align_corners(false));
  if (jitter == 0) return v;
  // Contrast about each image's own mean, then a brightness shift, both in the
  // normalised units the model sees (one data std per unit).
  const auto mean = v.mean({1, 2, 3}, /*keepdim=*/true);
  return (v - mean) * contrast.to(x.device()) + mean + brightness.to(x.device());
}

at::Tensor info_nce(const at::Tensor& q, const at::Tensor& k, const at::Tensor& queue, double temperature) {
  const auto pos = (q * k).sum(1, /*keepdim=*/true);  // [B, 1]
  const auto neg = q.mm(queue.t());                    // [B, K]
  const auto logits = torch::cat({pos, neg}, 1) / temperature;
  return -torch::log_softmax(logits, 1).select(1, 0).mean();
}

double knn_top1(const at::Tensor& train, const at::Tensor& train_labels, const at::Tensor& test,
                const at::Tensor& test_labels, int64_t k, int64_t num_classes, int64_t block_floats) {
  MOEV_CHECK(k >= 1 && train.size(0) >= 1, "knn_top1: k = ", k, " with ", train.size(0), " training rows");
  const auto tr = F::normalize(train, F::NormalizeFuncOptions().dim(1));
  const auto te = F::normalize(test, F::NormalizeFuncOptions().dim(1));
  const int64_t kk = std::min(k, tr.size(0));
  int64_t correct = 0;
  const int64_t rows = std::clamp<int64_t>(block_floats / tr.size(0), 1, 1024);
  for (int64_t begin = 0; begin < te.size(0); begin += rows) {
    const int64_t n = std::min<int64_t>(rows, te.size(0) - begin);
    const auto sim = te.narrow(0, begin, n).mm(tr.t());  // [n, M]
    const auto top = sim.topk(kk, 1);
    const auto& idx = std::get<1>(top);
    const auto weights = (std::get<0>(top) / 0.07).exp();
    const auto labels = train_labels.index_select(0, idx.flatten()).view_as(idx);
    const auto votes = torch::zeros({n, num_classes}, weights.options()).scatter_add_(1, labels, weights);
    correct += votes.argmax(1).eq(test_labels.narrow(0, begin, n)).sum().item<int64_t>();
  }
  return te.size(0) > 0 ? static_cast<double>(correct) / static_cast<double>(te.size(0)) : 0.0;
}

const std::vector<PretrainKey>& pretrain_keys() {
  using O = PretrainOptions;
  static const std::vector<PretrainKey> keys = {
      {"epochs", "--pretrain-epochs", "passes over the training images", &O::epochs, nullptr},
      {"lr", "--pretrain-lr", "peak learning rate (AdamW, warmup, cosine)", nullptr, &O::lr},
      {"weight_decay", "--pretrain-weight-decay", "AdamW decoupled weight decay (matrices only)", nullptr,
       &O::weight_decay},
      {"temperature", "--temperature", "InfoNCE temperature", nullptr, &O::temperature},
      {"momentum", "--momentum", "key encoder momentum", nullptr, &O::momentum},
      {"queue", "--queue", "negative keys per branch", &O::queue, nullptr},
      {"proj_dim", "--proj-dim", "projection head output width", &O::proj_dim, nullptr},
      {"min_scale", "--min-scale", "random resized crop: smallest area fraction", nullptr, &O::min_scale},
      {"jitter", "--jitter", "contrast and brightness jitter", nullptr, &O::jitter},
      {"knn", "--knn", "neighbours of the kNN probe (0: none)", &O::knn_k, nullptr},
  };
  return keys;
}

void apply_pretrain_section(PretrainOptions& o, const json& section, const std::string& source) {
  MOEV_CHECK(section.is_object(), source, ": [pretrain] must be a table of keys");
  const auto& keys = pretrain_keys();
  for (const auto& [name, v] : section.items()) {
    const auto k = std::find_if(keys.begin(), keys.end(), [&](const PretrainKey& x) { return name == x.key; });
    if (k == keys.end()) {
      std::string known;
      for (const auto& x : keys) known += std::string(known.empty() ? "" : ", ") + x.key;
      fail(source, ": pretrain.", name, " is not a key (", known, ")");
    }
    if (k->integer) {
      MOEV_CHECK(v.is_number_integer(), source, ": pretrain.", name, ": expected an integer, got ", v.dump());
      o.*k->integer = v.get<int64_t>();
    } else {
      MOEV_CHECK(v.is_number(), source, ": pretrain.", name, ": expected a number, got ", v.dump());
      o.*k->real = v.get<double>();
    }
  }
}

json pretrain_section(const PretrainOptions& o) {
  json j = json::object();
  for (const auto& k : pretrain_keys()) j[k.key] = k.integer ? json(o.*k.integer) : json(o.*k.real);
  return j;
}

void refuse_pretraining_checkpoint(const std::string& state_json, const std::string& path) {
  const auto state = json::parse(state_json, nullptr, /*allow_exceptions=*/false);
  MOEV_CHECK(!(state.is_object() && state.contains("pretrain")), path,
             " is a self-supervised pre-training checkpoint (moev pretrain) whose heads are untrained; start a ",
             "supervised run from it with train.init_from=", path);
}

namespace {

// What the projection heads read: each branch's embedding (one branch: the
// model's embedding).
std::vector<at::Tensor> branch_embeddings(models::Classifier& m, const at::Tensor& x) {
  if (m.num_branches() > 1) return m.forward_branches(x).embeddings;
  return {m.embed(x)};
}

// key <- m key + (1 - m) query over the parameters (same architecture, same
// order); buffers (BatchNorm statistics) stay the key encoder's own, as in MoCo.
void momentum_update(torch::nn::Module& key, torch::nn::Module& query, double m) {
  auto k = key.parameters(), q = query.parameters();
  for (size_t i = 0; i < k.size(); ++i) k[i].mul_(m).add_(q[i], 1 - m);
}

std::map<std::string, at::Tensor> prefixed(const std::map<std::string, at::Tensor>& t, const std::string& p) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, v] : t) out[p + name] = v;
  return out;
}

std::map<std::string, at::Tensor> unprefixed(const std::map<std::string, at::Tensor>& t, const std::string& p) {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, v] : t)
    if (name.compare(0, p.size(), p) == 0) out[name.substr(p.size())] = v;
  return out;
}

// The test set's and the training set's embeddings, kNN top-1 of the first by the second.
double knn_probe(models::Classifier& model, const Datasets& ds, int64_t k) {
  model.eval();
  auto embed_set = [&](const data::ImageSet& set) {
    data::LoaderOptions lo;
    lo.batch_size = 256;
    lo.shuffle = false;
    lo.drop_last = false;
    lo.mean = ds.mean;
    lo.std = ds.std;
    data::BatchLoader loader(set, lo, 0);
    std::vector<at::Tensor> parts;
    data::Batch b;
    torch::NoGradGuard ng;
    while (loader.next(b)) parts.push_back(model.embed(b.x));
    return torch::cat(parts);
  };
  const double top1 =
      knn_top1(embed_set(ds.train), ds.train.labels, embed_set(ds.test), ds.test.labels, k, ds.train.num_classes());
  model.train();
  return top1;
}

// What a resume must repeat: every option but the probe's, which reads the
// weights without changing them.
json options_json(const PretrainOptions& o) {
  json j = pretrain_section(o);
  j.erase("knn");
  return j;
}

// The loss curve of pretrain_log.jsonl (resumed runs included) as pretrain.png.
void write_curve(const fs::path& log_path, int64_t per_epoch, const fs::path& png) {
  viz::Series s;
  s.name = "InfoNCE";
  s.markers = false;
  // Only a file: a log that is a device (/dev/full on a full-disk test) reads without end.
  std::ifstream in;
  if (fs::is_regular_file(log_path)) in.open(log_path);
  std::string line;
  while (in.is_open() && std::getline(in, line)) {
    const auto j = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("loss")) continue;
    s.x.push_back(j["step"].get<double>() / static_cast<double>(per_epoch));
    s.y.push_back(j["loss"].get<double>());
  }
  viz::PlotSpec p;
  p.title = "self-supervised pre-training (MoCo v2)";
  p.xlabel = "epoch";
  p.ylabel = "InfoNCE loss, summed over branches";
  p.series = {s};
  viz::write_plot(p, png.string());
}

}  // namespace

void validate_pretrain_options(const PretrainOptions& o) {
  // At most 2^30: the step count stays within int64 (see train.epochs).
  MOEV_CHECK(o.epochs >= 1 && o.epochs <= (int64_t(1) << 30), "pretrain: epochs = ", o.epochs, ": expected 1..2^30");
  MOEV_CHECK(o.lr > 0, "pretrain: lr = ", o.lr, ": expected > 0");
  MOEV_CHECK(o.temperature > 0, "pretrain: temperature = ", o.temperature, ": expected > 0");
  MOEV_CHECK(o.momentum >= 0 && o.momentum < 1, "pretrain: momentum = ", o.momentum, ": expected in [0, 1)");
  MOEV_CHECK(o.min_scale > 0 && o.min_scale <= 1, "pretrain: min_scale = ", o.min_scale, ": expected in (0, 1]");
  MOEV_CHECK(o.jitter >= 0 && o.jitter < 1, "pretrain: jitter = ", o.jitter, ": expected in [0, 1)");
  MOEV_CHECK(o.queue >= 1 && o.proj_dim >= 1, "pretrain: queue = ", o.queue, " and proj_dim = ", o.proj_dim,
             ": expected at least 1");
  MOEV_CHECK(o.knn_k >= 0, "pretrain: knn = ", o.knn_k, ": expected >= 0 (0: no probe)");
  MOEV_CHECK(o.weight_decay >= 0, "pretrain: weight_decay = ", o.weight_decay, ": expected >= 0");
}

namespace {

// The run itself; pretrain holds the directory's lock around it.
PretrainOutcome pretrain_locked(const io::RunConfig& cfg, const std::string& out_dir, const PretrainOptions& o) {
  const auto& tc = cfg.train;
  validate_train_config(cfg.train);  // the keys it reads (batch, checkpoints, logs, steps) as train checks them
  validate_pretrain_options(o);
  // Settings of a supervised run that would change what pre-training does if
  // it read them; it does not, so a run that sets them is refused, not misled.
  MOEV_CHECK(tc.init_from.empty(), "pretrain: train.init_from = ", tc.init_from,
             ": pre-training starts from random weights; give train.init_from to the supervised run instead");
  MOEV_CHECK(tc.teacher.empty(), "pretrain: train.teacher = ", tc.teacher.front(),
             ": pre-training reads no labels and no teacher; give train.teacher to the supervised run instead");
  MOEV_CHECK(!tc.branch_views, "pretrain: train.branch_views = true: every branch sees the same views in ",
             "pre-training; set it in the supervised run only");
  const int64_t B = tc.batch_size;
  MOEV_CHECK(B >= 4, "pretrain: train.batch_size = ", B,
             ": expected at least 4 (the key encoder's BatchNorm runs on two halves of a batch)");
  MOEV_CHECK(tc.device.empty() || tc.device == "cpu", "pretrain: train.device = '", tc.device,
             "': pre-training runs on the CPU");
  set_threads(tc.threads);

  Datasets ds = open_datasets(cfg.data, cfg.model, /*load_train=*/true, /*load_test=*/o.knn_k > 0, o.stop);
  if (o.progress)
    for (const auto& note : ds.notes) *o.progress << "note: " << note << "\n";
  MOEV_CHECK(o.knn_k <= ds.train.size(), "pretrain: knn = ", o.knn_k, ": more neighbours than the ",
             ds.train.size(), " training images (--knn; 0: no probe)");
  MOEV_CHECK(!ds.train.multilabel(), "pretrain: ", ds.train.source,
             " is a multi-label manifest; pre-training reads single-label image sets (the labels only for the kNN probe)");
  const int64_t M = ds.train.size();
  MOEV_CHECK(M >= 2 * B, "pretrain: ", ds.train.source, " gives ", M, " training images, fewer than two batches of ",
             "train.batch_size = ", B);
  // A batch's keys replace the oldest B of the queue at once, so it holds at
  // least a batch; and at most the images outside one batch, so that most of
  // a batch's negatives are other images (a queue spanning an epoch boundary
  // may still hold an older key of an image in the batch, as in MoCo).
  MOEV_CHECK(o.queue >= B && o.queue <= M - B, "pretrain: queue = ", o.queue, " keys, but with ", M,
             " training images in ", ds.train.source, " and train.batch_size = ", B, " it must be at least ", B,
             " (a batch) and at most ", M - B, " (the images minus a batch)");

  // Both encoders are built from the same seed; the key encoder without drop
  // path, dropout or router noise, since its output is a target.
  torch::manual_seed(tc.seed);
  auto model = models::build_model(cfg.model);
  auto key_cfg = cfg.model;
  key_cfg.drop_path = 0;
  key_cfg.dropout = 0;
  key_cfg.router.noise_std = 0;
  auto key = models::build_model(key_cfg);
  const int64_t N = model->num_branches();
  int64_t width = 0;
  {
    torch::NoGradGuard ng;
    model->eval();
    width = branch_embeddings(*model, torch::zeros({2, cfg.model.channels, cfg.model.image_size,
                                                    cfg.model.image_size}))[0]
                .size(1);
    model->train();
  }
  auto make_heads = [&] {
    torch::nn::ModuleList heads;
    for (int64_t b = 0; b < N; ++b)
      heads->push_back(torch::nn::Sequential(torch::nn::Linear(width, width), torch::nn::ReLU(),
                                             torch::nn::Linear(width, o.proj_dim)));
    return heads;
  };
  auto proj = make_heads(), key_proj = make_heads();
  std::vector<at::Tensor> queues;
  for (int64_t b = 0; b < N; ++b)
    queues.push_back(F::normalize(torch::randn({o.queue, o.proj_dim}), F::NormalizeFuncOptions().dim(1)));
  load_module_tensors(*key, module_tensors(*model), "the query encoder");
  load_module_tensors(*key_proj, module_tensors(*proj), "the query projection");
  for (auto& p : key->parameters()) p.set_requires_grad(false);
  for (auto& p : key_proj->parameters()) p.set_requires_grad(false);
  key->train();
  key_proj->train();

  std::vector<std::pair<std::string, at::Tensor>> params;
  for (auto& p : model->named_parameters()) params.emplace_back(p.key(), p.value());
  for (auto& p : proj->named_parameters()) params.emplace_back("proj." + p.key(), p.value());
  AdamWOptions ao;
  ao.weight_decay = o.weight_decay;
  AdamW opt(params, ao);

  const fs::path dir(out_dir), ckpt_path = dir / "pretrain.pt", log_path = dir / "pretrain_log.jsonl";
  const std::string config_text = io::to_json_string(cfg);
  const json opts_json = options_json(o);
  const std::string train_data = data_fingerprint(ds.train);  // kept, so a resume on other images is refused
  int64_t step = 0, ptr = 0, epoch_n = 0;  // epoch_n, epoch_loss: steps and loss sum of the current epoch
  double epoch_loss = 0;
  PretrainOutcome out;
  out.checkpoint = ckpt_path.string();
  at::Tensor rng;
  // The step lines' window: saved with the checkpoint, so a resumed run's next line averages the steps the
  // uninterrupted run's does.
  double window = 0;
  int64_t window_n = 0;
  if (o.resume) {
    MOEV_CHECK(fs::exists(ckpt_path), "pretrain --resume: no checkpoint ", ckpt_path.string(), " to resume");
    auto c = load_checkpoint(ckpt_path.string());
    const auto state = json::parse(c.state_json);
    MOEV_CHECK(state.contains("pretrain"), ckpt_path.string(), " is not a pre-training checkpoint");
    // Only how the run runs may change (threads, max_steps, ...), as for moev train --resume.
    const auto differ = resume_differences(io::from_json_string(c.config_json, ckpt_path.string()), cfg, {});
    MOEV_CHECK(differ.empty(), "pretrain --resume: ", ckpt_path.string(), " was written with another config:", differ,
               "\nresume with the config it was started with");
    const auto& saved = state.at("pretrain").at("options");
    for (const auto& [k, v] : opts_json.items())
      MOEV_CHECK(saved.contains(k) && saved.at(k) == v, "pretrain --resume: ", ckpt_path.string(), " ran with ", k,
                 " = ", saved.contains(k) ? saved.at(k).dump() : "(none)", ", not ", v.dump(),
                 "; resume with its options ([pretrain] ", k, ", its flag or --set pretrain.", k, "=...)");
    load_module_tensors(*model, c.model, ckpt_path.string());
    load_module_tensors(*proj, unprefixed(c.optimizer, "proj."), ckpt_path.string());
    load_module_tensors(*key, unprefixed(c.optimizer, "key."), ckpt_path.string());
    load_module_tensors(*key_proj, unprefixed(c.optimizer, "key_proj."), ckpt_path.string());
    opt.load_state(unprefixed(c.optimizer, "adamw."), ckpt_path.string());
    for (int64_t b = 0; b < N; ++b) queues[b].copy_(c.optimizer.at("queue." + std::to_string(b)));
    const auto& st = state.at("pretrain");
    check_resume_data("pretrain --resume", ckpt_path.string(), st.value("train_data", std::string()), train_data,
                      ds.train.source, cfg.data.format);
    step = st.at("step").get<int64_t>();
    // A pause already passed trained nothing and wrote the finished run's files, at exit 0.
    MOEV_CHECK(tc.max_steps <= 0 || tc.max_steps > step, "pretrain --resume: train.max_steps = ", tc.max_steps,
               ", but ", ckpt_path.string(), " is at step ", step, "; give a larger --max-steps, or 0 for the whole run");
    ptr = st.at("queue_ptr").get<int64_t>();
    out.knn_top1_init = st.value("knn_top1_init", -1.0);
    epoch_loss = st.value("epoch_loss", 0.0);
    epoch_n = st.value("epoch_steps", int64_t{0});
    window = st.value("window_loss", 0.0);
    window_n = st.value("window_steps", int64_t{0});
    rng = c.rng;
  }
  // A second run into a directory replaced the first's log at once and its checkpoint soon after.
  MOEV_CHECK(o.resume || !fs::exists(ckpt_path), ckpt_path.string(), ": pretrain --out ", out_dir,
             " already holds a pre-training run; continue it with --resume, or pre-train into another --out");
  // Beside a supervised run its files would pass for that run's (of another config, perhaps).
  MOEV_CHECK(o.resume || !fs::exists(train::checkpoint_path(out_dir)), "pretrain --out ", out_dir,
             " holds a supervised run (", train::checkpoint_path(out_dir), "); pre-train into another --out");
  // A killed run logged steps past its checkpoint; the resumed run logs them again.
  if (o.resume) io::trim_jsonl(log_path.string(), [&](const json& j) { return j.value("step", int64_t{0}) <= step; });
  io::JsonlLog log;
  log.open(log_path.string(), o.resume, "pretrain --out " + out_dir);
  log.report_to(o.progress, o.interactive, "pre-training");

  if (!o.resume && o.knn_k > 0) out.knn_top1_init = knn_probe(*model, ds, o.knn_k);

  const int64_t per_epoch = M / B, total = per_epoch * o.epochs;
  auto save = [&] {
    Checkpoint c;
    c.config_json = config_text;
    c.state_json = json{{"pretrain",
                         {{"step", step},
                          {"total_steps", total},  // the run's end: checkpoint info tells a paused run by it
                          {"queue_ptr", ptr},
                          {"options", opts_json},
                          {"knn_top1_init", out.knn_top1_init},
                          {"epoch_loss", epoch_loss},
                          {"epoch_steps", epoch_n},
                          {"window_loss", window},
                          {"window_steps", window_n},
                          {"train_data", train_data}}}}
                       .dump();
    c.model = module_tensors(*model);
    // The rest of the run's state, which only a resumed pre-training reads back.
    for (auto& kv : prefixed(opt.state(), "adamw.")) c.optimizer.insert(kv);
    for (auto& kv : prefixed(module_tensors(*proj), "proj.")) c.optimizer.insert(kv);
    for (auto& kv : prefixed(module_tensors(*key), "key.")) c.optimizer.insert(kv);
    for (auto& kv : prefixed(module_tensors(*key_proj), "key_proj.")) c.optimizer.insert(kv);
    for (int64_t b = 0; b < N; ++b) c.optimizer["queue." + std::to_string(b)] = queues[b];
    c.rng = cpu_rng_state();
    save_checkpoint(ckpt_path.string(), c);
  };

  data::LoaderOptions lo = training_loader_options(cfg.data, ds, B, tc.seed);
  lo.augment = false;  // the two views are random_view's
  // log_every = 0 (no step lines in train) logs each epoch's end, which the loss curve needs.
  const int64_t log_every = tc.log_every > 0 ? tc.log_every : per_epoch;
  const int64_t warmup = std::min(10 * per_epoch, total / 5);
  const uint64_t base = data::splitmix64(tc.seed ^ 0x6d6f636f76327373ULL);
  auto seed_of = [&](int64_t s, int64_t what) { return data::splitmix64(base + 3 * static_cast<uint64_t>(s) + what); };
  const auto moe_layers = moe::find_moe_layers(*model);
  viz::ProgressBar bar(tc.progress ? o.progress : nullptr, total, "pretrain", "step", o.interactive, step);
  const auto t0 = std::chrono::steady_clock::now();
  // Restored last: everything above that draws (weight init, queues) ran as in
  // the first process, and drop path must continue the stream it left.
  if (rng.defined() && rng.numel() > 0) set_cpu_rng_state(rng);
  // train.max_steps stops early (a planned interruption; --resume continues it).
  int64_t stop_at = tc.max_steps > 0 ? std::min(total, tc.max_steps) : total;
  while (step < stop_at) {
    const int64_t epoch = step / per_epoch;
    if (step % per_epoch == 0) {
      epoch_loss = 0;
      epoch_n = 0;
    }
    data::BatchLoader loader(ds.train, lo, epoch, step % per_epoch);
    data::Batch batch;
    while (step < stop_at && loader.next(batch)) {
      const double lr = learning_rate(step, total, warmup, o.lr, o.lr / 100);
      const auto v1 = random_view(batch.x, seed_of(step, 0), o.min_scale, cfg.data.hflip, o.jitter);
      const auto v2 = random_view(batch.x, seed_of(step, 1), o.min_scale, cfg.data.hflip, o.jitter);
      std::vector<at::Tensor> keys(N);
      {
        torch::NoGradGuard ng;
        momentum_update(*key, *model, o.momentum);
        momentum_update(*key_proj, *proj, o.momentum);
        // Shuffle BN: the keys are computed in two halves of a random order.
        std::vector<int64_t> order(B);
        for (int64_t i = 0; i < B; ++i) order[i] = i;
        std::mt19937_64 rng_perm(seed_of(step, 2));
        for (int64_t i = B - 1; i > 0; --i)
          std::swap(order[i], order[data::uniform_below(rng_perm, static_cast<uint64_t>(i + 1))]);
        const auto perm = torch::tensor(order, torch::kInt64);
        const auto shuffled = v2.index_select(0, perm);
        const int64_t h = B / 2;
        const auto a = branch_embeddings(*key, shuffled.narrow(0, 0, h));
        const auto b = branch_embeddings(*key, shuffled.narrow(0, h, B - h));
        const auto inverse = torch::empty_like(perm).index_copy_(0, perm, torch::arange(B, torch::kInt64));
        for (int64_t n = 0; n < N; ++n)
          keys[n] = F::normalize(key_proj->ptr(n)->as<torch::nn::SequentialImpl>()->forward(
                                     torch::cat({a[n], b[n]}).index_select(0, inverse)),
                                 F::NormalizeFuncOptions().dim(1));
      }
      const auto q_emb = branch_embeddings(*model, v1);
      at::Tensor loss;
      for (int64_t n = 0; n < N; ++n) {
        const auto q = F::normalize(proj->ptr(n)->as<torch::nn::SequentialImpl>()->forward(q_emb[n]),
                                    F::NormalizeFuncOptions().dim(1));
        const auto l = info_nce(q, keys[n], queues[n], o.temperature);
        loss = loss.defined() ? loss + l : l;
      }
      const double contrastive = loss.item<double>();
      // Before the step, so no NaN weights reach pretrain.pt.
      MOEV_CHECK(std::isfinite(contrastive), "pretraining diverged at step ", step, " (InfoNCE loss ", contrastive,
                 "); lower --pretrain-lr or raise pretrain.temperature = ", o.temperature);
      for (auto& l : moe_layers) loss = loss + l->aux_loss();
      opt.zero_grad();
      loss.backward();
      opt.step(lr);
      {
        torch::NoGradGuard ng;
        const auto slots = (torch::arange(B, torch::kInt64) + ptr).remainder(o.queue);
        for (int64_t n = 0; n < N; ++n) queues[n].index_copy_(0, slots, keys[n]);
        ptr = (ptr + B) % o.queue;
      }
      ++step;
      window += contrastive;
      epoch_loss += contrastive;
      ++window_n;
      ++epoch_n;
      char status[48];
      std::snprintf(status, sizeof status, "loss %.4f", contrastive);
      bar.update(step, status);
      if (o.stop && o.stop->load() && step < stop_at) {  // saved below, like a max_steps pause
        stop_at = step;
        out.stopped = true;
      }
      if (step % log_every == 0 || step == total) {  // a pause (max_steps, a stop) keeps its window
        log.write(json{{"step", step}, {"epoch", static_cast<double>(step) / per_epoch}, {"loss", window / window_n},
                       {"lr", lr}},
                  step);
        window = 0;
        window_n = 0;
      }
      if (tc.checkpoint_every > 0 && step % tc.checkpoint_every == 0 && step < stop_at) save();
    }
  }
  bar.finish();
  out.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  out.steps = step;
  out.final_loss = epoch_n > 0 ? epoch_loss / epoch_n : 0;
  save();
  out.finished = step >= total;
  if (!out.finished) return out;  // stopped or paused: the probe and pretrain.json are the finished run's
  if (o.knn_k > 0) out.knn_top1 = knn_probe(*model, ds, o.knn_k);
  write_curve(log_path, per_epoch, dir / "pretrain.png");
  json result{{"steps", out.steps},     {"final_loss", out.final_loss}, {"seconds", out.seconds},
              {"checkpoint", out.checkpoint}, {"options", opts_json}};
  if (out.knn_top1_init >= 0) result["knn_top1_init"] = out.knn_top1_init;
  if (out.knn_top1 >= 0) result["knn_top1"] = out.knn_top1;
  io::write_text_atomic((dir / "pretrain.json").string(), result.dump(2) + "\n");
  return out;
}

}  // namespace

PretrainOutcome pretrain(const io::RunConfig& cfg, const std::string& out_dir, const PretrainOptions& o) {
  MOEV_CHECK(!out_dir.empty(), "pretrain: no output directory");
  // Two processes in one directory (a run started twice, a requeued job beside
  // the old one) would truncate each other's pretrain.pt.tmp and interleave logs. A supervised run's directory
  // is refused inside, naming the command that continues it.
  io::refuse_other_kinds(out_dir, {".pretrain.lock", ".train.lock"}, "pretrain --out");
  return io::in_run_directory(out_dir, ".pretrain.lock", "pretrain --out " + out_dir,
                              [&] { return pretrain_locked(cfg, out_dir, o); });
}

}  // namespace moev::train
