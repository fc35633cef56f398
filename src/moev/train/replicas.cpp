#include "moev/train/replicas.h"

#include <algorithm>

#include <omp.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/nn/random.h"

namespace moev::train {

int resolve_replicas(int requested, int threads, int64_t batch) {
  MOEV_CHECK(requested >= 0, "train.replicas = ", requested, ": expected >= 0 (0: one per thread)");
  int r = requested > 0 ? requested : std::max(1, threads);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(r, batch)));
}

int64_t slice_multiple(const models::ModelConfig& cfg) {
  return cfg.moe.kind == "none" ? 1 : std::max<int64_t>(1, cfg.router.group_size);
}

namespace {
bool is_running_stat(const std::string& name) {
  return name.find("running_") != std::string::npos || name.find("num_batches_tracked") != std::string::npos;
}

// The replica's tensor becomes the master's storage and version counter.
void share(at::Tensor& replica, const at::Tensor& master) {
  replica.set_data(master);
  replica.unsafeGetTensorImpl()->set_version_counter(master.unsafeGetTensorImpl()->version_counter());
}
}  // namespace

Replicas::Replicas(models::ClassifierPtr master, const models::ModelConfig& cfg, int replicas,
                   int threads, int first_index, bool own_generator)
    : first_index_(first_index) {
  MOEV_CHECK(replicas >= 1, "Replicas: expected >= 1 replica, got ", replicas);
  threads_per_replica_ = std::max(1, threads / replicas);
  models_.push_back(master);
  auto master_params = master->parameters();
  auto master_buffers = master->named_buffers();
  auto master_moe = moe::find_moe_layers(*master);
  const auto device = master_params.empty() ? c10::Device(c10::kCPU) : master_params[0].device();
  for (int r = 1; r < replicas; ++r) {
    auto m = models::build_model(cfg);
    m->to(device);
    torch::NoGradGuard no_grad;
    auto ps = m->parameters();
    auto bs = m->named_buffers();
    MOEV_CHECK(ps.size() == master_params.size() && bs.size() == master_buffers.size(),
               "Replicas: the model config does not build the master's architecture");
    // set_data shares the master's storage: the optimizer's in-place updates reach
    // every replica with no copies, while each keeps its own .grad. It does not
    // share the version counter, so the replica's would never move, and what
    // is cached per weight version (nn::linear's packed weights) would go
    // stale in every replica but the first: the replica takes the master's.
    for (size_t i = 0; i < ps.size(); ++i) {
      MOEV_CHECK(ps[i].sizes() == master_params[i].sizes(),
                 "Replicas: parameter ", i, " has shape ", ps[i].sizes(), " but the master's has ",
                 master_params[i].sizes());
      share(ps[i], master_params[i]);
    }
    // Buffers are shared too, except what BatchNorm updates in every training
    // forward: replicas writing one running mean from two threads would race.
    // Each keeps its own running statistics (of its slices), and the master's
    // are copied over whenever the replicas switch to inference (train(false)).
    for (size_t i = 0; i < bs.size(); ++i) {
      if (is_running_stat(bs[i].key())) {
        bs[i].value().copy_(master_buffers[i].value());
        own_stats_.push_back({bs[i].value(), master_buffers[i].value()});
      } else {
        share(bs[i].value(), master_buffers[i].value());
      }
    }
    // Routing settings changed after construction (inference overrides) follow.
    auto layers = moe::find_moe_layers(*m);
    for (size_t i = 0; i < layers.size() && i < master_moe.size(); ++i)
      layers[i]->set_router(master_moe[i]->router_config());
    m->train(master->is_training());
    models_.push_back(m);
  }
  for (auto& m : models_) {
    moe_.push_back(moe::find_moe_layers(*m));
    params_.push_back(m->parameters());
  }
  if (replicas == 1 && !own_generator) return;
  for (int r = 0; r < replicas; ++r) generators_.push_back(at::detail::createCPUGenerator(0));
  if (replicas == 1) return;
  errors_.resize(replicas);
  for (int r = 1; r < replicas; ++r) workers_.emplace_back([this, r] { work(r); });
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [&] { return ready_ == replicas - 1; });
}

std::vector<int64_t> split_rows(int64_t batch, int parts, int64_t multiple) {
  const int64_t R = std::max(1, parts);
  int64_t each = batch / R;
  if (multiple > 1 && each >= multiple) each -= each % multiple;
  std::vector<int64_t> out;
  int64_t left = batch;
  for (int64_t r = 0; r < R && left > 0; ++r) {
    const int64_t n = r + 1 == R ? left : std::min(left, std::max<int64_t>(1, each));
    out.push_back(n);
    left -= n;
  }
  return out;
}

std::vector<int64_t> Replicas::slice_sizes(int64_t batch, int64_t multiple) const {
  // No more slices than the batch has routing groups: a slice smaller than a group routed with another
  // capacity (train.replicas = 1000 dropped 47 % of the tokens where one replica dropped 29 %). Replicas
  // past that wait.
  const int64_t groups = multiple > 1 ? std::max<int64_t>(1, batch / multiple) : batch;
  return split_rows(batch, static_cast<int>(std::min<int64_t>(size(), groups)), multiple);
}

// Threads and ATen: at::set_num_threads() also clears oneDNN's primitive cache,
// and a thread's first ATen parallel op calls it (lazy per-thread init). Called
// while another replica runs a oneDNN op, that frees the primitive under it; called
// every step, it rebuilds the bf16 GEMM kernels every step. So the workers are
// persistent, pass their lazy init once while the constructor waits, and thread
// counts are then set per thread with omp_set_num_threads (OpenMP's per-thread
// setting, which at::get_num_threads() reads), never globally.
void Replicas::work(int r) {
  at::get_num_threads();  // the lazy per-thread init, while the constructor waits
  omp_set_num_threads(threads_per_replica_);
  int64_t seen = 0;
  std::unique_lock<std::mutex> lock(mutex_);
  ++ready_;
  done_.notify_all();
  for (;;) {
    wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
    if (stop_) return;
    seen = generation_;
    if (r >= job_n_) continue;
    const auto* job = job_;
    lock.unlock();
    std::exception_ptr error;
    try {
      (*job)(r);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    errors_[r] = error;
    if (--pending_ == 0) done_.notify_all();
  }
}

Replicas::~Replicas() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  for (auto& w : workers_) w.join();
}

void Replicas::run(int n, const std::function<void(int)>& fn) {
  MOEV_CHECK(n >= 1 && n <= size(), "Replicas::run: ", n, " slices for ", size(), " replicas");
  auto with_generator = [&](int r) {
    nn::GeneratorScope scope(generators_.empty() ? c10::nullopt : c10::make_optional(generators_[r]));
    fn(r);
  };
  if (n == 1) {
    with_generator(0);
    return;
  }
  const bool grad = at::GradMode::is_enabled();
  const bool inference = c10::InferenceMode::is_enabled();
  // Grad and inference modes are thread-local: the workers take the caller's.
  const std::function<void(int)> job = [&](int r) {
    at::AutoGradMode grad_mode(grad);
    c10::optional<c10::InferenceMode> inference_mode;
    if (inference) inference_mode.emplace();
    with_generator(r);
  };
  {
    std::lock_guard<std::mutex> lock(mutex_);
    job_ = &job;
    job_n_ = n;
    pending_ = n - 1;
    std::fill(errors_.begin(), errors_.end(), nullptr);
    ++generation_;
  }
  wake_.notify_all();
  const int own = omp_get_max_threads();
  omp_set_num_threads(threads_per_replica_);
  std::exception_ptr error;
  try {
    with_generator(0);
  } catch (...) {
    error = std::current_exception();
  }
  omp_set_num_threads(own);
  std::unique_lock<std::mutex> lock(mutex_);
  done_.wait(lock, [&] { return pending_ == 0; });
  job_ = nullptr;
  if (error) std::rethrow_exception(error);
  for (auto& e : errors_)
    if (e) std::rethrow_exception(e);
}

void Replicas::seed_generators(uint64_t seed, int64_t step) {
  for (size_t r = 0; r < generators_.size(); ++r) {
    // SplitMix-style mixing: nearby (seed, step, replica) give unrelated streams.
    uint64_t z = seed * 0x9e3779b97f4a7c15ULL + static_cast<uint64_t>(step) * 0xbf58476d1ce4e5b9ULL +
                 (first_index_ + r + 1) * 0x94d049bb133111ebULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    std::lock_guard<std::mutex> lock(generators_[r].mutex());
    generators_[r].set_current_seed(z ^ (z >> 31));
  }
}

std::vector<std::vector<at::Tensor>> Replicas::replica_grads() const {
  std::vector<std::vector<at::Tensor>> out;
  for (size_t r = 1; r < params_.size(); ++r) {
    auto& g = out.emplace_back();
    // The optimizer holds the trainable parameters only (frozen ones: train.freeze).
    for (const auto& p : params_[r])
      if (p.requires_grad()) g.push_back(p.grad());
  }
  return out;
}

void Replicas::clear_grads() {
  for (size_t r = 1; r < params_.size(); ++r)
    for (auto& p : params_[r]) p.mutable_grad() = at::Tensor();
}

void Replicas::train(bool on) {
  for (auto& m : models_) m->train(on);
  if (!on) {
    torch::NoGradGuard ng;
    for (auto& [own, master] : own_stats_) own.copy_(master);
  }
}

std::vector<moe::MoEStats> Replicas::last_stats(int n) const {
  MOEV_CHECK(n >= 1 && n <= size(), "Replicas::last_stats: ", n, " slices for ", size(), " replicas");
  std::vector<moe::MoEStats> out;
  // Each fraction weighted by its slice's tokens: dropped is per assignment (K per token, the same K in every
  // slice) or per token (Expert-Choice), unrouted per token.
  for (size_t i = 0; i < moe_[0].size(); ++i) {
    moe::MoEStats s = moe_[0][i]->last_stats();
    double dropped = s.dropped_fraction * double(s.tokens), unrouted = s.unrouted_fraction * double(s.tokens);
    for (int r = 1; r < n; ++r) {
      const auto& o = moe_[r][i]->last_stats();
      for (size_t e = 0; e < o.expert_count.size(); ++e) s.expert_count[e] += o.expert_count[e];
      dropped += o.dropped_fraction * double(o.tokens);
      unrouted += o.unrouted_fraction * double(o.tokens);
      s.tokens += o.tokens;
    }
    s.dropped_fraction = s.tokens > 0 ? dropped / double(s.tokens) : 0.0;
    s.unrouted_fraction = s.tokens > 0 ? unrouted / double(s.tokens) : 0.0;
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace moev::train
