#include "moev/io/run_config.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>
#include <toml++/toml.h>

#include "moev/core/error.h"
#include "moev/core/utf8.h"
#include "moev/io/table.h"

namespace moev::io {

using nlohmann::json;

namespace {

struct Field {
  std::string key;   // section.name
  std::string help;  // one line
  std::function<void(RunConfig&, const json&, const std::string&)> set;
  std::function<json(const RunConfig&)> get;
};

std::string type_name(const json& v) {
  std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);  // a string may not be UTF-8
  return s.size() > 40 ? s.substr(0, 40) + "..." : s;
}

// An integer JSON value that T holds as written (not 2^64 - 1 read as -1).
template <typename T>
bool integer_fits(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max());
  const auto x = v.get<int64_t>();
  if constexpr (std::is_unsigned_v<T>) return x >= 0;
  else return x >= static_cast<int64_t>(std::numeric_limits<T>::min()) &&
              x <= static_cast<int64_t>(std::numeric_limits<T>::max());
}

template <typename T>
void read_value(const json& v, T& out, const std::string& where) {
  if constexpr (std::is_same_v<T, bool>) {
    MOEV_CHECK(v.is_boolean(), where, ": expected true or false, got ", type_name(v));
    out = v.get<bool>();
  } else if constexpr (std::is_integral_v<T>) {
    MOEV_CHECK(v.is_number_integer(), where, ": expected an integer, got ", type_name(v));
    if constexpr (std::is_unsigned_v<T>)
      MOEV_CHECK(v.is_number_unsigned() || v.get<int64_t>() >= 0, where, ": expected a non-negative integer, got ",
                 type_name(v));
    MOEV_CHECK(integer_fits<T>(v), where, ": ", type_name(v), " is out of range; expected an integer in ",
               +std::numeric_limits<T>::min(), "..", +std::numeric_limits<T>::max());
    out = v.get<T>();
  } else if constexpr (std::is_floating_point_v<T>) {
    MOEV_CHECK(v.is_number(), where, ": expected a number, got ", type_name(v));
    out = v.get<T>();
  } else if constexpr (std::is_same_v<T, std::string>) {
    MOEV_CHECK(v.is_string(), where, ": expected a string, got ", type_name(v));
    out = v.get<std::string>();
    check_utf8(out, where);
  } else if constexpr (std::is_same_v<typename T::value_type, std::string>) {
    out.clear();
    if (v.is_string()) {  // a string is a list of one: train.teacher = "a.pt" as well as ["a.pt", "b.pt"]
      out.push_back(v.get<std::string>());
      check_utf8(out.back(), where);
      return;
    }
    MOEV_CHECK(v.is_array(), where, ": expected a string or a list of strings, got ", type_name(v));
    for (const auto& x : v) {
      MOEV_CHECK(x.is_string(), where, ": expected a string or a list of strings, got ", type_name(v));
      out.push_back(x.get<std::string>());
      check_utf8(out.back(), where);
    }
  } else {  // std::vector of numbers
    using Elem = typename T::value_type;
    constexpr bool integral = std::is_integral_v<Elem>;
    const char* what = integral ? ": expected a list of integers, got " : ": expected a list of numbers, got ";
    MOEV_CHECK(v.is_array(), where, what, type_name(v));
    out.clear();
    for (const auto& x : v) {
      MOEV_CHECK(integral ? x.is_number_integer() : x.is_number(), where, what, type_name(v));
      if constexpr (integral)
        MOEV_CHECK(integer_fits<Elem>(x), where, ": ", type_name(x), " is out of range; expected integers in ",
                   +std::numeric_limits<Elem>::min(), "..", +std::numeric_limits<Elem>::max());
      out.push_back(x.get<Elem>());
    }
  }
}

template <typename Access>
Field field(std::string key, std::string help, Access access) {
  Field f;
  f.key = std::move(key);
  f.help = std::move(help);
  f.set = [access](RunConfig& c, const json& v, const std::string& where) {
    read_value(v, access(c), where);
  };
  f.get = [access](const RunConfig& c) { return json(access(const_cast<RunConfig&>(c))); };
  return f;
}

#define MOEV_FIELD(key, member, help) \
  field(key, help, [](RunConfig& c) -> auto& { return c.member; })

const std::vector<Field>& fields() {
  static const std::vector<Field> kFields = [] {
    std::vector<Field> f = {
        MOEV_FIELD("model.family", model.family, "model family: vit | convnext | convnext-iso | resnest"),
        MOEV_FIELD("model.image_size", model.image_size, "input height = width, pixels"),
        MOEV_FIELD("model.channels", model.channels, "input channels"),
        MOEV_FIELD("model.num_classes", model.num_classes, "classes"),
        MOEV_FIELD("model.patch", model.patch, "ViT patch side, ConvNeXt stem stride, ResNeSt stem downsampling, pixels"),
        MOEV_FIELD("model.stem_channels", model.stem_channels,
                   "ViT, ConvNeXt: channels of an early 3x3 conv + GELU before the patch embedding / stem (0: none); ResNeSt: stem width"),
        MOEV_FIELD("model.width", model.width, "token width D (ViT, isotropic ConvNeXt)"),
        MOEV_FIELD("model.depth", model.depth, "blocks (ViT, isotropic ConvNeXt)"),
        MOEV_FIELD("model.heads", model.heads, "attention heads"),
        MOEV_FIELD("model.mlp_dim", model.mlp_dim, "MLP / expert hidden width H"),
        MOEV_FIELD("model.dropout", model.dropout, "dropout rate"),
        MOEV_FIELD("model.dims", model.dims, "ConvNeXt / ResNeSt stage widths, e.g. [32, 64, 128]"),
        MOEV_FIELD("model.depths", model.depths, "ConvNeXt / ResNeSt blocks per stage, e.g. [2, 2, 4]"),
        MOEV_FIELD("model.drop_path", model.drop_path, "ConvNeXt / ResNeSt stochastic depth at the last block (not for ViTs)"),
        MOEV_FIELD("model.pad_odd", model.pad_odd,
                   "ConvNeXt: zero-pad odd-sided maps before downsampling (7x7 -> 4x4) instead of dropping the last row and column"),
        MOEV_FIELD("model.branches", model.branches, "ResNeSt: expert branches N (1: plain ResNeSt)"),
        MOEV_FIELD("model.shared_stages", model.shared_stages, "ResNeSt: stages shared by all branches"),
        MOEV_FIELD("model.radix", model.radix, "ResNeSt: split-attention radix"),
        MOEV_FIELD("model.cardinality", model.cardinality, "ResNeSt: cardinal groups"),
        MOEV_FIELD("model.blur_pool", model.blur_pool, "ResNeSt: blur-pool downsampling"),
        MOEV_FIELD("model.layer_scale", model.layer_scale, "ConvNeXt layer scale initial value"),
        MOEV_FIELD("model.precision", model.precision, "GEMM precision: fp32 or bf16 (mixed)"),
        MOEV_FIELD("moe.num_experts", model.router.num_experts, "experts per MoE layer E"),
        MOEV_FIELD("moe.k", model.router.k, "experts per token K"),
        MOEV_FIELD("moe.capacity", model.router.capacity_factor, "capacity ratio C"),
        MOEV_FIELD("moe.dropless", model.router.dropless, "no capacity limit"),
        MOEV_FIELD("moe.bpr", model.router.bpr, "Batch Priority Routing"),
        MOEV_FIELD("moe.renormalize", model.router.renormalize, "renormalise the K gates"),
        MOEV_FIELD("moe.noise_std", model.router.noise_std, "router noise (std * 1/E)"),
        MOEV_FIELD("moe.group_size", model.router.group_size, "images per routing group"),
        MOEV_FIELD("moe.router_logits", model.router.logits, "router logits: linear | cosine"),
        MOEV_FIELD("moe.cosine_dim", model.router.cosine_dim, "cosine router projection width"),
        MOEV_FIELD("moe.importance_weight", model.aux.importance, "importance loss weight"),
        MOEV_FIELD("moe.load_weight", model.aux.load, "load loss weight"),
        MOEV_FIELD("moe.switch_weight", model.aux.switch_lb, "Switch load-balancing loss weight"),
        MOEV_FIELD("moe.z_weight", model.aux.z, "router z-loss weight"),
        MOEV_FIELD("data.format", data.format, "fashion-mnist | folder | cifar10 | manifest"),
        MOEV_FIELD("data.path", data.path, "dataset directory (folder: training root; manifest: training CSV)"),
        MOEV_FIELD("data.test_path", data.test_path, "folder format: test root; manifest: test CSV"),
        MOEV_FIELD("data.tags", data.tags, "manifest: the tag vocabulary (empty: every tag of the training manifest)"),
        MOEV_FIELD("data.mean", data.mean, "per-channel mean (empty: from training set)"),
        MOEV_FIELD("data.std", data.std, "per-channel std (empty: from training set)"),
        MOEV_FIELD("data.augment", data.augment, "training augmentation: random crop and flip, then AutoAugment and random erasing if set (false: none of them)"),
        MOEV_FIELD("data.crop_padding", data.crop_padding, "random crop padding, pixels"),
        MOEV_FIELD("data.hflip", data.hflip, "random horizontal flip"),
        MOEV_FIELD("data.random_erase", data.random_erase, "probability of erasing one random rectangle per training image"),
        MOEV_FIELD("data.auto_augment", data.auto_augment, "AutoAugment policy after crop and flip: none | imagenet"),
        MOEV_FIELD("data.resize", data.resize, "folder/manifest images of another aspect ratio: stretch | center_crop"),
        MOEV_FIELD("data.train_limit", data.train_limit, "first N training images (0: all)"),
        MOEV_FIELD("data.test_limit", data.test_limit, "first N test images (0: all)"),
        MOEV_FIELD("data.per_class", data.per_class, "train on K images per class, a seeded balanced subset (0: all)"),
        MOEV_FIELD("data.subset_seed", data.subset_seed, "seed of the per_class subset"),
        MOEV_FIELD("train.epochs", train.epochs, "passes over the training set"),
        MOEV_FIELD("train.batch_size", train.batch_size, "batch size B"),
        MOEV_FIELD("train.lr", train.lr, "peak learning rate"),
        MOEV_FIELD("train.min_lr", train.min_lr, "final learning rate of the cosine"),
        MOEV_FIELD("train.warmup_steps", train.warmup_steps, "linear warmup steps"),
        MOEV_FIELD("train.weight_decay", train.weight_decay, "AdamW decoupled weight decay"),
        MOEV_FIELD("train.beta1", train.beta1, "AdamW beta1"),
        MOEV_FIELD("train.beta2", train.beta2, "AdamW beta2"),
        MOEV_FIELD("train.label_smoothing", train.label_smoothing, "label smoothing"),
        MOEV_FIELD("train.cosine_loss", train.cosine_loss, "weight of the cosine loss 1 - cos(target, probs)"),
        MOEV_FIELD("train.mixup_alpha", train.mixup_alpha, "mixup Beta(alpha, alpha) (0: off)"),
        MOEV_FIELD("train.cutmix_alpha", train.cutmix_alpha, "cutmix Beta(alpha, alpha) (0: off)"),
        MOEV_FIELD("train.mix_prob", train.mix_prob, "probability a batch is mixed"),
        MOEV_FIELD("train.mix_switch_prob", train.mix_switch_prob, "probability of cutmix rather than mixup"),
        MOEV_FIELD("train.mix_off_epochs", train.mix_off_epochs, "last epochs without mixup/cutmix"),
        MOEV_FIELD("train.cooldown_epochs", train.cooldown_epochs, "epochs after the cosine at cooldown_lr"),
        MOEV_FIELD("train.cooldown_lr", train.cooldown_lr, "learning rate of the cool-down epochs"),
        MOEV_FIELD("train.teacher", train.teacher,
                   "distillation: teacher checkpoint(s) of the student's architecture; several: an ensemble, probabilities averaged"),
        MOEV_FIELD("train.distill_lambda", train.distill_lambda,
                   "target = lambda * label-smoothed + (1 - lambda) * teacher probs"),
        MOEV_FIELD("train.teacher_on_mix", train.teacher_on_mix,
                   "distillation: the teacher runs on the mixup/cutmix image itself (uncached) rather than its parts"),
        MOEV_FIELD("train.teacher_cache_mb", train.teacher_cache_mb,
                   "distillation: megabytes of cached teacher probabilities (per image and crop/flip); past them, "
                   "new images run the teacher each time (0: no cache)"),
        MOEV_FIELD("train.teacher_other_data", train.teacher_other_data,
                   "distillation: allow a teacher trained on other training images than the student's (default: an "
                   "error, since in a data-efficient run it would pass on labels the student may not see)"),
        MOEV_FIELD("train.diversity_weight", train.diversity_weight, "multi-branch: diversity loss weight"),
        MOEV_FIELD("train.diversity_off_target", train.diversity_off_target,
                   "multi-branch: the diversity loss only over the classes a row's target gives less than 1/L"),
        MOEV_FIELD("train.online_distill", train.online_distill,
                   "multi-branch: weight of online distillation, each branch towards the branches' mean "
                   "(Lan et al. 2018's ONE; 0: off)"),
        MOEV_FIELD("train.online_distill_temperature", train.online_distill_temperature,
                   "multi-branch: softmax temperature of online distillation"),
        MOEV_FIELD("train.branch_views", train.branch_views,
                   "multi-branch: each branch trains on batches of its own (images, order, crops, mixes), "
                   "the shared trunk on all of them (needs train.diversity_weight = 0)"),
        MOEV_FIELD("train.clip_grad_norm", train.clip_grad_norm, "gradient norm clip (0: off)"),
        MOEV_FIELD("train.ema_decay", train.ema_decay,
                   "decay of a weight average (EMA) that eval, predict, analyze, fuse, distillation and init_from use (0: none; e.g. 0.999)"),
        MOEV_FIELD("train.seed", train.seed, "random seed"),
        MOEV_FIELD("train.threads", train.threads, "threads (0: all cores)"),
        MOEV_FIELD("train.replicas", train.replicas,
                   "data-parallel replicas splitting each batch, one per thread (0: one per thread, 1: off)"),
        MOEV_FIELD("train.device", train.device, "cpu | cuda[:N]"),
        MOEV_FIELD("train.out_dir", train.out_dir, "run directory"),
        MOEV_FIELD("train.init_from", train.init_from, "checkpoint whose weights start the run"),
        MOEV_FIELD("train.freeze", train.freeze, "parameters kept fixed: names or module paths, e.g. [\"head\"]"),
        MOEV_FIELD("train.multilabel_loss", train.multilabel_loss, "multi-label data: softmax (over tags) | sigmoid"),
        MOEV_FIELD("train.checkpoint_every", train.checkpoint_every,
                   "steps between checkpoints (0: only at the end, so a killed run cannot resume)"),
        MOEV_FIELD("train.log_every", train.log_every, "steps between log lines (0: none; pretrain: each epoch's end)"),
        MOEV_FIELD("train.max_steps", train.max_steps, "stop after N steps (0: epochs)"),
        MOEV_FIELD("train.minutes", train.minutes,
                   "time budget of the training steps, evaluations excluded; the cosine schedule ends "
                   "with it; train.epochs caps it (0: off)"),
        MOEV_FIELD("train.dist_timeout", train.dist_timeout,
                   "distributed job: seconds a rank waits for the others before failing"),
        MOEV_FIELD("train.expert_parallel", train.expert_parallel,
                   "distributed job: split each MoE layer's experts over the ranks (E divisible by ranks)"),
        MOEV_FIELD("train.eval_each_epoch", train.eval_each_epoch, "test-set eval per epoch"),
        MOEV_FIELD("train.progress", train.progress, "progress bar and per-epoch test lines on stderr (notes print either way; not kept on --resume)"),
    };
    // Fields whose JSON form is a string but whose C++ type is not.
    Field placement;
    placement.key = "model.moe";
    placement.help = "MoE placement: none | every-N | last-N | block list \"3,5\" or [3, 5]";
    placement.set = [](RunConfig& c, const json& v, const std::string& where) {
      const std::string s = placement_text(v, where);
      // An unset shell variable (`--set model.moe=$MOE`) made the model dense without a word.
      MOEV_CHECK(!s.empty(), where, ": model.moe is empty; expected none, every-N, last-N or a block list like 3,5");
      c.model.moe = models::parse_placement(s);
    };
    placement.get = [](const RunConfig& c) { return json(models::to_string(c.model.moe)); };
    Field router;
    router.key = "moe.router";
    router.help = "router kind: topk | expert_choice";
    router.set = [](RunConfig& c, const json& v, const std::string& where) {
      std::string s;
      read_value(v, s, where);
      try {
        c.model.router.kind = moe::parse_router_kind(s);
      } catch (const Error& e) {  // "router kind 'foo'" named neither the key nor the file
        fail(where, ": ", e.what());
      }
    };
    router.get = [](const RunConfig& c) { return json(moe::to_string(c.model.router.kind)); };
    // In their sections, as --help-config lists the keys (they came after every train key).
    const auto first_moe = std::find_if(f.begin(), f.end(), [](const Field& x) { return x.key.rfind("moe.", 0) == 0; });
    f.insert(f.insert(first_moe, placement) + 1, router);
    return f;
  }();
  return kFields;
}

const Field* find_field(const std::string& key) {
  for (const auto& f : fields())
    if (f.key == key) return &f;
  return nullptr;
}

// "; did you mean 'data.augment'?" for an unknown key: the key of that name in another section (train.augment),
// else the nearest by edits, at most two (train.epoch, moe.num_expert); "" when none is near.
std::string did_you_mean(const std::string& key) {
  const auto dot = key.find('.');
  const std::string name = dot == std::string::npos ? key : key.substr(dot + 1);
  auto edits = [](const std::string& a, const std::string& b) {
    std::vector<size_t> row(b.size() + 1);
    for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
    for (size_t i = 1; i <= a.size(); ++i) {
      size_t diagonal = row[0];
      row[0] = i;
      for (size_t j = 1; j <= b.size(); ++j) {
        const size_t up = row[j];
        row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
        diagonal = up;
      }
    }
    return row[b.size()];
  };
  std::string best;
  size_t best_edits = 3;
  for (const auto& f : fields()) {
    if (f.key.substr(f.key.find('.') + 1) == name) return "; did you mean '" + f.key + "'?";
    const size_t d = edits(key, f.key);
    if (d < best_edits) best_edits = d, best = f.key;
  }
  return best.empty() ? "" : "; did you mean '" + best + "'?";
}

// A parser callback refusing JSON nested deeper than toml++ allows TOML (256
// levels): nothing moev reads is that deep, and an error message dumping
// such a value recursed off the stack (200,000 levels: a segfault).
json::parser_callback_t depth_limit(const std::string& source) {
  return [source](int depth, json::parse_event_t, json&) {
    MOEV_CHECK(depth <= 256, source, ": nested deeper than 256 levels; expected a table of sections and values");
    return true;
  };
}

}  // namespace

json read_config_file(const std::string& path) {
  const std::string text = read_text(path, "config file");
  std::string ext = std::filesystem::path(path).extension().string();
  // config.TOML from a case-blind file system is the same file kind.
  std::transform(ext.begin(), ext.end(), ext.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  // A name without an extension (`--config <(...)` is /dev/fd/63) is read by its
  // first character: a JSON config is a table, `{`; TOML cannot start with one.
  const size_t first = text.find_first_not_of(" \t\r\n");
  const bool guess = ext.empty();
  const bool is_json = ext == ".json" || (guess && first != std::string::npos && text[first] == '{');
  MOEV_CHECK(guess || ext == ".toml" || is_json, "config file ", path, ": expected a .toml or .json file (or a ",
             "name without an extension, read as JSON if it starts with '{', else as TOML)");
  if (is_json) {
    // JSON keeps the last of two equal keys in a table; TOML refuses them, and
    // so does this reader, rather than drop the first (a preset, a section).
    std::vector<std::set<std::string>> open;
    std::string twice;
    auto watch = [&, deep = depth_limit("config file " + path)](int depth, json::parse_event_t event, json& parsed) {
      deep(depth, event, parsed);
      if (event == json::parse_event_t::object_start) open.emplace_back();
      if (event == json::parse_event_t::object_end && !open.empty()) open.pop_back();
      if (event == json::parse_event_t::key && twice.empty() && !open.empty() &&
          !open.back().insert(parsed.get<std::string>()).second)
        twice = parsed.get<std::string>();
      return true;
    };
    json j;
    try {
      j = json::parse(text, watch);
    } catch (const json::exception& e) {  // syntax, and numbers out of range (1e400)
      fail("config file ", path, ": invalid JSON: ", e.what());
    }
    MOEV_CHECK(twice.empty(), "config file ", path, ": key '", twice, "' appears twice in one table; expected each ",
               "key once");
    return j;
  }
  try {
    auto table = toml::parse(text, path);
    std::stringstream js;
    js << toml::json_formatter{table};
    return json::parse(js.str());
  } catch (const toml::parse_error& e) {
    fail("config file ", path, ":", e.source().begin.line, ": invalid TOML", guess ? " (no .toml or .json in its name, "
         "and it does not start with '{')" : "", ": ", e.description());
  }
}

void apply_json(RunConfig& cfg, const json& j, const std::string& source) {
  MOEV_CHECK(j.is_object(), source, ": expected a table of sections (model, moe, data, train)");
  // A preset replaces the whole model config, so it goes first.
  if (j.contains("model") && j["model"].is_object() && j["model"].contains("preset")) {
    const auto& p = j["model"]["preset"];
    MOEV_CHECK(p.is_string(), source, ": model.preset: expected a string");
    try {
      cfg.model = models::preset(p.get<std::string>());
    } catch (const Error& e) {  // named the preset, not the file it was in
      fail(source, ": model.preset: ", e.what());
    }
  }
  for (auto& [section, body] : j.items()) {
    // Sections of other commands (moev sweep's grid, moev ablation's rows, moev
    // hardmoe's layout, moev pretrain's options), so one file serves them and
    // the single runs they start; those commands check them.
    if (section == "sweep" || section == "ablation" || section == "hardmoe" || section == "pretrain") continue;
    // An ensemble's file names checkpoints, not a run: given to a run, it was "unknown config key".
    MOEV_CHECK(section != "ensemble", source, ": [ensemble] is an ensemble config's section (moev ensemble --config ",
               source, "); a run's config holds the run's keys (moev train --help-config lists them)");
    MOEV_CHECK(body.is_object(), source, ": '", section, "' must be a table of keys");
    for (auto& [name, value] : body.items()) {
      const std::string key = section + "." + name;
      if (key == "model.preset") continue;
      const Field* f = find_field(key);
      MOEV_CHECK(f != nullptr, source, ": unknown config key '", key, "'", did_you_mean(key),
                 " (moev train --help-config lists the keys)");
      f->set(cfg, value, source + ": " + key);
    }
  }
}

void apply_file(RunConfig& cfg, const std::string& path) {
  apply_json(cfg, read_config_file(path), path);
}

RunConfig load_run_config(const std::string& path) {
  RunConfig cfg;
  apply_file(cfg, path);
  return cfg;
}

json assignment_json(const std::string& assignment) {
  const auto eq = assignment.find('=');
  MOEV_CHECK(eq != std::string::npos && eq > 0, "--set ", assignment,
             ": expected section.key=value, e.g. train.lr=0.001");
  const std::string key = assignment.substr(0, eq), text = assignment.substr(eq + 1);
  const auto dot = key.find('.');
  MOEV_CHECK(dot != std::string::npos, "--set ", assignment, ": key must be section.name");
  json value;
  try {
    value = json::parse(text, depth_limit("--set " + key));
  } catch (const json::parse_error& e) {
    // Bare words are strings (train.device=cpu); a list with a stray comma became a path of that name.
    MOEV_CHECK(text.empty() || (text.front() != '[' && text.front() != '{'), "--set ", key, "=",
               escaped_bytes(text), ": starts as a JSON list or table but does not parse (", e.what(),
               "); expected JSON, e.g. [\"a.pt\", \"b.pt\"]");
    value = text;
  } catch (const json::exception& e) {
    fail("--set ", assignment, ": ", text, " is not a number moev can hold (", e.what(), ")");
  }
  json j;
  j[key.substr(0, dot)][key.substr(dot + 1)] = value;
  return j;
}

void refuse_planned_keys(const json& base, const std::string& source, const char* planner,
                         std::initializer_list<PlannedKey> keys) {
  for (const auto& k : keys)
    MOEV_CHECK(!(base.contains(k.section) && base[k.section].is_object() && base[k.section].contains(k.key)), source,
               ": ", k.section, ".", k.key, ": ", planner, " sets it for each run from ", k.from,
               "; drop it from the config and --set");
}

json override_json(const std::string& assignment) {
  json j = assignment_json(assignment);
  const std::string key = assignment.substr(0, assignment.find('='));
  if (key != "model.preset" && !find_field(key))
    fail("--set: unknown config key '", key, "'", did_you_mean(key), " (moev train --help-config lists the keys)");
  return j;
}

void apply_override(RunConfig& cfg, const std::string& assignment) {
  apply_json(cfg, override_json(assignment), "--set " + assignment);
}

json to_json(const RunConfig& cfg) {
  json j;
  for (const auto& f : fields()) {
    const auto dot = f.key.find('.');
    j[f.key.substr(0, dot)][f.key.substr(dot + 1)] = f.get(cfg);
  }
  return j;
}

std::string to_json_string(const RunConfig& cfg) { return to_json(cfg).dump(2); }

bool same_path(const std::string& x, const std::string& y) {
  std::error_code ex, ey;
  const auto cx = std::filesystem::weakly_canonical(x, ex), cy = std::filesystem::weakly_canonical(y, ey);
  return x == y || (!ex && !ey && cx == cy);
}

std::vector<std::string> config_differences(const RunConfig& was, const RunConfig& now,
                                            const std::set<std::string>& keys) {
  const json a = to_json(was), b = to_json(now);
  // Files named by these keys may be spelled two ways ("data/x/", "./data/x").
  static const std::set<std::string> path_keys = {"data.path", "data.test_path", "train.init_from", "train.teacher"};
  auto same = [](const json& x, const json& y) {
    if (x.is_string() && y.is_string()) return same_path(x.get<std::string>(), y.get<std::string>());
    if (!x.is_array() || !y.is_array() || x.size() != y.size()) return x == y;
    for (size_t i = 0; i < x.size(); ++i)
      if (!x[i].is_string() || !y[i].is_string() || !same_path(x[i].get<std::string>(), y[i].get<std::string>()))
        return false;
    return true;
  };
  std::vector<std::string> out;
  for (const auto& [section, fields] : b.items())
    for (const auto& [field, value] : fields.items()) {
      const std::string key = section + "." + field;
      if ((value.is_array() && value.empty()) || (!keys.empty() && !keys.count(key))) continue;
      const bool known = a.contains(section) && a[section].contains(field);
      if (known && path_keys.count(key) && same(a[section][field], value)) continue;
      const auto old = known ? a[section][field].dump() : "(none)";
      if (old != value.dump()) out.push_back(key + " = " + value.dump() + " (was: " + old + ")");
    }
  return out;
}

RunConfig from_json_string(const std::string& text, const std::string& source) {
  RunConfig cfg;
  json j;
  try {
    j = json::parse(text, depth_limit(source));
  } catch (const json::exception& e) {
    fail(source, ": invalid config JSON: ", e.what());
  }
  apply_json(cfg, j, source);
  // Checkpoints store their config this way. ResNeSt accepted model.precision
  // = bf16 until session 29, while its convolutions ran in fp32 all along: such
  // a run reads as the fp32 run it was, rather than failing to load.
  if (cfg.model.family == "resnest" && cfg.model.precision == "bf16") cfg.model.precision = "fp32";
  return cfg;
}

std::string placement_text(const json& v, const std::string& where) {
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());  // one block: `--moe 5`
  if (v.is_array()) {
    std::string blocks;
    for (const auto& b : v) {
      MOEV_CHECK(b.is_number_integer(), where, ": ", v.dump(), ": expected block indices (integers), got ",
                 type_name(b));
      blocks += (blocks.empty() ? "" : ",") + std::to_string(b.get<int64_t>());
    }
    return blocks;  // [] is "": refused as empty, as the empty string is
  }
  std::string s;
  read_value(v, s, where);
  return s;
}

std::vector<std::pair<std::string, std::string>> config_keys() {
  std::vector<std::pair<std::string, std::string>> out{{"model.preset", "start from a named preset"}};
  for (const auto& f : fields()) out.emplace_back(f.key, f.help);
  return out;
}

}  // namespace moev::io
