#include "moev/train/teacher.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <sstream>
#include <system_error>
#include <utility>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "moev/core/error.h"
#include "moev/train/checkpoint.h"
#include "moev/train/datasets.h"
#include "moev/train/trained_model.h"

namespace moev::train {

namespace fs = std::filesystem;

namespace {
constexpr int64_t kTeacherChunk = 32;  // rows per teacher forward

// The "key X vs Y, ..." list both checks below put into their errors, so a
// refused teacher is explained field by field in one format.
class Differences {
 public:
  void add(const std::string& key, const nlohmann::json& x, const nlohmann::json& y) {
    if (x != y) item(key + " " + x.dump() + " vs " + y.dump());
  }
  void item(const std::string& text) {
    if (out_.tellp() > 0) out_ << ", ";
    out_ << text;
  }
  std::string str() const { return out_.str(); }

 private:
  std::ostringstream out_;
};

// Where a config's test images come from: a folder's or a manifest's
// data.test_path, the other formats' data.path (their test files). A folder
// run without data.test_path (refused since session 41; older checkpoints
// have it) is compared by its training root, where such runs took their "test".
std::pair<const char*, std::string> test_source(const DataConfig& d) {
  if (d.format == "manifest") return {"test_path", d.test_path};
  if (d.format == "folder" && !d.test_path.empty()) return {"test_path", d.test_path};
  return {"path", d.path};
}
}  // namespace

std::string architecture_difference(const models::ModelConfig& a, const models::ModelConfig& b) {
  // What decides the network's shape; drop rates, precision and routing noise do not.
  static const char* kKeys[] = {"family", "image_size", "channels", "num_classes", "patch", "stem_channels",
                                "width", "depth", "heads", "mlp_dim", "dims", "depths", "branches",
                                "shared_stages", "radix", "cardinality", "blur_pool"};
  io::RunConfig ra, rb;
  ra.model = a;
  rb.model = b;
  const auto ja = io::to_json(ra)["model"], jb = io::to_json(rb)["model"];
  Differences out;
  // Another family differs in everything: its fields (a ViT's patch and heads, ResNeSt's radix) were listed too.
  if (a.family != b.family) {
    out.add("model.family", a.family, b.family);
    return out.str();
  }
  for (const char* k : kKeys)
    if (ja.contains(k) && jb.contains(k)) out.add(std::string("model.") + k, ja[k], jb[k]);
  if (models::to_string(a.moe) != models::to_string(b.moe) ||
      (a.moe.kind != "none" && a.router.num_experts != b.router.num_experts)) {
    out.item("model.moe " + models::to_string(a.moe) + " (E " + std::to_string(a.router.num_experts) + ") vs " +
             models::to_string(b.moe) + " (E " + std::to_string(b.router.num_experts) + ")");
  }
  return out.str();
}

std::string training_data_difference(const DataConfig& a, const DataConfig& b) {
  Differences out;
  auto add = [&](const char* key, const auto& x, const auto& y) { out.add(std::string("data.") + key, x, y); };
  add("format", a.format, b.format);
  if (!io::same_path(a.path, b.path)) add("path", a.path, b.path);
  add("train_limit", a.train_limit, b.train_limit);
  add("per_class", a.per_class, b.per_class);
  if (a.per_class > 0 && b.per_class > 0) add("subset_seed", a.subset_seed, b.subset_seed);
  return out.str();
}

std::string test_data_difference(const DataConfig& a, const DataConfig& b) {
  Differences out;
  out.add("data.format", a.format, b.format);
  const auto ta = test_source(a), tb = test_source(b);
  if (!io::same_path(ta.second, tb.second)) {
    // "data.path "a" vs "b"", or "data.test_path "a" vs data.path "b"" when they are read from other keys.
    const std::string other = ta.first == tb.first ? "" : "data." + std::string(tb.first) + " ";
    out.item("data." + std::string(ta.first) + " " + nlohmann::json(ta.second).dump() + " vs " + other +
             nlohmann::json(tb.second).dump());
  }
  if (a.format == "manifest" && b.format == "manifest") out.add("data.tags", a.tags, b.tags);
  return out.str();
}

Teacher::Teacher(const std::vector<std::string>& checkpoints, const models::ModelConfig& student,
                 const std::vector<float>& mean, const std::vector<float>& std, const DataConfig* student_data,
                 const std::vector<std::string>& student_classes) {
  MOEV_CHECK(!checkpoints.empty(), "train.teacher: no checkpoint given");
  // Twice in the list, a member counted double in the average without a word.
  for (size_t i = 0; i < checkpoints.size(); ++i)
    for (size_t j = i + 1; j < checkpoints.size(); ++j)
      MOEV_CHECK(!io::same_path(checkpoints[i], checkpoints[j]), "train.teacher lists ", checkpoints[j],
                 " twice (as ", nlohmann::json(checkpoints[i]).dump(), " and ", nlohmann::json(checkpoints[j]).dump(),
                 "); expected each member once (the ensemble averages its members' probabilities equally)");
  classes_ = student.num_classes;
  for (const auto& checkpoint : checkpoints) {
    // Named as the teacher: a relative path is the working directory's, which a resume from elsewhere changes.
    std::error_code ec;
    MOEV_CHECK(fs::exists(checkpoint, ec), "train.teacher = ", checkpoint, ": no such file",
               fs::path(checkpoint).is_relative()
                   ? " (a relative path is read from the working directory, " + fs::current_path(ec).string() + ")"
                   : "");
    auto t = load_trained(checkpoint, c10::Device(c10::kCPU));
    if (!t.unfinished.empty()) notes_.push_back("train.teacher: " + t.unfinished);
    const auto diff = architecture_difference(t.cfg.model, student);
    MOEV_CHECK(diff.empty(), "train.teacher = ", checkpoint, ": the teacher is not a model of the student's ",
               "architecture (", diff, "); distillation expects a teacher of the same architecture");
    if (student_data) {
      const auto data_diff = training_data_difference(t.cfg.data, *student_data);
      MOEV_CHECK(data_diff.empty(), "train.teacher = ", checkpoint, ": the teacher was trained on other images than ",
                 "the student (", data_diff, "); its probabilities would pass on labels the student does not see. ",
                 "Train the teacher on the student's images, or set train.teacher_other_data = true if that is meant");
    }
    // x_teacher = (x * std_s + mean_s - mean_t) / std_t, per channel.
    const auto& tm = t.cfg.data.mean;
    const auto& ts = t.cfg.data.std;
    MOEV_CHECK(tm.size() == mean.size() && ts.size() == std.size(), "train.teacher = ", checkpoint,
               ": its normalisation has ", tm.size(), " channel(s), the student's ", mean.size());
    std::vector<float> scale, shift;
    for (size_t c = 0; c < mean.size(); ++c) {
      scale.push_back(std[c] / ts[c]);
      shift.push_back((mean[c] - tm[c]) / ts[c]);
    }
    // Matched by position, a folder-trained teacher (classes in folder order) taught an IDX-trained student
    // permuted targets at exit 0; one of other classes passed whenever the count agreed.
    at::Tensor columns;
    if (t.class_names_stored && !student_classes.empty() && t.class_names != student_classes) {
      std::vector<int64_t> at(student_classes.size());
      for (size_t c = 0; c < at.size(); ++c) {
        const auto it = find_class(t.class_names, student_classes[c], "train.teacher = " + checkpoint,
                                   "the student's training set");
        MOEV_CHECK(it != t.class_names.end(), "train.teacher = ", checkpoint, ": the teacher has no class '",
                   student_classes[c], "', which the student's training set has; expected a teacher of the ",
                   "student's classes (train.teacher_other_data allows other images, not other classes)");
        at[c] = static_cast<int64_t>(it - t.class_names.begin());
      }
      columns = torch::tensor(at, torch::kLong);
    }
    const auto C = static_cast<int64_t>(mean.size());
    t.model->eval();
    fingerprint_ += (fingerprint_.empty() ? "" : "+") + weights_fingerprint(module_tensors(*t.model));
    members_.push_back({t.model, torch::tensor(scale).view({1, C, 1, 1}), torch::tensor(shift).view({1, C, 1, 1}),
                        columns});
  }
}

at::Tensor Teacher::probs(const at::Tensor& x, const at::Tensor& index, const at::Tensor& aug, int64_t n_aug) {
  const int64_t B = x.size(0);
  const auto idx = index.contiguous(), ag = aug.contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const int64_t* ap = ag.data_ptr<int64_t>();
  // Rows with aug < 0 (AutoAugment, erasing) have no key: they run every time.
  std::vector<int64_t> missing, fresh(static_cast<size_t>(B), -1);  // fresh: row in p, or -1
  for (int64_t i = 0; i < B; ++i)
    if (ap[i] < 0 || !rows_.count(ip[i] * n_aug + ap[i])) missing.push_back(i);
  at::Tensor p;
  if (!missing.empty()) {
    auto rows = torch::tensor(missing, torch::kInt64);
    p = forward_chunks(x.index_select(0, rows).to(torch::kCPU));
    const float* pp = p.data_ptr<float>();
    for (size_t j = 0; j < missing.size(); ++j) {
      fresh[missing[j]] = static_cast<int64_t>(j);
      if (ap[missing[j]] < 0) continue;
      const int64_t key = ip[missing[j]] * n_aug + ap[missing[j]];
      if (cache_full() || rows_.count(key)) continue;  // full, or the same image twice in one batch
      // Chunks of fixed size, never moved: a vector grown by doubling would
      // hold 1.5x the limit while it copies.
      const auto row = static_cast<int64_t>(rows_.size());
      if (row % kCacheChunkRows == 0) chunks_.emplace_back().reserve(static_cast<size_t>(kCacheChunkRows * classes_));
      chunks_.back().insert(chunks_.back().end(), pp + j * classes_, pp + (j + 1) * classes_);
      rows_[key] = row;
    }
  }
  auto out = torch::empty({B, classes_}, torch::kFloat);
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < B; ++i) {
    const float* src = fresh[i] >= 0 ? p.data_ptr<float>() + fresh[i] * classes_
                                     : cached_row(rows_.at(ip[i] * n_aug + ap[i]));
    std::copy(src, src + classes_, op + i * classes_);
  }
  return out.to(x.device());
}

void Teacher::limit_cache(double megabytes) {
  MOEV_CHECK(std::isfinite(megabytes) && megabytes >= 0, "teacher cache of ", megabytes,
             " MB: expected >= 0 (0: no cache)");
  // A key costs its probabilities plus an unordered_map node and bucket (~64 bytes).
  const double per_key = double(classes_) * sizeof(float) + 64.0;
  max_rows_ = static_cast<int64_t>(std::min(megabytes * 1024.0 * 1024.0 / per_key, 9e18));
}

std::pair<at::Tensor, at::Tensor> Teacher::cache_tensors() const {
  const int64_t R = cached();
  auto keys = torch::empty({R}, torch::kInt64);
  auto probs = torch::empty({R, classes_}, torch::kFloat);
  int64_t* kp = keys.data_ptr<int64_t>();
  for (const auto& [key, row] : rows_) kp[row] = key;
  float* pp = probs.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) std::copy(cached_row(r), cached_row(r) + classes_, pp + r * classes_);
  return {keys, probs};
}

void Teacher::restore_cache(const at::Tensor& keys, const at::Tensor& probs, const std::string& source) {
  MOEV_CHECK(rows_.empty(), "restore_cache: the cache is not empty");
  MOEV_CHECK(keys.dim() == 1 && keys.scalar_type() == torch::kInt64 && probs.dim() == 2 &&
                 probs.scalar_type() == torch::kFloat && probs.size(0) == keys.size(0) && probs.size(1) == classes_,
             source, ": the teacher's cache holds keys ", keys.sizes(), " and probabilities ", probs.sizes(),
             "; expected [R] and [R, ", classes_, "]");
  const auto k = keys.contiguous();
  const auto p = probs.contiguous();
  const int64_t* kp = k.data_ptr<int64_t>();
  const float* pp = p.data_ptr<float>();
  for (int64_t r = 0; r < k.size(0) && !cache_full(); ++r) {
    const auto row = static_cast<int64_t>(rows_.size());
    if (row % kCacheChunkRows == 0) chunks_.emplace_back().reserve(static_cast<size_t>(kCacheChunkRows * classes_));
    chunks_.back().insert(chunks_.back().end(), pp + r * classes_, pp + (r + 1) * classes_);
    MOEV_CHECK(rows_.emplace(kp[r], row).second, source, ": the teacher's cache holds key ", kp[r], " twice");
  }
}

at::Tensor Teacher::probs_uncached(const at::Tensor& x) {
  return forward_chunks(x.to(torch::kCPU)).to(x.device());
}

at::Tensor Teacher::forward_chunks(const at::Tensor& x) {
  torch::NoGradGuard ng;
  // Fixed-size chunks, the last one padded: BLAS and oneDNN choose kernels
  // (and so summation orders) by batch size, and a cached probability must
  // not depend on which other images happened to miss the cache with it, or
  // a resumed run, whose cache refills from other batches, would differ.
  const int64_t M = x.size(0);
  std::vector<at::Tensor> parts;
  for (int64_t c0 = 0; c0 < M; c0 += kTeacherChunk) {
    const int64_t n = std::min(kTeacherChunk, M - c0);
    auto chunk = x.narrow(0, c0, n);
    if (n < kTeacherChunk)
      chunk = torch::cat({chunk, torch::zeros({kTeacherChunk - n, x.size(1), x.size(2), x.size(3)})});
    at::Tensor sum;
    for (const auto& m : members_) {
      auto p = torch::softmax(m.model->forward(chunk * m.scale + m.shift), 1);
      if (m.columns.defined()) p = p.index_select(1, m.columns);
      sum = sum.defined() ? sum + p : p;
    }
    parts.push_back((sum / static_cast<double>(members_.size())).narrow(0, 0, n));
  }
  images_run_ += M;
  return torch::cat(parts).contiguous();
}

}  // namespace moev::train
