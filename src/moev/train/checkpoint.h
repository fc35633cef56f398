// Checkpoints: one file in torch::pickle_save's format (streamed to disk), so Python's torch.load
// opens it as a dict {"format", "config" (JSON text), "state" (JSON text),
// "model": {name: tensor}, "optimizer": {name: tensor}, "rng": tensor}, and
// "ema": {name: tensor} when the run kept a weight average (train.ema_decay).
// Written to a temporary file, flushed and renamed: a crash never leaves a
// half-written checkpoint where the last good one was.
#pragma once

#include <map>
#include <string>

#include <ATen/core/Tensor.h>
#include <torch/nn/module.h>

namespace moev::train {

inline constexpr const char* kCheckpointFormat = "moev-checkpoint-v1";

struct Checkpoint {
  std::string config_json;                      // io::RunConfig as JSON
  std::string state_json;                       // trainer position (step, epoch, ...)
  std::map<std::string, at::Tensor> model;      // parameters and buffers by name
  std::map<std::string, at::Tensor> optimizer;  // AdamW state by name
  at::Tensor rng;                               // CPU generator state
  std::map<std::string, at::Tensor> ema;        // weight average, names as model (empty: none kept)
};

// The weights a trained model is used with: the average when the run kept one.
const std::map<std::string, at::Tensor>& inference_weights(const Checkpoint& ckpt);

// A short hex digest (CRC-32) of tensors' names, shapes and bytes: equal for
// the same weights, different (but for a 1 in 2^32 chance) for others. Lets a
// file that depends on a checkpoint notice that it was replaced.
std::string weights_fingerprint(const std::map<std::string, at::Tensor>& tensors);

// What load_checkpoint reads: the parts left out stay empty, and their bytes
// are neither read nor held (a run with AdamW and a weight average stores
// four copies of its weights; inference needs one).
enum class CheckpointLoad {
  kEverything,  // all of it: to resume training
  kWeights,     // the model and the weight average, not the optimizer's moments
  kInference,   // what inference_weights() returns only: the average when kept, else the model
  kConfig,      // config_json and state_json only: no tensor is read
};

void save_checkpoint(const std::string& path, const Checkpoint& ckpt);
Checkpoint load_checkpoint(const std::string& path, CheckpointLoad what = CheckpointLoad::kEverything);

std::map<std::string, at::Tensor> module_tensors(const torch::nn::Module& module);
// Copies tensors into the module; the first missing, extra or mis-shaped tensor
// is an error naming it and `source`.
void load_module_tensors(torch::nn::Module& module, const std::map<std::string, at::Tensor>& t,
                         const std::string& source);

// The default CPU generator's state (stochastic depth, dropout, weight init):
// saved with a checkpoint so a resumed run draws what the uninterrupted one did.
at::Tensor cpu_rng_state();
void set_cpu_rng_state(const at::Tensor& state);

}  // namespace moev::train
