// The assembled hard mixture of experts (Gross et al. 2017, "Hard Mixtures of
// Experts for Large Scale Weakly Supervised Vision"): the trunk is the gater,
// an image goes to the expert of the centroid nearest its trunk embedding, and
// only that expert runs. Per image that is one trunk pass plus one expert
// pass, whatever the number of experts; the parameters grow with it.
// To eval, predict and the ensemble it is one more Classifier.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "moev/models/classifier.h"
#include "moev/train/trained_model.h"

namespace moev::hardmoe {

class HardMoEImpl : public models::Classifier {
 public:
  // centroids: float [E, F] in the trunk's embedding space; experts[e] serves centroid e.
  HardMoEImpl(models::ClassifierPtr trunk, std::vector<models::ClassifierPtr> experts, at::Tensor centroids);

  // images: [B, C, H, W] -> int64 [B]: each image's expert (nearest centroid of its trunk embedding)
  at::Tensor gate(const at::Tensor& images);
  // images: [B, C, H, W] -> logits: [B, L], each row from its own expert
  at::Tensor forward(const at::Tensor& images) override;
  // images: [B, C, H, W] -> embedding: [B, F], each row from its own expert (one space: the decoder is shared)
  at::Tensor embed(const at::Tensor& images) override;
  std::string decoder() const override;

  int64_t num_experts() const { return static_cast<int64_t>(experts_.size()); }
  // Images each expert served since the last reset (eval reports the load).
  const std::vector<int64_t>& served() const { return served_; }
  void reset_served() { served_.assign(experts_.size(), 0); }

 private:
  // images: [B, C, H, W] -> [B, L] logits or [B, F] embeddings: each expert
  // runs on the images gated to it, its rows scattered back into place.
  at::Tensor per_expert(const at::Tensor& images, bool logits);

  models::ClassifierPtr trunk_;
  std::vector<models::ClassifierPtr> experts_;
  at::Tensor centroids_;
  std::vector<int64_t> served_;
};
TORCH_MODULE(HardMoE);

// hardmoe.json's "format": what tells it from other JSON.
inline constexpr const char* kHardMoEFormat = "moev hard mixture of experts";

// Is `path` to be read as a hard MoE's hardmoe.json (what moev hardmoe cluster
// writes)? Every regular file starting with `{` or `[` is: checkpoints are zips, so
// a damaged hardmoe.json is named as one rather than as an unreadable checkpoint.
bool is_hard_moe_file(const std::string& path);
// Is it one in fact: a JSON object with moev hard MoE's format (a run's config.json is JSON text too)?
bool declares_hard_moe(const std::string& path);

// The run config of a hard MoE (its trunk's), read without loading any weights.
io::RunConfig hard_moe_config(const std::string& path);

// Loads the trunk, centroids and every expert of <dir>/hardmoe.json. An expert
// not yet trained, or one whose data or normalisation differ from the trunk's,
// is an error naming it. cfg and class_names are the trunk's.
train::TrainedModel load_hard_moe(const std::string& path, const c10::Device& device,
                                  const std::string& precision = "");

}  // namespace moev::hardmoe
