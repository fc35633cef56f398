#include "moev/train/expert_shards.h"

#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/moe/moe_layer.h"

namespace moev::train {

ExpertShards::ExpertShards(models::Classifier& model, dist::Communicator& comm) : comm_(comm) {
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    auto layer = std::dynamic_pointer_cast<moe::MoELayerImpl>(item.value());
    if (!layer) continue;
    layer->shard_experts(&comm);
    for (const auto& p : layer->experts->named_parameters()) names_.insert(item.key() + ".experts." + p.key());
  }
  MOEV_CHECK(!names_.empty(), "train.expert_parallel = true, but the model has no MoE layer");
}

bool ExpertShards::is_expert(const std::string& name) const {
  const auto dot = name.rfind('.');
  return names_.count(name) || (dot != std::string::npos && names_.count(name.substr(0, dot)));
}

std::map<std::string, at::Tensor> ExpertShards::gather(const std::map<std::string, at::Tensor>& local) const {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : local)  // std::map: every rank walks the names in the same order
    out[name] = is_expert(name) ? comm_.all_gather(t) : t;
  return out;
}

std::map<std::string, at::Tensor> ExpertShards::slice(const std::map<std::string, at::Tensor>& full) const {
  std::map<std::string, at::Tensor> out;
  for (const auto& [name, t] : full) {
    if (!is_expert(name)) {
      out[name] = t;
      continue;
    }
    MOEV_CHECK(t.dim() >= 1 && t.size(0) % comm_.size() == 0, "expert tensor '", name, "' has ",
               t.dim() ? t.size(0) : 0, " experts, not divisible by the ", comm_.size(), " ranks");
    const int64_t local = t.size(0) / comm_.size();
    out[name] = t.narrow(0, comm_.rank() * local, local).clone();
  }
  return out;
}

}  // namespace moev::train
