#include "moev/hardmoe/partition.h"

#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "moev/cluster/kmeans.h"
#include "moev/core/error.h"
#include "moev/data/batch_loader.h"
#include "moev/hardmoe/hard_moe.h"
#include "moev/io/table.h"
#include "moev/train/checkpoint.h"
#include "moev/train/datasets.h"
#include "moev/train/trained_model.h"
#include "moev/train/trainer.h"
#include "moev/viz/plot.h"
#include "moev/viz/progress_bar.h"

namespace moev::hardmoe {

namespace fs = std::filesystem;
using nlohmann::json;

at::Tensor extract_features(models::Classifier& model, const data::ImageSet& set, const std::vector<float>& mean,
                            const std::vector<float>& std, int64_t batch_size, const c10::Device& device,
                            std::ostream* progress, bool interactive) {
  MOEV_CHECK(batch_size >= 1, "feature extraction: batch size ", batch_size, ": expected >= 1");
  const bool was_training = model.is_training();
  model.eval();
  c10::InferenceMode guard;
  const int64_t n = set.size();
  std::vector<at::Tensor> parts;
  viz::ProgressBar bar(progress, n, "features", "img", interactive);
  for (int64_t i = 0; i < n; i += batch_size) {
    const int64_t b = std::min(batch_size, n - i);
    auto x = data::normalize_images(set.images.narrow(0, i, b), mean, std).to(device);
    parts.push_back(model.embed(x).to(torch::kCPU, torch::kFloat32));
    bar.update(i + b);
  }
  bar.finish();
  model.train(was_training);
  MOEV_CHECK(!parts.empty(), "feature extraction: the data set ", set.source, " is empty");
  return torch::cat(parts);
}

namespace {

std::string partition_csv(const std::string& dir) { return (fs::path(dir) / "partition.csv").string(); }
std::string centroids_file(const std::string& dir) { return (fs::path(dir) / "centroids.pt").string(); }
std::string summary_file(const std::string& dir) { return (fs::path(dir) / "partition.json").string(); }

// A pickled tensor, as torch.save writes one: Python's torch.load reads it back.
void save_tensor_atomic(const at::Tensor& t, const std::string& path) {
  const std::string tmp = path + ".tmp";
  const std::vector<char> bytes = torch::pickle_save(c10::IValue(t));
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    MOEV_CHECK(out.good(), path, ": cannot write ", tmp);
  }
  fs::rename(tmp, path);
}

std::vector<int64_t> read_assignment(const std::string& file, int64_t k) {
  std::ifstream in(file);
  MOEV_CHECK(in, file, ": cannot open (run moev hardmoe cluster first)");
  std::string line;
  // A spreadsheet saves CRLF lines; the CR printed raw left the quote in the message unclosed.
  auto next = [&] {
    if (!std::getline(in, line)) return false;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    return true;
  };
  next();
  MOEV_CHECK(line == "row,expert", file, ":1: expected the header 'row,expert', got '", line, "'");
  std::vector<int64_t> out;
  int64_t lineno = 1;
  while (next()) {
    ++lineno;
    if (line.empty()) continue;
    int64_t row = -1, expert = -1;
    char comma = 0;
    std::istringstream ss(line);
    ss >> row >> comma >> expert;
    MOEV_CHECK(ss && comma == ',' && ss.peek() == EOF, file, ":", lineno, ": expected 'row,expert', got '", line, "'");
    MOEV_CHECK(row == static_cast<int64_t>(out.size()), file, ":", lineno, ": row ", row, " out of order (expected ",
               out.size(), ")");
    MOEV_CHECK(expert >= 0 && expert < k, file, ":", lineno, ": expert ", expert, " outside 0..", k - 1);
    out.push_back(expert);
  }
  return out;
}

}  // namespace

at::Tensor load_centroids(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MOEV_CHECK(in, path, ": missing (run moev hardmoe cluster again)");
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  c10::IValue v;
  try {
    v = torch::pickle_load(bytes);
  } catch (const c10::Error&) {
    fail(path, ": not a pickled tensor (written by moev hardmoe cluster?)");
  }
  MOEV_CHECK(v.isTensor(), path, ": holds no tensor");
  return v.toTensor();
}

Partition read_partition(const std::string& dir) {
  std::ifstream in(summary_file(dir));
  MOEV_CHECK(in, summary_file(dir), ": cannot open (run moev hardmoe cluster first)");
  auto s = json::parse(in, nullptr, false);
  MOEV_CHECK(s.is_object() && s.contains("experts") && s["experts"].is_number_integer(), summary_file(dir),
             ": not a partition summary");
  Partition p;
  p.experts = s["experts"].get<int64_t>();
  p.inertia = s.value("inertia", 0.0);
  p.iterations = s.value("iterations", int64_t{0});
  p.trunk = s.value("trunk", std::string());
  if (!p.trunk.empty() && fs::path(p.trunk).is_relative()) p.trunk = (fs::path(dir) / p.trunk).lexically_normal().string();
  p.trunk_step = s.value("trunk_step", int64_t{-1});  // -1: not recorded (older directories)
  p.trunk_weights = s.value("trunk_weights", std::string());
  p.training_data = s.value("training_data", std::string());
  p.assignment = s.value("assignment", std::string());
  p.expert_of = read_assignment(partition_csv(dir), p.experts);
  MOEV_CHECK(static_cast<int64_t>(p.expert_of.size()) == s.value("images", int64_t{-1}), partition_csv(dir),
             ": ", p.expert_of.size(), " rows, but ", summary_file(dir), " says ", s.value("images", int64_t{-1}));
  // The centroids send each image to an expert by the partition cluster wrote; experts trained on an edited one
  // learned other images than they are sent.
  const std::string now = train::index_fingerprint(p.expert_of);
  MOEV_CHECK(p.assignment.empty() || now == p.assignment, partition_csv(dir), " is not the partition ",
             summary_file(dir), " records (fingerprint ", now, ", recorded ", p.assignment, "): edited or replaced ",
             "since moev hardmoe cluster wrote it, while the centroids still send images by the recorded one; ",
             "put it back, or cluster again into a new hardmoe.dir");
  p.counts.assign(static_cast<size_t>(p.experts), 0);
  for (auto e : p.expert_of) ++p.counts[static_cast<size_t>(e)];
  p.centroids_weights = s.value("centroids_weights", std::string());
  p.centroids = load_centroids(centroids_file(dir));
  MOEV_CHECK(p.centroids.dim() == 2 && p.centroids.size(0) == p.experts, centroids_file(dir), ": expected [",
             p.experts, ", F] centroids, got ", p.centroids.sizes());
  check_centroids(p, p.centroids, centroids_file(dir));
  return p;
}

namespace {
std::string centroids_fingerprint(const at::Tensor& centroids) {
  return train::weights_fingerprint({{"centroids", centroids.to(torch::kFloat32).contiguous()}});
}
}  // namespace

void check_centroids(const Partition& p, const at::Tensor& centroids, const std::string& file) {
  if (p.centroids_weights.empty()) return;
  const std::string now = centroids_fingerprint(centroids);
  MOEV_CHECK(now == p.centroids_weights, file, " are not the centroids partition.json records (fingerprint ", now,
             ", recorded ", p.centroids_weights, "): copied from another clustering, or damaged; put them back, or ",
             "cluster again into a new hardmoe.dir");
}

std::vector<int64_t> partition_rows(const Partition& p, int64_t expert, const std::string& dir) {
  MOEV_CHECK(expert >= 0 && expert < p.experts, "--expert ", expert, ": the partition in ", dir, " has ", p.experts,
             " experts (0..", p.experts - 1, ")");
  std::vector<int64_t> rows;
  for (size_t i = 0; i < p.expert_of.size(); ++i)
    if (p.expert_of[i] == expert) rows.push_back(static_cast<int64_t>(i));
  MOEV_CHECK(!rows.empty(), "expert ", expert, ": its partition in ", dir,
             " is empty (no training image is nearest its centroid); cluster with fewer experts");
  return rows;
}

std::string trained_rows(const std::string& run_dir) {
  const std::string ckpt = train::checkpoint_path(run_dir);
  if (!fs::exists(ckpt)) return "";
  const auto st = json::parse(train::load_checkpoint(ckpt, train::CheckpointLoad::kConfig).state_json, nullptr, false);
  return st.is_object() ? st.value("train_rows", std::string()) : "";
}

void check_expert_rows(const Partition& p, const std::string& dir, int64_t expert) {
  const std::string rows = trained_rows(expert_dir(dir, expert));
  if (rows.empty()) return;
  const std::string given = train::index_fingerprint(partition_rows(p, expert, dir));
  MOEV_CHECK(rows == given, expert_dir(dir, expert), ": expert ", expert, " trained on other images (fingerprint ",
             rows, ") than the partition in ", dir, " gives it (", given, "): copied in from another clustering? ",
             "Delete ", expert_dir(dir, expert), " and train it again (moev hardmoe train-expert --expert ", expert, ")");
}

std::string checked_trunk(const Partition& p, const std::string& dir, const std::string& given) {
  // A directory copied or moved away from its trunk: the trunk named now is taken if it is the same training
  // state, which only a recorded weights fingerprint can tell.
  const bool moved = !fs::exists(p.trunk) && !given.empty() && fs::exists(given) && !p.trunk_weights.empty();
  MOEV_CHECK(moved || fs::exists(p.trunk), summary_file(dir), ": its trunk ", p.trunk, " does not exist",
             given.empty() || p.trunk_weights.empty() ? "" : " (nor does --trunk / hardmoe.trunk " + given + ")",
             "; if the directory or the trunk moved, moev hardmoe cluster --trunk <its checkpoint> --dir ", dir,
             " records its new place (trained experts are kept when their rows are unchanged)");
  MOEV_CHECK(moved || given.empty() || !fs::exists(given) || fs::equivalent(given, p.trunk), "the trunk ", given,
             " is not the one ", dir, " was clustered from (", p.trunk, "): experts must share the gater's trunk");
  const std::string trunk = moved ? given : p.trunk;
  const auto ckpt = train::load_checkpoint(trunk, train::CheckpointLoad::kInference);
  const auto st = json::parse(ckpt.state_json, nullptr, false);
  const int64_t step = st.is_object() ? st.value("step", int64_t{-1}) : -1;
  MOEV_CHECK(p.trunk_step < 0 || step == p.trunk_step, trunk, " is at step ", step, " but ", dir,
             " was clustered from ", p.trunk, " at step ", p.trunk_step,
             moved ? ": not the same trunk" : ": the trunk changed since; cluster again into a new directory");
  const auto weights = train::weights_fingerprint(train::inference_weights(ckpt));
  MOEV_CHECK(p.trunk_weights.empty() || weights == p.trunk_weights, trunk, " holds other weights (fingerprint ",
             weights, ") than ", p.trunk, " when ", dir, " was clustered from it (", p.trunk_weights,
             moved ? "): not the same trunk" : "): the trunk was retrained since; cluster again into a new directory");
  return trunk;
}

Partition cluster_trunk(const HardMoEConfig& c, int64_t batch_size, std::ostream* progress, bool interactive) {
  // Named as the trunk: "checkpoint X: cannot open" did not say that it is the model to train first.
  MOEV_CHECK(fs::exists(c.trunk), "hardmoe.trunk = ", c.trunk, ": no such checkpoint; the trunk is a trained run's ",
             "checkpoint, clustered by its features (train it first: moev train ... --out <dir>, then trunk = ",
             "\"<dir>/checkpoint.pt\")");
  auto trunk = train::load_trained(c.trunk, c10::Device(c10::kCPU));
  MOEV_CHECK(trunk.model->num_branches() == 1, c.trunk, ": model.branches = ", trunk.model->num_branches(),
             ": a hard MoE's trunk is a single-branch model");
  auto ds = train::open_datasets(trunk.cfg.data, trunk.cfg.model, /*load_train=*/true, /*load_test=*/false);
  const int64_t n = ds.train.size();
  MOEV_CHECK(n >= c.experts, "hardmoe.experts = ", c.experts, ": more experts than the ", n, " training images of ",
             ds.train.source);
  auto features = extract_features(*trunk.model, ds.train, ds.mean, ds.std, batch_size, c10::Device(c10::kCPU),
                                   progress, interactive);
  cluster::KMeansOptions ko;
  ko.k = c.experts;
  ko.max_iters = c.kmeans_iters;
  // Lloyd sweeps every point each iteration; past a few hundred thousand
  // images mini-batches reach the same centroids far sooner.
  ko.batch_size = c.kmeans_batch >= 0 ? c.kmeans_batch : (n > 200000 ? 4096 : 0);
  ko.seed = c.seed;
  auto km = cluster::kmeans(features, ko);
  Partition p;
  p.experts = c.experts;
  p.centroids = km.centroids.to(torch::kFloat32).contiguous();
  p.centroids_weights = centroids_fingerprint(p.centroids);
  p.inertia = km.inertia;
  p.iterations = km.iterations;
  p.trunk = fs::absolute(c.trunk).lexically_normal().string();
  p.trunk_step = trunk.step;
  p.training_data = train::data_fingerprint(ds.train);  // rows index these images, in this order
  p.trunk_weights = train::weights_fingerprint(train::inference_weights(train::load_checkpoint(c.trunk, train::CheckpointLoad::kInference)));
  // The gater's rule at inference, applied to the training images too, so an
  // image is trained on by the expert it would be sent to.
  auto assign = cluster::nearest_centroid(features, p.centroids).contiguous();
  p.expert_of.assign(assign.data_ptr<int64_t>(), assign.data_ptr<int64_t>() + n);
  p.counts.assign(static_cast<size_t>(p.experts), 0);
  for (auto e : p.expert_of) ++p.counts[static_cast<size_t>(e)];
  for (int64_t e = 0; e < p.experts; ++e)
    MOEV_CHECK(p.counts[e] > 0, "hardmoe.experts = ", p.experts, ": expert ", e,
               " would get no training image (its centroid is nearest to none); cluster with fewer experts");

  fs::create_directories(c.dir);
  const std::string trunk_rel = fs::relative(p.trunk, fs::absolute(c.dir)).string();
  // Experts trained on another partition would no longer match the gater. Each records its rows; one from
  // before that is judged by the partition.csv it was trained with. Nothing else of the old files is needed, so
  // a directory that lost its centroids (or summary) is mended by clustering again.
  p.assignment = train::index_fingerprint(p.expert_of);
  std::vector<int64_t> old;
  bool old_read = false;
  for (int64_t e = 0; fs::is_directory(expert_dir(c.dir, e)) || e < p.experts; ++e) {
    if (!fs::exists(train::checkpoint_path(expert_dir(c.dir, e)))) continue;
    const std::string rows = trained_rows(expert_dir(c.dir, e));
    bool same = e < p.experts;
    if (same && !rows.empty()) {
      same = rows == train::index_fingerprint(partition_rows(p, e, c.dir));
    } else if (same) {
      if (!old_read) {
        MOEV_CHECK(fs::exists(partition_csv(c.dir)), c.dir, " holds expert ", e, ", which does not record its rows, ",
                   "and no partition.csv to tell which they were; cluster into a new hardmoe.dir, or delete ", c.dir,
                   "'s expert_* directories first");
        old = read_assignment(partition_csv(c.dir), std::numeric_limits<int64_t>::max());
        old_read = true;
      }
      same = old == p.expert_of;
    }
    MOEV_CHECK(same, c.dir, " holds expert ", e, ", trained on another partition than this clustering gives; ",
               "cluster into a new hardmoe.dir, or delete ", c.dir, "'s expert_* directories first");
  }
  std::string csv = "row,expert\n";
  csv.reserve(csv.size() + static_cast<size_t>(n) * 8);
  for (int64_t i = 0; i < n; ++i) csv += std::to_string(i) + "," + std::to_string(p.expert_of[i]) + "\n";
  io::write_text_atomic(partition_csv(c.dir), csv);
  save_tensor_atomic(p.centroids, centroids_file(c.dir));
  // What each expert got: the share of its images that carry each tag (class),
  // as numbers and as a heatmap, to see what the clusters separate.
  auto tags = ds.train.multilabel()
                  ? ds.train.targets
                  : torch::one_hot(ds.train.labels, ds.train.num_classes()).to(torch::kFloat32);
  auto share = torch::zeros({p.experts, tags.size(1)}).index_add_(0, assign, tags);
  share = (share / torch::tensor(p.counts, torch::kFloat32).clamp_min(1).unsqueeze(1)).contiguous();
  viz::HeatmapSpec h;
  h.title = std::to_string(p.experts) + " experts of " + fs::path(c.trunk).string();
  h.xlabel = "tag (cells: share of the expert's training images with it)";
  h.ylabel = "expert";
  h.col_labels = ds.train.class_names;
  for (int64_t e = 0; e < p.experts; ++e) {
    h.row_labels.push_back(std::to_string(e) + " (" + std::to_string(p.counts[e]) + ")");
    auto r = share[e];
    h.values.emplace_back(r.data_ptr<float>(), r.data_ptr<float>() + r.numel());
  }
  h.cell = p.experts > 16 ? 18 : 40;
  h.annotate = h.cell >= 30;
  viz::write_heatmap(h, (fs::path(c.dir) / "partition.png").string());
  json summary{{"experts", p.experts}, {"images", n}, {"counts", p.counts}, {"inertia", p.inertia},
               {"iterations", p.iterations}, {"features", features.size(1)}, {"trunk", trunk_rel},
               {"trunk_step", p.trunk_step}, {"trunk_weights", p.trunk_weights}, {"training_data", p.training_data},
               {"assignment", p.assignment}, {"centroids_weights", p.centroids_weights},
               {"training_set", ds.train.source}, {"seed", c.seed},
               {"tags", ds.train.class_names}, {"tag_share", h.values}};
  io::write_text_atomic(summary_file(c.dir), summary.dump(2) + "\n");
  json model{{"format", kHardMoEFormat}, {"trunk", trunk_rel}, {"experts", p.experts},
             {"centroids", "centroids.pt"}, {"share_decoder", c.share_decoder}};
  io::write_text_atomic(model_file(c.dir), model.dump(2) + "\n");
  return p;
}

}  // namespace moev::hardmoe
