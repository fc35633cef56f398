#include "moev/train/trained_model.h"

#include <filesystem>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/hardmoe/hard_moe.h"
#include "moev/train/checkpoint.h"
#include "moev/train/pretrain.h"

namespace moev::train {

TrainedModel load_trained(const std::string& path, const c10::Device& device,
                          const std::string& precision, bool raw_weights) {
  if (hardmoe::is_hard_moe_file(path)) return hardmoe::load_hard_moe(path, device, precision);
  auto ckpt = load_checkpoint(path, raw_weights ? CheckpointLoad::kWeights : CheckpointLoad::kInference);
  refuse_pretraining_checkpoint(ckpt.state_json, path);
  TrainedModel t;
  t.cfg = io::from_json_string(ckpt.config_json, path);
  // Named as the flag that sets it, not as the file's model.precision.
  MOEV_CHECK(precision.empty() || precision == "fp32" || precision == "bf16", "--precision ", precision,
             ": expected fp32 or bf16");
  if (!precision.empty()) t.cfg.model.precision = precision;
  try {
    t.model = models::build_model(t.cfg.model);
  } catch (const Error& e) {  // a config edited inside the file, or a --precision it cannot take: say which file
    const bool flag = !precision.empty() && std::string(e.what()).find("model.precision") != std::string::npos;
    fail(path, ": ", flag ? "--precision " + precision + ": " : std::string(), e.what());
  }
  load_module_tensors(*t.model, raw_weights ? ckpt.model : inference_weights(ckpt), path);
  t.averaged = !raw_weights && !ckpt.ema.empty();
  t.model->to(device);
  t.model->eval();
  auto state = nlohmann::json::parse(ckpt.state_json);
  t.step = state.value("step", int64_t{0});
  t.unfinished = unfinished_training(t.cfg, ckpt.state_json, path);
  if (state.contains("class_names")) t.class_names = state["class_names"].get<std::vector<std::string>>();
  t.class_names_stored = !t.class_names.empty();
  for (int64_t i = static_cast<int64_t>(t.class_names.size()); i < t.cfg.model.num_classes; ++i)
    t.class_names.push_back("class " + std::to_string(i));
  return t;
}

namespace {
// The checkpoint a fused model's branches came from ("" for any other state).
std::string fused_from(const nlohmann::json& st) {
  const bool fused = st.is_object() && st.contains("fusion") && st["fusion"].is_object() &&
                     st["fusion"].contains("from") && st["fusion"]["from"].is_string();
  return fused ? st["fusion"]["from"].get<std::string>() : "";
}
}  // namespace

std::string unfinished_training(const io::RunConfig& cfg, const std::string& state_json,
                                const std::string& checkpoint) {
  const auto st = nlohmann::json::parse(state_json, nullptr, false);
  if (!st.is_object() || !st.contains("epoch") || !st["epoch"].is_number_integer()) return "";  // not a train run's
  const auto epoch = st["epoch"].get<int64_t>();
  const auto step = st.value("step", int64_t{0});
  const int64_t all_epochs = cfg.train.epochs + cfg.train.cooldown_epochs;
  if (epoch >= all_epochs) return "";
  // A time budget ends the run at its planned step, inside an epoch.
  if (st.contains("planned_steps") && st["planned_steps"].is_number_integer() &&
      step >= st["planned_steps"].get<int64_t>())
    return "";
  // A fused model holds its source run's state: that run is the one to finish, and the fusion to train again
  // (resuming the run leaves fused.pt as it is).
  const std::string from = fused_from(st);
  const bool fused = !from.empty();
  const std::string source = fused ? from : checkpoint;
  return checkpoint + (fused ? " fused the branches of an unfinished run (" + source + ")" : " is an unfinished run's") +
         ": it stopped at step " + std::to_string(step) + ", after " + std::to_string(epoch) + " of " +
         std::to_string(all_epochs) + (all_epochs == 1 ? " epoch" : " epochs") +
         (cfg.train.cooldown_epochs > 0 ? " (cool-down included)" : "") +
         " (paused by --max-steps, or stopped before its end); " + resume_command(checkpoint, state_json) +
         " finishes it" + (fused ? ", and moev fuse " + source + " fuses it again" : "");
}

std::string resume_command(const std::string& checkpoint, const std::string& state_json) {
  namespace fs = std::filesystem;
  const auto st = nlohmann::json::parse(state_json, nullptr, false);
  const std::string from = fused_from(st);  // a fused model's run is its source's
  fs::path dir = fs::path(from.empty() ? checkpoint : from).parent_path();
  dir = (dir.empty() ? fs::path(".") : dir).lexically_normal();
  if (!dir.has_filename()) dir = dir.parent_path();  // "expert_0/": its name, not ""
  const fs::path whole = fs::absolute(dir).lexically_normal();  // "." inside expert_0: expert_0
  const std::string name = (whole.has_filename() ? whole : whole.parent_path()).filename().string();
  if (st.is_object() && st.contains("train_rows") && name.rfind("expert_", 0) == 0) {
    const fs::path hm_dir = dir.filename() == "." || dir.filename() == ".." ? whole.parent_path() : dir.parent_path();
    return "moev hardmoe train-expert --config <the hard MoE's config> --dir " +
           (hm_dir.empty() ? std::string(".") : hm_dir.string()) + " --expert " + name.substr(7) +
           " (or the moev hardmoe train-all that started it)";
  }
  const bool pretraining = st.is_object() && st.contains("pretrain");
  return (pretraining ? "moev pretrain --out " : "moev train --out ") + dir.string() + " --resume";
}

io::RunConfig trained_config(const std::string& path) {
  if (hardmoe::is_hard_moe_file(path)) return hardmoe::hard_moe_config(path);
  const auto ckpt = load_checkpoint(path, CheckpointLoad::kConfig);
  refuse_pretraining_checkpoint(ckpt.state_json, path);
  return io::from_json_string(ckpt.config_json, path);
}

Datasets open_test_set(const TrainedModel& t, const DataConfig& data, const std::string& checkpoint) {
  // A single-label run scored on a manifest read "data.tags is empty and there is no training manifest".
  MOEV_CHECK(data.format != "manifest" || t.cfg.data.format == "manifest", checkpoint, " was trained on ",
             "single-label data (data.format = '", t.cfg.data.format, "'); a manifest is a multi-label test set, ",
             "which only a run trained on one can score");
  // A run keeps its paths as given: a relative one, read from another directory, was just "not found".
  const bool own_key = data.format == "folder" || data.format == "manifest";
  const std::string& where = own_key ? data.test_path : data.path;
  const std::string& run_where = own_key ? t.cfg.data.test_path : t.cfg.data.path;
  MOEV_CHECK(where != run_where || where.empty() || std::filesystem::path(where).is_absolute() ||
                 std::filesystem::exists(where),
             checkpoint, ": the run's test set ", where, " (", own_key ? "data.test_path" : "data.path", ") is a ",
             "path relative to the directory the run was started in, and is not found from ",
             std::filesystem::current_path().string(), "; run from that directory, or give the test set with --data");
  auto ds = open_datasets(data, t.cfg.model, /*load_train=*/false);
  if (t.class_names_stored) align_classes(ds.test, t.class_names, "the training set of " + checkpoint);
  return ds;
}

}  // namespace moev::train
