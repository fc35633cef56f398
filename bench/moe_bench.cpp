// moev's speed figures, printed as ratios measured in one run (machines are
// noisy; ratios within one run are not):
//   - fp32 matmul GFLOP/s of this machine (the peak MFU is measured against);
//   - the MoE layer (E=8, K=2, C=1.05) against a dense FFN of the same active
//     FLOPs (D -> K*H -> D on the same tokens);
//   - the MoE layer at E = 4..64 with K = 2 and the same tokens;
//   - capacity 1.05 against 0.5;
//   - training and inference images/s of the tiny V-MoE, the dense tiny ViT,
//     the ConvNeXt with MoE and the three-branch ResNeSt of Sun et al. (batch
//     128), their model FLOP utilisation, and the ratio to the Python
//     (PyTorch eager, same LibTorch 1.13 backend) reference figures.
// Run: ./build/bench/moev_bench [--threads N] [--rounds R] [--quick] [--no-python] [--no-figures] [--min-time S]
//      [--profile preset/precision/train|eval[/dp] [--trace FILE]]
//      [--checkpoint GB DIR]   (a GB checkpoint saved to DIR and loaded in each mode: seconds, memory)
//      [--benchmark_filter=...]
#include <benchmark/benchmark.h>
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/torch.h>

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <fstream>
#include <thread>

#include "moev/models/cost.h"
#include "moev/models/model_config.h"
#include "moev/moe/moe_layer.h"
#include "moev/nn/linear.h"
#include "moev/train/adamw.h"
#include "moev/train/checkpoint.h"
#include "moev/train/losses.h"
#include "moev/train/replicas.h"

namespace {

// The Python (PyTorch eager, same LibTorch 1.13) reference of the speed targets:
// the figures the issues quote for their machine, and bench/python_reference.py,
// which this program runs on the machine it measures (machines differ: the
// quoted ones had AVX-512, some of ours only AVX2).
struct PythonRef {
  const char* preset;
  double quoted_train, quoted_eval;   // images/s quoted in the issues (0: none quoted)
  double target_train, target_eval;   // moev / Python targets (0: none set)
  double train = 0, eval = 0;         // fp32, measured here by python_reference.py (0: not run)
  double train_bf16 = 0, eval_bf16 = 0;  // the same under torch.autocast bf16 (0: not run)
  double peak = 0;                    // fp32 matmul GFLOP/s python_reference.py measured around its fp32 run
};
std::vector<PythonRef> g_python = {{"vmoe-tiny", 175, 550, 2.0, 2.5},
                                   {"convnext-moe-tiny", 430, 1500, 2.0, 2.0},
                                   {"resnest-mb-tiny", 0, 0, 0, 0}};

// ResNeSt's convolutions run in fp32 only (model.precision = bf16 is refused for it).
bool fp32_only(const std::string& preset) { return moev::models::preset(preset).family == "resnest"; }

// Runs python_reference.py with Debian's python3 (which has python3-torch) and
// fills the measured figures, for fp32 and, where the CPU has native bf16,
// bf16 autocast; a missing interpreter or module leaves them 0. Called before
// and after moev's rounds, each figure keeps the faster of the two runs: one
// run of one process moved by up to 40% between bench runs (sessions 12-13),
// and the ratios should not rest on the reference's slow moment.
void run_python_reference(int threads, bool bf16) {
  auto run = [&](const PythonRef& ref, const char* precision, double& best_train, double& best_eval, double* best_peak) {
    double train = 0, eval = 0, peak = 0;
    const std::string cmd = "/usr/bin/python3 " MOEV_SOURCE_DIR "/bench/python_reference.py --model " +
                            std::string(ref.preset) + " --threads " + std::to_string(threads) +
                            " --precision " + precision + " 2>/dev/null";
    FILE* pipe = ::popen(cmd.c_str(), "r");
    if (!pipe) return;
    char line[512] = {0};
    const bool got = std::fgets(line, sizeof line, pipe) != nullptr;
    ::pclose(pipe);
    const char* tr = got ? std::strstr(line, "\"train_img_s\": ") : nullptr;
    const char* ev = got ? std::strstr(line, "\"eval_img_s\": ") : nullptr;
    const char* pk = got ? std::strstr(line, "\"matmul_gflops\": ") : nullptr;
    if (tr && ev) {
      train = std::atof(tr + std::strlen("\"train_img_s\": "));
      eval = std::atof(ev + std::strlen("\"eval_img_s\": "));
    }
    if (pk) peak = std::atof(pk + std::strlen("\"matmul_gflops\": "));
    if (train > 0)
      std::printf("  %s %s: train %.0f img/s, eval %.0f img/s", ref.preset,
                  std::strcmp(precision, "bf16") == 0 ? "bf16 autocast" : precision, train, eval);
    else std::printf("  %s %s: not measured (needs /usr/bin/python3 with python3-torch)", ref.preset, precision);
    if (peak > 0) std::printf(" (matmul %.0f GFLOP/s around the run)", peak);
    std::printf("\n");
    best_train = std::max(best_train, train);
    best_eval = std::max(best_eval, eval);
    if (best_peak) *best_peak = std::max(*best_peak, peak);
  };
  for (auto& ref : g_python) {
    run(ref, "fp32", ref.train, ref.eval, &ref.peak);
    if (bf16 && fp32_only(ref.preset)) std::printf("  %s bf16: not run (moev's ResNeSt is fp32 only)\n", ref.preset);
    else if (bf16) run(ref, "bf16", ref.train_bf16, ref.eval_bf16, nullptr);
  }
}

// The MoE layer's shape in these figures: ViT-S/32-like width, 64 images of 49 tokens.
constexpr int64_t kD = 512, kH = 1024, kTokens = 64 * 49, kTokensPerImage = 49;
bool g_quick = false;

moev::moe::MoELayer make_layer(int64_t E, int64_t K, double C) {
  moev::moe::RouterConfig rc;
  rc.num_experts = E;
  rc.k = K;
  rc.capacity_factor = C;
  auto layer = moev::moe::MoELayer(moev::moe::MoELayerOptions(kD, kH, rc));
  {
    torch::NoGradGuard ng;  // a trained-like router: spread, not uniform
    layer->router_weight.normal_(0, 0.05);
  }
  return layer;
}

// The dense FFN the MoE layer is measured against: the models' own dense MLP
// (nn::mlp), so in inference both run on packed weights with the GELU fused.
at::Tensor dense_ffn(const torch::nn::Linear& fc1, const torch::nn::Linear& fc2, const at::Tensor& x) {
  return moev::nn::mlp(x, fc1->weight, fc1->bias, fc2->weight, fc2->bias, at::kFloat);
}

void BM_Matmul(benchmark::State& state) {
  const int64_t n = state.range(0);
  auto a = torch::randn({n, n}), b = torch::randn({n, n});
  for (auto _ : state) benchmark::DoNotOptimize(torch::mm(a, b));
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * n * n * n, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_DenseFFN(benchmark::State& state) {
  const int64_t K = 2;
  auto fc1 = torch::nn::Linear(kD, K * kH), fc2 = torch::nn::Linear(K * kH, kD);
  auto x = torch::randn({kTokens / kTokensPerImage, kTokensPerImage, kD});
  c10::InferenceMode g;
  for (auto _ : state) benchmark::DoNotOptimize(dense_ffn(fc1, fc2, x));
}

void BM_MoELayer(benchmark::State& state, int64_t E, double C) {
  auto layer = make_layer(E, 2, C);
  layer->eval();
  auto x = torch::randn({kTokens / kTokensPerImage, kTokensPerImage, kD});
  c10::InferenceMode g;
  for (auto _ : state) benchmark::DoNotOptimize(layer->forward(x));
}

void BM_DenseFFNTrain(benchmark::State& state) {
  auto fc1 = torch::nn::Linear(kD, 2 * kH), fc2 = torch::nn::Linear(2 * kH, kD);
  auto x = torch::randn({kTokens / kTokensPerImage, kTokensPerImage, kD}, torch::requires_grad());
  for (auto _ : state) fc2(torch::gelu(fc1(x))).sum().backward();
}

void BM_MoELayerTrain(benchmark::State& state) {
  auto layer = make_layer(8, 2, 1.05);
  layer->train();
  auto x = torch::randn({kTokens / kTokensPerImage, kTokensPerImage, kD}, torch::requires_grad());
  for (auto _ : state) {
    auto y = layer->forward(x).sum();
    (y + layer->aux_loss()).backward();
  }
}

// One training step (forward, loss with aux losses, backward, AdamW update) or
// one inference forward of a tiny preset on a batch of 128, as the trainer and
// evaluator run it: split over `replicas` data-parallel replicas (1: the plain
// model on all threads). A multi-branch model trains as Sun et al.'s: every
// branch against the target plus 0.2 times the diversity loss.
std::function<void()> model_step(const char* preset, const char* precision, bool train, int replicas,
                                 int threads) {
  auto cfg = moev::models::preset(preset);
  cfg.precision = precision;
  torch::manual_seed(0);
  auto model = moev::models::build_model(cfg);
  const int64_t B = 128;
  auto x = torch::randn({B, cfg.channels, cfg.image_size, cfg.image_size});
  auto y = torch::randint(0, cfg.num_classes, {B}, torch::kLong);
  auto reps = std::make_shared<moev::train::Replicas>(model, cfg, replicas, threads);
  const auto sizes = reps->slice_sizes(B, moev::train::slice_multiple(cfg));
  const int n = static_cast<int>(sizes.size());
  const auto xs = x.split_with_sizes(sizes), ys = y.split_with_sizes(sizes);
  if (!train) {
    reps->train(false);
    return [=] {
      c10::InferenceMode g;
      reps->run(n, [&](int r) { benchmark::DoNotOptimize(reps->model(r).forward(xs[r])); });
    };
  }
  reps->train(true);
  std::vector<std::pair<std::string, at::Tensor>> params;
  for (auto& p : model->named_parameters()) params.emplace_back(p.key(), p.value());
  auto opt = std::make_shared<moev::train::AdamW>(params, moev::train::AdamWOptions{});
  return [=] {
    opt->zero_grad();
    reps->clear_grads();
    reps->run(n, [&](int r) {
      at::Tensor loss;
      if (reps->model(r).num_branches() > 1) {
        const auto out = reps->model(r).forward_branches(xs[r]);
        loss = 0.2 * moev::train::diversity_loss(out.logits);
        for (const auto& l : out.logits) loss = loss + torch::cross_entropy_loss(l, ys[r]);
      } else {
        loss = torch::cross_entropy_loss(reps->model(r).forward(xs[r]), ys[r]);
      }
      for (auto& l : reps->moe_layers(r)) loss = loss + l->aux_loss();
      (loss * (double(sizes[r]) / double(B))).backward();
    });
    if (n == 1) opt->step(1e-4, 1.0);
    else opt->step(1e-4, 1.0, reps->replica_grads(),
                   [&](int parts, const std::function<void(int)>& fn) { reps->parallel(parts, fn); }, n);
  };
}

// Milliseconds per call of each function, measured in interleaved rounds: every
// round times a block of calls of each function in turn, and the fastest block
// per function is kept. On a shared, noisy machine slow phases hit all
// functions of a round alike, so ratios of these minima are stable where
// back-to-back means are not. Each block starts with one untimed call: the
// first step after another model ran pays for that model's traces (oneDNN
// primitives evicted from its cache and re-created, caches refilled), which
// a trainer running one model never pays; with blocks of two bf16 training
// steps it had made them read 1.6x slower than a steady run.
std::vector<double> interleaved_min_ms(const std::vector<std::function<void()>>& fns, int rounds,
                                       double block_ms) {
  using clock = std::chrono::steady_clock;
  std::vector<double> best(fns.size(), 1e300);
  std::vector<int64_t> calls(fns.size(), 1);
  for (size_t i = 0; i < fns.size(); ++i) {  // warm up; size the blocks
    const auto t0 = clock::now();
    fns[i]();
    const double ms = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
    calls[i] = std::max<int64_t>(1, static_cast<int64_t>(block_ms / std::max(ms, 1e-3)));
  }
  for (int r = 0; r < rounds; ++r)
    for (size_t i = 0; i < fns.size(); ++i) {
      fns[i]();
      const auto t0 = clock::now();
      for (int64_t c = 0; c < calls[i]; ++c) fns[i]();
      const double ms = std::chrono::duration<double, std::milli>(clock::now() - t0).count();
      best[i] = std::min(best[i], ms / double(calls[i]));
    }
  return best;
}

// This process's resident set, and its peak since the last reset_peak (kB).
int64_t status_kb(const char* field) {
  std::ifstream in("/proc/self/status");
  for (std::string line; std::getline(in, line);)
    if (line.rfind(field, 0) == 0) return std::atoll(line.c_str() + std::strlen(field));
  return -1;
}
void reset_peak() { std::ofstream("/proc/self/clear_refs") << "5"; }

// A checkpoint of a model with gb / 4 GB of fp32 weights in 256 MB tensors,
// AdamW's two moments and a weight average (gb GB in all; past 4 GB the zip
// records need zip64 sizes and offsets), saved to dir and loaded in each
// mode: seconds and memory beyond what the process held, every tensor
// compared. Returns the process's exit code.
int checkpoint_figures(double gb, const std::string& dir) {
  using clock = std::chrono::steady_clock;
  const int64_t floats = static_cast<int64_t>(gb / 4 * (1 << 30) / 4), chunk = int64_t{64} << 20;
  moev::train::Checkpoint c;
  c.config_json = c.state_json = "{}";
  for (int64_t at = 0, i = 0; at < floats; at += chunk, ++i) {
    const auto n = std::min(chunk, floats - at);
    const auto name = "w" + std::to_string(i);
    c.model[name] = torch::randn({n});
    c.optimizer[name + ".m"] = torch::randn({n});
    c.optimizer[name + ".v"] = torch::rand({n});
    c.ema[name] = torch::randn({n});
  }
  c.rng = moev::train::cpu_rng_state();
  const std::string path = dir + "/bench_checkpoint.pt";
  auto bytes = [](const moev::train::Checkpoint& k) {
    double n = 0;
    for (const auto* part : {&k.model, &k.optimizer, &k.ema})
      for (const auto& [name, t] : *part) n += static_cast<double>(t.nbytes());
    return n;
  };
  // Seconds, tensor MB/s and the peak beyond what the process held, of one save or load.
  auto measure = [&](const char* what, const std::function<double()>& f) {
    const auto rss = status_kb("VmRSS:");
    reset_peak();
    const auto t0 = clock::now();
    const double n = f();
    const double s = std::chrono::duration<double>(clock::now() - t0).count();
    std::printf("  %-20s %6.2f GB %6.2f s %6.0f MB/s  peak +%.0f MB\n", what, n / (1 << 30), s, n / s / (1 << 20),
                (status_kb("VmHWM:") - rss) / 1024.0);
  };
  std::printf("checkpoint of %.2f GB (weights %.2f GB, moments, average) in %s\n", gb, gb / 4, dir.c_str());
  try {
    measure("save", [&] {
      moev::train::save_checkpoint(path, c);
      return bytes(c);
    });
    using L = moev::train::CheckpointLoad;
    for (auto [mode, name] : {std::pair{L::kInference, "load for inference"}, std::pair{L::kWeights, "load weights"},
                              std::pair{L::kEverything, "load to resume"}}) {
      moev::train::Checkpoint l;
      measure(name, [&] {
        l = moev::train::load_checkpoint(path, mode);
        return bytes(l);
      });
      auto same = [](const std::map<std::string, at::Tensor>& a, const std::map<std::string, at::Tensor>& b) {
        if (a.size() != b.size()) return false;
        for (const auto& [k, v] : a)
          if (!b.count(k) || !torch::equal(v, b.at(k))) return false;
        return true;
      };
      const bool ok = same(c.ema, l.ema) && (mode == L::kInference ? l.model.empty() : same(c.model, l.model)) &&
                      (mode == L::kEverything ? same(c.optimizer, l.optimizer) : l.optimizer.empty());
      if (!ok) {
        std::fprintf(stderr, "moev_bench: --checkpoint: %s loaded other tensors than were saved\n", name);
        return 1;
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moev_bench: --checkpoint: %s\n", e.what());
    return 1;
  }
  std::remove(path.c_str());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int threads = static_cast<int>(std::thread::hardware_concurrency());
  int rounds = 5;
  bool no_python = false;
  bool no_figures = false;  // only the Google Benchmark cases (for a profiler)
  std::string profile;  // "preset/precision/train|eval[/dp]": run that model step for 20 s (--min-time), nothing else
  std::string trace;    // with --profile: also write LibTorch's op trace of 3 steps (Chrome JSON) to this file
  double min_time_arg = 0;  // seconds per Google Benchmark case (0: 0.3, or 0.01 with --quick)
  double checkpoint_gb = 0;  // with --checkpoint: a checkpoint of this many GB, saved and loaded, nothing else
  std::string checkpoint_dir;
  std::vector<char*> args;
  for (int i = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) { g_quick = true; continue; }
    if (std::strcmp(argv[i], "--no-python") == 0) { no_python = true; continue; }
    if (std::strcmp(argv[i], "--no-figures") == 0) { no_figures = true; continue; }
    if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) { threads = std::atoi(argv[++i]); continue; }
    if (std::strcmp(argv[i], "--profile") == 0 && i + 1 < argc) { profile = argv[++i]; continue; }
    if (std::strcmp(argv[i], "--trace") == 0 && i + 1 < argc) { trace = argv[++i]; continue; }
    if (std::strcmp(argv[i], "--checkpoint") == 0 && i + 2 < argc) {
      checkpoint_gb = std::atof(argv[++i]);
      checkpoint_dir = argv[++i];
      continue;
    }
    if (std::strcmp(argv[i], "--min-time") == 0 && i + 1 < argc) { min_time_arg = std::atof(argv[++i]); continue; }
    if (std::strcmp(argv[i], "--rounds") == 0 && i + 1 < argc) { rounds = std::max(1, std::atoi(argv[++i])); continue; }
    args.push_back(argv[i]);
  }
  at::set_num_threads(threads);
  std::printf("moev_bench: %d thread(s)\n", at::get_num_threads());
  if (!checkpoint_dir.empty()) {
    if (!(checkpoint_gb > 0)) {
      std::fprintf(stderr, "moev_bench: --checkpoint expects a size in GB above 0 and a directory\n");
      return 2;
    }
    return checkpoint_figures(checkpoint_gb, checkpoint_dir);
  }
  if (!profile.empty()) {  // one model step in a loop, for perf record
    char preset[64] = {0}, prec[16] = {0}, mode[16] = {0}, dp[8] = {0};
    if (std::sscanf(profile.c_str(), "%63[^/]/%15[^/]/%15[^/]/%7s", preset, prec, mode, dp) < 3) {
      std::fprintf(stderr, "moev_bench: --profile expects preset/precision/train|eval[/dp], got '%s'\n", profile.c_str());
      return 2;
    }
    const bool train = std::strcmp(mode, "train") == 0;
    std::function<void()> step;
    try {
      step = model_step(preset, prec, train, dp[0] ? threads : 1, threads);
    } catch (const std::exception& e) {  // an unknown preset, ResNeSt in bf16...
      std::fprintf(stderr, "moev_bench: --profile %s: %s\n", profile.c_str(), e.what());
      return 2;
    }
    using clock = std::chrono::steady_clock;
    step();
    if (!trace.empty()) {  // the ops LibTorch runs (perf cannot name them: its library is stripped)
      torch::autograd::profiler::RecordProfile guard(trace);
      for (int i = 0; i < 3; ++i) step();
    }
    int64_t calls = 0;
    const auto t0 = clock::now();
    const double seconds = min_time_arg > 0 ? min_time_arg : 20.0;
    while (std::chrono::duration<double>(clock::now() - t0).count() < seconds) { step(); ++calls; }
    const double s = std::chrono::duration<double>(clock::now() - t0).count();
    std::printf("%s: %.1f img/s (%lld steps of 128)\n", profile.c_str(), 128.0 * calls / s, (long long)calls);
    return 0;
  }

  // Part 1: the individual kernels as Google Benchmark cases (--benchmark_filter
  // selects; --benchmark_filter=none skips them).
  const double min_time = min_time_arg > 0 ? min_time_arg : g_quick ? 0.01 : 0.3;
  benchmark::RegisterBenchmark("matmul", BM_Matmul)->Arg(g_quick ? 128 : 1024)->Unit(benchmark::kMillisecond)->MinTime(min_time);
  benchmark::RegisterBenchmark("dense_ffn", BM_DenseFFN)->Unit(benchmark::kMillisecond)->MinTime(min_time);
  for (int64_t E : {4, 8, 16, 32, 64})
    benchmark::RegisterBenchmark(("moe/E" + std::to_string(E) + "/C105").c_str(), BM_MoELayer, E, 1.05)
        ->Unit(benchmark::kMillisecond)->MinTime(min_time);
  benchmark::RegisterBenchmark("moe/E8/C050", BM_MoELayer, 8, 0.5)->Unit(benchmark::kMillisecond)->MinTime(min_time);
  benchmark::RegisterBenchmark("dense_ffn_train", BM_DenseFFNTrain)->Unit(benchmark::kMillisecond)->MinTime(min_time);
  benchmark::RegisterBenchmark("moe_train/E8/C105", BM_MoELayerTrain)->Unit(benchmark::kMillisecond)->MinTime(min_time);
  int bargc = static_cast<int>(args.size());
  benchmark::Initialize(&bargc, args.data());
  benchmark::RunSpecifiedBenchmarks();
  if (no_figures) return 0;

  // Part 2: the figures, every one from the same interleaved rounds.
  std::vector<std::string> names;
  std::vector<std::function<void()>> fns;
  auto add = [&](std::string name, std::function<void()> f) {
    names.push_back(std::move(name));
    fns.push_back(std::move(f));
  };
  const int64_t n = g_quick ? 128 : 1024;
  auto ma = torch::randn({n, n}), mb = torch::randn({n, n});
  add("matmul", [=] { benchmark::DoNotOptimize(torch::mm(ma, mb)); });
  const auto x = torch::randn({kTokens / kTokensPerImage, kTokensPerImage, kD});
  {
    auto fc1 = torch::nn::Linear(kD, 2 * kH), fc2 = torch::nn::Linear(2 * kH, kD);
    add("dense", [=]() mutable {
      c10::InferenceMode g;
      benchmark::DoNotOptimize(dense_ffn(fc1, fc2, x));
    });
    const auto xg = x.clone().requires_grad_();
    add("dense_train", [=]() mutable { fc2(torch::gelu(fc1(xg))).sum().backward(); });
  }
  for (auto [E, C] : std::vector<std::pair<int64_t, double>>{{4, 1.05}, {8, 1.05}, {16, 1.05}, {32, 1.05}, {64, 1.05}, {8, 0.5}}) {
    auto layer = make_layer(E, 2, C);
    layer->eval();
    add("moe/E" + std::to_string(E) + (C < 1 ? "/C050" : "/C105"), [=]() mutable {
      c10::InferenceMode g;
      benchmark::DoNotOptimize(layer->forward(x));
    });
  }
  {
    auto layer = make_layer(8, 2, 1.05);
    layer->train();
    const auto xg = x.clone().requires_grad_();
    add("moe_train", [=]() mutable {
      auto y = layer->forward(xg).sum();  // before aux_loss(): it reads this forward's routing
      (y + layer->aux_loss()).backward();
    });
  }
  const std::vector<const char*> presets = {"vmoe-tiny", "vit-tiny", "convnext-moe-tiny", "resnest-mb-tiny"};
  // /dp: one data-parallel replica per thread (what `moev train` and `moev eval`
  // do by default); without: one model over all threads.
  const int dp = std::max(1, threads);
  // bf16 only where the CPU multiplies it natively: elsewhere model.precision =
  // bf16 runs fp32 GEMMs (nn::parse_precision), and its rows would repeat fp32's.
  std::vector<const char*> precisions{"fp32"};
  if (moev::nn::native_bf16()) precisions.push_back("bf16");
  if (!g_quick)
    for (const char* prec : precisions)
      for (const char* p : presets)
        for (bool train : {true, false}) {
          if (std::strcmp(prec, "fp32") != 0 && fp32_only(p)) continue;
          const std::string name = std::string(p) + "/" + prec + (train ? "/train" : "/eval");
          add(name, model_step(p, prec, train, 1, threads));
          if (dp > 1) add(name + "/dp", model_step(p, prec, train, dp, threads));
        }
  if (!g_quick && !no_python) {
    std::printf("\nPython reference: bench/python_reference.py...\n");
    run_python_reference(threads, moev::nn::native_bf16());
  }
  std::printf("\nfigures: %d interleaved rounds of %zu cases, fastest round kept...\n", g_quick ? 1 : rounds, fns.size());
  const auto ms = interleaved_min_ms(fns, g_quick ? 1 : rounds, g_quick ? 1.0 : 300.0);
  if (!g_quick && !no_python) {
    std::printf("\nPython reference again, after the rounds:\n");
    run_python_reference(threads, moev::nn::native_bf16());
    std::printf("kept, the faster of the two runs per figure:\n");
    for (const auto& ref : g_python) {
      if (ref.train > 0)
        std::printf("  %s fp32: train %.0f img/s, eval %.0f img/s (matmul %.0f GFLOP/s)\n", ref.preset, ref.train,
                    ref.eval, ref.peak);
      if (ref.train_bf16 > 0)
        std::printf("  %s bf16 autocast: train %.0f img/s, eval %.0f img/s\n", ref.preset, ref.train_bf16, ref.eval_bf16);
    }
  }
  std::map<std::string, double> t;
  for (size_t i = 0; i < names.size(); ++i) t[names[i]] = ms[i];

  const double peak = 2.0 * double(n) * double(n) * double(n) / (t["matmul"] * 1e-3) / 1e9;
  std::printf("\n== moev figures (one run, %d threads) ==\n", at::get_num_threads());
  std::printf("fp32 matmul peak (%lld^3): %.1f GFLOP/s\n", (long long)n, peak);
  const double dense = t["dense"], e8 = t["moe/E8/C105"];
  std::printf("MoE layer (D=%lld, H=%lld, %lld tokens, E=8, K=2, C=1.05) / dense FFN same active FLOPs: %.2fx  (target <= 1.30)\n",
              (long long)kD, (long long)kH, (long long)kTokens, e8 / dense);
  std::printf("  training (fwd+bwd) MoE / dense: %.2fx\n", t["moe_train"] / t["dense_train"]);
  std::printf("MoE time by E (K=2, C=1.05):");
  double tmin = 1e300, tmax = 0;
  for (int E : {4, 8, 16, 32, 64}) {
    const double v = t["moe/E" + std::to_string(E) + "/C105"];
    tmin = std::min(tmin, v);
    tmax = std::max(tmax, v);
    std::printf(" E%d %.2fms", E, v);
  }
  std::printf("\n  E=64 / E=4: %.2fx, max/min over E: %.2fx  (target <= 1.25)\n", t["moe/E64/C105"] / t["moe/E4/C105"],
              tmax / tmin);
  std::printf("capacity 1.05 / 0.5 time: %.2fx faster at 0.5  (target >= 1.6)\n", e8 / t["moe/E8/C050"]);
  if (!g_quick) {
    // MFU is against the fp32 peak for both precisions; bf16 GEMMs run at about
    // twice that peak here, so bf16 figures can pass 100% in principle.
    if (!moev::nn::native_bf16())
      std::printf("bf16: this CPU has no native bf16 dot products (AVX512_BF16 or AMX); bf16 rows skipped\n");
    for (const char* prec : precisions)
      for (const char* p : presets) {
        const double f = moev::models::model_cost(moev::models::preset(p)).flops;
        for (const std::string mode : {"", "/dp"}) {
          const std::string name = std::string(p) + "/" + prec;
          if (!t.count(name + "/train" + mode)) continue;
          const double tr = 128.0 / (t[name + "/train" + mode] * 1e-3);
          const double ev = 128.0 / (t[name + "/eval" + mode] * 1e-3);
          std::printf("%s %s (batch 128, %s): train %.0f img/s (fp32 MFU %.0f%%), eval %.0f img/s (fp32 MFU %.0f%%)\n",
                      p, prec, mode.empty() ? "one model" : "one replica per thread", tr,
                      100 * 3 * f * tr / (peak * 1e9), ev, 100 * f * ev / (peak * 1e9));
          for (const auto& ref : g_python) {
            if (std::string(p) != ref.preset) continue;
            auto target = [](double v) { return v > 0 ? " (target >= " + std::to_string(v).substr(0, 3) + ")" : std::string(); };
            if (ref.train > 0)
              std::printf("  vs Python eager fp32 measured here (%.0f train, %.0f eval img/s): train %.2fx%s, eval %.2fx%s\n",
                          ref.train, ref.eval, tr / ref.train, target(ref.target_train).c_str(), ev / ref.eval,
                          target(ref.target_eval).c_str());
            // Python runs in a separate process before the interleaved rounds, so
            // a slow or fast phase of the machine can fall on one side only:
            // each side's images/s per GFLOP/s of the matmul peak it measured
            // at the time takes the phase out (both are OpenBLAS's sgemm).
            if (ref.train > 0 && ref.peak > 0)
              std::printf("  the same per GFLOP/s of each side's own matmul peak (moev %.0f, Python %.0f GFLOP/s): train %.2fx, eval %.2fx\n",
                          peak, ref.peak, (tr / peak) / (ref.train / ref.peak), (ev / peak) / (ref.eval / ref.peak));
            // Like against like: moev bf16 against Python's bf16 autocast, and
            // against the faster of Python's two precisions (what a user would pick).
            if (std::string(prec) == "bf16" && ref.train_bf16 > 0) {
              const double best_tr = std::max(ref.train, ref.train_bf16), best_ev = std::max(ref.eval, ref.eval_bf16);
              std::printf("  vs Python eager bf16 autocast measured here (%.0f train, %.0f eval img/s): train %.2fx, eval %.2fx; vs Python's faster precision: train %.2fx, eval %.2fx\n",
                          ref.train_bf16, ref.eval_bf16, tr / ref.train_bf16, ev / ref.eval_bf16, tr / best_tr, ev / best_ev);
            }
            if (ref.quoted_train > 0)
              std::printf("  vs Python figures quoted in the issues (%.0f train, %.0f eval img/s): train %.2fx, eval %.2fx\n",
                          ref.quoted_train, ref.quoted_eval, tr / ref.quoted_train, ev / ref.quoted_eval);
          }
        }
      }
  }
  return 0;
}
