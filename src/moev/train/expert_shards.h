// Expert parallelism in training: the experts of every MoE layer split over the
// ranks of a job (moe::MoELayerImpl::shard_experts), and the two forms of the
// expert tensors that follow. Checkpoints always hold the full form, the one a
// single process writes, so a checkpoint loads on any number of ranks, with or
// without expert parallelism; each rank slices out its experts after loading,
// and rank 0 gathers them back before saving.
#pragma once

#include <map>
#include <set>
#include <string>

#include <ATen/core/Tensor.h>

#include "moev/dist/communicator.h"
#include "moev/models/classifier.h"

namespace moev::train {

class ExpertShards {
 public:
  // Shards every MoE layer of `model` over comm's ranks (E divisible by WORLD_SIZE).
  ExpertShards(models::Classifier& model, dist::Communicator& comm);

  // Whether a parameter (or optimizer state "<param>.exp_avg"...) is an expert shard.
  bool is_expert(const std::string& name) const;
  // Full tensors from this rank's: expert shards gathered from every rank (a
  // collective: all ranks call it), other tensors as they are.
  std::map<std::string, at::Tensor> gather(const std::map<std::string, at::Tensor>& local) const;
  // This rank's tensors from full ones: expert tensors sliced to its experts.
  std::map<std::string, at::Tensor> slice(const std::map<std::string, at::Tensor>& full) const;

 private:
  dist::Communicator& comm_;
  std::set<std::string> names_;  // parameter names of the expert tensors
};

}  // namespace moev::train
