#include "moev/train/trainer.h"

#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <set>
#include <thread>

#include <unistd.h>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "moev/core/device.h"
#include "moev/core/error.h"
#include "moev/core/memory.h"
#include "moev/models/cost.h"
#include "moev/data/batch_loader.h"
#include "moev/data/subset.h"
#include "moev/io/file_lock.h"
#include "moev/io/table.h"
#include "moev/models/placement.h"
#include "moev/moe/moe_layer.h"
#include "moev/moe/router.h"
#include "moev/train/adamw.h"
#include "moev/train/checkpoint.h"
#include "moev/train/replicas.h"
#include "moev/train/datasets.h"
#include "moev/train/expert_shards.h"
#include "moev/train/losses.h"
#include "moev/train/multilabel.h"
#include "moev/train/teacher.h"
#include "moev/train/trained_model.h"
#include "moev/train/schedule.h"
#include "moev/train/weight_average.h"
#include "moev/viz/progress_bar.h"

namespace moev::train {

using nlohmann::json;
namespace fs = std::filesystem;

std::string checkpoint_path(const std::string& out_dir) {
  return (fs::path(out_dir) / "checkpoint.pt").string();
}

uint64_t branch_view_seed(uint64_t seed, int64_t view) { return seed + uint64_t(view) * 0x9E3779B97F4A7C15ull; }

io::RunConfig resumed_config(io::RunConfig saved, const io::RunConfig& now) {
  saved.train.threads = now.train.threads;
  saved.train.device = now.train.device;
  saved.train.progress = now.train.progress;
  saved.train.max_steps = now.train.max_steps;
  saved.train.teacher_cache_mb = now.train.teacher_cache_mb;  // how often the teacher runs, not what it says
  saved.train.checkpoint_every = now.train.checkpoint_every;  // when it saves, not what it learns
  saved.train.out_dir = now.train.out_dir;
  return saved;
}

std::string resume_differences(const io::RunConfig& saved, const io::RunConfig& now,
                               const std::set<std::string>& keys) {
  std::string out;
  for (const auto& d : io::config_differences(resumed_config(saved, now), now, keys)) out += "\n  " + d;
  return out;
}

// Far past any core count, threads only contend (and make a replica each).
constexpr int kMaxThreads = 1024;

int set_threads(int threads) {
  MOEV_CHECK(threads >= 0 && threads <= kMaxThreads, "threads = ", threads, ": expected 0..", kMaxThreads,
             " (0: all cores, ", std::thread::hardware_concurrency(), " here)");
  const int n = std::max(1, threads > 0 ? threads : static_cast<int>(std::thread::hardware_concurrency()));
  at::set_num_threads(n);
  return n;
}

namespace {

// Every rank reads its own config (a file per machine; a pipe, which only the
// first rank to read it gets): a rank set up for another run than rank 0's
// trained it silently or hung in a collective. Rank 0's config goes to every
// rank; each names what differs in its own, and all of them fail together.
// Rank 0's `mine`, on every rank.
std::string rank0_string(dist::Communicator& comm, const std::string& mine) {
  auto length = torch::tensor({static_cast<int64_t>(mine.size())});
  comm.broadcast({length});
  auto bytes = torch::empty({length.item<int64_t>()}, torch::kUInt8);
  if (comm.rank() == 0) std::memcpy(bytes.data_ptr(), mine.data(), mine.size());
  comm.broadcast({bytes});
  return std::string(static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(bytes.numel()));
}

// The ranks whose `differs` is true ("1, 3"; "" when none), on every rank: a
// rank that fails alone leaves the others waiting in their next collective.
std::string ranks_that_differ(dist::Communicator& comm, bool differs) {
  auto ranks = torch::zeros({comm.size()}, torch::kInt64);
  ranks[comm.rank()] = differs ? 1 : 0;
  comm.all_reduce_sum({ranks});
  std::string which;
  for (int r = 0; r < comm.size(); ++r)
    if (ranks[r].item<int64_t>() != 0) which += (which.empty() ? "" : ", ") + std::to_string(r);
  return which;
}

void check_same_run(dist::Communicator& comm, const io::RunConfig& cfg) {
  io::RunConfig lead = io::from_json_string(rank0_string(comm, io::to_json_string(cfg)), "rank 0's config");
  lead.train.threads = cfg.train.threads;  // each machine its own cores
  lead.train.progress = cfg.train.progress;
  lead.train.teacher_cache_mb = cfg.train.teacher_cache_mb;
  lead.train.out_dir = cfg.train.out_dir;  // rank 0 alone writes it; others may spell or mount it otherwise
  // Each machine may mount the data elsewhere (and only rank 0 evaluates): the training images themselves are
  // compared once read (check_same_data), which also catches one path holding other images on another machine.
  lead.data.path = cfg.data.path;
  lead.data.test_path = cfg.data.test_path;
  // Every key both ways, empty values too (a teacher on rank 0 and none here is a difference).
  const json a = io::to_json(cfg), b = io::to_json(lead);
  std::string differ;
  for (const auto& [section, keys] : a.items())
    for (const auto& [key, value] : keys.items()) {
      const json theirs = b.contains(section) && b[section].contains(key) ? b[section][key] : json();
      if (value != theirs)
        differ += "\n  " + section + "." + key + " = " + value.dump() + " (rank 0: " + theirs.dump() + ")";
    }
  const std::string which = ranks_that_differ(comm, !differ.empty());
  MOEV_CHECK(differ.empty(), "rank ", comm.rank(), " of ", comm.size(), ": its config differs from rank 0's:", differ,
             "\nevery rank must train the same run: the same config file and flags");
  MOEV_CHECK(which.empty(), "rank ", comm.rank(), " of ", comm.size(), ": rank(s) ", which, " have another config ",
             "than rank 0 (their errors list the keys); every rank must train the same run");
}

// Every rank reads the whole training set and takes its share of each batch: a machine whose copy of the data
// differs (another version under the same path) would train on other images without a word.
void check_same_data(dist::Communicator& comm, const std::string& train_data, const std::string& source) {
  const std::string lead = rank0_string(comm, train_data);
  const std::string which = ranks_that_differ(comm, lead != train_data);
  MOEV_CHECK(lead == train_data, "rank ", comm.rank(), " of ", comm.size(), ": its training set ", source,
             " differs from rank 0's (fingerprint ", train_data, ", rank 0: ", lead, "); every rank must read the ",
             "same images");
  MOEV_CHECK(which.empty(), "rank ", comm.rank(), " of ", comm.size(), ": rank(s) ", which, " read another ",
             "training set than rank 0 (see their errors); every rank must read the same images");
}

// Sums the gradients of `params` over this rank's replicas (extra[r][i]) and
// then over the ranks, into each parameter's .grad. A parameter no token reached
// on this rank (an expert with no assignments) contributes zeros, so every rank
// reduces the same list of tensors in the same order.
void sum_gradients_over_ranks(dist::Communicator& comm, const std::vector<at::Tensor>& params,
                              const std::vector<std::vector<at::Tensor>>& extra) {
  std::vector<at::Tensor> grads;
  for (size_t i = 0; i < params.size(); ++i) {
    auto& g = params[i].mutable_grad();
    if (!g.defined()) g = torch::zeros_like(params[i]);
    for (const auto& rg : extra)
      if (rg[i].defined()) g.add_(rg[i]);
    grads.push_back(g);
  }
  comm.all_reduce_sum(grads);
}

// Expert parallelism: the global L2 norm of all gradients (shared ones counted
// once, every rank's experts once) and, above max_norm > 0, every gradient
// scaled down to it. Returns the norm before clipping.
double clip_global_norm(dist::Communicator& comm, const std::vector<std::pair<std::string, at::Tensor>>& params,
                        const ExpertShards& shards, double max_norm) {
  double shared_sq = 0;
  auto expert_sq = torch::zeros({1}, torch::kDouble);
  for (const auto& [name, p] : params) {
    if (!p.grad().defined()) continue;
    const double sq = p.grad().to(torch::kDouble).pow(2).sum().item<double>();
    if (shards.is_expert(name)) expert_sq += sq;
    else shared_sq += sq;
  }
  comm.all_reduce_sum({expert_sq});
  const double norm = std::sqrt(shared_sq + expert_sq.item<double>());
  if (max_norm > 0 && norm > max_norm) {
    torch::NoGradGuard ng;
    for (const auto& [name, p] : params)
      if (p.grad().defined()) p.grad().mul_(max_norm / (norm + 1e-6));
  }
  return norm;
}

// The parameter names train.freeze covers: an entry names a parameter or a
// module (every parameter under it). An entry matching nothing is an error:
// a misspelt freeze would otherwise train what the user meant to keep.
std::set<std::string> frozen_parameters(torch::nn::Module& model, const std::vector<std::string>& freeze) {
  std::set<std::string> out;
  const auto named = model.named_parameters();
  for (const auto& f : freeze) {
    bool any = false;
    for (const auto& p : named)
      if (p.key() == f || p.key().rfind(f + ".", 0) == 0) {
        out.insert(p.key());
        any = true;
      }
    MOEV_CHECK(any, "train.freeze: '", f, "' names no parameter or module of the model (e.g. ",
               named.is_empty() ? std::string("none") : named.begin()->key(), ")");
  }
  return out;
}

struct Position {
  int64_t step = 0, epoch = 0, batch = 0;  // next step, its epoch and batch in epoch
};

json eval_json(const EvalResult& e) {
  json j{{"top1", e.top1}, {"top5", e.top5}, {"loss", e.loss}, {"images_per_s", e.images_per_s},
         {"expert_load", e.expert_load}, {"dropped", e.dropped}, {"unrouted", e.unrouted}};
  if (e.multilabel) {
    j["k"] = e.k;
    j["precision_at_k"] = e.precision_at_k;
    j["recall_at_k"] = e.recall_at_k;
    j["mean_ap"] = e.mean_ap;
  }
  return j;
}

}  // namespace

void validate_train_config(const TrainConfig& tc) {
  MOEV_CHECK(tc.batch_size >= 1, "train.batch_size = ", tc.batch_size, ": expected >= 1");
  // Named by its key here (set_threads, which --threads of other commands reach too, says "threads"), and so
  // refused by --print-config as by the run.
  MOEV_CHECK(tc.threads >= 0 && tc.threads <= kMaxThreads, "train.threads = ", tc.threads, ": expected 0..",
             kMaxThreads, " (0: all cores, ", std::thread::hardware_concurrency(), " here)");
  // Checked whatever the data: "foo" passed on single-label data, and stood in the run's config.
  MOEV_CHECK(tc.multilabel_loss == "softmax" || tc.multilabel_loss == "sigmoid", "train.multilabel_loss = '",
             tc.multilabel_loss, "': expected softmax or sigmoid");
  // At most 2^30 epochs of each kind: with at most 2^31 steps per epoch the step counts stay within int64
  // (train.epochs = 2^62 overflowed them and trained 0 steps at exit 0).
  constexpr int64_t kMaxEpochs = int64_t(1) << 30;
  MOEV_CHECK(tc.epochs >= 1 && tc.epochs <= kMaxEpochs, "train.epochs = ", tc.epochs, ": expected 1..2^30");
  MOEV_CHECK(tc.lr > 0, "train.lr = ", tc.lr, ": expected > 0");
  MOEV_CHECK(tc.min_lr >= 0 && tc.min_lr <= tc.lr, "train.min_lr = ", tc.min_lr, ": expected 0..train.lr = ", tc.lr,
             " (the end of the cosine decay from train.lr)");
  MOEV_CHECK(tc.beta1 >= 0 && tc.beta1 < 1 && tc.beta2 >= 0 && tc.beta2 < 1, "train.beta1 = ", tc.beta1,
             ", train.beta2 = ", tc.beta2, ": AdamW's averaging factors, expected in [0, 1)");
  MOEV_CHECK(tc.warmup_steps >= 0, "train.warmup_steps = ", tc.warmup_steps, ": expected >= 0");
  MOEV_CHECK(tc.max_steps >= 0, "train.max_steps = ", tc.max_steps, ": expected >= 0 (0: the epochs decide)");
  MOEV_CHECK(tc.mixup_alpha >= 0 && tc.cutmix_alpha >= 0, "train.mixup_alpha / train.cutmix_alpha: expected >= 0");
  MOEV_CHECK(tc.mix_off_epochs >= 0 && tc.mix_off_epochs <= tc.epochs, "train.mix_off_epochs = ",
             tc.mix_off_epochs, ": expected 0..train.epochs = ", tc.epochs);
  MOEV_CHECK(tc.cooldown_epochs >= 0 && tc.cooldown_epochs <= kMaxEpochs, "train.cooldown_epochs = ",
             tc.cooldown_epochs, ": expected 0..2^30");
  // Negative ones ran at exit 0: a negative learning rate climbs the loss, a negative decay grows the weights.
  MOEV_CHECK(tc.cooldown_lr >= 0, "train.cooldown_lr = ", tc.cooldown_lr, ": expected >= 0");
  MOEV_CHECK(tc.weight_decay >= 0, "train.weight_decay = ", tc.weight_decay, ": expected >= 0");
  MOEV_CHECK(tc.clip_grad_norm >= 0, "train.clip_grad_norm = ", tc.clip_grad_norm, ": expected >= 0 (0: off)");
  MOEV_CHECK(tc.mix_prob >= 0 && tc.mix_prob <= 1, "train.mix_prob = ", tc.mix_prob,
             ": expected [0, 1] (the probability a batch is mixed)");
  MOEV_CHECK(tc.mix_switch_prob >= 0 && tc.mix_switch_prob <= 1, "train.mix_switch_prob = ", tc.mix_switch_prob,
             ": expected [0, 1] (the probability of cutmix rather than mixup)");
  MOEV_CHECK(tc.checkpoint_every >= 0, "train.checkpoint_every = ", tc.checkpoint_every,
             ": expected >= 0 (0: a checkpoint at the end only)");
  MOEV_CHECK(tc.log_every >= 0, "train.log_every = ", tc.log_every, ": expected >= 0 (0: no step lines)");
  MOEV_CHECK(std::isfinite(tc.dist_timeout) && tc.dist_timeout > 0, "train.dist_timeout = ", tc.dist_timeout,
             ": expected > 0 seconds");
  MOEV_CHECK(tc.distill_lambda >= 0 && tc.distill_lambda <= 1, "train.distill_lambda = ", tc.distill_lambda,
             ": expected [0, 1]");
  MOEV_CHECK(tc.cosine_loss >= 0, "train.cosine_loss = ", tc.cosine_loss, ": expected >= 0");
  MOEV_CHECK(tc.diversity_weight >= 0, "train.diversity_weight = ", tc.diversity_weight, ": expected >= 0");
  MOEV_CHECK(std::isfinite(tc.teacher_cache_mb) && tc.teacher_cache_mb >= 0, "train.teacher_cache_mb = ",
             tc.teacher_cache_mb, ": expected >= 0 (megabytes; 0: no cache)");
  MOEV_CHECK(tc.online_distill >= 0, "train.online_distill = ", tc.online_distill, ": expected >= 0");
  MOEV_CHECK(tc.online_distill_temperature > 0, "train.online_distill_temperature = ",
             tc.online_distill_temperature, ": expected > 0");
  MOEV_CHECK(tc.label_smoothing >= 0 && tc.label_smoothing < 1, "train.label_smoothing = ", tc.label_smoothing,
             ": expected [0, 1) (the share of a target spread over all classes)");
  MOEV_CHECK(std::isfinite(tc.minutes) && tc.minutes >= 0, "train.minutes = ", tc.minutes,
             ": expected >= 0 (0: no time budget)");
  // Both are counted in epochs of a schedule whose length a budget leaves open.
  MOEV_CHECK(tc.minutes <= 0 || (tc.cooldown_epochs == 0 && tc.mix_off_epochs == 0),
             "train.minutes = ", tc.minutes, " with train.cooldown_epochs = ", tc.cooldown_epochs,
             " / train.mix_off_epochs = ", tc.mix_off_epochs,
             ": a time budget needs both 0 (they are counted in epochs; use train.epochs instead of minutes)");
}

namespace {
// moe.num_experts = 16384 in a tiny V-MoE is 2 billion parameters: their weights, gradients and AdamW's two
// moments outgrew the machine, and the kernel's out-of-memory killer took other processes with it. Refused
// before anything is allocated (activations come on top, so passing this is no promise).
void check_fits_in_memory(const io::RunConfig& cfg) {
  if (cfg.train.expert_parallel) return;  // experts spread over the ranks, each holding a share
  const double have = physical_memory_bytes();
  if (have <= 0) return;
  const int64_t params = models::model_cost(cfg.model).params;
  const double need = double(params) * (16.0 + (cfg.train.ema_decay > 0 ? 4.0 : 0.0));
  MOEV_CHECK(need <= have, "model: ", params, " parameters need about ", io::fmt(need / 1e9, 1), " GB for their ",
             "weights, gradients and AdamW's moments", cfg.train.ema_decay > 0 ? " and the weight average" : "",
             ", more than this machine's ", io::fmt(have / 1e9, 1), " GB of memory (moe.num_experts = ",
             cfg.model.router.num_experts, ", model.width = ", cfg.model.width, "); make the model smaller");
}
}  // namespace

void check_new_run_config(const io::RunConfig& cfg) {
  validate_train_config(cfg.train);
  models::validate(cfg.model);
  models::refuse_repeated_blocks(cfg.model.moe);
  moe::refuse_unused_topk_settings(cfg.model.router);
  validate_training_data(cfg.data, cfg.model);
  check_fits_in_memory(cfg);
  parse_device(cfg.train.device, "train.device (--device) =");  // --print-config printed "gpu" at exit 0
  // Read by folder and manifest data only: with the other formats they were set and unread.
  const auto& d = cfg.data;
  const bool own_test_path = d.format == "folder" || d.format == "manifest";
  MOEV_CHECK(d.test_path.empty() || own_test_path, "data.test_path = ", d.test_path, ": data.format = ", d.format,
             " reads its test set from data.path (its own test files); drop data.test_path");
  MOEV_CHECK(d.tags.empty() || d.format == "manifest", "data.tags is set, but data.format = ", d.format,
             " has classes, not the tags of a manifest; drop data.tags");
}

namespace {

// The run itself; train_model holds the directory's lock around it.
TrainOutcome train_locked(io::RunConfig cfg, const TrainRunOptions& opts) {
  const std::string ckpt_file = checkpoint_path(cfg.train.out_dir);
  // Every rank reads the checkpoint it resumes from. A machine without it (no shared file system) resolved its
  // config from the defaults and was first refused for the keys that differed from rank 0's.
  MOEV_CHECK(!opts.resume || !opts.comm || opts.comm->rank() == 0 || fs::exists(ckpt_file), "rank ",
             opts.comm ? opts.comm->rank() : 0, ": --resume: ", ckpt_file, " does not exist on this machine: every ",
             "rank reads the run's checkpoint to resume, so give each machine rank 0's run directory (a shared file ",
             "system, or a copy of train.out_dir) before resuming the job");
  // First: a rank that differs is named before any check of its own could stop it alone.
  if (opts.comm) check_same_run(*opts.comm, cfg);
  Checkpoint resume_from;
  Position pos;
  double prior_train_s = 0;  // training seconds before this process (a resumed run)
  int64_t saved_plan = 0;    // a time-budgeted run's planned last step when it was saved
  std::string saved_train_data;  // data_fingerprint of the set the resumed run trained on ("": not recorded)
  std::string saved_teacher;     // Teacher::fingerprint of the resumed run's teacher ("": none, or not recorded)
  std::string saved_rows;        // index_fingerprint of the rows it trained on ("": all, or not recorded)
  int saved_replicas = 0;    // a one-process run's replicas when it was saved (0: not recorded)
  // The steps since the last step line, summed. Saved with each checkpoint, so
  // that a run resumed between two lines logs the line the uninterrupted run
  // would (it averaged only the steps after the resume).
  struct {
    double loss = 0, aux = 0, grad_norm = 0, carried_s = 0;  // carried_s: the window's seconds before `since`
    int64_t correct = 0, images = 0;
    std::chrono::steady_clock::time_point since;
    double seconds(std::chrono::steady_clock::time_point now) const {
      return carried_s + std::chrono::duration<double>(now - since).count();
    }
  } window;
  // A second run into a directory would replace the first's log at once and
  // its checkpoint soon after: a forgotten --resume must not cost a long run.
  MOEV_CHECK(opts.resume || !fs::exists(ckpt_file), ckpt_file, ": train.out_dir = ", cfg.train.out_dir,
             " already holds a run; continue it with --resume, or train into another --out (or delete ",
             cfg.train.out_dir, ") to start anew");
  if (opts.resume) {
    // A self-supervised run's directory holds pretrain.pt: the command that continues it is another.
    const auto pretrained = fs::path(cfg.train.out_dir) / "pretrain.pt";
    MOEV_CHECK(fs::exists(ckpt_file) || !fs::exists(pretrained), "--resume: train.out_dir = ", cfg.train.out_dir,
               " holds a pretraining run (", pretrained.string(), "), not a supervised one: continue it with moev ",
               "pretrain --out ", cfg.train.out_dir, " --resume, or start a supervised run from it in another ",
               "directory with --set train.init_from=", pretrained.string());
    MOEV_CHECK(fs::exists(ckpt_file), "--resume: ", ckpt_file, " does not exist: train.out_dir = ", cfg.train.out_dir,
               " holds no checkpoint yet (a run killed before its first, every train.checkpoint_every steps, has none",
               "); start it again without --resume");
    resume_from = load_checkpoint(ckpt_file);
    // The run continues as it was configured; only how it runs may change.
    cfg = resumed_config(io::from_json_string(resume_from.config_json, ckpt_file), cfg);
    auto st = json::parse(resume_from.state_json);
    pos.step = st.at("step").get<int64_t>();
    pos.epoch = st.at("epoch").get<int64_t>();
    pos.batch = st.at("batch").get<int64_t>();
    prior_train_s = st.value("train_elapsed_s", 0.0);
    saved_plan = st.value("planned_steps", int64_t{0});
    saved_train_data = st.value("train_data", std::string());  // "" in checkpoints from before it was kept
    saved_teacher = st.value("teacher", std::string());
    saved_rows = st.value("train_rows", std::string());
    // Before the data is read: without its rows, the expert's run failed as if its partition had changed.
    MOEV_CHECK(saved_rows.empty() || !opts.train_rows.empty(), "--resume: ", ckpt_file, " is a hard MoE expert's ",
               "run (it trains on its partition's rows of the training set); ",
               resume_command(ckpt_file, resume_from.state_json), " resumes it");
    if (st.value("world_size", 1) == 1) saved_replicas = st.value("replicas", 0);
    if (st.contains("log_window")) {  // not in checkpoints written before it was saved
      const auto& w = st.at("log_window");
      window.loss = w.at("loss").get<double>();
      window.aux = w.at("aux_loss").get<double>();
      window.grad_norm = w.at("grad_norm").get<double>();
      window.correct = w.at("correct").get<int64_t>();
      window.images = w.at("images").get<int64_t>();
      window.carried_s = w.at("seconds").get<double>();
    }
  }
  const auto& tc = cfg.train;
  if (opts.resume) {  // settings that would be ignored are not checked: a resumed run had them already
    validate_train_config(tc);
    models::validate(cfg.model);
  } else {
    check_new_run_config(cfg);
  }
  const bool budgeted = tc.minutes > 0;
  const int threads = set_threads(tc.threads);
  dist::Communicator* comm = opts.comm;
  const int rank = comm ? comm->rank() : 0, world = comm ? comm->size() : 1;
  const bool lead = rank == 0;  // writes the run directory, logs, evaluates
  const auto device = parse_device(tc.device, "train.device (--device) =");

  Datasets ds;
  try {
    // A job's ranks stop together at a step they agree on, so only a run of its own stops while decoding.
    ds = open_datasets(cfg.data, cfg.model, /*load_train=*/true, /*load_test=*/true, comm ? nullptr : opts.stop);
  } catch (const Stopped& e) {  // a large folder takes minutes to decode: a stop need not wait for it
    throw Stopped(std::string(e.what()) + "; stopped before the first step" +
                  (opts.resume ? ", so " + ckpt_file + " is as it was (--resume continues it)"
                               : ": nothing was trained"));
  }
  if (lead && opts.progress)
    for (const auto& note : ds.notes) *opts.progress << "note: " << note << "\n";
  cfg.data.mean = ds.mean;  // stored in the checkpoint, so eval/predict normalise alike
  cfg.data.std = ds.std;
  MOEV_CHECK(opts.expect_train_size < 0 || ds.train.size() == opts.expect_train_size, "training set ",
             ds.train.source, " has ", ds.train.size(), " images, but the rows to train on were chosen from ",
             opts.expect_train_size, ": the data changed since (cluster again)");
  // What the run trains on, kept in its checkpoints: resumed on other data (a folder that gained images, another
  // subset), it would go on without a word, where the README promises the run it was.
  const std::string train_data = data_fingerprint(ds.train);
  MOEV_CHECK(opts.expect_train_data.empty() || train_data == opts.expect_train_data, "training set ",
             ds.train.source, " differs from the one the rows to train on were chosen from (fingerprint ", train_data,
             ", then ", opts.expect_train_data, "): the data changed since (cluster again)");
  if (comm) check_same_data(*comm, train_data, ds.train.source);
  if (opts.resume)
    check_resume_data("--resume", ckpt_file, saved_train_data, train_data, ds.train.source, cfg.data.format);
  // A hard MoE expert's rows: resumed on another partition (an edited or replaced one), the run went on over
  // other images, with another length of epoch, without a word.
  const std::string train_rows = opts.train_rows.empty() ? "" : index_fingerprint(opts.train_rows);
  MOEV_CHECK(!opts.resume || saved_rows.empty() || saved_rows == train_rows, "--resume: ", ckpt_file,
             " trained on other rows of ", ds.train.source, " than it is given now (fingerprint ", saved_rows,
             ", now ", train_rows.empty() ? "all of them" : train_rows, "): its partition changed since; ",
             "put the partition back, or start this run anew in another directory");
  if (!opts.train_rows.empty()) ds.train = data::select_rows(ds.train, opts.train_rows);
  const bool multilabel = ds.train.multilabel();
  const bool sigmoid_tags = multilabel && tc.multilabel_loss == "sigmoid";
  if (multilabel) {
    cfg.data.tags = ds.train.class_names;  // the columns eval and predict must use
    MOEV_CHECK(tc.multilabel_loss == "softmax" || tc.multilabel_loss == "sigmoid", "train.multilabel_loss = '",
               tc.multilabel_loss, "': expected softmax or sigmoid");
    MOEV_CHECK(tc.teacher.empty(), "train.teacher: distillation needs single-label data, not a multi-label manifest");
  }
  MOEV_CHECK(ds.train.size() >= tc.batch_size, "training set ", ds.train.source, " has ",
             ds.train.size(), " images, fewer than train.batch_size = ", tc.batch_size);
  // Resumed with a max_steps it has passed, the run trained nothing and said "paused at step N" at exit 0.
  // Checked before the run directory is written. Reaching it exactly may still owe an epoch's end (its
  // evaluation), and a time budget plans its own end: both go on as before.
  if (const int64_t steps = ds.train.size() / tc.batch_size * (tc.epochs + tc.cooldown_epochs);
      opts.resume && !budgeted && tc.max_steps > 0)
    MOEV_CHECK(pos.step <= tc.max_steps || pos.step >= steps, "train.max_steps = ", tc.max_steps, " (--max-steps): ",
               ckpt_file, " is at step ", pos.step, " already; give a larger --max-steps, or 0 to train to the end (",
               steps, " steps)");

  torch::manual_seed(tc.seed);
  auto model = models::build_model(cfg.model);
  const int64_t n_branches = model->num_branches();
  // Checked before the run directory is written, so a rejected config leaves it as it was.
  // Both losses compare the branches' outputs on one image.
  for (const auto& [key, weight] : {std::pair<const char*, double>{"train.diversity_weight", tc.diversity_weight},
                                    {"train.online_distill", tc.online_distill}})
    MOEV_CHECK(!tc.branch_views || n_branches == 1 || weight == 0, "train.branch_views: each branch sees other ",
               "images, so ", key, " = ", weight, " would compare outputs on different images; set ", key, " = 0");
  // Loaded (and checked) before the run directory is written, like the checks above.
  std::unique_ptr<Teacher> teacher;
  if (!tc.teacher.empty()) {
    teacher = std::make_unique<Teacher>(tc.teacher, cfg.model, ds.mean, ds.std,
                                        tc.teacher_other_data ? nullptr : &cfg.data, ds.train.class_names);
    teacher->limit_cache(tc.teacher_cache_mb);
    if (opts.progress && lead && !opts.resume)
      for (const auto& note : teacher->notes()) *opts.progress << "note: " << note << "\n";
    // A teacher file replaced between the stop and the resume would teach the rest of the run something else.
    MOEV_CHECK(!opts.resume || saved_teacher.empty() || saved_teacher == teacher->fingerprint(), "--resume: ",
               ckpt_file, " was taught by other teacher weights than train.teacher holds now (",
               io::to_json(cfg)["train"]["teacher"].dump(), " was replaced since): resuming would change the "
               "run's targets halfway; put the teacher back, or start a new run");
    // The cache the run had: refilled from other batches, its probabilities would differ in rounding.
    const auto kc = resume_from.optimizer.find("teacher_cache.keys");
    const auto pc = resume_from.optimizer.find("teacher_cache.probs");
    if (opts.resume && kc != resume_from.optimizer.end() && pc != resume_from.optimizer.end())
      teacher->restore_cache(kc->second, pc->second, ckpt_file);
  }
  model->to(device);
  if (!opts.resume && !tc.init_from.empty()) {
    const auto init = load_checkpoint(tc.init_from, CheckpointLoad::kInference);
    const auto from = io::from_json_string(init.config_json, tc.init_from);
    try {
      load_module_tensors(*model, inference_weights(init), "train.init_from = " + tc.init_from);
    } catch (const Error& e) {  // a tensor's name and shape said nothing of which setting differs
      const auto arch = architecture_difference(from.model, cfg.model);
      fail(e.what(), arch.empty() ? "" : "; its model differs from this run's: " + arch);
    }
    // Said, since nothing else shows it: a supervised run on more labels than this one's subset (a data-efficient
    // run started from a model of the whole set) reached 0.87 where 0.54 was this data's own.
    const auto st = json::parse(init.state_json, nullptr, false);
    const bool supervised = st.is_object() && !st.contains("pretrain");
    const std::string differ = supervised ? training_data_difference(from.data, cfg.data) : "";
    if (lead && opts.progress)
      *opts.progress << "note: starting from the weights of " << tc.init_from
                     << (differ.empty() ? ""
                                        : ", a supervised run on other data than this one's (" + differ +
                                              "): what it learnt from those labels comes with it")
                     << "\n";
    // A paused run's weights were started from as a finished one's.
    std::string unfinished = supervised ? unfinished_training(from, init.state_json, tc.init_from) : "";
    if (st.is_object() && st.contains("pretrain") && st["pretrain"].is_object()) {
      const auto& p = st["pretrain"];
      const int64_t step = p.value("step", int64_t{0}), total = p.value("total_steps", int64_t{0});
      if (step < total)
        unfinished = tc.init_from + " is an unfinished pre-training's: it stopped at step " + std::to_string(step) +
                     " of " + std::to_string(total) + "; " + resume_command(tc.init_from, init.state_json) +
                     " finishes it";
    }
    if (lead && opts.progress && !unfinished.empty()) *opts.progress << "note: " << unfinished << "\n";
  }
  if (!opts.resume && !opts.init_tensors.empty()) {
    torch::NoGradGuard no_grad;
    auto named = model->named_parameters();
    for (const auto& [name, t] : opts.init_tensors) {
      auto* p = named.find(name);
      MOEV_CHECK(p != nullptr, "initial tensor '", name, "': the model has no such parameter");
      MOEV_CHECK(p->sizes() == t.sizes(), "initial tensor '", name, "' has shape ", t.sizes(),
                 " but the model's parameter has ", p->sizes());
      p->copy_(t);
    }
  }
  if (opts.resume) load_module_tensors(*model, resume_from.model, ckpt_file);
  // Expert parallelism: every rank loaded the full experts; each keeps its own.
  std::unique_ptr<ExpertShards> shards;
  if (tc.expert_parallel && comm) shards = std::make_unique<ExpertShards>(*model, *comm);
  AdamWOptions ao;
  ao.beta1 = tc.beta1;
  ao.beta2 = tc.beta2;
  ao.weight_decay = tc.weight_decay;
  std::vector<std::pair<std::string, at::Tensor>> params;
  std::vector<at::Tensor> shared;  // data-parallel parameters (the same on every rank)
  // Frozen parameters never get a gradient, so the optimizer leaves them exactly as loaded.
  const auto frozen = frozen_parameters(*model, tc.freeze);
  for (auto& p : model->named_parameters()) {
    if (frozen.count(p.key())) p.value().requires_grad_(false);
    params.emplace_back(p.key(), p.value());
    if (!shards || !shards->is_expert(p.key())) shared.push_back(p.value());
  }
  std::vector<at::Tensor> trainable;  // in the order of the replicas' gradients
  for (const auto& [name, p] : params)
    if (p.requires_grad()) trainable.push_back(p);
  AdamW opt(params, ao);
  if (opts.resume) {
    opt.load_state(shards ? shards->slice(resume_from.optimizer) : resume_from.optimizer, ckpt_file);
  }
  // The average starts from the weights training starts from (init_from's included).
  std::unique_ptr<WeightAverage> avg;
  if (tc.ema_decay != 0) avg = std::make_unique<WeightAverage>(*model, tc.ema_decay);
  if (avg && opts.resume) {
    MOEV_CHECK(!resume_from.ema.empty(), ckpt_file, ": the run keeps a weight average (train.ema_decay = ",
               tc.ema_decay, ") but the checkpoint has none");
    avg->load(shards ? shards->slice(resume_from.ema) : resume_from.ema, ckpt_file);
  }
  // Every rank built the same weights from the same seed; rank 0's are sent
  // anyway, so no rank can start from another (e.g. an older init_from file).
  if (comm) comm->broadcast(shared);
  io::JsonlLog log;
  const auto log_path = fs::path(tc.out_dir) / "log.jsonl";
  if (lead) {
    // Checked now: a directory that cannot be written would otherwise fail at
    // the first checkpoint, after the training it was to keep.
    const auto config_file = (fs::path(tc.out_dir) / "config.json").string();
    // A run goes on with its checkpoint's config; an edit of config.json (to change the learning rate, say)
    // was overwritten without a word.
    std::error_code ec;
    if (opts.resume && opts.progress && fs::exists(config_file, ec)) {
      std::string edits;
      try {
        const auto edited = resumed_config(io::from_json_string(io::read_text(config_file, "config"), config_file),
                                           cfg);
        for (const auto& d : io::config_differences(cfg, edited)) edits += (edits.empty() ? "" : "; ") + d;
      } catch (const Error& e) {
        edits = std::string("it no longer reads as a config: ") + e.what();
      }
      if (!edits.empty())
        *opts.progress << "note: " << config_file << " was changed since the run wrote it: " << edits
                       << ". A resumed run goes on with its checkpoint's config, and config.json is written from it "
                       << "again; a changed setting needs a new run (from this one: --set train.init_from="
                       << ckpt_file << ")\n";
    }
    io::write_text_atomic(config_file, io::to_json_string(cfg) + "\n");
    // A run killed after its last checkpoint logged steps (and perhaps an epoch's
    // evaluation) that it logs again now: each step once, in order.
    if (opts.resume)
      io::trim_jsonl(log_path.string(), [&](const json& j) {
        return j.value("step", int64_t{0}) <= pos.step &&
               (!j.contains("eval") || j.value("epoch", int64_t{0}) <= pos.epoch);
      });
    log.open(log_path.string(), opts.resume, "train.out_dir = " + tc.out_dir);
    log.report_to(opts.progress, opts.interactive, "training");  // at once, not by the next checkpoint's failure
  }
  auto write_log = [&](const json& line) { log.write(line, pos.step); };

  data::LoaderOptions lo = training_loader_options(cfg.data, ds, tc.batch_size, tc.seed);
  const int64_t slices_of = slice_multiple(cfg.model);
  // This rank's rows of every global batch, routing groups kept whole.
  const auto shares = split_rows(tc.batch_size, world, slices_of);
  MOEV_CHECK(static_cast<int>(shares.size()) == world, "train.batch_size = ", tc.batch_size,
             " is too small to give each of ", world, " ranks a share");
  for (int q = 0; q < rank; ++q) lo.rows_begin += shares[q];
  lo.rows_end = lo.rows_begin + shares[rank];
  const int64_t per_epoch = ds.train.size() / tc.batch_size;  // drop_last
  const int64_t epoch_steps = per_epoch * tc.epochs;           // the warmup + cosine schedule
  const int64_t all_epochs = tc.epochs + tc.cooldown_epochs;   // then the cool-down at cooldown_lr
  const int64_t all_steps = per_epoch * all_epochs;
  // A time budget ends the schedule where the budget does (re-planned as the run
  // goes), train.epochs at the latest.
  int64_t total_steps = budgeted && saved_plan > 0 ? std::min(saved_plan, epoch_steps) : epoch_steps;
  auto stop_step = [&] {
    const int64_t s = budgeted ? total_steps : all_steps;
    // A finished run has no pause ahead: its bar read "350/25" under --max-steps 25.
    return tc.max_steps > 0 && pos.step < s ? std::min(s, tc.max_steps) : s;
  };
  int64_t stop_at = stop_step();
  // Soft targets [B, L] when anything but the label shapes them.
  const bool mixing = tc.mixup_alpha > 0 || tc.cutmix_alpha > 0;
  const bool soft = mixing || teacher || tc.cosine_loss > 0 || multilabel;
  MixOptions mix_opts;
  mix_opts.mixup_alpha = tc.mixup_alpha;
  mix_opts.cutmix_alpha = tc.cutmix_alpha;
  mix_opts.prob = tc.mix_prob;
  mix_opts.switch_prob = tc.mix_switch_prob;
  const int64_t n_augs = data::num_augmentations(lo);

  // Replicas share the master's storage, so they are built after its weights are final.
  // Replicas share the master's tensors whole; expert shards keep one per rank.
  // With train.replicas = 0 (one per thread) a one-process run resumes with the replicas it had, whatever the
  // threads now: the replicas cut the batch (BatchNorm statistics, routing groups), the threads only share work.
  const int requested = tc.replicas == 0 && world == 1 && saved_replicas > 0 ? saved_replicas : tc.replicas;
  const int n_reps = shards ? 1 : resolve_replicas(requested, threads, shares[rank]);
  // Ranks may hold different replica counts (shares, cores): the job's replicas
  // are numbered across ranks for their router noise, and the optimizer's norm
  // is cut into the job's total, the same number on every rank.
  int first_replica = 0, job_replicas = n_reps;
  if (comm) {
    auto counts = comm->all_gather(torch::tensor({static_cast<int64_t>(n_reps)}));
    job_replicas = static_cast<int>(counts.sum().item<int64_t>());
    for (int q = 0; q < rank; ++q) first_replica += static_cast<int>(counts[q].item<int64_t>());
  }
  Replicas reps(model, cfg.model, n_reps, threads, first_replica, /*own_generator=*/world > 1);
  for (int r = 1; r < reps.size(); ++r)
    for (auto& p : reps.model(r).named_parameters())
      if (frozen.count(p.key())) p.value().requires_grad_(false);
  // Ranks waiting at an evaluation's end while rank 0 logs it (they follow its batches, each within the
  // collectives' dist_timeout): a deadline for that, not for one collective.
  const double eval_wait_s = 30 * tc.dist_timeout;
  auto t_start = std::chrono::steady_clock::now();  // reset when training starts
  double eval_seconds = 0;
  // Seconds of training steps, this process's and before it, evaluations excluded.
  auto train_elapsed = [&] {
    return prior_train_s +
           std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count() - eval_seconds;
  };
  double saved_train_s = prior_train_s;  // what the last checkpoint holds
  auto save = [&](const Position& p) {  // every rank calls it: expert shards are gathered
    saved_train_s = train_elapsed();
    auto tensors = module_tensors(*model);
    auto opt_state = opt.state();
    std::map<std::string, at::Tensor> averaged;
    if (avg) averaged = avg->tensors();
    if (shards) {
      tensors = shards->gather(tensors);
      opt_state = shards->gather(opt_state);
      if (avg) averaged = shards->gather(averaged);
    }
    if (!lead) return;
    Checkpoint c;
    c.config_json = io::to_json_string(cfg);
    json st{{"step", p.step}, {"epoch", p.epoch}, {"batch", p.batch},
                        {"combine_weights", cfg.model.router.renormalize
                                                ? "renormalized over the selected K"
                                                : "selected softmax gates (V-MoE)"},
                        {"world_size", world}, {"expert_parallel", shards != nullptr}, {"replicas", n_reps},
                        {"train_elapsed_s", saved_train_s},
                        {"log_window",
                         {{"loss", window.loss},
                          {"aux_loss", window.aux},
                          {"grad_norm", window.grad_norm},
                          {"correct", window.correct},
                          {"images", window.images},
                          {"seconds", window.seconds(std::chrono::steady_clock::now())}}},
                        {"class_names", ds.train.class_names}, {"train_data", train_data}};
    if (budgeted) st["planned_steps"] = total_steps;
    if (teacher) st["teacher"] = teacher->fingerprint();
    if (!train_rows.empty()) st["train_rows"] = train_rows;
    c.state_json = st.dump();
    c.model = std::move(tensors);
    c.optimizer = std::move(opt_state);
    // A single process's teacher cache goes with it, so a resumed run is taught from the same rows; a job's
    // ranks each hold their own rows' and refill them (see Teacher::limit_cache).
    if (teacher && world == 1 && teacher->cached() > 0) {
      auto [keys, probs] = teacher->cache_tensors();
      c.optimizer["teacher_cache.keys"] = keys;
      c.optimizer["teacher_cache.probs"] = probs;
    }
    c.rng = cpu_rng_state();
    c.ema = std::move(averaged);
    save_checkpoint(ckpt_file, c);
  };

  // A stop asked during an evaluation ends it at the next batch: a test set that
  // takes minutes would outlast a scheduler's grace period. The ranks of a job
  // agree before every batch, so a stop sent to any one of them (a preempted
  // node's) counts: with expert shards every rank runs the evaluation's forwards;
  // otherwise rank 0 evaluates alone and the others follow its batches
  // (follow_evaluation) until it says it is done. Returns {stop asked, rank 0
  // still evaluating}, summed over the ranks.
  auto agree = [&](bool evaluating) {
    const bool asked = opts.stop && opts.stop->load();
    if (!comm) return std::make_pair(asked, evaluating);
    auto t = torch::tensor({asked ? 1.0 : 0.0, evaluating && lead ? 1.0 : 0.0}, torch::kDouble);
    comm->all_reduce_sum({t});
    return std::make_pair(t[0].item<double>() > 0, t[1].item<double>() > 0 || shards);
  };
  const std::function<bool()> eval_stop = [&] { return agree(true).first; };
  // Ranks but 0 without expert shards, while rank 0 evaluates: true when a stop cut it short.
  auto follow_evaluation = [&] {
    for (;;) {
      const auto [stop, evaluating] = agree(false);
      if (!evaluating) return false;
      if (stop) return true;
    }
  };
  // The test-set figures of the training weights (raw), or of the weight
  // average when the run keeps one (the default); `stopped` when a stop ended it.
  auto evaluate_model = [&](bool raw = false) {
    auto run = [&] {
      return evaluate(reps, ds.test, ds.mean, ds.std, 256, device, nullptr, false, false, slices_of, sigmoid_tags,
                      opts.stop || comm ? eval_stop : std::function<bool()>{});
    };
    if (!avg || raw) return run();
    EvalResult e;
    avg->with_average([&] { e = run(); });
    return e;
  };

  TrainOutcome out;
  out.steps_per_epoch = per_epoch;
  out.budgeted = budgeted;
  // train.branch_views: branch b trains on the batches of a loader and mix draws
  // of its own (view 0 those of the plain run), like a separately trained model
  // but for the trunk they share (Havasi et al. 2021's independent inputs).
  const int64_t views = tc.branch_views ? n_branches : 1;
  auto view_seed = [&](int64_t v) { return branch_view_seed(tc.seed, v); };
  auto ce_opts = torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(tc.label_smoothing);
  viz::ProgressBar bar(tc.progress && lead ? opts.progress : nullptr, stop_at, "train", "step",
                       opts.interactive, pos.step);
  t_start = std::chrono::steady_clock::now();
  // Until the first plan; not when --max-steps ends this process first.
  if (budgeted && !(saved_plan > 0) && stop_at == total_steps) bar.set_end_in(tc.minutes * 60 - prior_train_s);
  // The budget's step time, from the last (step, seconds) samples of this process,
  // after its first steps (allocations, caches) have passed.
  std::deque<std::pair<int64_t, double>> pace;
  const int64_t pace_from = pos.step + 5, pace_every = 10;
  int64_t images_seen = 0;
  double ema_loss = -1;
  bool cache_full_noted = false;  // the note that the teacher's cache filled, printed once
  // A warmup as long as the schedule (a preset's 300 steps in a one-epoch or
  // one-minute run) never reaches train.lr nor decays: said once, when known.
  bool warmup_noted = false;
  auto note_warmup = [&] {
    // Notes are said with train.progress = false too: it turns off the bar and the epoch lines, not warnings.
    if (warmup_noted || tc.warmup_steps < total_steps || !opts.progress || !lead) return;
    warmup_noted = true;
    if (opts.interactive) *opts.progress << "\r\033[K";
    *opts.progress << "note: " << opts.warmup_key << " = " << tc.warmup_steps << " is at least the schedule's "
                   << total_steps << (budgeted ? " steps planned in the time budget" : " steps")
                   << ": the learning rate rises to "
                   << learning_rate(total_steps - 1, total_steps, tc.warmup_steps, tc.lr, tc.min_lr)
                   << " (" << opts.lr_key << " = " << tc.lr << ") and never decays\n";
  };
  if (!budgeted) note_warmup();
  // `--epochs 3` on a config with a cool-down trained 8 epochs, said only in the summary.
  if (!budgeted && tc.cooldown_epochs > 0 && !opts.resume && opts.progress && lead)
    *opts.progress << "note: train.epochs = " << tc.epochs << " and then train.cooldown_epochs = "
                   << tc.cooldown_epochs << " at train.cooldown_lr = " << tc.cooldown_lr << ": "
                   << tc.epochs + tc.cooldown_epochs << " epochs in all\n";
  double window_comm = comm ? comm->seconds_in_collectives() : 0.0;
  window.since = t_start;
  reps.train(true);
  // The generator as it was at the checkpoint, restored only now: building the
  // teacher and the replicas above draws from it (weight init), and stochastic
  // depth must see the stream the uninterrupted run saw.
  if (opts.resume && resume_from.rng.numel() > 0) set_cpu_rng_state(resume_from.rng);
  resume_from = Checkpoint{};  // all copied into place: not held (4x the weights) for the rest of the run
  const Position started_at = pos;
  // An epoch whose steps are all taken but whose end is not (a stop came before
  // or during its evaluation) is entered for that end, its last epoch too, and
  // so is the epoch a spent time budget ended inside.
  auto end_pending = [&] {
    return pos.batch == per_epoch || (budgeted && pos.batch > 0 && pos.step >= total_steps);
  };
  while ((pos.step < stop_at || end_pending()) && pos.epoch < all_epochs) {
    std::vector<std::unique_ptr<data::BatchLoader>> loaders;
    for (int64_t v = 0; v < views; ++v) {
      auto lv = lo;
      lv.seed = view_seed(v);
      loaders.push_back(std::make_unique<data::BatchLoader>(ds.train, lv, pos.epoch, pos.batch));
    }
    std::vector<data::Batch> batches(views);
    auto next_batches = [&] {
      bool all = true;
      for (int64_t v = 0; v < views; ++v) all = loaders[v]->next(batches[v]) && all;
      return all;
    };
    while (pos.step < stop_at && next_batches()) {
      const double lr = pos.step < total_steps
                            ? learning_rate(pos.step, total_steps, tc.warmup_steps, tc.lr, tc.min_lr)
                            : tc.cooldown_lr;
      const bool mix_on = mixing && pos.epoch < tc.epochs - tc.mix_off_epochs;
      // One view's images x, labels y and soft targets [B, L] (when anything but
      // the label shapes them), from its batch and its own mix draws.
      auto prepare = [&](const data::Batch& batch, uint64_t seed, at::Tensor& x, at::Tensor& y, at::Tensor& target) {
        x = batch.x.to(device);
        y = batch.y.to(device);
        // Pairs are (i, B-1-i) within this rank's rows: a job of W ranks mixes
        // other pairs than one process would (the same distribution of mixes).
        const Mix mix = mix_on ? draw_mix(mix_opts, seed, pos.step, x.size(2), x.size(3)) : Mix{};
        if (multilabel) {
          target = batch.t.to(device);
          apply_mix(mix, x, target);
        } else if (soft) {
          target = smoothed_one_hot(y, cfg.model.num_classes, tc.label_smoothing);
          auto distill = [&](const at::Tensor& teacher_probs) {
            target = tc.distill_lambda * target + (1 - tc.distill_lambda) * teacher_probs;
          };
          // The teacher sees the blend itself, or its cached parts' probabilities
          // are mixed like the labels.
          const bool teach_blend = teacher && tc.teacher_on_mix && mix.kind != Mix::kNone;
          if (teacher && !teach_blend) distill(teacher->probs(batch.x, batch.index, batch.aug, n_augs).to(device));
          apply_mix(mix, x, target);
          if (teach_blend) distill(teacher->probs_uncached(x));
        }
      };
      // Views side by side per row ([B, V, ...] flattened), so that cutting the
      // rows into replica slices keeps each row's views together.
      std::vector<at::Tensor> xv(views), yv(views), tv(views);
      for (int64_t v = 0; v < views; ++v) prepare(batches[v], view_seed(v), xv[v], yv[v], tv[v]);
      auto interleave = [&](const std::vector<at::Tensor>& t) {
        return views == 1 || !t[0].defined() ? t[0] : torch::stack(t, 1).flatten(0, 1);
      };
      const auto x = interleave(xv), y = interleave(yv), target = interleave(tv);
      // Each replica's slice loss is weighted by its share of the batch, so the
      // summed gradients are those of the whole batch's mean loss.
      const auto sizes = reps.slice_sizes(y.size(0) / views, slices_of);
      // BatchNorm cannot normalise one image (split attention pools it to 1x1).
      if (cfg.model.family == "resnest")
        for (auto n : sizes)
          MOEV_CHECK(n >= 2, "train.batch_size = ", tc.batch_size, " cut into ", sizes.size(), " slices (",
                     world, " rank(s), ", reps.size(), " replica(s)) leaves a slice of ", n,
                     " image; BatchNorm needs >= 2: raise train.batch_size or lower train.replicas");
      const int slices = static_cast<int>(sizes.size());
      std::vector<int64_t> rows(sizes);  // of x: each image's V views
      for (auto& n : rows) n *= views;
      const auto xs = x.split_with_sizes(rows), ys = y.split_with_sizes(rows);
      const auto ts = soft ? target.split_with_sizes(rows) : std::vector<at::Tensor>{};
      std::vector<double> slice_loss(slices), slice_aux(slices);
      std::vector<int64_t> slice_correct(slices);
      reps.seed_generators(tc.seed, pos.step);
      opt.zero_grad();
      reps.clear_grads();
      reps.run(slices, [&](int r) {
        // Row i, view v of the slice is at i V + v: view v's rows, [n, ...].
        auto view_of = [&](const at::Tensor& t, int64_t v) {
          return views == 1 ? t : t.unflatten(0, {t.size(0) / views, views}).select(1, v);
        };
        auto objective = [&](const at::Tensor& logits, int64_t v) {
          const auto t = soft ? view_of(ts[r], v) : at::Tensor();
          if (multilabel)
            return tc.multilabel_loss == "sigmoid" ? sigmoid_bce(logits, t) : softmax_over_tags(logits, t);
          if (!soft) return torch::nn::functional::cross_entropy(logits, view_of(ys[r], v), ce_opts);
          auto l = soft_cross_entropy(logits, t);
          return tc.cosine_loss > 0 ? l + tc.cosine_loss * cosine_loss(logits, t) : l;
        };
        // Multi-label: precision@1, the top class is one of the (mixed) targets' tags.
        auto correct = [&](const at::Tensor& logits, int64_t v) {
          return multilabel ? view_of(ts[r], v).gather(1, logits.argmax(1, true)).gt(0).sum().item<int64_t>()
                            : logits.argmax(1).eq(view_of(ys[r], v)).sum().item<int64_t>();
        };
        at::Tensor loss, aux;
        int64_t right = 0;
        if (n_branches > 1) {
          // Sun et al. eq. 5-8: every branch against the target, plus the diversity
          // loss (counted with the auxiliary losses); accuracy from the mean logits,
          // or with views, each branch's on its own images.
          models::BranchOutputs outs;
          if (views > 1) {
            std::vector<at::Tensor> own(views);
            for (int64_t v = 0; v < views; ++v) own[v] = view_of(xs[r], v);
            outs = reps.model(r).forward_views(own);
          } else {
            outs = reps.model(r).forward_branches(xs[r]);
          }
          for (int64_t b = 0; b < n_branches; ++b) {
            const int64_t v = views > 1 ? b : 0;
            loss = loss.defined() ? loss + objective(outs.logits[b], v) : objective(outs.logits[b], v);
            if (views > 1) right += correct(outs.logits[b].detach(), v);
          }
          if (tc.diversity_weight > 0) {
            at::Tensor off;  // the classes left out: those the target supports
            if (tc.diversity_off_target)
              off = soft ? supported_classes(ts[r])
                         : torch::one_hot(ys[r], cfg.model.num_classes).to(torch::kBool);
            aux = tc.diversity_weight * diversity_loss(outs.logits, off);
          }
          if (tc.online_distill > 0) {
            auto od = tc.online_distill * online_distill_loss(outs.logits, tc.online_distill_temperature);
            aux = aux.defined() ? aux + od : od;
          }
          if (views == 1) right = correct(torch::stack(outs.logits).mean(0).detach(), 0);
        } else {
          auto logits = reps.model(r).forward(xs[r]);
          loss = objective(logits, 0);
          right = correct(logits.detach(), 0);
        }
        for (auto& l : reps.moe_layers(r)) aux = aux.defined() ? aux + l->aux_loss() : l->aux_loss();
        auto total = aux.defined() ? loss + aux : loss;
        const double w = double(sizes[r]) / double(tc.batch_size);
        (slices > 1 || world > 1 ? total * w : total).backward();
        slice_loss[r] = loss.item<double>() * w;
        slice_aux[r] = aux.defined() ? aux.item<double>() * w : 0.0;
        slice_correct[r] = right;
      });
      double grad_norm = 0;
      if (shards) {
        sum_gradients_over_ranks(*comm, shared, {});
        // Clipped here by the job's global norm (the experts' parts of it differ
        // per rank), so the optimizer does not clip again.
        grad_norm = clip_global_norm(*comm, params, *shards, tc.clip_grad_norm);
        opt.step(lr, 0.0);
      } else if (world > 1) {
        sum_gradients_over_ranks(*comm, trainable, reps.replica_grads());
        // The optimizer's passes cut into as many parts as the job has replicas:
        // then the norm's summation order, and so every bit of the update, is
        // that of one process running all of them.
        grad_norm = opt.step(lr, tc.clip_grad_norm, {}, nullptr, job_replicas);
      } else if (reps.size() == 1) {
        grad_norm = opt.step(lr, tc.clip_grad_norm);
      } else {
        grad_norm = opt.step(lr, tc.clip_grad_norm, reps.replica_grads(),
                             [&](int parts, const std::function<void(int)>& fn) { reps.parallel(parts, fn); },
                             reps.size());
      }
      if (avg) avg->update(pos.step);
      ++pos.step;
      ++pos.batch;
      // Every step of the first ten sampled, then every tenth: sampled every tenth from the start, a budget of
      // a few seconds got its first plan only at the 15th step, whatever it had allowed (2.4 s ran for 3.75 s).
      // By step number, so every rank of a job samples (and broadcasts) at the same steps.
      if (budgeted && pos.step >= pace_from &&
          (pos.step < pace_from + pace_every || (pos.step - pace_from) % pace_every == 0)) {
        int64_t plan = total_steps;
        if (lead) {
          const double now_s = train_elapsed();
          pace.emplace_back(pos.step, now_s);
          if (pace.size() > 30) pace.pop_front();
          const double per_step = pace.size() >= 2 ? (pace.back().second - pace.front().second) /
                                                         double(pace.back().first - pace.front().first)
                                                   : -1;
          if (per_step > 0 || now_s >= tc.minutes * 60)
            plan = steps_in_budget(pos.step, now_s, tc.minutes * 60, per_step, epoch_steps);
        }
        if (comm) {  // every rank follows rank 0's clock
          auto t = torch::tensor({plan}, torch::kLong);
          comm->broadcast({t});
          plan = t[0].item<int64_t>();
        }
        total_steps = plan;
        stop_at = stop_step();
        bar.set_total(stop_at);
        note_warmup();
      }

      double l = 0, aux_value = 0;
      int64_t correct = 0;
      for (int r = 0; r < slices; ++r) {
        l += slice_loss[r];
        aux_value += slice_aux[r];
        correct += slice_correct[r];
      }
      // A stop asked of any rank stops all of them after this step: the signal
      // reaches each at its own moment, the sum below at one step.
      bool stop_now = opts.stop && opts.stop->load();
      if (world > 1) {  // the job's figures, not this rank's
        auto t = torch::tensor({l, aux_value, double(correct), stop_now ? 1.0 : 0.0}, torch::kDouble);
        comm->all_reduce_sum({t});
        l = t[0].item<double>();
        aux_value = t[1].item<double>();
        correct = static_cast<int64_t>(t[2].item<double>());
        stop_now = t[3].item<double>() > 0;
      }
      window.correct += correct;
      MOEV_CHECK(std::isfinite(l), "training diverged at step ", pos.step, " (loss ", l,
                 "); lower train.lr or raise train.warmup_steps");
      ema_loss = ema_loss < 0 ? l : 0.98 * ema_loss + 0.02 * l;
      window.loss += l;
      window.grad_norm += grad_norm;
      window.aux += aux_value;
      window.images += tc.batch_size * views;
      images_seen += tc.batch_size * views;
      char status[96];
      std::snprintf(status, sizeof status, "ep %lld loss %.4f lr %.2e",
                    (long long)pos.epoch + 1, ema_loss, lr);
      bar.update(pos.step, status);

      if (lead && tc.log_every > 0 && pos.step % tc.log_every == 0) {
        const auto now = std::chrono::steady_clock::now();
        const double secs = window.seconds(now);
        const double n = double(window.images) / double(tc.batch_size * views);  // steps
        json line{{"step", pos.step}, {"epoch", pos.epoch}, {"lr", lr},
                  {"loss", window.loss / n}, {"aux_loss", window.aux / n},
                  {"grad_norm", window.grad_norm / n},
                  {"train_acc", double(window.correct) / double(window.images)},
                  {"teacher_images", teacher ? teacher->images_run() : 0},
                  {"teacher_cached", teacher ? teacher->cached() : 0},
                  {"images_per_s", secs > 0 ? double(window.images) / secs : 0.0}};
        json load = json::array(), dropped = json::array(), unrouted = json::array();
        for (const auto& s : reps.last_stats(slices)) {
          int64_t sum = 0;
          for (auto c : s.expert_count) sum += c;
          json row = json::array();
          for (auto c : s.expert_count) row.push_back(sum ? double(c) / double(sum) : 0.0);
          load.push_back(row);
          dropped.push_back(s.dropped_fraction);
          unrouted.push_back(s.unrouted_fraction);
        }
        line["expert_load"] = load;
        line["dropped"] = dropped;
        line["unrouted"] = unrouted;
        if (comm) {  // share of this window's wall time rank 0 spent in collectives
          const double c = comm->seconds_in_collectives();
          line["comm_share"] = secs > 0 ? (c - window_comm) / secs : 0.0;
          window_comm = c;
        }
        write_log(line);
        if (teacher && tc.teacher_cache_mb > 0 && teacher->cache_full() && !cache_full_noted && opts.progress) {
          cache_full_noted = true;
          if (opts.interactive) *opts.progress << "\r\033[K";
          *opts.progress << "note: the teacher's cache is full (" << teacher->cached()
                         << " images and crops, train.teacher_cache_mb = " << tc.teacher_cache_mb
                         << "); the teacher runs on every new one from now on\n";
        }
        window = {};
        window.since = now;
      }
      // Saved below, where a max_steps pause is. A stop that comes with the pause is still a stop: the run
      // exited 0 as if merely paused, and a scheduler took the preempted job for a finished one.
      if (stop_now) {
        stop_at = std::min(stop_at, pos.step);
        out.stopped = true;
      }
      if (tc.checkpoint_every > 0 && pos.step % tc.checkpoint_every == 0 && pos.step < stop_at)
        save(pos);
    }
    // Asked to stop at an epoch's end: saved before the epoch's evaluation, which the resumed run makes (the
    // checkpoint comes first in a scheduler's grace period).
    if (out.stopped) break;
    // The budget spent inside an epoch ends the run like its last epoch; max_steps only pauses it.
    const bool budget_spent = budgeted && pos.step >= total_steps;
    if (pos.step >= stop_at && pos.batch < per_epoch && !budget_spent) break;  // stopped inside an epoch
    const Position before_eval = pos;  // where an evaluation cut short by a stop leaves the run
    ++pos.epoch;
    pos.batch = 0;
    out.epochs_done = pos.epoch;
    const bool eval_now = tc.eval_each_epoch || pos.epoch == all_epochs || budget_spent;
    bool eval_stopped = false;
    if (!lead) {
      // Expert shards: every rank runs the evaluation's forwards (each holds
      // experts the others need); otherwise rank 0 evaluates alone.
      if (eval_now) eval_stopped = shards ? evaluate_model().stopped : follow_evaluation();
      if (eval_now) comm->barrier(eval_wait_s);
    } else if (eval_now) {
      const auto t_eval = std::chrono::steady_clock::now();
      auto e = evaluate_model();
      // What the average adds, beside it (the expert shards' evaluation needs every rank).
      std::optional<EvalResult> raw;
      if (avg && !shards && !e.stopped) raw = evaluate_model(/*raw=*/true);
      eval_stopped = e.stopped || (raw && raw->stopped);
      if (comm && !shards && !eval_stopped) agree(false);  // done: the other ranks stop following
      eval_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t_eval).count();
      if (!eval_stopped) {  // one cut short by a stop is neither logged nor the run's figures
        out.eval = std::move(e);
        // Wall time since this process started training, evaluations included: what
        // a time budget counts (a resumed run starts again from 0).
        const double elapsed =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
        // train_s: the run's training seconds so far, the processes it resumed from included.
        json line{{"step", pos.step}, {"epoch", pos.epoch}, {"elapsed_s", elapsed}, {"train_s", train_elapsed()},
                  {"eval", eval_json(out.eval)}};
        if (raw) line["eval_raw"] = eval_json(*raw);
        write_log(line);
        if (opts.progress && tc.progress) {
          char buf[128];
          if (out.eval.multilabel)
            std::snprintf(buf, sizeof buf, "epoch %lld: test precision@1 %.4f mAP %.4f loss %.4f", (long long)pos.epoch,
                          out.eval.top1, out.eval.mean_ap, out.eval.loss);
          else
            std::snprintf(buf, sizeof buf, "epoch %lld: test top-1 %.4f%s loss %.4f", (long long)pos.epoch,
                          out.eval.top1, top5_text(out.eval.top5).c_str(), out.eval.loss);
          if (opts.interactive) *opts.progress << "\r\033[K";
          *opts.progress << buf << "\n";
        }
      }
      reps.train(true);
      if (comm) comm->barrier(eval_wait_s);
    }
    if (eval_now) {
      // A stop asked while the test set was evaluated takes effect here, not a
      // step later; one cut short leaves the run before its epoch's end, so the
      // resumed run makes that evaluation.
      bool stop_now = opts.stop && opts.stop->load();
      if (comm) {
        auto t = torch::tensor({stop_now ? 1.0 : 0.0, eval_stopped ? 1.0 : 0.0}, torch::kDouble);
        comm->all_reduce_sum({t});
        stop_now = t[0].item<double>() > 0;
        eval_stopped = t[1].item<double>() > 0;
      }
      if (eval_stopped) {
        pos = before_eval;
        out.epochs_done = pos.epoch;
      }
      // At a max_steps pause the run ends here anyway, but a stop asked is still a stop (exit 143, not 0).
      if (eval_stopped || stop_now) {
        out.stopped = true;
        break;
      }
    }
  }
  bar.finish();
  // A run resumed after its last epoch (killed while writing its last
  // checkpoint, or run again) still reports the figures of its model.
  const bool finished = pos.epoch >= all_epochs || (budgeted && pos.step >= total_steps && !end_pending());
  // A resume that took no step (the run was done, or is paused at this max_steps) leaves its checkpoint as it
  // was: rewriting it added this process's seconds to the run's training time each time.
  const bool moved = pos.step != started_at.step || pos.epoch != started_at.epoch || !opts.resume;
  if (moved) save(pos);
  out.run_train_seconds = saved_train_s;  // the checkpoint's: the evaluation below is no training
  out.stopped = out.stopped && !finished;  // stopped after its last step: done all the same
  if (lead && finished && out.eval.images == 0 && !comm) {
    auto e = evaluate_model();
    if (e.stopped) out.stopped = true;  // the run is done; a rerun evaluates it
    else out.eval = std::move(e);
  }
  out.steps = pos.step;
  out.finished = finished;
  out.teacher_images = teacher ? teacher->images_run() : 0;
  out.epochs_done = pos.epoch;
  out.train_seconds = out.run_train_seconds - prior_train_s;
  out.train_images_per_s = out.train_seconds > 0 ? double(images_seen) / out.train_seconds : 0;
  return out;
}
}  // namespace

TrainOutcome train_model(io::RunConfig cfg, const TrainRunOptions& opts) {
  if (opts.comm && opts.comm->rank() != 0) return train_locked(std::move(cfg), opts);  // rank 0 writes the directory
  // Two processes in one directory (two sweeps into one --out, a run started
  // twice) would interleave logs and rename each other's checkpoints. Locked
  // before anything in it is read: a run that finished or saved while this one
  // checked for its checkpoint must be seen.
  const fs::path dir = cfg.train.out_dir;
  MOEV_CHECK(!cfg.train.out_dir.empty(), "train.out_dir is empty: expected a run directory (--out DIR)");
  std::error_code ec;
  // A directory no run was started in (no lock file) may hold the user's own
  // config.json or log.jsonl, which the run would replace at once.
  if (fs::exists(dir, ec) && !fs::exists(dir / ".train.lock", ec) && !fs::exists(checkpoint_path(cfg.train.out_dir), ec))
    for (const char* name : {"config.json", "log.jsonl"})
      MOEV_CHECK(!fs::exists(dir / name, ec), "train.out_dir = ", cfg.train.out_dir, ": holds a ", name,
                 " that no moev run wrote (no .train.lock beside it), which this run would replace; train into ",
                 "another --out, or move it away");
  // A pre-training run's directory is named as one, with the command that continues it and the way to start
  // from it; a new run there would put a supervised run's files among its.
  const bool pretrained = fs::exists(dir / "pretrain.pt", ec) || fs::exists(dir / ".pretrain.lock", ec);
  MOEV_CHECK(opts.resume || !pretrained, "train.out_dir = ", cfg.train.out_dir, " holds a pretraining run ",
             "(pretrain.pt, .pretrain.lock): continue it with moev pretrain --out ", cfg.train.out_dir, " --resume, ",
             "or start a supervised run from it in another directory with --set train.init_from=",
             (dir / "pretrain.pt").string());
  io::refuse_other_kinds(dir.string(), {".train.lock", ".pretrain.lock"}, "train.out_dir");
  const std::string who = "train.out_dir = " + cfg.train.out_dir;
  return io::in_run_directory(dir.string(), ".train.lock", who, [&] { return train_locked(std::move(cfg), opts); });
}

}  // namespace moev::train
