#include "moev/hardmoe/hard_moe.h"

#include <cctype>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "moev/cluster/kmeans.h"
#include "moev/core/error.h"
#include "moev/hardmoe/expert_training.h"
#include "moev/hardmoe/hardmoe_config.h"
#include "moev/hardmoe/partition.h"
#include "moev/train/checkpoint.h"
#include "moev/train/trainer.h"

namespace moev::hardmoe {

namespace fs = std::filesystem;
using nlohmann::json;

HardMoEImpl::HardMoEImpl(models::ClassifierPtr trunk, std::vector<models::ClassifierPtr> experts,
                         at::Tensor centroids)
    : trunk_(std::move(trunk)), experts_(std::move(experts)) {
  MOEV_CHECK(!experts_.empty(), "HardMoE: no experts");
  MOEV_CHECK(centroids.dim() == 2 && centroids.size(0) == num_experts(), "HardMoE: ", num_experts(),
             " experts need [", num_experts(), ", F] centroids, got ", centroids.sizes());
  register_module("trunk", trunk_);
  for (size_t e = 0; e < experts_.size(); ++e) register_module("experts_" + std::to_string(e), experts_[e]);
  centroids_ = register_buffer("centroids", centroids.to(torch::kFloat32).contiguous());
  reset_served();
}

at::Tensor HardMoEImpl::gate(const at::Tensor& images) {
  // The gater is the trunk as trained: in inference mode whatever this module's mode.
  const bool was = trunk_->is_training();
  trunk_->eval();
  auto a = cluster::nearest_centroid(trunk_->embed(images).to(centroids_.dtype()), centroids_);
  trunk_->train(was);
  return a;
}

at::Tensor HardMoEImpl::per_expert(const at::Tensor& images, bool logits) {
  const auto a = gate(images).cpu();
  const int64_t B = images.size(0);
  at::Tensor out;
  for (int64_t e = 0; e < num_experts(); ++e) {
    const auto rows = a.eq(e).nonzero().squeeze(1).to(images.device());
    if (rows.numel() == 0) continue;
    served_[static_cast<size_t>(e)] += rows.numel();
    auto& m = *experts_[static_cast<size_t>(e)];
    const auto x = images.index_select(0, rows);
    auto y = logits ? m.forward(x) : m.embed(x);
    if (!out.defined()) out = torch::zeros({B, y.size(1)}, y.options());
    out.index_copy_(0, rows, y);
  }
  return out;
}

at::Tensor HardMoEImpl::forward(const at::Tensor& images) { return per_expert(images, /*logits=*/true); }
at::Tensor HardMoEImpl::embed(const at::Tensor& images) { return per_expert(images, /*logits=*/false); }
std::string HardMoEImpl::decoder() const { return "experts_0." + experts_[0]->decoder(); }

// A checkpoint is a zip ("PK"), never JSON: a file starting with `{` or `[`
// is read as a hard MoE file, so a damaged one is named as such (not as "an
// unreadable torch pickle"), whatever its name (fuse --out x.json is a zip).
bool is_hard_moe_file(const std::string& path) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec)) return false;
  std::ifstream in(path, std::ios::binary);
  char ch = 0;
  while (in.get(ch) && std::isspace(static_cast<unsigned char>(ch))) {
  }
  return in && (ch == '{' || ch == '[');
}

bool declares_hard_moe(const std::string& path) {
  if (!is_hard_moe_file(path)) return false;
  std::ifstream in(path);
  const auto j = json::parse(in, nullptr, /*allow_exceptions=*/false);
  return j.is_object() && j.value("format", "") == kHardMoEFormat;
}

namespace {
struct HardMoEFile {
  std::string dir;     // the directory it lies in (its link's target's)
  std::string trunk;   // checked against partition.json
  int64_t experts = 0;
  std::string centroids;  // relative to dir
  Partition partition;    // partition.json's and partition.csv's
};

HardMoEFile read_hard_moe_file(const std::string& path) {
  std::ifstream in(path);
  MOEV_CHECK(in, path, ": cannot open");
  json j;
  try {
    j = json::parse(in);
  } catch (const json::exception& e) {
    fail(path, ": not valid JSON (", e.what(), "); expected the hardmoe.json that moev hardmoe cluster writes");
  }
  // A run's config.json (or any JSON) given where a checkpoint goes was called "not a hard MoE file".
  MOEV_CHECK(j.is_object() && j.contains("format") && j["format"] == kHardMoEFormat, path,
             ": JSON text, not a checkpoint (the zip archive moev train writes, <run>/checkpoint.pt) nor a hard ",
             "MoE's hardmoe.json (format = \"", kHardMoEFormat, "\", as moev hardmoe cluster writes it)");
  MOEV_CHECK(j.contains("trunk") && j.contains("experts") && j.contains("centroids"), path,
             ": not a hard MoE file (expected trunk, experts and centroids)");
  MOEV_CHECK(j["trunk"].is_string() && j["experts"].is_number_integer() && j["centroids"].is_string(), path,
             ": expected trunk and centroids as strings, experts as an integer");
  // Its files lie beside it, not beside a link to it.
  std::error_code link_ec;
  const std::string dir = (fs::is_symlink(path, link_ec) ? fs::canonical(path) : fs::path(path)).parent_path().string();
  const auto partition = read_partition(dir);
  // hardmoe.json repeats what partition.json records, which is what the experts
  // were trained against; an edited copy must not silently lose to it.
  fs::path named = j["trunk"].get<std::string>();
  if (named.is_relative()) named = (fs::path(dir) / named).lexically_normal();
  std::error_code ec;  // equivalent() needs both files; a missing trunk is checked_trunk's to name
  MOEV_CHECK(named == fs::path(partition.trunk).lexically_normal() || fs::equivalent(named, partition.trunk, ec), path,
             ": trunk = ", j["trunk"], " is not ", partition.trunk, ", the trunk ", dir,
             " was clustered from (partition.json)");
  const int64_t k = j["experts"].get<int64_t>();
  MOEV_CHECK(k == partition.experts, path, ": experts = ", k, ", but ", dir, " was clustered into ",
             partition.experts, " (partition.json)");
  // The trunk as the partition knows it: relative to the directory, at the step it was clustered at.
  return {dir, checked_trunk(partition, dir), k, j["centroids"].get<std::string>(), partition};
}
}  // namespace

io::RunConfig hard_moe_config(const std::string& path) {
  const auto trunk = read_hard_moe_file(path).trunk;
  return io::from_json_string(train::load_checkpoint(trunk, train::CheckpointLoad::kConfig).config_json, trunk);
}

train::TrainedModel load_hard_moe(const std::string& path, const c10::Device& device, const std::string& precision) {
  const auto [dir, trunk, k, centroids_file, partition] = read_hard_moe_file(path);
  auto t = train::load_trained(trunk, device, precision);
  const auto centroids = load_centroids((fs::path(dir) / centroids_file).string());
  check_centroids(partition, centroids, (fs::path(dir) / centroids_file).string());
  std::vector<models::ClassifierPtr> experts;
  for (int64_t e = 0; e < k; ++e) {
    const std::string ckpt = train::checkpoint_path(expert_dir(dir, e));
    const std::string result_file = expert_result_file(dir, e);
    MOEV_CHECK(fs::exists(result_file), path, ": expert ", e, " has not finished training (no ", result_file,
               "); run moev hardmoe train-expert --expert ", e);
    std::ifstream result_in(result_file);
    const auto result = json::parse(result_in, nullptr, false);
    MOEV_CHECK(result.is_object() && result.contains("expert") && result["expert"] == e, result_file, ": not expert ",
               e, "'s result (damaged, or copied from another expert); delete it and run moev hardmoe train-expert ",
               "--expert ", e);
    auto x = train::load_trained(ckpt, device, precision);
    // A checkpoint records the directory it trained in: one swapped in from
    // another expert, or the trunk copied in, scored as this expert at exit 0.
    MOEV_CHECK(fs::path(x.cfg.train.out_dir).filename() == fs::path(expert_dir(dir, e)).filename(),
               ckpt, ": trained as ", x.cfg.train.out_dir, ", not as expert ", e, " (copied or swapped in from ",
               "elsewhere?); run moev hardmoe train-expert --expert ", e, " in a clean ", expert_dir(dir, e));
    check_expert_rows(partition, dir, e);
    MOEV_CHECK(x.cfg.data.mean == t.cfg.data.mean && x.cfg.data.std == t.cfg.data.std &&
                   x.class_names == t.class_names,
               ckpt, ": expert ", e, " was trained with another normalisation or other classes than the trunk ",
               trunk);
    experts.push_back(x.model);
  }
  auto moe = HardMoE(t.model, std::move(experts), centroids);
  moe->to(device);
  moe->eval();
  t.model = moe.ptr();
  t.replicable = false;
  return t;
}

}  // namespace moev::hardmoe
