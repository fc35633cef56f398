// Data parallelism inside one process. R model replicas share the parameter
// storage of one master model; a batch is cut into R slices and each replica runs
// its slice on its own thread with one intra-op thread.
//
// Why: the tiny models' GEMMs ([2048, 128] x [128, 256]) are too small to split
// well over cores. On the 2-core machines two 1-thread processes train 870 img/s
// each while one 2-thread process trains ~1200 in total; whole half-batches, one
// per core, keep both cores busy without fork/join inside every op.
//
// Gradients land in each replica's own .grad and are summed into the master's in
// replica order, so a run is reproducible. Router noise, dropout and stochastic
// depth draw from a per-replica generator seeded from (seed, step, replica)
// (nn::GeneratorScope on the replica's thread), not from the shared global RNG.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>

#include "moev/models/classifier.h"
#include "moev/models/model_config.h"
#include "moev/moe/moe_layer.h"

namespace moev::train {

// How many replicas `requested` means on `threads` intra-op threads (0: one per
// thread), capped so that every replica gets at least one image of `batch`.
int resolve_replicas(int requested, int threads, int64_t batch);

// Images per slice that keep routing groups whole (1 for dense models).
int64_t slice_multiple(const models::ModelConfig& cfg);

// Cuts `batch` rows into at most `parts` slices: multiples of `multiple` rows
// where the batch allows, the last slice taking the rest; empty slices left out.
// Replicas cut a batch with it, and so do the ranks of a data-parallel job.
std::vector<int64_t> split_rows(int64_t batch, int parts, int64_t multiple);

class Replicas {
 public:
  // master: the model the optimizer steps (replica 0), built from cfg and already
  // on its device, holding its final weights' storage. threads: the cores to use.
  // first_index: the global index of replica 0 among all replicas of a
  // data-parallel job (rank * replicas); with a job of several ranks, or several
  // replicas, every replica draws its random numbers (router noise, dropout,
  // stochastic depth) from its own generator, seeded by its global index, so R
  // ranks of one replica train as one process of R replicas.
  Replicas(models::ClassifierPtr master, const models::ModelConfig& cfg, int replicas, int threads,
           int first_index = 0, bool own_generator = false);
  ~Replicas();
  Replicas(const Replicas&) = delete;
  Replicas& operator=(const Replicas&) = delete;

  int size() const { return static_cast<int>(models_.size()); }
  models::Classifier& model(int r) { return *models_[r]; }
  std::vector<moe::MoELayer>& moe_layers(int r) { return moe_[r]; }

  // Cuts [B, ...] into at most size() slices along dim 0, and no more than the
  // batch has groups of `multiple` images: multiples of `multiple` images, the
  // last slice taking the rest (a batch of less than a group is one slice).
  std::vector<int64_t> slice_sizes(int64_t batch, int64_t multiple) const;

  // Runs fn(r) for replicas r < n, replica 0 on the calling thread and the others
  // on their own (persistent) threads, each with threads/size() intra-op threads
  // and replica r's generator (if it has one) as the thread's; rethrows the first
  // error. fn(r) may only touch replica r's model and outputs.
  void run(int n, const std::function<void(int)>& fn);

  // Reseeds every replica's generator for this step.
  void seed_generators(uint64_t seed, int64_t step);

  // Gradients of replicas 1..R-1, [r - 1][i] for the master's parameter i (for
  // AdamW::step, which sums them into the master's inside its update pass).
  std::vector<std::vector<at::Tensor>> replica_grads() const;
  // Drops the replicas' gradients (set to none), as AdamW::zero_grad the master's.
  void clear_grads();
  // AdamW::Parallel over the replica threads.
  void parallel(int parts, const std::function<void(int)>& fn) { run(parts, fn); }

  void train(bool on);

  // Expert counts and dropped fraction of the last forward, summed over replicas
  // per MoE layer (dropped weighted by the assignments of each replica).
  std::vector<moe::MoEStats> last_stats(int n) const;

 private:
  std::vector<models::ClassifierPtr> models_;
  std::vector<std::vector<moe::MoELayer>> moe_;
  std::vector<std::vector<at::Tensor>> params_;  // per replica, master order
  std::vector<at::Generator> generators_;  // per replica; empty: the global one
  std::vector<std::pair<at::Tensor, at::Tensor>> own_stats_;  // (replica's, master's) BatchNorm statistics
  int first_index_ = 0;
  int threads_per_replica_ = 1;

  // Worker r (1..R-1) runs job_(r) when generation_ moves on and r < job_n_.
  void work(int r);
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* job_ = nullptr;
  int job_n_ = 0;
  int64_t generation_ = 0;
  int pending_ = 0, ready_ = 0;
  bool stop_ = false;
  std::vector<std::exception_ptr> errors_;
};

}  // namespace moev::train
